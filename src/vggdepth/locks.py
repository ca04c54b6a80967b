"""One writer at a time per run folder (or other output): whatever writes `runs/<run>/` (the train stage, the grid's
driver, whose recorder writes every run it trains, the evaluate stage) holds `runs/.<run>.vggdepth-lock`, an
flock(2) lock on a file beside the folder, never inside a DVC output. A second writer is refused at once with one
line naming the folder and the process that holds it.

The kernel drops an flock lock when the last descriptor of its open file closes, so a process killed in any way,
SIGKILL included, leaves nothing stuck: the next writer takes the lock. The file is removed when its holder lets it
go (while still holding it: a writer that opened the old file meanwhile sees the name gone and opens the new one,
so two writers never hold two files of one name); a killed holder's file stays until the next writer removes it.
Its name is none of the temporary names `files.clean_leftovers` removes (`files.is_leftover`), so clean-up never
takes it for a killed writer's leftover, and a user's file of another name beside a run is never touched. The
descriptor is close-on-exec, so processes a writer starts do not hold its lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from vggdepth.errors import VggdepthError

SUFFIX = "vggdepth-lock"


class FolderBusy(VggdepthError):
    """Another process is writing the folder."""


def lock_path(folder: str | Path) -> Path:
    """The lock of `folder`: `.<name>.vggdepth-lock` beside it (its real location, links resolved)."""
    real = Path(folder).resolve()
    return real.parent / f".{real.name}.{SUFFIX}"


@contextmanager
def writing(*folders: str | Path) -> Iterator[None]:
    """Hold the lock of each folder (or output file) for the block: the one writer of them. Raises `FolderBusy`
    at once, naming the folder and the process holding it, when another process writes one of them."""
    with ExitStack() as stack:
        for folder in folders:
            stack.enter_context(_held(Path(folder)))
        yield


@contextmanager
def _held(folder: Path) -> Iterator[None]:
    path = lock_path(folder)
    fd = _acquire(folder, path)
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(path)  # while still held: see the module's notes
        os.close(fd)


def _acquire(folder: Path, path: Path) -> int:
    for _ in range(100):  # each turn: the file was replaced between our open and our lock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VggdepthError(
                f"cannot write to {path.parent}: {exc.strerror or exc}; check the path and its permissions"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if holder is None:
                raise VggdepthError(f"cannot lock {path}: {exc.strerror or exc}") from None
            raise FolderBusy(
                f"{folder} is being written by another process ({holder}); wait for it to end or stop it, "
                "then run this again"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            command = " ".join([os.path.basename(sys.executable), *sys.argv])[:300]
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{command}\n".encode(), 0)
            return fd
        os.close(fd)
    raise VggdepthError(f"cannot lock {path}: it keeps being replaced")


def _holder(fd: int) -> str:
    """Who holds a lock, from what it wrote in the file (it writes right after taking it: wait a moment)."""
    for _ in range(20):
        lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
        if lines and lines[0].strip().isdigit():
            command = f": {lines[1].strip()}" if len(lines) > 1 and lines[1].strip() else ""
            return f"pid {lines[0].strip()}{command}"
        time.sleep(0.05)
    return "pid unknown"
