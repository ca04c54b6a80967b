"""Writing files so that a reader never sees a half-written one: write beside, then rename."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
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


def _cannot_write(dest: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {dest}: {reason}; free some space or choose a writable location")


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it: checked before work starts, so a stage
    never trains for an hour to fail on its first output."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or exc
        raise OutputError(f"cannot write to {folder}: {reason}; check the path and its permissions") from None
    return folder


def clean_leftovers(dest: str | Path) -> list[Path]:
    """Remove what a killed writer of `dest` left beside it (`.<name>.*.part` files, `.<name>.*` staging folders),
    saying so; return what was removed. Called when a stage starts, before it writes `dest` again."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for leftover in dest.parent.glob(f".{dest.name}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.endswith(".part") or leftover.name.endswith(".old"):
            leftover.unlink(missing_ok=True)
        else:
            continue
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
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
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


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """A temporary folder beside `dest` that replaces `dest` whole when the block succeeds, and is removed when
    it fails (leaving `dest` as it was)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; the output gets the usual permissions
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    try:
        try:
            yield staging
        except OutputError as exc:  # name the output a user knows, not the staging folder
            raise OutputError(str(exc).replace(str(staging), str(dest))) from None
        if dest.exists():
            retired = dest.with_name(f".{dest.name}.old")
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
