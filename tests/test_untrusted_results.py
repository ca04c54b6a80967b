"""A GPU lease's results archive comes from another machine: untrusted input. Each bad archive is refused by
`benchmarks/gpu_results.py` with exit status 1 and one `error:` line, no traceback, and nothing written anywhere:
not under results/, not beside it, not outside it; a good one after it is unpacked as usual."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

FINISHED_AT = "2026-12-01T10:00:00Z"


def lease_record(trained_with, **changes) -> dict:
    record = {
        "device": "NVIDIA H200",
        "torch": "2.14.1",
        "commit": "0" * 40,
        "finished_at": FINISHED_AT,
        "params": trained_with.model_dump(mode="json"),
        "runs": [{"run": "VGG-08-s0", "variant": "VGG-08", "seed": 0, "state": "stopped after epoch 3"}],
    }
    record.update(changes)
    return record


def archive(path: Path, members: list[tuple[str, bytes | None, str]], gz: bool = True) -> Path:
    """A tar(.gz) of (name, content, kind) members: kind "file", "symlink" (content: its target) or "dir"."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, content.decode()
                tar.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def json_member(data) -> tuple[str, bytes, str]:
    return ("lease.json", json.dumps(data).encode(), "file")


class Sized(io.RawIOBase):
    """`size` zero bytes, streamed: a member of any size without holding it."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def bring_home(tmp_path: Path, path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_results.py"),
            str(path),
            "--results",
            str(tmp_path / "res" / "r"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BAD: dict[str, tuple[Callable, str]] = {
    # a name derived from the archive's content, escaping results/
    "finished-at-escapes": (
        lambda p, d: archive(d, [json_member(lease_record(p, finished_at="../../esc2"))]),
        "finished_at: string should match pattern",
    ),
    "device-is-a-path": (  # slugged to letters, digits and dashes: never a path
        lambda p, d: archive(d, [json_member(lease_record(p, device="../../" * 30))]),
        "",
    ),
    # members
    "member-climbs-out": (
        lambda p, d: archive(d, [json_member(lease_record(p)), ("runs/../../x/train.json", b"{}", "file")]),
        "which a lease's results never hold",
    ),
    "member-absolute": (
        lambda p, d: archive(d, [json_member(lease_record(p)), ("/tmp/evil.json", b"{}", "file")]),
        "which a lease's results never hold",
    ),
    "record-is-a-symlink": (
        lambda p, d: archive(d, [("lease.json", b"/etc/passwd", "symlink")]),
        "a link",
    ),
    "run-folder-not-a-run": (
        lambda p, d: archive(d, [json_member(lease_record(p)), ("runs/.git/train.json", b"{}", "file")]),
        "which a lease's results never hold",
    ),
    "member-twice": (
        lambda p, d: archive(d, [json_member(lease_record(p)), json_member(lease_record(p))]),
        "twice",
    ),
    "no-record": (lambda p, d: archive(d, [("profile.txt", b"x", "file")]), "holds no lease.json"),
    "not-gzip": (lambda p, d: archive(d, [json_member(lease_record(p))], gz=False), "is not a readable .tar.gz"),
    "not-an-archive": (lambda p, d: (d.write_bytes(b"hello"), d)[1], "is not a readable .tar.gz"),
    "truncated": (
        lambda p, d: (d.write_bytes(archive(d, [json_member(lease_record(p))]).read_bytes()[:40]), d)[1],
        "is not a readable .tar.gz",
    ),
    # the record's content
    "record-not-json": (lambda p, d: archive(d, [("lease.json", b"{not json", "file")]), "lease.json: not JSON"),
    "record-a-list": (
        lambda p, d: archive(d, [json_member([])]),
        "the whole file: a JSON object is expected (found [])",
    ),
    "runs-not-a-list": (
        lambda p, d: archive(d, [json_member(lease_record(p, runs={"VGG-08-s0": "finished"}))]),
        "runs: input should be a valid list",
    ),
    "seed-a-word": (
        lambda p, d: archive(
            d,
            [
                json_member(
                    lease_record(p, runs=[{"run": "VGG-08-s0", "variant": "VGG-08", "seed": "x", "state": "finished"}])
                )
            ],
        ),
        "runs.0.seed",
    ),
    "throughput-row-a-word": (
        lambda p, d: archive(
            d,
            [
                json_member(
                    lease_record(
                        p,
                        throughput=[
                            {"network": "VGG-08", "path": "eager", "fused": 1, "processes": 1, "per_run": "fast"}
                        ],
                    )
                )
            ],
        ),
        "throughput.0.per_run: input should be a valid number (found 'fast')",
    ),
    "params-invalid": (
        lambda p, d: archive(
            d, [json_member({**lease_record(p), "params": {**p.model_dump(mode="json"), "seeds": []}})]
        ),
        "lease.json: invalid parameters",
    ),
    "long-value-excerpted": (
        lambda p, d: archive(d, [json_member(lease_record(p, commit="x" * 100_000))]),
        "characters)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_results_archive_is_refused_in_one_line_and_writes_nothing(case, params, tmp_path):
    make, culprit = BAD[case]
    (tmp_path / "in").mkdir()
    path = make(params, tmp_path / "in" / "results.tar.gz")
    before = everything(tmp_path)
    done = bring_home(tmp_path, path)
    if case == "device-is-a-path":  # not refused: its folder name is made safe, inside results/
        assert done.returncode == 0, done.stderr
        (made,) = (tmp_path / "res" / "r").iterdir()
        assert made.name == "2026-12-01-device" or made.name.startswith("2026-12-01-")
        assert ".." not in made.name and "/" not in made.name
        return
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert culprit in done.stderr, done.stderr
    assert len(done.stderr) < 1000  # a bounded message, whatever the archive held
    assert everything(tmp_path) == before  # nothing under results/, beside it, or outside it


def test_a_member_larger_than_any_table_is_refused_before_it_is_read(params, tmp_path):
    """A 3 GiB member (streamed into the archive, never held) is refused from its header: in seconds and with
    little memory, and nothing is written."""
    path = tmp_path / "results.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        record = json.dumps(lease_record(params)).encode()
        info = tarfile.TarInfo("lease.json")
        info.size = len(record)
        tar.addfile(info, io.BytesIO(record))
        big = tarfile.TarInfo("runs/VGG-08-s0/gradients.csv")
        big.size = 3 << 30
        tar.addfile(big, io.BufferedReader(Sized(big.size), buffer_size=1 << 20))
    before = everything(tmp_path)
    # The script as __main__, then its peak memory in KiB on a line of its own, whatever the exit: VmHWM, the peak of
    # this process image alone (getrusage's ru_maxrss keeps the peak of the forked parent across exec).
    measured = (
        "import re, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    status = open('/proc/self/status').read()\n"
        "    print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1), file=sys.stderr)\n"
    )
    script = str(ROOT / "benchmarks" / "gpu_results.py")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", measured, script, str(path), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    (kib,) = [line for line in done.stderr.splitlines() if line.isdigit()]
    lines = [line for line in done.stderr.splitlines() if not line.isdigit()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "runs/VGG-08-s0/gradients.csv is 3,221,225,472 bytes, more than any lease table" in lines[0]
    assert int(kib) < 1_000_000 and seconds < 60  # not read: no 3 GiB in memory, no minute of inflating
    assert everything(tmp_path) == before


def test_a_failure_after_unpacking_leaves_nothing_and_a_rerun_says_the_same(params, tmp_path):
    """The archive passes every check, but its finished run's tables are missing, so the report cannot be rendered
    after the files were unpacked: nothing is left under results/, and the same command run again says the same
    (not that the folder exists)."""
    from tests.helpers import narrow

    raw = params.model_dump(mode="json")
    narrowed = narrow(raw, {v: raw["variants"][v] for v in ("VGG-08", "VGG-38")})
    narrowed["seeds"] = [0]
    runs = [{"run": f"{v}-s0", "variant": v, "seed": 0, "state": "finished"} for v in ("VGG-08", "VGG-38")]
    path = archive(
        tmp_path / "results.tar.gz",
        [json_member(lease_record(params, params=narrowed, runs=runs)), ("runs/VGG-08-s0/test.json", b"{}", "file")],
    )
    for _ in range(2):
        done = bring_home(tmp_path, path)
        assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr
        assert "epochs.csv" in done.stderr and "exists" not in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "res" / "r").exists() or not list((tmp_path / "res" / "r").iterdir())


def test_long_throughput_errors_are_cut_never_a_reason_to_refuse_the_runs(params, tmp_path):
    """A lease's throughput errors are diagnostics: a CUDA failure's text can be pages long, and the lease's trained
    runs must still come home. Each error is cut to 2,000 characters and the list to 100; the runs are read."""
    from vggdepth.records import read_results

    errors = [f"BN-VGG-38 9 fused: RuntimeError: CUDA error {i}: " + "x" * 5000 for i in range(150)]
    path = archive(tmp_path / "results.tar.gz", [json_member(lease_record(params, throughput_errors=errors))])
    record, _ = read_results(path)
    assert len(record.throughput_errors) == 100
    assert [e[:60] for e in record.throughput_errors] == [e[:60] for e in errors[:100]]
    assert {len(e) for e in record.throughput_errors} == {2000}
    assert [r.run for r in record.runs] == ["VGG-08-s0"]
