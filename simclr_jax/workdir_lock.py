"""One training process per workdir: an advisory lock on ``WORKDIR/lock``.

The lock is ``flock(2)`` on that file, held while the process holds the file open: the kernel
releases it when the process ends, however it ends (a crash or ``kill -9`` included), so a
dead run never leaves a workdir locked. The file, which stays behind, names the last holder
(process id, host, start time); only a live lock means anything. ``flock`` locks are local to a
machine, and on some network file systems they are not shared between machines at all.
"""

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Iterator

LOCK_FILE = "lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be created or locked; the message names it and the cause."""


class WorkdirInUseError(WorkdirError):
    """Another live process holds the workdir's lock; the message names it."""


def _describe_holder(fd: int) -> str:
    """What the lock file's holder wrote into it, on one line."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    return " ".join(text.split()) or "another process"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``WORKDIR/lock`` (creating the workdir if needed) for the block.

    Raises:
      WorkdirInUseError: another live process holds it (the message names the workdir and it).
      WorkdirError: the workdir cannot be created, or its lock file opened.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WorkdirError(
            f"cannot use {workdir} as a workdir ({error.strerror}: {error.filename}); choose a "
            "workdir you can write to."
        ) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by {_describe_holder(fd)}; wait for that run to "
                "end (or stop it), or choose another --workdir."
            ) from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        me = f"pid {os.getpid()} on {socket.gethostname()} since {since}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        except OSError as error:  # a full disk, say
            raise WorkdirError(
                f"cannot write the lock file {os.path.join(workdir, LOCK_FILE)} ({error.strerror})."
            ) from error
        yield
    finally:
        os.close(fd)  # releases the lock


def holder(workdir: str) -> str | None:
    """Who holds ``WORKDIR/lock`` now (as it describes itself), or None when no live process
    does. Creates nothing."""
    try:
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe_holder(fd)
    else:
        return None  # the lock was free
    finally:
        os.close(fd)
