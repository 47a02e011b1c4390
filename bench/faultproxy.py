"""A fault- and latency-injecting HTTP proxy for `make drills` and `make bench`: a real loopback
process between a client (s3fs, botocore) and an HTTP endpoint (a moto S3 server) that fails a share
of the requests, and can make every request as slow as an object store's.

Run it as its own process (``python -m bench.faultproxy --upstream http://127.0.0.1:PORT --error
0.1 --drop 0.05``); it prints one JSON line ``{"url": ..., "pid": ...}`` on stdout once it listens,
then forwards every request to the upstream. Each request draws one fault, or none, from a seeded
generator (the sequence of draws is fixed; which request gets which draw depends on arrival order):

    error          answered by the proxy with an S3-style 500 InternalError or 503 SlowDown (XML
                   body); the upstream never sees the request
    drop           the connection is reset after the request is read; the upstream never sees it
    lost_response  the request is forwarded (and takes effect upstream), then the connection is
                   reset before any byte of the response
    truncate       the response's status, headers (with the full Content-Length) and the first half
                   of its body are sent, then the connection is reset; responses without a body
                   are treated as lost_response

Latency (``--delay-ms D --bytes-per-s R``, default none): every request waits D ms after it is
read and before anything else happens to it (an object store's time to first byte: S3 and GCS answer
a GET after 20-60 ms), and a response body goes out on its connection at no more than R bytes/s.
Requests on different connections wait at the same time, as on a real endpoint: throughput through
the proxy depends on how many requests a client keeps in flight.

Control requests under ``/__faultproxy__/`` are never faulted, delayed or forwarded: ``GET .../stats``
returns the counters, rates and latency as JSON (with the requests in flight: now, the peak since
the latency was last set, and their integral over time, so that two snapshots give the mean);
``POST .../rates`` with a JSON object of rates sets them (unnamed kinds keep theirs); ``POST
.../latency`` with ``{"delay_ms": D, "bytes_per_s": R or null}`` sets the latency and restarts the
peak. :class:`FaultProxy` starts, controls and stops the process.

Only the standard library is imported: the proxy starts in a fraction of a second.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = ("error", "drop", "lost_response", "truncate")
CONTROL_PREFIX = "/__faultproxy__/"
# Headers that belong to one connection, not to the message (RFC 9110 7.6.1), plus Expect: the
# proxy answers 100-continue itself and sends the body upstream at once.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "expect", "proxy-connection"}
UPSTREAM_TIMEOUT_S = 60.0
PACE_SLICE = 64 * 1024  # bytes written between checks of the bandwidth cap


@dataclass
class FaultRates:
    """Probability of each fault per request; their sum (the share of faulted requests) is <= 1."""

    error: float = 0.0
    drop: float = 0.0
    lost_response: float = 0.0
    truncate: float = 0.0

    def __post_init__(self):
        for kind in FAULT_KINDS:
            value = float(getattr(self, kind))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {kind}={value} is not in [0, 1]")
            setattr(self, kind, value)
        if self.total > 1.0 + 1e-12:
            raise ValueError(f"fault rates sum to {self.total:.3f} > 1")

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in FAULT_KINDS)

    def updated(self, changes: dict) -> "FaultRates":
        unknown = sorted(set(changes) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
        return FaultRates(**{**asdict(self), **changes})


@dataclass
class Latency:
    """Added to every proxied request: ``delay_ms`` before it is served (time to first byte), and at
    most ``bytes_per_s`` for each response body on its connection (None: no cap)."""

    delay_ms: float = 0.0
    bytes_per_s: float | None = None

    def __post_init__(self):
        self.delay_ms = float(self.delay_ms)
        if not 0.0 <= self.delay_ms <= 60_000:
            raise ValueError(f"delay_ms={self.delay_ms} is not in [0, 60000]")
        if self.bytes_per_s is not None:
            self.bytes_per_s = float(self.bytes_per_s)
            if self.bytes_per_s <= 0:
                raise ValueError(f"bytes_per_s={self.bytes_per_s} must be > 0 (or null: no cap)")

    @classmethod
    def from_dict(cls, d: dict) -> "Latency":
        unknown = sorted(set(d) - {"delay_ms", "bytes_per_s"})
        if unknown:
            raise ValueError(f"unknown latency setting(s) {unknown}; known: delay_ms, bytes_per_s")
        return cls(**d)


class FaultPolicy:
    """Seeded fault draws, the latency, and the counters (thread-safe)."""

    def __init__(self, rates: FaultRates, seed: int = 0, latency: Latency | None = None):
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.rates = rates
        self.latency = latency or Latency()
        # Requests between being read and their response sent: now, peak, and the integral over
        # time (request-seconds), updated at every change.
        self.in_flight = self.in_flight_peak = 0
        self.in_flight_seconds = 0.0
        self._in_flight_since = time.monotonic()
        self.bytes_sent = 0
        self.requests = 0
        self.faults = {k: 0 for k in FAULT_KINDS}
        self.forwarded = 0
        self.upstream_errors = 0
        self.by_method: dict[str, int] = {}
        self.faults_by_method: dict[str, int] = {}

    def draw(self, method: str) -> tuple[str | None, float]:
        """(fault kind or None, a second uniform number for the fault's details)."""
        with self._lock:
            u, detail = self._rng.random(), self._rng.random()
            self.requests += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            edge = 0.0
            for kind in FAULT_KINDS:
                edge += getattr(self.rates, kind)
                if u < edge:
                    self.faults[kind] += 1
                    self.faults_by_method[method] = self.faults_by_method.get(method, 0) + 1
                    return kind, detail
            return None, detail

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def set_rates(self, changes: dict) -> None:
        with self._lock:
            self.rates = self.rates.updated(changes)

    def set_latency(self, latency: Latency) -> None:
        with self._lock:
            self.latency = latency
            self.in_flight_peak = self.in_flight

    def _advance(self) -> None:
        now = time.monotonic()
        self.in_flight_seconds += self.in_flight * (now - self._in_flight_since)
        self._in_flight_since = now

    def begin(self) -> None:
        with self._lock:
            self._advance()
            self.in_flight += 1
            self.in_flight_peak = max(self.in_flight_peak, self.in_flight)

    def end(self) -> None:
        with self._lock:
            self._advance()
            self.in_flight -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": self.requests,
                "faulted": sum(self.faults.values()),
                "faults": dict(self.faults),
                "forwarded": self.forwarded,
                "upstream_errors": self.upstream_errors,
                "by_method": dict(sorted(self.by_method.items())),
                "faults_by_method": dict(sorted(self.faults_by_method.items())),
                "rates": asdict(self.rates),
                "latency": asdict(self.latency),
                "bytes_sent": self.bytes_sent,
                "in_flight": {"now": self.in_flight, "peak": self.in_flight_peak,
                              "request_seconds": self.in_flight_seconds + self.in_flight * (
                                  time.monotonic() - self._in_flight_since)},
                "clock_s": time.monotonic(),
            }


def s3_error_body(status: int, request_number: int) -> bytes:
    code, message = {500: ("InternalError", "We encountered an internal error. Please try again."),
                     503: ("SlowDown", "Please reduce your request rate.")}[status]
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message} '
            f"(injected by faultproxy)</Message><RequestId>faultproxy-{request_number}</RequestId></Error>").encode()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: "FaultProxyServer"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one line per request would flood the drills' output

    def do_GET(self):
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    # -- request
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        self._latency: Latency | None = None  # this request's (None: a control request)
        body = self._read_body()
        if self.path.startswith(CONTROL_PREFIX):
            self._control(body)
            return
        policy = self.server.policy
        policy.begin()
        try:
            self._serve(body, policy)
        finally:
            policy.end()

    def _serve(self, body: bytes, policy: "FaultPolicy") -> None:
        self._latency = latency = policy.latency
        if latency.delay_ms:
            time.sleep(latency.delay_ms / 1000.0)
        fault, detail = policy.draw(self.command)
        if fault == "error":
            status = 500 if detail < 0.5 else 503
            self._send(status, [("Content-Type", "application/xml")], s3_error_body(status, policy.requests))
            return
        if fault == "drop":
            self._reset()
            return
        try:
            status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException) as e:
            policy.count("upstream_errors")
            self._send(502, [("Content-Type", "text/plain")], f"faultproxy: upstream failed: {e}".encode())
            return
        policy.count("forwarded")
        if fault == "lost_response" or (fault == "truncate" and (len(data) < 2 or self.command == "HEAD")):
            self._reset()
            return
        if fault == "truncate":
            self._send(status, headers, data[: len(data) // 2], reason=reason, length=len(data))
            self._reset()
            return
        self._send(status, headers, data, reason=reason)

    # -- upstream
    def _upstream(self, fresh: bool = False) -> http.client.HTTPConnection:
        local = self.server.local
        if fresh or getattr(local, "conn", None) is None:
            if getattr(local, "conn", None) is not None:
                local.conn.close()
            host, port = self.server.upstream
            local.conn = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_S)
        return local.conn

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))  # the body arrives de-chunked
        # A kept-alive upstream connection may have been closed by the upstream meanwhile: one
        # retry on a fresh connection (the proxy's own plumbing, not a fault).
        for attempt in (0, 1):
            conn = self._upstream(fresh=attempt == 1)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if attempt == 1:
                    raise
        out_headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD")]
        if resp.will_close:
            self._upstream(fresh=True)
        return resp.status, resp.reason, out_headers, data

    # -- response
    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, *, reason: str | None = None,
              length: int | None = None) -> None:
        self.send_response(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        if not no_body:
            self.send_header("Content-Length", str(len(data) if length is None else length))
        elif self.command == "HEAD" and not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", "0")
        self.end_headers()
        if not no_body and data:
            self._write_paced(data)

    def _write_paced(self, data: bytes) -> None:
        """The body, at no more than the request's latency's bytes/s (control replies: at once)."""
        cap = self._latency.bytes_per_s if self._latency is not None else None
        if cap is None:
            self.wfile.write(data)
        else:
            view, t0 = memoryview(data), time.monotonic()
            for start in range(0, len(view), PACE_SLICE):
                piece = view[start:start + PACE_SLICE]
                early = (start + len(piece)) / cap - (time.monotonic() - t0)
                if early > 0:
                    time.sleep(early)  # the piece's last byte leaves no sooner than the cap allows
                self.wfile.write(piece)
        if self._latency is not None:
            self.server.policy.count("bytes_sent", len(data))

    def _reset(self) -> None:
        """Abort the connection: RST instead of an orderly close, as a crashed server or a broken
        network does."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    # -- control
    def _control(self, body: bytes) -> None:
        name = urllib.parse.urlsplit(self.path).path[len(CONTROL_PREFIX):]
        policy = self.server.policy
        try:
            if name == "stats" and self.command == "GET":
                out = policy.snapshot()
            elif name == "rates" and self.command == "POST":
                policy.set_rates(json.loads(body or b"{}"))
                out = policy.snapshot()
            elif name == "latency" and self.command == "POST":
                policy.set_latency(Latency.from_dict(json.loads(body or b"{}")))
                out = policy.snapshot()
            else:
                self._send(404, [("Content-Type", "text/plain")], b"unknown faultproxy control request")
                return
        except (ValueError, TypeError) as e:
            self._send(400, [("Content-Type", "text/plain")], str(e).encode())
            return
        self._send(200, [("Content-Type", "application/json")], json.dumps(out).encode())


class FaultProxyServer(ThreadingHTTPServer):
    """The proxy in this process (one thread per client connection)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, listen: tuple[str, int], upstream: str, policy: FaultPolicy):
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream {upstream!r}: expected http://host:port")
        self.upstream = (parts.hostname, parts.port or 80)
        self.policy = policy
        self.local = threading.local()
        super().__init__(listen, _ProxyHandler)

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-exchange is normal here; one line each, not a traceback.
        exc = sys.exc_info()[1]
        sys.stderr.write(f"faultproxy: {client_address[0]}:{client_address[1]}: {type(exc).__name__}: {exc}\n")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


# --------------------------------------------------------------------------------------------
# the process, from the outside


class FaultProxy:
    """Starts ``python -m bench.faultproxy`` as a child process and talks to its control API."""

    def __init__(self, upstream: str, rates: FaultRates | None = None, *, seed: int = 0, host: str = "127.0.0.1",
                 log_path: str | None = None, latency: Latency | None = None):
        self.upstream, self.rates, self.seed, self.host = upstream, rates or FaultRates(), seed, host
        self.latency = latency or Latency()
        self.log_path = log_path  # the process's stderr (None: discarded)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def command(self) -> list[str]:
        r = self.rates
        return [sys.executable, "-m", "bench.faultproxy", "--upstream", self.upstream, "--host", self.host,
                "--port", "0", "--seed", str(self.seed), "--error", str(r.error), "--drop", str(r.drop),
                "--lost-response", str(r.lost_response), "--truncate", str(r.truncate),
                "--delay-ms", str(self.latency.delay_ms)] + (
                    ["--bytes-per-s", str(self.latency.bytes_per_s)] if self.latency.bytes_per_s else [])

    def start(self, timeout_s: float = 30.0) -> "FaultProxy":
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
        with open(self.log_path or os.devnull, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log, env=env, cwd=repo)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            where = f" (its stderr: {self.log_path})" if self.log_path else ""
            raise RuntimeError(f"the fault proxy did not start within {timeout_s:.0f} s{where}")
        self.url = json.loads(line)["url"]
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _control(self, name: str, payload: dict | None = None) -> dict:
        if self.url is None:
            raise RuntimeError("the fault proxy is not started")
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + CONTROL_PREFIX + name, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        return self._control("stats")

    def set_rates(self, **rates: float) -> dict:
        return self._control("rates", rates)

    def set_latency(self, delay_ms: float = 0.0, bytes_per_s: float | None = None) -> dict:
        """Set the latency of the requests read from now on, and restart the in-flight peak."""
        self.latency = Latency(delay_ms, bytes_per_s)
        return self._control("latency", asdict(self.latency))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "FaultProxy":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faultproxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="http://host:port to forward to")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (printed on stdout)")
    p.add_argument("--seed", type=int, default=0)
    for kind in FAULT_KINDS:
        p.add_argument("--" + kind.replace("_", "-"), type=float, default=0.0, help=f"share of requests: {kind}")
    p.add_argument("--delay-ms", type=float, default=0.0, help="added to every request before it is served")
    p.add_argument("--bytes-per-s", type=float, default=None, help="cap on each response body, per connection")
    args = p.parse_args(argv)
    rates = FaultRates(**{k: getattr(args, k) for k in FAULT_KINDS})
    latency = Latency(args.delay_ms, args.bytes_per_s)
    server = FaultProxyServer((args.host, args.port), args.upstream, FaultPolicy(rates, args.seed, latency))
    print(json.dumps({"url": server.url, "pid": os.getpid(), "upstream": args.upstream, "rates": asdict(rates),
                      "latency": asdict(latency)}), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
