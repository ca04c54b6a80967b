"""Writing files so that a reader never sees a half-written one: write beside, then rename."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vggdepth.errors import VggdepthError

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, outputs should get the usual permissions


class OutputError(VggdepthError):
    """An output cannot be written (no permission, no space left, not a folder)."""


def file_kind(mode: int) -> str:
    """What a file of `mode` (`os.stat`'s st_mode) is, in words: 'a regular file', 'a folder', 'a FIFO', ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "another kind of file"


def path_kind(path: Path) -> str | None:
    """What `path` is (links followed), as `file_kind` says it; None when there is nothing."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return file_kind(mode)


def _cannot_write(dest: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {dest}: {reason}; free some space or choose a writable location")


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it: checked before work starts, so a stage
    never trains for an hour to fail on its first output."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".write-check.{TEMPORARY}-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or exc
        raise OutputError(f"cannot write to {folder}: {reason}; check the path and its permissions") from None
    return folder


# Every temporary file and staging folder this project writes is named `.<output's name>.vggdepth-tmp-<8 random
# characters>` (files end in `.part`), and an output being replaced is retired as `.<name>.vggdepth-old`: names no
# person would choose. Clean-up removes those and nothing else: a user's `.prepared.backup/` beside an output stays.
TEMPORARY = "vggdepth-tmp"
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # what tempfile puts in its names


def temporary_prefix(dest: Path) -> str:
    """The start of every temporary name of `dest`'s writers: `.<name>.vggdepth-tmp-`."""
    return f".{dest.name}.{TEMPORARY}-"


def _retired(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.vggdepth-old")


def is_leftover(path: Path, dest: Path) -> bool:
    """Whether `path` is a temporary file, staging folder or retired output of a writer of `dest`: by its exact
    name, which only this project's writers make (a link is never one)."""
    if path.parent != dest.parent or path.is_symlink():
        return False
    if path.name == _retired(dest).name:
        return True
    prefix = temporary_prefix(dest)
    if not path.name.startswith(prefix):
        return False
    rest = path.name.removeprefix(prefix)
    if path.is_dir():
        return bool(_RANDOM.fullmatch(rest))
    return rest.endswith(".part") and bool(_RANDOM.fullmatch(rest.removesuffix(".part")))


def clean_leftovers(dest: str | Path) -> list[Path]:
    """Remove what a killed writer of `dest` left beside it (its temporary files, staging folders and retired
    output, by their exact names: `is_leftover`), saying so; return what was removed. Anything else beside `dest`,
    whatever its name, is left alone. Called when a stage starts, before it writes `dest` again."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}.vggdepth-*"):
        if not is_leftover(leftover, dest):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        log.warning("removed %s, left by a writer of %s that was killed", leftover, dest)
        removed.append(leftover)
    return removed


def ready_to_write(dest: str | Path) -> Path:
    """Before a stage's work: clear what a killed writer of `dest` left, and prove `dest`'s folder writable."""
    clean_leftovers(dest)
    return ensure_writable(Path(dest).parent)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary path beside `dest`: renamed to `dest` when the block succeeds, removed when it fails.
    An OSError inside the block (a full disk, say) is reported as an `OutputError` naming `dest`."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=temporary_prefix(dest), suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def staging_dir(dest: Path) -> Path:
    """A new temporary folder beside `dest`, named as its writers' are (`temporary_prefix`)."""
    return Path(tempfile.mkdtemp(prefix=temporary_prefix(dest), dir=dest.parent))


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """A temporary folder beside `dest` that replaces `dest` whole when the block succeeds, and is removed when
    it fails (leaving `dest` as it was)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(dest)
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; the output gets the usual permissions
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    try:
        try:
            yield staging
        except OutputError as exc:  # name the output a user knows, not the staging folder
            raise OutputError(str(exc).replace(str(staging), str(dest))) from None
        if dest.exists():
            retired = _retired(dest)
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(dest, retired)
            os.replace(staging, dest)
            shutil.rmtree(retired)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(dest: str | Path, data: object) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(dest: str | Path, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
