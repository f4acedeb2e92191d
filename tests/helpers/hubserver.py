"""A local stand-in for the Hugging Face Hub (127.0.0.1), and tar indexes in deepghs' format.

``FakeHub`` answers like the Hub for dataset repositories: ``GET /api/datasets/R/revision/V``
(the commit and the file list), ``HEAD``/``GET /datasets/R/resolve/V/PATH`` with
``X-Repo-Commit``, ``ETag``, ``Content-Length``, one ``Range`` -> 206 + ``Content-Range``,
404 for a missing repository, revision or file. Faults are injected on demand: 429 (with
``Retry-After``), 503, a cut connection, a corrupted body, Range ignored (200 with the whole
file), a required token, a delay per request (of every path, or of those ending in a suffix).
``tar_index`` writes a tar's index the way hfutils' ``tar_create_index`` does, read with the
standard ``tarfile`` module.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
INFO = re.compile(r"^/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
STORAGE = re.compile(r"^/storage/(\d+)/([^/]+/[^/]+)/([0-9a-f]+)/(.+)$")


def tar_index(tar_path: Path) -> dict:
    """The index JSON of one tar in the published format (hfutils tar_create_index)."""
    data = Path(tar_path).read_bytes()
    files = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if m.isfile():
                body = data[m.offset_data:m.offset_data + m.size]
                files[m.name] = {"offset": m.offset_data, "size": m.size,
                                 "sha256": hashlib.sha256(body).hexdigest()}
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return {"filesize": len(data), "hash": blob, "hash_lfs": hashlib.sha256(data).hexdigest(),
            "files": files}


def archive_repos(images_dir: Path) -> tuple[dict, dict]:
    """(data files, index files) of a local archives folder: every tar at its relative path,
    and beside it ``.json`` for ``.tar``."""
    images_dir = Path(images_dir)
    data, index = {}, {}
    for tar in sorted(images_dir.rglob("*.tar")):
        rel = tar.relative_to(images_dir).as_posix()
        data[rel] = tar
        index[rel[:-4] + ".json"] = json.dumps(tar_index(tar)).encode()
    return data, index


class FakeHub:
    """Dataset repositories served on 127.0.0.1; ``url`` is the HF_ENDPOINT to use."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"branches": {name: sha}, "commits": {sha: files}}
        self.token: str | None = None
        self.ignore_range = False
        self.delay = 0.0
        self.delay_suffix = ""  # only requests of paths ending so wait (default: all)
        self.retry_after = "0"
        self.redirect = False  # tars: resolve answers 302 to a storage URL (another port)
        self.generation = 0  # storage URLs of older generations answer 403 (expired)
        self.storage_requests: list[tuple] = []  # (path, range header, status, had a token)
        self.requests: list[tuple] = []  # (method, repo, path, range header, status)
        self.sent = Counter()  # body bytes of files sent per repository
        self._faults: list[list] = []  # [kind, times left, path suffix]
        self._lock = threading.Lock()
        self._server = None
        self._metas: dict = {}

    def add_repo(self, repo_id: str, files: dict, branch: str = "main") -> str:
        """Commit ``files`` ({path: bytes or Path}) to ``branch``; returns the commit sha."""
        h = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            content = files[path]
            h.update(path.encode() + b"\0" + (content if isinstance(content, bytes)
                                               else Path(content).read_bytes()))
        sha = h.hexdigest()
        repo = self.repos.setdefault(repo_id, {"branches": {}, "commits": {}})
        repo["commits"][sha] = dict(files)
        repo["branches"][branch] = sha
        return sha

    def inject(self, kind: str, times: int = 1, suffix: str = ".tar") -> None:
        """The next ``times`` requests of files ending in ``suffix`` answer with ``kind``:
        ``429``, ``503`` (any GET or HEAD), ``cut`` (half the body, then the connection
        closes), ``corrupt`` (one byte flipped) (ranged GETs; a fault taken by another request
        is spent)."""
        with self._lock:
            self._faults.append([kind, times, suffix])

    def _meta(self, content) -> tuple[int, str]:
        """(size, sha256) of a file's content, computed once."""
        key = id(content) if isinstance(content, bytes) else str(content)
        with self._lock:
            meta = self._metas.get(key)
        if meta is None:
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            meta = (len(data), hashlib.sha256(data).hexdigest())
            with self._lock:
                self._metas[key] = meta
        return meta

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault[1] > 0 and path.endswith(fault[2]):
                    fault[1] -= 1
                    return fault[0]
        return None

    def data_requests(self, suffix: str = ".tar") -> list[tuple]:
        """The GETs of files ending in ``suffix``."""
        return [r for r in self.requests if r[0] == "GET" and r[2] and r[2].endswith(suffix)]

    def __enter__(self):
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._servers = [_QuietServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.url, self.storage_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        for server in self._servers:
            server.shutdown()
            server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up (a cut or a refused answer) is part of the tests


def _read(content, start: int, n: int) -> bytes:
    if isinstance(content, bytes):
        return content[start:start + n]
    with open(content, "rb") as f:
        f.seek(start)
        return f.read(n)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stall between
    hub: FakeHub

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _send(self, status: int, headers: dict, body: bytes = b"", head: bool = False,
              repo: str | None = None, path: str | None = None):
        self.hub.requests.append((self.command, repo, path, self.headers.get("Range"), status))
        self.send_response(status)
        length = headers.pop("_length", len(body))
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            if path is not None:  # files only, not the API's answers
                with self.hub._lock:
                    self.hub.sent[repo] += len(body)

    def _error(self, status: int, code: str, message: str, repo=None, path=None, head=False):
        body = json.dumps({"error": message}).encode()
        self._send(status, {"X-Error-Code": code, "X-Error-Message": message,
                            "Content-Type": "application/json"}, body, head, repo, path)

    def _answer(self, head: bool):
        hub = self.hub
        url_path = unquote(urlsplit(self.path).path)
        if hub.delay and url_path.endswith(hub.delay_suffix):
            time.sleep(hub.delay)
        m_store = STORAGE.match(url_path)
        if m_store:
            return self._storage(m_store, head)
        m_info, m_file = INFO.match(url_path), RESOLVE.match(url_path)
        m = m_info or m_file
        if m is None:
            return self._error(404, "NotFound", "no such route", head=head)
        repo_id, rev = m.group(1), m.group(2) or "main"
        path = m_file.group(3) if m_file else None
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(401, "GatedRepo", f"Access to dataset {repo_id} is restricted.",
                               repo_id, path, head)
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", repo_id, path, head)
        sha = repo["branches"].get(rev, rev if rev in repo["commits"] else None)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo_id, path, head)
        files = repo["commits"][sha]
        if m_info:
            body = json.dumps({"id": repo_id, "sha": sha, "private": False, "gated": False,
                               "siblings": [{"rfilename": p} for p in sorted(files)]}).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head, repo_id)
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist", repo_id, path, head)
        if hub.redirect and path.endswith(".tar"):
            location = f"{hub.storage_url}/storage/{hub.generation}/{repo_id}/{sha}/{path}"
            return self._send(302, {"Location": location, "X-Repo-Commit": sha}, b"", head,
                              repo_id, path)
        return self._file(files[path], sha, head, repo_id, path)

    def _storage(self, m, head: bool):
        hub = self.hub
        generation, repo_id, sha, path = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        files = hub.repos.get(repo_id, {}).get("commits", {}).get(sha, {})
        ok = generation == hub.generation and path in files
        hub.storage_requests.append((path, self.headers.get("Range"), 206 if ok else 403,
                                     "Authorization" in self.headers))
        if not ok:
            return self._send(403, {}, b"Request has expired", head, repo_id, path)
        return self._file(files[path], sha, head, repo_id, path)

    def _file(self, content, sha: str, head: bool, repo_id: str, path: str):
        hub = self.hub
        size, etag = hub._meta(content)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        fault = hub._take_fault(path)
        if fault in ("429", "503"):
            extra = {"Retry-After": hub.retry_after} if fault == "429" else {}
            return self._send(int(fault), extra, b"slow down", head, repo_id, path)
        ranged = RANGE.match(self.headers.get("Range", ""))
        if head or ranged is None or hub.ignore_range:
            headers["_length"] = size
            return self._send(200, headers, b"" if head else _read(content, 0, size), head,
                              repo_id, path)
        start, end = int(ranged.group(1)), min(int(ranged.group(2)), size - 1)
        body = _read(content, start, end + 1 - start)
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if fault == "corrupt":
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
        if fault == "cut":
            headers["_length"] = len(body)
            self.close_connection = True
            return self._send(206, headers, body[:len(body) // 2], False, repo_id, path)
        return self._send(206, headers, body, False, repo_id, path)
