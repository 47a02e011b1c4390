"""Shared pieces of `make bench`: its registry and results file (on ``bench.harness``), timing and
ratios, the table of figures, and the bench's own S3 endpoint with a plain object reader.

Every figure is a ratio of two sides measured in the same run: :func:`run_interleaved` runs the
sides round by round in a rotated order (no side always first), and :func:`ratio_figure` reports
the ratio of the medians with every round's absolute values beside it.
"""
from __future__ import annotations

import glob
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.harness import Column, Registry, ResultsFile, format_columns
from pipeline import uri as U

# --------------------------------------------------------------------------------------------
# the registry and the results file

# A benchmark is a function ``fn(ctx: BenchContext) -> result`` (see :func:`item_result`), run in
# registration order: ``@register(name, summary)``.
BENCHMARKS = Registry("benchmark")
register = BENCHMARKS.register
select_benchmarks = BENCHMARKS.select

# bench/results.json: canonical JSON, items sorted by name; a file of another kind is an error.
RESULTS_FILE = ResultsFile(format="rae-bench-results", version=1, items_key="items", what="bench", canonical=True,
                           strict=True)


def load_results(path: str) -> dict:
    """The results file's content, or an empty one when it does not exist."""
    return RESULTS_FILE.load(path)


def merge_results(path: str, items: dict[str, dict]) -> dict:
    """Replace the named items in the results file (others are kept) and write it atomically."""
    return RESULTS_FILE.merge(path, items)


# --------------------------------------------------------------------------------------------
# options and context


@dataclass
class BenchOptions:
    """Settings shared by the benchmarks (the command line sets them).

    device: where the trainer's batches go ("cpu" or "cuda"). quick: tiny sizes, to check the
    code paths (figures meaningless). rounds: alternations of the two sides of every ratio.
    seconds: timed seconds per measurement of a throughput. workers / batch: DataLoader workers
    and batch size of every loader compared. loader_samples: samples in the loader benchmark's store.
    storage_images: sample images encoded for the storage benchmark (0: all). work_dir: where
    stores and peer files are kept between runs. sample_data: the built-in sample image folder
    (None: ``pipeline.sample_data``'s default, generated on first use). s3_ranged_reads: the
    bench's moto server reads only the requested range for a ranged GET (see :func:`serve_moto`).
    """

    device: str = "cpu"
    quick: bool = False
    rounds: int = 3
    seconds: float = 2.0
    workers: int = 2
    batch: int = 32
    loader_samples: int = 384
    storage_images: int = 0
    work_dir: str = "bench/work"
    sample_data: str | None = None
    s3_ranged_reads: bool = True
    inception_weights: str | None = None  # Inception weights file for rFID figures (None: no rFID)


class BenchContext:
    """What a benchmark gets: the options, a work folder, a shared cache for setup that several
    benchmarks reuse (stores, uploads), and the bench's S3 endpoint, started on first use."""

    def __init__(self, options: BenchOptions, log: Callable[[str], None] | None = None):
        self.options = options
        self.work_dir = U.normalize(options.work_dir)
        os.makedirs(self.work_dir, exist_ok=True)
        self.cache: dict[str, Any] = {}
        self._s3: S3Server | None = None
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def log(self, msg: str) -> None:
        self._log(msg)

    def s3(self) -> "S3Server":
        if self._s3 is None:
            self._s3 = S3Server(ranged_reads=self.options.s3_ranged_reads)
            self.log(f"bench: starting a {self._s3.describe()}")
            self._s3.start()
        return self._s3

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None


# --------------------------------------------------------------------------------------------
# timing and ratios


@dataclass(frozen=True)
class Measurement:
    """``amount`` units (samples, bytes) in ``seconds`` of wall clock."""

    amount: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.amount / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"amount": round(self.amount, 3), "seconds": round(self.seconds, 4), "rate": _round(self.rate)}


def run_interleaved(sides: dict[str, Callable[[], Measurement]], rounds: int,
                    log: Callable[[str], None] | None = None) -> dict[str, list[Measurement]]:
    """Run every side once per round, round r in the side order rotated by r; returns each side's
    measurements in round order. Alternating the sides spreads the machine's noise over all of them."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(sides)
    out: dict[str, list[Measurement]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            m = sides[name]()
            out[name].append(m)
            if log:
                log(f"  round {r + 1}/{rounds} {name}: {m.rate:.1f}/s ({m.amount:.0f} in {m.seconds:.2f} s)")
    return out


def _round(x: float, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def side(label: str, values: list[float], unit: str, **details) -> dict:
    """One side of a ratio: its label, per-round values and their median (the figure's input)."""
    if not values:
        raise ValueError(f"side {label!r} has no values")
    return {"label": label, "unit": unit, "median": _round(statistics.median(values)),
            "values": [_round(v) for v in values], **details}


def rates(measurements: list[Measurement]) -> list[float]:
    return [m.rate for m in measurements]


def check_target(ratio: float | None, target: str | None) -> bool | None:
    """``target`` like ">= 0.5", "<= 1", "> 1": whether the ratio meets it (None: no target/ratio)."""
    if target is None or ratio is None:
        return None
    op, _, value = target.strip().partition(" ")
    ops = {">=": ratio.__ge__, ">": ratio.__gt__, "<=": ratio.__le__, "<": ratio.__lt__}
    if op not in ops:
        raise ValueError(f"target {target!r}: expected '<op> <number>' with op one of {sorted(ops)}")
    return bool(ops[op](float(value)))


def ratio_figure(figure: str, numerator: dict, denominator: dict, *, target: str | None = None,
                 note: str | None = None) -> dict:
    """A figure: median(numerator) / median(denominator), both sides (see :func:`side`) beside it,
    the per-round ratios when both sides have a value per round, and whether ``target`` is met."""
    num, den = statistics.median(numerator["values"]), statistics.median(denominator["values"])
    ratio = _round(num / den) if den else None
    fig = {"figure": figure, "ratio": ratio, "numerator": numerator, "denominator": denominator,
           "target": target, "target_met": check_target(ratio, target)}
    if len(numerator["values"]) == len(denominator["values"]) > 1:
        fig["round_ratios"] = [_round(n / d) if d else None for n, d in zip(numerator["values"], denominator["values"])]
    if note:
        fig["note"] = note
    return fig


def item_result(figures: list[dict], *, settings: dict, data: str, notes: list[str] | None = None, **extra) -> dict:
    """The result of one benchmark item as stored in results.json (the runner adds run facts)."""
    return {"figures": figures, "settings": settings, "data": data, "notes": list(notes or []), **extra}


# --------------------------------------------------------------------------------------------
# the table


def _fmt_value(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _fmt_side(s: dict) -> str:
    return f"{s['label']}: {_fmt_value(s['median'])} {s['unit']}"


def format_table(items: dict[str, dict]) -> str:
    """A plain-text table: one row per figure (item, figure, ratio, numerator, denominator, target),
    a figure's note on an indented line below it."""
    rows: list[tuple[str, ...] | str] = []
    for name, result in items.items():
        for fig in result.get("figures", []):
            target = fig.get("target") or ""
            if fig.get("target_met") is not None:
                target += " ok" if fig["target_met"] else " MISSED"
            rows.append((name, fig["figure"], _fmt_value(fig["ratio"]), _fmt_side(fig["numerator"]),
                         _fmt_side(fig["denominator"]), target))
            if fig.get("note"):
                rows.append(f"{'':4}note: {fig['note']}")
    columns = [Column(t) for t in ("item", "figure", "ratio", "numerator", "denominator", "target")]
    return "\n".join(format_columns(columns, rows))


# --------------------------------------------------------------------------------------------
# S3: the bench's own endpoint and a plain object reader


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Access:
    """Endpoint and credentials of an S3 service, passed explicitly (no environment variables).

    Picklable: each process (DataLoader worker) makes its own boto3 client on first use.
    """

    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"
    _clients: dict = field(default_factory=dict, compare=False, repr=False)

    def storage_options(self) -> dict:
        """fsspec/s3fs options for this endpoint."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region}}

    def client(self):
        """This process's boto3 S3 client (boto3 clients are thread-safe, not fork-safe)."""
        pid = os.getpid()
        if pid not in self._clients:
            import boto3

            self._clients.clear()
            self._clients[pid] = boto3.client(
                "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                aws_secret_access_key=self.secret, region_name=self.region)
        return self._clients[pid]

    def __getstate__(self):
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret, "region": self.region}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_clients", {})


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single "bytes=a-b", "bytes=a-" or "bytes=-n" range of an object of
    ``size`` bytes; None for anything else (multiple or unsatisfiable ranges)."""
    import re

    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not m or not (m[1] or m[2]) or size == 0:
        return None
    if m[1]:
        first, last = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    else:
        first, last = max(0, size - int(m[2])), size - 1
    return (first, last) if first <= last else None


def serve_moto(host: str, port: int, ranged_reads: bool) -> None:
    """Run moto's S3 server (blocking). ``ranged_reads``: serve a ranged GET by reading only the
    range from the stored object, as S3 does; stock moto reads the whole object for every ranged
    GET and then slices it. Everything else is stock moto."""
    if ranged_reads:
        from moto.s3.responses import S3Response

        stock_get_object = S3Response.get_object

        def get_object(self):
            if self.querystring.get("partNumber"):
                return stock_get_object(self)
            key, not_modified = self._get_key()
            rng = None if not_modified else _parse_range(self.headers.get("range"), key.size)
            if rng is None:
                return stock_get_object(self)
            first, last = rng
            with key.lock:
                key._value_buffer.seek(first)
                data = key._value_buffer.read(last - first + 1)
            headers = self._get_cors_headers_other()
            headers.update(key.response_dict)
            headers.update(key.metadata)
            headers.update({"Accept-Ranges": "bytes", "content-range": f"bytes {first}-{last}/{key.size}",
                            "content-length": str(len(data))})
            return 206, headers, data

        S3Response.get_object = get_object
    from moto.server import main as moto_main

    moto_main(["-H", host, "-p", str(port)])


class S3Server:
    """A moto S3 server in its own process on 127.0.0.1:<free port>, with one bucket; objects live
    in that process. ``ranged_reads=False``: stock ``python -m moto.server``, as the test suite
    starts its own; True: the same server serving ranged GETs at the cost of the range (see
    :func:`serve_moto`)."""

    def __init__(self, bucket: str = "bench", *, ranged_reads: bool = False):
        self.bucket = bucket
        self.ranged_reads = ranged_reads
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def describe(self) -> str:
        if self.ranged_reads:
            return "moto server (own process, 127.0.0.1) serving ranged GETs by reading only the range, as S3 does"
        return "stock moto server (python -m moto.server, own process, 127.0.0.1)"

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child_env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                         AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                         PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
        if self.ranged_reads:
            cmd = [sys.executable, "-c", f"from bench.common import serve_moto; serve_moto('127.0.0.1', {port}, True)"]
        else:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the moto S3 server on {self.url} did not start within {timeout_s:.0f} s")
                time.sleep(0.2)
        self.access.client().create_bucket(Bucket=self.bucket)
        return self

    @property
    def access(self) -> S3Access:
        if self.url is None:
            raise RuntimeError("the S3 server is not started")
        return S3Access(self.url)

    def uri(self, *parts: str) -> str:
        return U.join(f"s3://{self.bucket}", *parts)

    def upload_dir(self, local_dir: str, prefix: str) -> int:
        """Copy every file under ``local_dir`` to ``s3://bucket/prefix/...``; returns the bytes uploaded."""
        return upload_dir(self.access, self.bucket, local_dir, prefix)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def upload_dir(access: S3Access, bucket: str, local_dir: str, prefix: str) -> int:
    """Copy every file under ``local_dir`` to ``s3://bucket/prefix/<relative path>`` (PUTs from 8
    threads: many small files); returns the bytes uploaded."""
    from concurrent.futures import ThreadPoolExecutor

    client = access.client()

    def put(item: tuple[str, str]) -> int:
        rel, path = item
        with open(path, "rb") as f:
            data = f.read()
        client.put_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{rel}", Body=data)
        return len(data)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(put, local_files(local_dir)))


def local_files(root: str) -> list[tuple[str, str]]:
    """(relative POSIX path, absolute path) of every file under ``root``, sorted by relative path."""
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


class ObjectReader:
    """Whole-object and byte-range reads under a root: a local folder or ``s3://bucket/prefix``
    (through boto3, one GET per call). Picklable; each process opens its own client."""

    def __init__(self, root: str, s3: S3Access | None = None):
        self.root = U.normalize(root)
        self.is_s3 = self.root.startswith("s3://")
        if self.is_s3:
            if s3 is None:
                raise ValueError(f"{root}: reading s3:// needs the endpoint (S3Access)")
            self.bucket, _, self.prefix = self.root[len("s3://"):].partition("/")
        elif "://" in self.root:
            raise ValueError(f"{root}: only local folders and s3:// are supported")
        self.s3 = s3

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self, sub: str = "") -> list[tuple[str, int]]:
        """(relative key, size in bytes) of every object under ``sub``, sorted by key."""
        if not self.is_s3:
            base = os.path.join(self.root, sub) if sub else self.root
            rel0 = os.path.relpath(base, self.root)
            return [((f"{rel0}/{rel}" if rel0 != "." else rel), os.path.getsize(p)) for rel, p in local_files(base)]
        client, prefix = self.s3.client(), self._key(sub).rstrip("/") + "/"
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append((obj["Key"][len(self.prefix) + 1 if self.prefix else 0:], int(obj["Size"])))
        return sorted(out)

    def read(self, rel: str) -> bytes:
        if not self.is_s3:
            with open(os.path.join(self.root, rel), "rb") as f:
                return f.read()
        return self.s3.client().get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of one object."""
        if stop <= start:
            return b""
        if not self.is_s3:
            with open(os.path.join(self.root, rel), "rb") as f:
                f.seek(start)
                return f.read(stop - start)
        resp = self.s3.client().get_object(Bucket=self.bucket, Key=self._key(rel), Range=f"bytes={start}-{stop - 1}")
        return resp["Body"].read()


def raw_read(reader: ObjectReader, keys: list[str]) -> tuple[int, float]:
    """Read each object whole into memory, one after another: (bytes read, seconds)."""
    total = 0
    t0 = time.perf_counter()
    for key in keys:
        total += len(reader.read(key))
    return total, time.perf_counter() - t0


def sample_image_files(root: str) -> list[str]:
    """The sample data's image files (train, then val), sorted: ``root/<split>/<class>/<file>``."""
    files = []
    for split in ("train", "val"):
        files += sorted(p for p in glob.glob(os.path.join(root, split, "*", "*")) if os.path.isfile(p))
    return files
