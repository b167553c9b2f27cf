"""The workdir lock: one holder at a time, named to the others, and gone with its process."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading

import pytest

from simclr_jax import workdir_lock

# Holds the lock on the workdir argv[1], says so, then sleeps until killed.
HOLDER = """
import sys, time
from simclr_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    workdir = str(tmp_path / "run")
    assert workdir_lock.holder(workdir) is None
    assert not os.path.exists(workdir)  # asking creates nothing
    with workdir_lock.hold(workdir):
        assert workdir_lock.holder(workdir).startswith(f"pid {os.getpid()} on ")
        with pytest.raises(workdir_lock.WorkdirInUseError) as refused, workdir_lock.hold(workdir):
            pytest.fail("two holders at once")
        message = str(refused.value)
        assert f"workdir {workdir} is in use by pid {os.getpid()} on " in message
        assert "\n" not in message
    assert workdir_lock.holder(workdir) is None
    with workdir_lock.hold(workdir):  # released: free to take again
        pass


def test_a_killed_holder_leaves_the_workdir_free(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        assert workdir_lock.holder(workdir).startswith(f"pid {holder.pid} on ")
        refused = pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {holder.pid} ")
        with refused, workdir_lock.hold(workdir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert workdir_lock.holder(workdir) is None  # no stale lock after kill -9
    with workdir_lock.hold(workdir):
        assert workdir_lock.holder(workdir).startswith(f"pid {os.getpid()} ")


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    refused = pytest.raises(workdir_lock.WorkdirError, match=r"cannot use .*a_file/run as")
    with refused, workdir_lock.hold(str(blocker / "run")):
        pass


def test_a_holder_query_at_that_instant_does_not_refuse_the_run(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lock.LOCK_FILE).touch()
    # What holder(), run by an evaluation, holds for an instant: a shared lock.
    query = os.open(workdir / workdir_lock.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(query, fcntl.LOCK_SH)
    threading.Timer(0.2, os.close, [query]).start()
    with workdir_lock.hold(str(workdir)):
        assert workdir_lock.holder(str(workdir)).startswith(f"pid {os.getpid()} ")


def test_a_file_system_without_flock_is_named_with_the_lock_file(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    workdir = tmp_path / "run"
    with pytest.raises(workdir_lock.WorkdirError) as refused, workdir_lock.hold(str(workdir)):
        pytest.fail("locked without a lock")
    assert type(refused.value) is workdir_lock.WorkdirError  # not "in use"
    message = str(refused.value)
    assert message.startswith(
        f"cannot lock {workdir / 'lock'} ({os.strerror(errno.ENOLCK)}): its file system"
    )
    assert "choose a --workdir on another file system" in message and "\n" not in message
