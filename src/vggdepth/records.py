"""Records of runs trained elsewhere, read as untrusted input: a GPU lease's `lease.json` and `results.tar.gz`.

An archive brought back from another machine is checked whole before anything is written: every member's name, type
and size (bounded before it is read), the record's every field (a typed schema: the file and the field are named
in the error), and every name derived from its content (confined to the results folder). A failure is one line, and
nothing is left behind.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from pathlib import Path

from vggdepth import schemas
from vggdepth.errors import excerpt
from vggdepth.runs import TABLES
from vggdepth.schemas import LeaseRecord, RecordError, parse_record

MAX_MEMBER_BYTES = 64 << 20  # a table of a 100-epoch run is about 1 MB; predictions.npz about 0.5 MB
MAX_TOTAL_BYTES = 512 << 20
MAX_MEMBERS = 2000  # 18 runs x 8 tables, and room for larger studies
RECORD, PROFILE = "lease.json", "profile.txt"
RUN_NAME = re.compile(schemas.RUN_NAME)
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


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
