"""The workdir lock: one holder at a time, named to the others, and gone with its process."""

import os
import signal
import subprocess
import sys

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
