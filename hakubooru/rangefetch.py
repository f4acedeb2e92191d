"""Reading members out of remote tars by HTTP Range, verified by sha256.

``plan_spans`` groups wanted members into requests: members of one tar whose gap (the next
member's tar header and the padding before it) is at most ``MAX_GAP_SHARE`` of what it brings
share one request, so the bytes read are at most 1.1 x (members + one 512-byte header
each). ``RangeFetcher`` runs the requests on ``connections`` threads (at most twice that many
requests held at once: bounded memory) over huggingface_hub's HTTP session and checks each
member's sha256. A 429 (after its ``Retry-After``), a 5xx, a cut connection, a short body
or a sha256 mismatch is tried again with exponential backoff, up to ``retries`` times; past
that the member fails with its reason. A server that answers a Range with 200 (the whole
file) or with another range, or refuses the token, stops the run with one line. Where the
Hub redirects a tar's resolve URL to its storage, later requests of that tar go there
directly (without the token), and back through the Hub once that URL stops answering.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from .errors import HakubooruError

TAR_HEADER = 512
MAX_GAP_SHARE = 0.1
MAX_SPAN = 4 << 20  # bytes of one coalesced request (memory: about 2 x connections x this)
MAX_RETRY_AFTER = 300.0
BACKOFF = 1.0  # seconds before the first retry (doubling after each) where no Retry-After says
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Want:
    """One member to read: ``key`` (the caller's), the tar's path, data offset, size, sha256."""

    key: object
    path: str
    offset: int
    size: int
    sha256: str


@dataclass
class Span:
    """One Range request: bytes [start, end) of ``path``, holding ``wants``."""

    path: str
    start: int
    end: int
    wants: list = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    """A member given up on: reason (``http_429``, ``http_503``, ``connection``, ``cut_short``,
    ``sha256_mismatch``, ``not_found``, ...) and a detail."""

    reason: str
    detail: str


def plan_spans(wants, max_gap_share: float = MAX_GAP_SHARE, max_span: int = MAX_SPAN) -> list[Span]:
    """The requests for ``wants``, in (path, offset) order; neighbours share one when the gap
    before a member is at most ``max_gap_share`` x (its size + a tar header)."""
    spans: list[Span] = []
    for w in sorted(wants, key=lambda w: (w.path, w.offset)):
        cur = spans[-1] if spans else None
        gap = w.offset - cur.end if cur is not None and cur.path == w.path else -1
        if 0 <= gap <= max_gap_share * (w.size + TAR_HEADER) and w.offset + w.size - cur.start <= max_span:
            cur.end = w.offset + w.size
            cur.wants.append(w)
        else:
            spans.append(Span(w.path, w.offset, w.offset + w.size, [w]))
    return spans


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.wait = reason, detail, wait


class _GiveUp(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date; capped), or None."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        return min(MAX_RETRY_AFTER, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


@dataclass
class FetchStats:
    """What crossed the network: body bytes, requests, and retries (requests again)."""

    bytes: int = 0
    requests: int = 0
    retries: int = 0


class RangeFetcher:
    """Range reads of remote tars; ``url_for(path)`` gives a tar's URL."""

    def __init__(self, url_for, connections: int = 16, retries: int = 5,
                 backoff: float | None = None, timeout: float = 60.0, on_bytes=None):
        if connections < 1 or retries < 0:
            raise HakubooruError("--connections must be at least 1 and retries at least 0")
        self.url_for, self.connections, self.retries = url_for, connections, retries
        self.backoff = BACKOFF if backoff is None else backoff
        self.timeout, self.on_bytes = timeout, on_bytes
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._storage: dict[str, str] = {}  # tar path -> the URL its resolve redirected to

    def stop(self) -> None:
        """Make running requests give up soon (an interrupted run)."""
        self._stop.set()

    def fetch(self, spans):
        """Yield ``(want, bytes or Failure)`` for every want of ``spans`` as requests finish
        (bytes: verified against the want's sha256). Raises HakubooruError for a server that
        cannot be read from safely."""
        from huggingface_hub.utils import build_hf_headers, get_session

        session = get_session()
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"
        spans = iter(spans)
        pool = cf.ThreadPoolExecutor(self.connections, thread_name_prefix="rangefetch")
        running = set()
        try:
            while True:
                while len(running) < 2 * self.connections:
                    span = next(spans, None)
                    if span is None:
                        break
                    running.add(pool.submit(self._span, session, headers, span))
                if not running:
                    return
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    yield from f.result()
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._stop.clear()

    def _span(self, session, headers, span: Span) -> list:
        results = {}
        pending = list(span.wants)
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                wait = last.wait if last.wait is not None else self.backoff * 2 ** (attempt - 1)
                if self._stop.wait(wait):
                    break
            start, end = pending[0].offset, pending[-1].offset + pending[-1].size
            try:
                data = self._get(session, headers, span.path, start, end)
            except _Retry as e:
                last = e
                continue
            except _GiveUp as e:
                last = e
                break
            bad = []
            for w in pending:
                body = data[w.offset - start:w.offset - start + w.size]
                if hashlib.sha256(body).hexdigest() == w.sha256:
                    results[w] = bytes(body)
                else:
                    bad.append(w)
            pending = bad
            if not pending:
                break
            last = _Retry("sha256_mismatch", f"{span.path}: member at {bad[0].offset} does not "
                          "match the index's sha256")
        tries = f" after {attempt + 1} tries" if attempt else ""
        out = [(w, results[w]) for w in span.wants if w in results]
        out += [(w, Failure(last.reason if last else "stopped",
                            (last.detail if last else "run stopped") + tries)) for w in pending]
        return out

    def _get(self, session, headers, path: str, start: int, end: int) -> bytearray:
        import httpx2

        url = self.url_for(path)
        with self._lock:
            stored = self._storage.get(path)
        if stored is not None:  # the storage URL the Hub redirected to: one round trip, not two
            if urlsplit(stored).netloc != urlsplit(url).netloc:  # the token stays with the Hub
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = stored
        if self._stop.is_set():
            raise _GiveUp("stopped", "run stopped")
        want = end - start
        with self._lock:
            self.stats.requests += 1
        try:
            with session.stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end - 1}"},
                                follow_redirects=True, timeout=self.timeout) as r:
                status = r.status_code
                if stored is not None and status in (401, 403, 404, 410):
                    with self._lock:  # its signature expired: ask the Hub again, at once
                        self._storage.pop(path, None)
                    raise _Retry("expired", f"{path}: storage URL answered {status}", 0.0)
                if stored is None and r.history and status == 206:
                    with self._lock:
                        self._storage[path] = str(r.url)
                if status == 200:
                    raise HakubooruError(f"{url}: the server ignored the Range request (answered 200 "
                                         "with the whole file); refusing to read members from it")
                if status in (401, 403):
                    from huggingface_hub import get_token
                    token = "the token in HF_TOKEN was refused" if get_token() else "no token is set"
                    raise HakubooruError(f"{url}: the Hub answered {status} ({token}): accept the "
                                         "repository's terms on the Hub and set HF_TOKEN to a token "
                                         "of that account")
                if status == 404:
                    raise _GiveUp("not_found", f"{path}: 404 at the recorded commit")
                if status == 429 or status >= 500:
                    raise _Retry(f"http_{status}", f"{path}: HTTP {status}",
                                 retry_after(r.headers.get("Retry-After")))
                if status != 206:
                    raise _GiveUp(f"http_{status}", f"{path}: HTTP {status}")
                m = CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != start or int(m.group(2)) != end - 1:
                    raise HakubooruError(f"{url}: asked for bytes {start}-{end - 1}, the server "
                                         f"answered Content-Range {r.headers.get('Content-Range')!r}; "
                                         "refusing to read members from it")
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    with self._lock:
                        self.stats.bytes += len(chunk)
                    if self.on_bytes is not None:
                        self.on_bytes(len(chunk))
                    if len(body) > want or self._stop.is_set():
                        break
        except httpx2.HTTPError as e:
            raise _Retry("connection", f"{path}: {type(e).__name__}: {e}") from None
        if len(body) != want:
            raise _Retry("cut_short", f"{path}: {len(body)} of {want} bytes")
        return body
