"""Fetch the CIFAR-100 archive from a URL or a local path: streamed, md5-verified, written atomically, within a
total deadline (data.timeout_s); a server silent for READ_TIMEOUT_S is given up sooner."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import queue
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_path, file_kind, ready_to_write

log = logging.getLogger(__name__)

CHUNK = 1 << 20
BUFFERED = 16  # chunks read ahead of the file being written: memory, not time
TIMEOUT_S = 600.0  # the whole fetch, as data.timeout_s in params.yaml: a slow link still fetches the 169 MB archive
READ_TIMEOUT_S = 60.0  # one read of the socket (data.timeout_s when shorter): a silent server is said in a minute


class DownloadError(VggdepthError):
    """The archive could not be fetched, or is not the expected one."""


def md5sum(path: str | Path) -> str:
    """md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(url: str, md5: str, dest: str | Path, *, timeout_s: float = TIMEOUT_S) -> Path:
    """Copy `url` (http(s)://, file:// or a path to a regular file) to `dest` if its md5 is `md5`.

    `timeout_s` (data.timeout_s) bounds the whole fetch, not only each read: a server that trickles its answer
    fails it as surely as one that is silent. Each read of an http(s) answer has READ_TIMEOUT_S (or `timeout_s`,
    when shorter), so a server gone silent is said within a minute, not at the end of the whole. The bytes go to
    a temporary file beside `dest` that is renamed only once complete and verified: on any failure `dest` is left
    as it was and no partial file remains.
    """
    ready_to_write(dest)
    deadline = time.monotonic() + timeout_s
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    started = time.perf_counter()
    with atomic_path(dest) as tmp:
        with (
            _open_source(url, timeout_s, deadline) as (chunks, expected_size),
            open(tmp, "wb") as out,
            tqdm(
                total=expected_size, unit="B", unit_scale=True, desc=f"download {Path(dest).name}", disable=None
            ) as bar,
        ):
            for chunk in chunks:
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


def _late(url: str, timeout_s: float, received: int, size: int | None) -> DownloadError:
    of = f" of {size:,}" if size is not None else ""
    return DownloadError(
        f"download from {url} did not complete within data.timeout_s = {timeout_s:g} s ({received:,}{of} bytes "
        "received): the server is too slow or stalled. Try again, raise data.timeout_s, or point data.url at a "
        "local copy of the archive (a path or file:// URL)"
    )


@contextmanager
def _open_source(url: str, timeout_s: float, deadline: float) -> Iterator[tuple[Iterator[bytes], int | None]]:
    """Open `url` for streaming; yield its chunks and its announced size (None when unknown). The chunks stop
    with a DownloadError at `deadline` (monotonic)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        with _http_source(url, timeout_s, deadline) as source:
            yield source
        return
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    elif scheme == "" or len(scheme) == 1:  # a plain path (a one-letter scheme is a Windows drive)
        path = Path(url).expanduser()
    else:
        raise DownloadError(f"unsupported data.url scheme {scheme!r} in {url}; use http(s)://, file:// or a path")
    with _open_regular(path, url) as stream:
        size = os.fstat(stream.fileno()).st_size
        yield _file_chunks(stream, url, timeout_s, deadline, size), size


@contextmanager
def _open_regular(path: Path, url: str) -> Iterator:
    """`path` opened for reading if it is a regular file (links followed). Anything else (a folder, a FIFO, a
    device) is refused from its metadata, without opening it: a FIFO would wait for a writer forever and a device
    never end. It is opened without blocking and checked again, in case it was swapped in between."""

    def refuse(mode: int) -> DownloadError:
        what = f"{path} (from data.url={url}) is {file_kind(mode)}"
        return DownloadError(f"{what}, not a regular file: point data.url at the archive")

    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DownloadError(f"archive not found: {path} (from data.url={url}); check the path") from None
    except OSError as exc:
        raise DownloadError(f"cannot read {path} (from data.url={url}): {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DownloadError(f"cannot read {path} (from data.url={url}): {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
        os.close(fd)
        raise refuse(mode)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as stream:
        yield stream


def _file_chunks(stream, url: str, timeout_s: float, deadline: float, size: int) -> Iterator[bytes]:
    received = 0
    while True:
        if time.monotonic() > deadline:
            raise _late(url, timeout_s, received, size)
        try:
            chunk = stream.read(CHUNK)
        except OSError as exc:
            raise DownloadError(f"cannot read {url}: {exc.strerror or exc}") from None
        if not chunk:
            return
        received += len(chunk)
        yield chunk


@contextmanager
def _http_source(url: str, timeout_s: float, deadline: float) -> Iterator[tuple[Iterator[bytes], int | None]]:
    """GET `url` in a daemon thread that hands over what arrives; this thread waits for each piece only until
    `deadline`. The socket's timeout (READ_TIMEOUT_S, or `timeout_s` when shorter) bounds each read, which a server
    sending one byte a second never trips; the deadline bounds it all. Past it the request is abandoned: its
    thread ends at its next read, within the socket's timeout."""
    read_s = min(READ_TIMEOUT_S, timeout_s)
    pieces: queue.Queue = queue.Queue(maxsize=BUFFERED)
    stop = threading.Event()

    def put(kind: str, value) -> bool:
        """Hand over a piece; False once nobody waits for more (past the deadline, or the fetch given up)."""
        try:
            pieces.put((kind, value), timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Full:
            return False
        return not stop.is_set()

    def fetch() -> None:
        try:
            with urllib.request.urlopen(url, timeout=read_s) as response:  # noqa: S310 (scheme checked)
                length = response.headers.get("Content-Length")
                if not put("size", int(length) if length and length.isdigit() else None):
                    return
                while not stop.is_set():
                    chunk = response.read1(CHUNK)  # what one read brings: the deadline is checked between reads
                    if not put("data", chunk) or not chunk:
                        return
        except BaseException as exc:  # handed to the waiting thread
            put("error", exc)

    def take(received: int, size: int | None, *, started: bool = True):
        """The next piece, by the deadline; a DownloadError for what went wrong instead."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise queue.Empty
            kind, value = pieces.get(timeout=left)
        except queue.Empty:
            raise _late(url, timeout_s, received, size) from None
        if kind == "error":
            raise _http_error(url, value, read_s, started=started)
        return value

    threading.Thread(target=fetch, name=f"vggdepth-download {url}", daemon=True).start()
    try:
        size = take(0, None, started=False)  # the status line and headers come within the deadline too

        def chunks() -> Iterator[bytes]:
            received = 0
            while True:
                chunk = take(received, size)
                if not chunk:
                    return
                received += len(chunk)
                yield chunk

        yield chunks(), size
    finally:
        stop.set()


def _http_error(url: str, exc: BaseException, read_s: float, *, started: bool) -> DownloadError:
    """The one line for what went wrong fetching `url`: before its answer began, or mid-transfer (`started`)."""
    if isinstance(exc, urllib.error.HTTPError):
        return DownloadError(f"HTTP {exc.code} {exc.reason} from {url}; check data.url")
    if not started and isinstance(exc, urllib.error.URLError | OSError | http.client.HTTPException):
        reason = getattr(exc, "reason", exc)
        host = urllib.parse.urlsplit(url).netloc
        return DownloadError(
            f"cannot reach {host} for {url}: {reason}. Without network access, point data.url at a local "
            "copy of the archive (a path or file:// URL) and data.md5 at its md5"
        )
    if isinstance(exc, TimeoutError):
        return DownloadError(f"download from {url} stalled: no data for {read_s:g} s; try again")
    if isinstance(exc, OSError | http.client.HTTPException):
        return DownloadError(f"download from {url} failed mid-transfer: {exc}; try again")
    return DownloadError(f"download from {url} failed: {type(exc).__name__}: {exc}")
