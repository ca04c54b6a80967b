"""Records of runs trained elsewhere, read as untrusted input: a GPU lease's `lease.json` and `results.tar.gz`.

An archive brought back from another machine is checked whole before anything is written: every member's name, type
and size (bounded before it is read), the record's every field (a typed schema: the file and the field are named
in the error), and every name derived from its content (confined to the results folder). A failure is one line, and
nothing is left behind.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vggdepth.errors import VggdepthError
from vggdepth.runs import TABLES

MAX_MEMBER_BYTES = 64 << 20  # a table of a 100-epoch run is about 1 MB; predictions.npz about 0.5 MB
MAX_TOTAL_BYTES = 512 << 20
MAX_MEMBERS = 2000  # 18 runs x 8 tables, and room for larger studies
RECORD, PROFILE = "lease.json", "profile.txt"
RUN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}-s[0-9]{1,10}")  # `<variant>-s<seed>`: config's variant-name rule
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class RecordError(VggdepthError):
    """A record or archive of runs from elsewhere is not what it must be."""


def excerpt(value: Any, limit: int = 80) -> str:
    """A bounded excerpt of a bad value, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class RunState(_Record):
    run: Annotated[str, Field(pattern=RUN_NAME.pattern)]
    variant: Annotated[str, Field(min_length=1, max_length=64)]
    seed: Annotated[int, Field(ge=0, lt=2**32)]
    state: Annotated[str, Field(max_length=2000)]


class LeaseRecord(_Record):
    """`lease.json`: what a lease ran, where, and each run's state."""

    device: Annotated[str, Field(min_length=1, max_length=200)]
    torch: Annotated[str, Field(max_length=100)]
    commit: Annotated[str, Field(max_length=100)]
    finished_at: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")]
    params: dict
    runs: list[RunState] = Field(default_factory=list, max_length=MAX_MEMBERS)


def parse_record(raw: bytes | str, model: type[BaseModel], source: str) -> Any:
    """`raw` JSON read as `model`; a `RecordError` naming `source` and the first bad field otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{source}: not JSON ({str(exc).splitlines()[0][:120]})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the whole file"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecordError(
            f"{source}: {where}: {first['msg'].lower()} (found {excerpt(first.get('input'))}){more}"
        ) from None


def _wanted(name: str) -> tuple[str, ...] | None:
    """The path of an archive member a lease's results may hold, as parts; None for anything else."""
    parts = tuple(name.split("/"))
    if parts in ((RECORD,), (PROFILE,)):
        return parts
    if len(parts) == 3 and parts[0] == "runs" and RUN_NAME.fullmatch(parts[1]) and parts[2] in TABLES:
        return parts
    return None


def read_results(archive: Path) -> tuple[LeaseRecord, dict[tuple[str, ...], bytes]]:
    """A lease's `results.tar.gz`, checked whole and held in memory (bounded): its record and its files by path.
    Writes nothing. A member that is not a regular file of a known name, a member or an archive over the bounds,
    a damaged or non-gzip archive, or a record that fails its schema ends in one `RecordError`."""
    files: dict[tuple[str, ...], bytes] = {}
    total = 0
    try:
        with tarfile.open(archive, "r|gz") as tar:  # a stream: each header is checked before its data is read
            for count, member in enumerate(tar, start=1):
                parts = _wanted(member.name)
                if count > MAX_MEMBERS:
                    raise RecordError(f"{archive} holds more than {MAX_MEMBERS} members: not a lease's results")
                if parts is None or not member.isfile():
                    kind = "a link" if member.issym() or member.islnk() else "not a regular file"
                    why = kind if parts is not None else "which a lease's results never hold"
                    raise RecordError(f"{archive} holds {excerpt(member.name)}, {why}; nothing was unpacked")
                if parts in files:
                    raise RecordError(f"{archive} holds {member.name!r} twice; nothing was unpacked")
                if member.size > MAX_MEMBER_BYTES:
                    raise RecordError(
                        f"{archive}: {member.name} is {member.size:,} bytes, more than any lease table "
                        f"({MAX_MEMBER_BYTES >> 20} MiB); nothing was unpacked"
                    )
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise RecordError(
                        f"{archive} unpacks to more than {MAX_TOTAL_BYTES >> 20} MiB; nothing was unpacked"
                    )
                files[parts] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise RecordError(f"{archive} is not a readable .tar.gz ({str(exc)[:120] or type(exc).__name__})") from None
    if (RECORD,) not in files:
        raise RecordError(f"{archive} holds no {RECORD}: not a lease's results")
    record = parse_record(files[(RECORD,)], LeaseRecord, f"{archive}: {RECORD}")
    return record, files


def results_folder(results: Path, record: LeaseRecord, name: str | None) -> Path:
    """Where a lease's results go: `results/<name>`, by default `<date>-<device>` from the record; a name that is
    not one plain folder name, or that would land outside `results`, is refused."""
    if name is None:
        device = re.sub(r"[^a-z0-9]+", "-", record.device.lower()).strip("-")[:60] or "device"
        name = f"{record.finished_at[:10]}-{device}"
    if not FOLDER_NAME.fullmatch(name) or name in (".", ".."):
        raise RecordError(f"results folder name {excerpt(name)}: use letters, digits, '.', '_' and '-' only")
    dest = results / name
    if dest.resolve().parent != results.resolve():
        raise RecordError(f"results folder {excerpt(name)} would be outside {results}")
    return dest
