"""A fault-injecting HTTP proxy on 127.0.0.1, put in front of the real S3 server or the tracking server.

Clients are pointed at :attr:`FaultProxy.url` (``MLFLOW_S3_ENDPOINT_URL`` or
``MLFLOW_TRACKING_URI``); the proxy forwards each request to the upstream port on 127.0.0.1
and relays the answer, unless a :class:`Rule` whose pattern matches the request line
(``"PUT /mlflow/...?partNumber=2&uploadId=..."``) says otherwise. Rules count their matches,
so a test can fail exactly the Nth request of one phase of a save or a load:

- ``status``: answer a canned error (S3's ``503 Slow Down`` / ``500 InternalError`` XML, or
  MLflow's JSON) instead of forwarding;
- ``reset_request``: take ``after_bytes`` of the request body, then reset the connection;
- ``reset_response`` / ``cut_response``: forward, relay ``after_bytes`` of the answer's body,
  then reset the connection / close it cleanly (a short body);
- ``drop_response``: forward and let the server act, then reset instead of answering;
- ``stall``: take the request and never answer it, for ``stall_s`` at most, then reset.

Everything is bounded: at most :data:`MAX_CONNECTIONS` connections at once, every socket
operation times out after :data:`IO_TIMEOUT` seconds, stalls end at ``stall_s`` or
:meth:`FaultProxy.close`, whichever comes first, and ``close`` joins every thread with a
timeout. The proxy listens on, and connects to, 127.0.0.1 only.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO

HOST = "127.0.0.1"
MAX_CONNECTIONS = 64
IO_TIMEOUT = 60.0
MAX_HEAD_BYTES = 64 * 1024
MAX_ACCEPTS = 100_000  # per proxy
MAX_REQUESTS = 10_000  # per client connection
BLOCK = 256 * 1024
ACTIONS = ("status", "reset_request", "reset_response", "cut_response", "drop_response", "stall")

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down", 504: "Gateway Timeout"}
_S3_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Rule:
    """Fault the requests whose request line matches ``pattern``: skip ``skip`` matches, then fault ``times``.

    ``times=None`` faults every match after the skipped ones.
    """

    pattern: str
    action: str
    skip: int = 0
    times: int | None = 1
    status: int = 503
    after_bytes: int = 0
    stall_s: float = 0.0
    matched: int = 0
    injected: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        self._regex = re.compile(self.pattern)

    def take(self, request_line: str) -> bool:
        """Whether this request is to be faulted (counts the match)."""
        if not self._regex.search(request_line):
            return False
        self.matched += 1
        if self.matched <= self.skip:
            return False
        if self.times is not None and self.injected >= self.times:
            return False
        self.injected += 1
        return True


class _Closed(Exception):
    """The peer closed the connection (cleanly, between requests)."""


class FaultProxy:
    """An HTTP/1.1 proxy from ``url`` to ``127.0.0.1:upstream_port`` that injects the faults its rules say.

    ``flavor`` is ``"s3"`` (canned errors in S3's XML) or ``"mlflow"`` (MLflow's JSON).
    """

    def __init__(self, upstream_port: int, flavor: str = "s3") -> None:
        if flavor not in ("s3", "mlflow"):
            raise ValueError(f"flavor must be 's3' or 'mlflow', got {flavor!r}")
        self.upstream_port = upstream_port
        self.flavor = flavor
        self.rules: list[Rule] = []
        # Request lines seen, newest last (bounded).
        self.requests: deque[str] = deque(maxlen=20000)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, 0))
        self._listener.listen(MAX_CONNECTIONS)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._acceptor.start()

    # -- rules ----------------------------------------------------------------------------------

    def add(self, pattern: str, action: str, **kwargs: object) -> Rule:
        rule = Rule(pattern, action, **kwargs)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    @property
    def injected(self) -> int:
        with self._lock:
            return sum(rule.injected for rule in self.rules)

    def seen(self, pattern: str) -> list[str]:
        """Request lines seen so far that match ``pattern``."""
        regex = re.compile(pattern)
        with self._lock:
            return [line for line in self.requests if regex.search(line)]

    def _decide(self, request_line: str) -> Rule | None:
        with self._lock:
            self.requests.append(request_line)
            for rule in self.rules:
                if rule.take(request_line):
                    return rule
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        for _ in range(MAX_ACCEPTS):
            if self._stop.is_set():
                return
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(timeout=IO_TIMEOUT):
                _reset(client)
                continue
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    # -- one client connection ------------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(IO_TIMEOUT)
        self._track(client)
        reader = client.makefile("rb")
        try:
            for _ in range(MAX_REQUESTS):
                if self._stop.is_set() or not self._exchange(client, reader):
                    break
        except (_Closed, OSError, ValueError):
            pass
        finally:
            reader.close()
            client.close()
            self._untrack(client)
            self._slots.release()

    def _exchange(self, client: socket.socket, reader: BinaryIO) -> bool:
        """Serve one request; False when the client connection is done."""
        request_line, headers = _read_head(reader)
        method, target = request_line.split(" ")[:2]
        if _header(headers, "expect").lower() == "100-continue":
            # Answer as a server would; the Expect header is not signed, so it can go.
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        rule = self._decide(f"{method} {target}")
        if rule is not None and rule.action == "reset_request":
            _read_body(reader, headers, limit=rule.after_bytes)
            _reset(client)
            return False
        body = _read_body(reader, headers)
        if rule is not None and rule.action == "status":
            client.sendall(self._canned(rule.status, target))
            return _header(headers, "connection").lower() != "close"
        if rule is not None and rule.action == "stall":
            self._stop.wait(rule.stall_s)
            _reset(client)
            return False
        forwarded = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
        forwarded.append(("Connection", "close"))
        head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in forwarded) + "\r\n"
        upstream = socket.create_connection((HOST, self.upstream_port), timeout=IO_TIMEOUT)
        self._track(upstream)
        up_reader = upstream.makefile("rb")
        try:
            upstream.sendall(head.encode("latin-1") + body)
            return self._relay(client, up_reader, method, rule) and _header(headers, "connection").lower() != "close"
        finally:
            up_reader.close()
            upstream.close()
            self._untrack(upstream)

    def _relay(self, client: socket.socket, up: BinaryIO, method: str, rule: Rule | None) -> bool:
        """Relay one response (or fault it); False when the client connection must end."""
        for _ in range(100):  # interim 1xx answers, then the response
            status_line, headers = _read_head(up)
            status = int(status_line.split(" ")[1])
            raw_head = (status_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
            if not 100 <= status < 200:
                break
            client.sendall(raw_head)
        else:
            raise ValueError("too many interim responses")
        action = rule.action if rule is not None else None
        if action == "drop_response":
            _drain(up, method, status, headers)
            _reset(client)
            return False
        budget = rule.after_bytes if rule is not None and action in ("reset_response", "cut_response") else None
        client.sendall(raw_head)
        sent = _copy_body(up, client, method, status, headers, budget)
        if budget is not None:
            if action == "reset_response":
                _reset(client)
            else:
                client.shutdown(socket.SHUT_RDWR)
            return False
        return sent and _header(headers, "connection").lower() != "close"

    def _canned(self, status: int, target: str) -> bytes:
        reason = _REASONS.get(status, "Error")
        if self.flavor == "s3":
            code = _S3_CODES.get(status, "InternalError")
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected by the reliability proxy</Message>"
                f"<Resource>{target.split('?')[0]}</Resource><RequestId>reliability-proxy</RequestId></Error>"
            ).encode()
            content_type = "application/xml"
        else:
            error = {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected by the reliability proxy"}
            body = json.dumps(error).encode()
            content_type = "application/json"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "x-amz-request-id: reliability-proxy\r\n\r\n"
        )
        return head.encode() + body


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _read_head(reader: BinaryIO) -> tuple[str, list[tuple[str, str]]]:
    first = reader.readline(MAX_HEAD_BYTES)
    if not first:
        raise _Closed()
    if not first.endswith(b"\r\n"):
        raise ValueError("request or status line too long or cut")
    lines: list[str] = []
    total = len(first)
    for _ in range(MAX_HEAD_BYTES):  # each line takes at least one byte of the budget
        line = reader.readline(MAX_HEAD_BYTES)
        total += len(line)
        if not line.endswith(b"\n") or total > MAX_HEAD_BYTES:
            raise ValueError("header block too long or cut")
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line.decode("latin-1").rstrip("\r\n"))
    else:
        raise ValueError("header block too long")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return first.decode("latin-1").rstrip("\r\n"), headers


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _read_exact(reader: BinaryIO, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise _Closed()
    return data


def _read_chunked(reader: BinaryIO) -> bytes:
    """The raw bytes of a chunked body, framing included."""
    out = bytearray()
    for _ in range(1_000_000):
        size_line = reader.readline(MAX_HEAD_BYTES)
        if not size_line.endswith(b"\n"):
            raise _Closed()
        out += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            for _ in range(1000):  # trailers, then the empty line
                line = reader.readline(MAX_HEAD_BYTES)
                if not line.endswith(b"\n"):
                    raise _Closed()
                out += line
                if line in (b"\r\n", b"\n"):
                    return bytes(out)
            raise ValueError("too many trailers")
        out += _read_exact(reader, size + 2)
    raise ValueError("too many chunks")


def _read_body(reader: BinaryIO, headers: list[tuple[str, str]], limit: int | None = None) -> bytes:
    """A request's body (framing kept for chunked ones); with ``limit``, at most that many bytes of it."""
    if "chunked" in _header(headers, "transfer-encoding").lower():
        if limit is not None:
            return reader.read(limit) if limit else b""
        return _read_chunked(reader)
    length = int(_header(headers, "content-length") or 0)
    if limit is not None:
        return reader.read(min(limit, length)) if limit and length else b""
    return _read_exact(reader, length) if length else b""


def _has_no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in (204, 304)


def _drain(up: BinaryIO, method: str, status: int, headers: list[tuple[str, str]]) -> None:
    if _has_no_body(method, status):
        return
    if "chunked" in _header(headers, "transfer-encoding").lower():
        _read_chunked(up)
        return
    length = _header(headers, "content-length")
    if length:
        _read_exact(up, int(length))
        return
    for _ in range(1_000_000):
        if not up.read(BLOCK):
            return


def _copy_body(
    up: BinaryIO, client: socket.socket, method: str, status: int, headers: list[tuple[str, str]], budget: int | None
) -> bool:
    """Relay a response body, at most ``budget`` bytes of it; False when it was delimited by the close."""
    if _has_no_body(method, status):
        return True
    if "chunked" in _header(headers, "transfer-encoding").lower():
        raw = _read_chunked(up)
        client.sendall(raw if budget is None else raw[:budget])
        return True
    length = _header(headers, "content-length")
    left = int(length) if length else None
    if budget is not None:
        left = budget if left is None else min(left, budget)
    for _ in range(1_000_000):
        if left == 0:
            return length != ""
        chunk = up.read(BLOCK if left is None else min(BLOCK, left))
        if not chunk:
            if left is not None and length:
                raise _Closed()
            return False
        client.sendall(chunk)
        if left is not None:
            left -= len(chunk)
    raise ValueError("response too long")
