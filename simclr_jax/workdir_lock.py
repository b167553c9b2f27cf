"""One training process per workdir: an advisory lock on ``WORKDIR/lock``.

The lock is ``flock(2)`` on that file, held while the process holds the file open: the kernel
releases it when the process ends, however it ends (a crash or ``kill -9`` included), so a
dead run never leaves a workdir locked. The file, which stays behind, names the last holder
(process id, host, start time); only a live lock means anything. On Linux an NFS mount shares the
lock between machines (unless mounted with ``nolock`` or ``local_lock``); some other network file
systems keep it to one machine, and where a file system refuses ``flock``, so does :func:`hold`.
"""

import contextlib
import datetime
import fcntl
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = "lock"
# How long hold() retries a lock held by another process: holder() holds it for an instant.
_RETRY_SECONDS = 1.0


class WorkdirError(RuntimeError):
    """The workdir cannot be created or locked; the message names it and the cause."""


class WorkdirInUseError(WorkdirError):
    """Another live process holds the workdir's lock; the message names it."""


def _describe_holder(fd: int) -> str:
    """What the lock file's holder wrote into it, on one line."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    return " ".join(text.split()) or "another process"


def _lock(fd: int, path: str) -> bool:
    """Takes the exclusive lock on ``fd`` (the lock file ``path``); False when another process
    holds it for longer than :data:`_RETRY_SECONDS`.

    Raises:
      WorkdirError: the file system does not support the lock.
    """
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        except OSError as error:  # ENOLCK or EOPNOTSUPP on some network file systems
            raise WorkdirError(
                f"cannot lock {path} ({error.strerror}): its file system may not support flock "
                "locks; choose a --workdir on another file system, such as a local disk."
            ) from error


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``WORKDIR/lock`` (creating the workdir if needed) for the block.

    Raises:
      WorkdirInUseError: another live process holds it (the message names the workdir and it).
      WorkdirError: the workdir cannot be created, or its lock file opened or locked.
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WorkdirError(
            f"cannot use {workdir} as a workdir ({error.strerror}: {error.filename}); choose a "
            "workdir you can write to."
        ) from error
    try:
        if not _lock(fd, path):
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by {_describe_holder(fd)}; wait for that run to "
                "end (or stop it), or choose another --workdir."
            )
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        me = f"pid {os.getpid()} on {socket.gethostname()} since {since}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        except OSError as error:  # a full disk, say
            raise WorkdirError(f"cannot write the lock file {path} ({error.strerror}).") from error
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


@contextlib.contextmanager
def hold_on_first_process(workdir: str) -> Iterator[None]:
    """:func:`hold` for a run of one or more JAX processes: the first process takes the lock
    for the block; when it cannot (another run holds it, or any other failure), every process
    raises: the first its error, the others :class:`WorkdirError`."""
    with contextlib.ExitStack() as stack:
        refusal: Exception | None = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(hold(workdir))
            except Exception as error:  # raised below, once the other processes know
                refusal = error
        if jax.process_count() > 1:
            refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
            if refused and refusal is None:
                refusal = WorkdirError(
                    f"the first process cannot lock the workdir {workdir} (it says why)."
                )
        if refusal is not None:
            raise refusal
        yield
