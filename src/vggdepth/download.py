"""Fetch the CIFAR-100 archive from a URL or a local path: streamed, md5-verified, written atomically."""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_path, ready_to_write

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class DownloadError(VggdepthError):
    """The archive could not be fetched, or is not the expected one."""


def md5sum(path: str | Path) -> str:
    """md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(url: str, md5: str, dest: str | Path, *, timeout_s: float = 60.0) -> Path:
    """Copy `url` (http(s)://, file:// or a path) to `dest` if its md5 is `md5`.

    The bytes go to a temporary file beside `dest` that is renamed only once complete and verified:
    on any failure `dest` is left as it was and no partial file remains.
    """
    ready_to_write(dest)
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    started = time.perf_counter()
    with atomic_path(dest) as tmp:
        with (
            open(tmp, "wb") as out,
            _open_source(url, timeout_s) as (stream, expected_size),
            tqdm(
                total=expected_size, unit="B", unit_scale=True, desc=f"download {Path(dest).name}", disable=None
            ) as bar,
        ):
            while chunk := _read(stream, url):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if expected_size is not None and received != expected_size:
            raise DownloadError(
                f"truncated download from {url}: received {received:,} of {expected_size:,} bytes; try again"
            )
        actual = digest.hexdigest()
        if actual != md5:
            raise DownloadError(
                f"md5 mismatch for {url}: expected {md5}, got {actual} ({received:,} bytes). "
                "The file is corrupt or not the expected archive; for a local mirror, set data.md5 to its md5."
            )
    seconds = time.perf_counter() - started
    log.info("fetched %s -> %s: %s bytes in %.1f s, md5 %s verified", url, dest, f"{received:,}", seconds, md5)
    return Path(dest)


@contextmanager
def _open_source(url: str, timeout_s: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Open `url` for streaming; yield the stream and its announced size (None when unknown)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        try:
            response = urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 (scheme checked above)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"HTTP {exc.code} {exc.reason} from {url}; check data.url") from None
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            host = urllib.parse.urlsplit(url).netloc
            raise DownloadError(
                f"cannot reach {host} for {url}: {reason}. Without network access, point data.url at a local "
                "copy of the archive (a path or file:// URL) and data.md5 at its md5"
            ) from None
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length and length.isdigit() else None
        return
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    elif scheme == "" or len(scheme) == 1:  # a plain path (a one-letter scheme is a Windows drive)
        path = Path(url).expanduser()
    else:
        raise DownloadError(f"unsupported data.url scheme {scheme!r} in {url}; use http(s)://, file:// or a path")
    if not path.is_file():
        raise DownloadError(f"archive not found: {path} (from data.url={url}); check the path")
    try:
        stream = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise DownloadError(f"cannot read {path} (from data.url={url}): {exc.strerror or exc}") from None
    with stream:
        yield stream, path.stat().st_size


def _read(stream: BinaryIO, url: str) -> bytes:
    try:
        return stream.read(CHUNK)
    except TimeoutError:
        raise DownloadError(f"download from {url} stalled: no data within the timeout (data.timeout_s)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"download from {url} failed mid-transfer: {exc}; try again") from None
