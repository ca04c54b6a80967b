"""The download stage: every source kind works, every failure is one clear message and leaves no file."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import run_stage, write_yaml
from vggdepth.download import DownloadError, fetch_archive, md5sum

WRONG_MD5 = "0" * 32


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetches_real_archive_over_http_and_verifies_md5(http_server, archive_path, archive_md5, tmp_path):
    base_url, _ = http_server
    dest = tmp_path / "out" / "cifar-100-python.tar.gz"

    fetch_archive(f"{base_url}/{archive_path.name}", archive_md5, dest)

    assert dest.stat().st_size == archive_path.stat().st_size
    assert md5sum(dest) == archive_md5
    assert _leftovers(dest.parent) == [dest.name]  # no temporary file left behind


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_fetches_local_archive_from_path_or_file_url(tiny_archive, tmp_path, form):
    url = str(tiny_archive) if form == "path" else tiny_archive.as_uri()
    dest = tmp_path / "out" / "archive.tar.gz"

    fetch_archive(url, md5sum(tiny_archive), dest)

    assert dest.read_bytes() == tiny_archive.read_bytes()


def test_wrong_md5_names_expected_and_actual_and_writes_nothing(http_server, tiny_archive, tmp_path):
    base_url, folder = http_server
    shutil.copy(tiny_archive, folder / "tiny.tar.gz")
    dest = tmp_path / "out" / "archive.tar.gz"

    with pytest.raises(DownloadError) as err:
        fetch_archive(f"{base_url}/tiny.tar.gz", WRONG_MD5, dest)

    message = str(err.value)
    assert "md5 mismatch" in message
    assert f"expected {WRONG_MD5}" in message
    assert f"got {md5sum(tiny_archive)}" in message
    assert _leftovers(dest.parent) == []


def test_truncated_body_is_reported_and_writes_nothing(http_server, tiny_archive, tmp_path):
    base_url, folder = http_server
    shutil.copy(tiny_archive, folder / "tiny.tar.gz")
    dest = tmp_path / "out" / "archive.tar.gz"
    size = tiny_archive.stat().st_size

    with pytest.raises(DownloadError, match=rf"truncated download .*: received {size // 2:,} of {size:,} bytes"):
        fetch_archive(f"{base_url}/truncated/tiny.tar.gz", md5sum(tiny_archive), dest)

    assert _leftovers(dest.parent) == []


@pytest.mark.parametrize(("path", "expected"), [("missing.tar.gz", "HTTP 404"), ("status/500", "HTTP 500")])
def test_http_error_status_is_reported(http_server, tmp_path, path, expected):
    base_url, _ = http_server
    dest = tmp_path / "out" / "archive.tar.gz"

    with pytest.raises(DownloadError, match=expected):
        fetch_archive(f"{base_url}/{path}", WRONG_MD5, dest)

    assert _leftovers(dest.parent) == []


def test_unreachable_host_is_reported(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = tmp_path / "out" / "archive.tar.gz"

    with pytest.raises(DownloadError, match=rf"cannot reach 127.0.0.1:{port}"):
        fetch_archive(f"http://127.0.0.1:{port}/cifar-100-python.tar.gz", WRONG_MD5, dest, timeout_s=5)

    assert _leftovers(dest.parent) == []


def test_missing_local_file_is_reported(tmp_path):
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(DownloadError, match=f"archive not found: {missing}"):
        fetch_archive(str(missing), WRONG_MD5, tmp_path / "out" / "archive.tar.gz")


def test_failed_fetch_leaves_an_existing_archive_untouched(tiny_archive, tmp_path):
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(b"earlier good copy")

    with pytest.raises(DownloadError):
        fetch_archive(str(tiny_archive), WRONG_MD5, dest)

    assert dest.read_bytes() == b"earlier good copy"
    assert _leftovers(tmp_path) == sorted([dest.name, tiny_archive.name])


def test_stage_reports_wrong_md5_in_one_line_and_exits_nonzero(tiny_archive, raw_params, tmp_path):
    raw_params["data"].update(url=str(tiny_archive), md5=WRONG_MD5)
    params_file = write_yaml(tmp_path / "params.yaml", raw_params)
    dest = tmp_path / "raw" / "archive.tar.gz"

    result = run_stage("download", "--out", str(dest), "--params", str(params_file))

    assert result.returncode == 1
    assert result.stderr.startswith(f"error: md5 mismatch for {tiny_archive}: expected {WRONG_MD5}, got ")
    assert "Traceback" not in result.stderr
    assert not dest.exists()
