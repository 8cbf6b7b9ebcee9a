"""One job at a time in an output folder: ``OUT/.dualguide.lock``, held with ``flock`` by the job's main process.

The processes of one job (``accelerate launch``, ``torchrun``, several machines on a shared folder) share the
folder, so only the main process (global rank 0) takes the lock, before any process reads or writes the
manifest, and broadcasts whether it got it; the broadcast is also the barrier that keeps the other processes
waiting until then. Another job finds the lock taken: each of its processes stops with a UsageError. The
kernel drops a ``flock`` when its holder dies, so a killed or crashed job never leaves the folder locked; the
lock file is removed when the job ends.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager, suppress
from typing import Iterator, Optional

from ..generation.errors import UsageError

LOCK = ".dualguide.lock"


@contextmanager
def job_lock(out: str, state) -> Iterator[None]:
    """Hold ``out``'s lock for this job (``state``: accelerate's ``PartialState``); UsageError if another job has it."""
    path = os.path.join(out, LOCK)
    descriptor = _acquire(path) if state.is_main_process else None
    if not _main_says(descriptor is not None, state):
        raise UsageError(
            f"--out {out}: another dualguide job is writing there; wait for it to end or give another --out"
        )
    try:
        yield
    finally:
        if descriptor is not None:
            with suppress(FileNotFoundError):  # removed before unlocked: a job that opened it then takes a new one
                os.remove(path)
            os.close(descriptor)


def _main_says(got: bool, state) -> bool:
    """The main process's ``got``, in every process of the job (the others wait here for it)."""
    if state.num_processes == 1:
        return got
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([got])[0]


def _acquire(path: str) -> Optional[int]:
    """A descriptor of ``path`` locked by this process, or None when another process holds the lock."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        if _is_at(descriptor, path):
            return descriptor
        os.close(descriptor)  # its holder removed it between our open and our lock: lock the file there now


def _is_at(descriptor: int, path: str) -> bool:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)
