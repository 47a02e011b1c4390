"""`make drills`: faults the pipeline must survive, each staged for real and checked.

Every drill runs the real commands (``python -m pipeline.cli encode|train-dit|stores verify``) as
subprocesses against servers the drills start themselves on 127.0.0.1 (a local Ray cluster, a moto
S3 server, the fault proxy of ``bench.faultproxy``), injects one fault, and checks the outcome
against a clean run made in the same session. Each result says what was done, what was expected,
what happened and whether anything was lost; ``bench/drills.json`` keeps them (merged by drill
name) and a table is printed at the end::

    python -m bench.drills [--quick] [--only NAME,...] [--out bench/drills.json]

Drills (``--only`` names): encode_driver_kill, encode_actor_kill, encode_concurrent,
s3_faults_encode, s3_faults_train, corrupt_chunk, train_ckpt_kill, train_nan, bad_input.

The encode drills share one configuration: the built-in sample data (16 images, train split), a
shallow DINOv2-B (1 block, random weights: the encoder's cost is not what is drilled), 4 shards of
4, micro-batches of 4, one encoder actor with one thread. A clean run of it is the reference every
encode drill's store is compared with, object by object (sha256 of every object's bytes).

The encoder actor is found through Ray's actor table: ``ray.util.state.list_actors`` when the
dashboard is installed, else the GCS table (a minimal Ray, as here). Peak memory comes from /proc
(Linux). ``--device cuda`` lets the jobs see this machine's GPUs (default: hidden).

Nothing here sets environment variables of this process: the children get theirs explicitly (Ray on
loopback without auth, the hub offline, the S3 endpoint of the drill).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_FORMAT = "rae-drills-results"
RESULTS_VERSION = 1
MIB = 1024 * 1024

# The local Ray cluster of the drills: logical CPUs (the machine's 2 cores) and a small object store.
RAY_CPUS = 2
RAY_OBJECT_STORE_BYTES = 512 * MIB
# The shared encode configuration (see the module docstring).
ENCODE_SAMPLES_PER_SHARD = 4
ENCODE_ARGS = [
    "--encoder", "dinov2", "--weights", "random", "--split", "train", "--resolution", "256",
    "--samples-per-shard", str(ENCODE_SAMPLES_PER_SHARD), "--batch-size", "4", "--num-actors", "1",
    "--threads", "1", "--set", 'encoder_overrides={"depth": 1}', "--set", "actor_cpus=0.5", "--no-progress",
]  # fmt: skip
ENCODER_ACTOR_CLASS = "ShardEncoder"  # Ray Data names the actor MapWorker(MapBatches(ShardEncoder))
# Share of S3 requests the proxy fails, per kind (bench.faultproxy.FAULT_KINDS): 15% in all.
S3_FAULTS = {"error": 0.06, "drop": 0.04, "lost_response": 0.02, "truncate": 0.03}
S3_BUCKET = "drills"
# Training drills: the debug preset, quiet, on the clean sample store.
TRAIN_QUIET = ["train.progress=false", "train.tensorboard=false"]
# A wider debug model (checkpoints of ~140 MB with EMA and Adam moments) so that a checkpoint write
# lasts long enough for a SIGKILL to land inside it.
TRAIN_WIDE = ["model.hidden_size=256", "model.head_hidden_size=512"]
# Memory bound of the bad-input drill: the job's largest process may grow at most this much over
# the same process role in the clean run (decoding the 20000 x 20000 header would need 1144 MiB).
BAD_INPUT_RSS_SLACK_MIB = 256
WORK_MARKER = ".drills-work"  # only a work folder holding this file is ever emptied


def log(msg: str) -> None:
    print(f"[drills {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# records, the registry, the table, the results file


@dataclass
class DrillRecord:
    """One drill's outcome: what was done, what was expected, what happened, what was lost."""

    name: str
    category: str
    did: str = ""
    expected: str = ""
    happened: str = ""
    lost: str = ""
    ok: bool = False
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)  # problems in the code under test, stated precisely
    details: dict = field(default_factory=dict)
    error: str | None = None  # the drill itself failed to run (not the same as ok=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Drill:
    name: str
    category: str
    run: Callable[["DrillContext", DrillRecord], None]
    summary: str


DRILLS: dict[str, Drill] = {}


def drill(name: str, category: str, summary: str) -> Callable:
    """Register ``fn(ctx, record)``: it fills the record (and may raise: the drill then fails)."""

    def add(fn):
        if name in DRILLS:
            raise ValueError(f"drill {name!r} is registered twice")
        DRILLS[name] = Drill(name, category, fn, summary)
        return fn

    return add


def select_drills(only: str | None) -> list[str]:
    """Names to run: all in registration order, or the comma-separated ``only`` list (checked)."""
    if not only:
        return list(DRILLS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise ValueError(f"unknown drill(s) {unknown}; valid names: {', '.join(DRILLS)}")
    return [n for n in DRILLS if n in names]


def _cell(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(records: dict[str, dict]) -> str:
    """A summary line per drill, then each drill's done / expected / happened / lost, wrapped."""
    lines = [f"{'drill':<20} {'category':<9} {'result':<6} {'seconds':>8} {'findings':>8}  lost", "-" * 105]
    for name, r in records.items():
        result = "ERROR" if r.get("error") else ("PASS" if r.get("ok") else "FAIL")
        lines.append(f"{name:<20} {r.get('category', ''):<9} {result:<6} {r.get('seconds', 0):>8.1f} "
                     f"{len(r.get('findings') or []):>8}  {_cell(r.get('lost', ''), 52)}")
    for name, r in records.items():
        result = "ERROR" if r.get("error") else ("PASS" if r.get("ok") else "FAIL")
        lines += ["", f"[{name}] {result} ({r.get('seconds', 0):.1f} s)"]
        rows = [("done", r.get("did")), ("expected", r.get("expected")), ("happened", r.get("happened")),
                ("lost", r.get("lost"))]
        rows += [("finding", f) for f in r.get("findings") or []]
        if r.get("error"):
            rows.append(("error", r["error"]))
        for label, text in rows:
            wrapped = textwrap.wrap(" ".join(str(text or "").split()), 90) or [""]
            lines.append(f"  {label + ':':<10}{wrapped[0]}")
            lines += [f"  {'':<10}{w}" for w in wrapped[1:]]
    return "\n".join(lines)


def load_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if data.get("format") == RESULTS_FORMAT and data.get("version") == RESULTS_VERSION else {}


def merge_results(path: str, run: dict, records: dict[str, dict]) -> dict:
    """Write ``run`` (facts of this invocation) with the drills of an earlier file that were not
    rerun, and this run's; returns what was written."""
    old = load_results(path)
    drills = {**old.get("drills", {}), **records}
    out = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, **run, "drills": drills}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------------------------
# processes: /proc readers (Linux), resident memory of a job, child processes


def proc_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo += proc_children(p)
    return out


def proc_memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB: resident memory now and its peak over the process's life."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
    hwm = re.search(r"^VmHWM:\s+(\d+)", text, re.M)
    if not rss or not hwm:
        return None  # a zombie or kernel thread
    return int(rss[1]), int(hwm[1])


def proc_title(pid: int) -> str:
    """The process title (Ray workers set theirs to ``ray::<actor or task>[.<method>]``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return ""
    return " ".join(p.decode(errors="replace") for p in parts if p).strip()


def proc_env(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(name.encode() + b"="):
                    return item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    return None


RAY_NO_JOB = "ffffffff"  # RAY_JOB_ID of workers started before any job claimed them


JOB_WORK_TITLES = ("ShardEncoder", "read_shard", "write_shard_row")  # Ray workers running an encode job's work


class MemorySampler:
    """Peak resident memory of one encode job: its driver's process tree, plus the Ray workers that
    ran the job's work (a title naming ShardEncoder, read_shard or write_shard_row at some poll) or
    were started for its Ray job (a ``RAY_JOB_ID`` that was not there when the sampler started).
    Workers of earlier jobs and Ray's shared actors are left out. Meant for one job at a time.

    Each process's peak is its kernel high-water mark (VmHWM), so a spike between two polls still
    counts while the process lives; the tree's peak is the largest sum of current RSS seen by a poll.
    """

    def __init__(self, job_pid: int, ray_root_pid: int | None, interval_s: float = 0.05):
        self.job_pid, self.ray_root_pid, self.interval_s = job_pid, ray_root_pid, interval_s
        self.peaks: dict[int, int] = {}
        self.titles: dict[int, set[str]] = {}
        self.tree_peak_kib = 0
        self._env_cache: dict[int, str | None] = {}
        self._old_jobs = {self._job_of(p) for p in self._ray_workers()} - {RAY_NO_JOB, None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _ray_workers(self) -> list[int]:
        if not self.ray_root_pid:
            return []
        return [p for p in proc_tree(self.ray_root_pid) if proc_title(p).startswith("ray::")]

    def _job_of(self, pid: int) -> str | None:
        if pid not in self._env_cache:
            self._env_cache[pid] = proc_env(pid, "RAY_JOB_ID")
        return self._env_cache[pid]

    def _belongs(self, pid: int) -> bool:
        if any(w in t for t in self.titles.get(pid, ()) for w in JOB_WORK_TITLES):
            return True
        job = self._job_of(pid)
        return job is not None and job != RAY_NO_JOB and job not in self._old_jobs

    def poll(self) -> None:
        driver = set(proc_tree(self.job_pid))
        total = 0
        for p in driver | {p for p in self._ray_workers() if self._job_of(p) not in self._old_jobs}:
            mem, title = proc_memory_kib(p), proc_title(p)
            if mem is None:
                continue
            self.titles.setdefault(p, set()).add(title)
            if p in driver or self._belongs(p):
                total += mem[0]
                self.peaks[p] = max(self.peaks.get(p, 0), mem[1])
        self.tree_peak_kib = max(self.tree_peak_kib, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return self.summary()

    def role(self, pid: int) -> str:
        titles = " ".join(self.titles.get(pid, ()))
        if pid == self.job_pid:
            return "driver"
        if "ShardEncoder" in titles:
            return "encoder actor"
        if "read_shard" in titles or "write_shard_row" in titles:
            return "read/write task worker"
        return "other process of the job"

    def summary(self) -> dict:
        """Peaks in MiB: per role (the largest process of each), the largest process, the tree."""
        by_role: dict[str, float] = {}
        for p, kib in self.peaks.items():
            role = self.role(p)
            by_role[role] = max(by_role.get(role, 0.0), kib / 1024)
        return {
            "max_process_peak_mib": round(max(self.peaks.values(), default=0) / 1024, 1),
            "tree_peak_mib": round(self.tree_peak_kib / 1024, 1),
            "peak_mib_by_role": {k: round(v, 1) for k, v in sorted(by_role.items())},
            "processes": len(self.peaks),
            "method": "VmHWM of each process of the job (driver tree + the Ray workers that ran its work), polled "
                      f"every {self.interval_s * 1000:.0f} ms; tree = largest sum of VmRSS at one poll",
        }


@dataclass
class Job:
    """A subprocess with its output in files (no pipes to fill up)."""

    name: str
    cmd: list[str]
    proc: subprocess.Popen
    out_path: str
    err_path: str
    started: float
    sampler: MemorySampler | None = None
    ended: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.monotonic()
        return rc

    def wait(self, timeout_s: float) -> int:
        """The exit code; on timeout the process is killed and -9 returned."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: no exit after {timeout_s:.0f} s: killing pid {self.pid}")
            self.kill()
            rc = self.proc.wait(timeout=30)
        self.poll()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def stdout(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def memory(self) -> dict | None:
        return self.sampler.stop() if self.sampler is not None else None


def line_with(text: str, pattern: str) -> str | None:
    """The last line of ``text`` matching the regular expression ``pattern`` (stripped), if any."""
    hits = [ln.strip() for ln in text.splitlines() if re.search(pattern, ln)]
    return hits[-1] if hits else None


def error_line(text: str) -> str:
    """The line of a command's stderr that says what went wrong: the CLI's ``Error: ...``, else
    the last exception line of a traceback, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("Error:"):
            return ln
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln):
            return ln
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------
# the drills' Ray cluster: a head started by a child process of ours (ray.init on 127.0.0.1)


def ray_host_main() -> None:
    """Run in a child process: start a local Ray on 127.0.0.1, print ``{"address", "pid"}`` as one
    JSON line, then answer ``actors`` lines on stdin with the actor table (one JSON line each) until
    ``quit``, EOF or SIGTERM; then shut Ray down (which stops the processes it started)."""
    import ray

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=RAY_OBJECT_STORE_BYTES)
    try:
        print(json.dumps({"address": ray.get_runtime_context().gcs_address, "pid": os.getpid()}), flush=True)
        method = None
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            if line.strip() == "actors":
                method, actors = _actor_table(method)
                print(json.dumps({"method": method, "actors": actors}), flush=True)
    finally:
        ray.shutdown()


def _actor_table(method: str | None) -> tuple[str, list[dict]]:
    """Every actor: class name, pid, state, job, restarts. Ray's state API (``list_actors``) needs
    the dashboard, which a minimal Ray install lacks; then the GCS actor table is read directly."""
    if method in (None, "ray.util.state.list_actors"):
        try:
            from ray.util.state import list_actors

            rows = list_actors(detail=True, timeout=5, raise_on_missing_output=False)
            return "ray.util.state.list_actors", [
                {"actor_id": a.actor_id, "class_name": a.class_name, "pid": a.pid, "state": a.state,
                 "job_id": a.job_id, "num_restarts": int(a.num_restarts or 0)} for a in rows]
        except Exception:  # noqa: BLE001 - any failure of the state API: use the GCS table instead
            pass
    import ray._private.state as gcs_state

    return "GCS actor table (ray._private.state.actors; the state API needs the dashboard)", [
        {"actor_id": a["ActorID"], "class_name": a["ActorClassName"], "pid": a.get("Pid"), "state": a["State"],
         "job_id": a["JobID"], "num_restarts": int(a.get("NumRestarts") or 0)}
        for a in gcs_state.actors().values()]


class RayHost:
    """The child process holding the drills' Ray cluster."""

    def __init__(self, env: dict, log_path: str):
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.actor_method: str | None = None
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 120.0) -> "RayHost":
        cmd = [sys.executable, "-c", "from bench.drills import ray_host_main; ray_host_main()"]
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=self.env, cwd=REPO, text=True)
        line = self._readline(timeout_s)
        if not line:
            self.stop()
            raise RuntimeError(f"the drills' Ray cluster did not start within {timeout_s:.0f} s (see {self.log_path})")
        self.address = json.loads(line)["address"]
        return self

    def _readline(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline() if ready else ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def actors(self, timeout_s: float = 30.0) -> list[dict]:
        with self._lock:
            self.proc.stdin.write("actors\n")
            self.proc.stdin.flush()
            line = self._readline(timeout_s)
        if not line:
            raise RuntimeError("the Ray host did not answer the actor query")
        reply = json.loads(line)
        self.actor_method = reply["method"]
        return reply["actors"]

    def stop(self) -> None:
        """``quit`` (Ray shuts its processes down); after 60 s, kill what is left, by pid."""
        if self.proc is None:
            return
        tree = {pid: proc_title(pid) for pid in proc_tree(self.proc.pid)}
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for pid, title in tree.items():
            # Only a process still showing the title it had as part of this cluster (not a reused pid).
            now = proc_title(pid)
            ours = now == title or (title.startswith("ray::") and now.startswith("ray::"))
            if pid != self.proc.pid and title and ours:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc = None


# --------------------------------------------------------------------------------------------
# stores: object snapshots, comparisons, damage


def store_digests(uri: str, storage_options: dict | None = None) -> dict[str, str]:
    """{key relative to the store: sha256 of its bytes} of every object under the store's prefix
    (hidden temporary files of local writes included: a leftover one is a difference)."""
    from pipeline import uri as U

    fs, root = U.get_fs(uri, storage_options)
    fs.invalidate_cache()
    root = root.rstrip("/")
    return {p[len(root) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(fs.find(root))}


def compare_digests(got: dict[str, str], want: dict[str, str]) -> dict:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    return {"identical": not (missing or extra or differ), "objects": len(want), "missing": missing[:10],
            "extra": extra[:10], "differ": differ[:10]}


def describe_comparison(c: dict) -> str:
    if c["identical"]:
        return f"all {c['objects']} objects byte-identical to the clean run"
    parts = [f"{k} {c[k]}" for k in ("missing", "extra", "differ") if c[k]]
    return f"NOT identical to the clean run ({'; '.join(parts)})"


def flip_bytes(path: str, offset: int, count: int) -> None:
    """XOR ``count`` bytes of a file with 0xFF from ``offset`` on (in place)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def records_written(store_dir: str) -> int:
    return len(glob.glob(os.path.join(store_dir, "records", "*.json")))


ENCODED_RE = re.compile(r"encoded (\d+) images in (\d+) shard\(s\), ([\d.]+) images/s, (\d+) failed")


def encode_outcome(job: Job, rc: int) -> dict:
    """What an encode command said: shards encoded, images/s, failures, or reuse, or its error."""
    err = job.stderr()
    m = ENCODED_RE.search(err)
    out = {"rc": rc, "seconds": round(job.seconds, 1)}
    if m:
        out.update(images=int(m[1]), shards_encoded=int(m[2]), images_per_s=float(m[3]), failed=int(m[4]))
    elif "store is complete, reused" in err:
        out.update(reused=True, shards_encoded=0)
    if rc != 0:
        out["error"] = error_line(err)
    lines = job.stdout().strip().splitlines()
    if rc == 0 and lines:
        out["uri"] = lines[-1].strip()
    return out


# --------------------------------------------------------------------------------------------
# the context: options, children, servers, the clean reference store


@dataclass
class DrillOptions:
    quick: bool = False
    work_dir: str = "bench/work/drills"
    timeout_s: float = 420.0  # per command
    device: str = "cpu"  # cpu: the children see no GPU; cuda: they see this machine's GPUs (encoder, trainer)


class DrillContext:
    def __init__(self, options: DrillOptions):
        self.options = options
        self.work = os.path.abspath(options.work_dir)
        marker = os.path.join(self.work, WORK_MARKER)
        if os.path.isdir(self.work) and os.listdir(self.work) and not os.path.exists(marker):
            raise ValueError(f"--work-dir {self.work} is not empty and was not made by the drills: not emptying it")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(os.path.join(self.work, "logs"))
        with open(marker, "w", encoding="utf-8") as f:
            f.write("scratch folder of `make drills`; emptied at the start of every run\n")
        self.jobs: list[Job] = []
        self._ray: RayHost | None = None
        self._s3 = None
        self._clean: dict | None = None
        self._sample: str | None = None
        self.s3_store_from_encode: str | None = None  # set by s3_faults_encode when its store is good

    # -- environment of the children
    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
        })
        if self.options.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env

    def s3_env(self, endpoint: str) -> dict:
        return self.env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                        AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")

    def path(self, *parts: str) -> str:
        p = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    # -- children
    def start(self, name: str, cmd: list[str], env: dict | None = None, *, measure: bool = False) -> Job:
        out, err = self.path("logs", f"{name}.out"), self.path("logs", f"{name}.err")
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env or self.env(), cwd=REPO)
        job = Job(name, cmd, proc, out, err, time.monotonic())
        if measure:
            job.sampler = MemorySampler(proc.pid, self._ray.pid if self._ray else None).start()
        self.jobs.append(job)
        return job

    def run(self, name: str, cmd: list[str], env: dict | None = None, timeout_s: float | None = None,
            *, measure: bool = False) -> tuple[Job, int]:
        job = self.start(name, cmd, env, measure=measure)
        return job, job.wait(timeout_s or self.options.timeout_s)

    def close(self) -> None:
        for job in self.jobs:
            if job.proc.poll() is None:
                log(f"stopping {job.name} (pid {job.pid})")
                job.kill()
                job.proc.wait(timeout=30)
            if job.sampler is not None:
                job.sampler.stop()
        if self._ray is not None:
            self._ray.stop()
            self._ray = None
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None

    # -- servers
    def ray(self) -> RayHost:
        if self._ray is None:
            t = time.monotonic()
            self._ray = RayHost(self.env(), self.path("logs", "ray-host.err")).start()
            log(f"Ray on {self._ray.address} (head pid {self._ray.pid}) in {time.monotonic() - t:.1f} s")
        return self._ray

    def s3(self):
        """The drills' moto S3 server (``python -m moto.server`` on a free 127.0.0.1 port), bucket ``drills``."""
        if self._s3 is None:
            from bench.common import S3Server

            self._s3 = S3Server(bucket=S3_BUCKET).start()
            log(f"moto S3 on {self._s3.url}")
        return self._s3

    def s3_options(self) -> dict:
        return self.s3().access.storage_options()

    # -- data and commands
    def sample_data(self) -> str:
        if self._sample is None:
            from pipeline.sample_data import ensure_sample_data

            self._sample = ensure_sample_data()
        return self._sample

    def encode_cmd(self, out: str, data: str | None = None) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "encode", "--data", data or self.sample_data(), "--out", out,
                "--ray-address", self.ray().address, *ENCODE_ARGS]

    @staticmethod
    def train_cmd(store: str, run_dir: str, *sets: str) -> list[str]:
        cmd = [sys.executable, "-m", "pipeline.cli", "train-dit", "--store", store, "--run-dir", run_dir,
               "--preset", "debug"]
        for s in [*TRAIN_QUIET, *sets]:
            cmd += ["--set", s]
        return cmd

    @staticmethod
    def verify_cmd(store: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "stores", "verify", store]

    def clean_store(self) -> dict:
        """The reference: the shared encode configuration run once, undisturbed (memory measured)."""
        if self._clean is None:
            out = self.path("clean", "stores")
            job, rc = self.run("clean-encode", self.encode_cmd(out), measure=True)
            memory = job.memory()
            outcome = encode_outcome(job, rc)
            if rc != 0:
                raise RuntimeError(f"the clean encode failed ({rc}): {outcome.get('error')} (see {job.err_path})")
            uri = outcome["uri"]
            self._clean = {"uri": uri, "name": os.path.basename(uri), "digests": store_digests(uri),
                           "seconds": round(job.seconds, 1), "memory": memory, "outcome": outcome}
            log(f"clean store {uri}: {len(self._clean['digests'])} objects in {job.seconds:.1f} s")
        return self._clean


# --------------------------------------------------------------------------------------------
# encode drills


def _wait_until(predicate: Callable[[], bool], job: Job, timeout_s: float, poll_s: float = 0.02) -> bool:
    """True once ``predicate()`` holds; False when the job exits first or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if job.poll() is not None:
            return predicate()
        time.sleep(poll_s)
    return False


@drill("encode_driver_kill", "encode", "SIGKILL the encode driver mid-job, rerun: the clean run's store")
def encode_driver_kill(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    out = ctx.path("encode_driver_kill", "stores")
    store = os.path.join(out, clean["name"])
    num_shards = sum(1 for k in clean["digests"] if k.startswith("records/"))
    rec.did = ("ran `rae-pipeline encode` (shared config, 4 shards) as a subprocess on the drills' Ray; SIGKILLed "
               "the driver once the first shard's completion record existed; reran the same command")
    rec.expected = ("killed run leaves no COMPLETE marker; the rerun encodes only the shards without a record and "
                    "finishes a store byte-identical (every object) to the clean run, no temporary files left")
    job = ctx.start("driver-kill-1", ctx.encode_cmd(out))
    landed = _wait_until(lambda: records_written(store) >= 1, job, ctx.options.timeout_s)
    at_kill = records_written(store)
    job.kill()
    rc1 = job.wait(60)
    complete_after_kill = os.path.exists(os.path.join(store, "COMPLETE"))
    time.sleep(1.0)  # let Ray reap the dead driver's workers before counting what is on disk
    before_rerun = records_written(store)
    rerun, rc2 = ctx.run("driver-kill-rerun", ctx.encode_cmd(out))
    second = encode_outcome(rerun, rc2)
    cmp = compare_digests(store_digests(store), clean["digests"]) if rc2 == 0 else None
    rec.figures = {"records_at_kill": at_kill, "records_before_rerun": before_rerun, "num_shards": num_shards,
                   "shards_reencoded": second.get("shards_encoded"), "killed_after_s": round(job.seconds, 1),
                   "rerun_s": second["seconds"], "clean_run_s": clean["seconds"]}
    rec.details = {"kill_exit_code": rc1, "rerun": second, "comparison": cmp}
    rec.ok = bool(landed and rc1 == -signal.SIGKILL and at_kill < num_shards and not complete_after_kill
                  and rc2 == 0 and second.get("shards_encoded") == num_shards - before_rerun and cmp["identical"])
    rec.happened = (
        f"driver SIGKILLed after {job.seconds:.1f} s with {at_kill}/{num_shards} shard records written "
        f"(exit {rc1}; COMPLETE {'present' if complete_after_kill else 'absent'}); {before_rerun} records when "
        f"rerun; the rerun (exit {rc2}) encoded {second.get('shards_encoded')} shard(s) in {second['seconds']} s"
        + (f"; store: {describe_comparison(cmp)}" if cmp else f"; rerun error: {second.get('error')}"))
    if not landed:
        rec.happened += "; the kill did not land mid-job (the job ended or timed out first)"
    rec.lost = (f"nothing: {before_rerun} shard(s) of the killed run kept, the rest re-encoded, store identical"
                if rec.ok else "see happened")


def _encoder_actor(ctx: DrillContext) -> dict | None:
    alive = [a for a in ctx.ray().actors() if ENCODER_ACTOR_CLASS in (a["class_name"] or "") and a["state"] == "ALIVE"]
    return alive[0] if alive else None


@drill("encode_actor_kill", "encode", "SIGKILL the encoder actor mid-job: Ray restarts it, the store is identical")
def encode_actor_kill(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    num_shards = sum(1 for k in clean["digests"] if k.startswith("records/"))
    out = ctx.path("encode_actor_kill", "stores")
    store = os.path.join(out, clean["name"])
    rec.did = ("ran `rae-pipeline encode` (shared config) as a subprocess on the drills' Ray; found the encoder "
               "actor's pid in Ray's actor table and SIGKILLed that process while it was running a shard (its "
               "process title ray::...ShardEncoder).submit), with no shard written yet")
    rec.expected = ("Ray restarts the actor (max_restarts=-1) and retries the shard (max_task_retries=3); the job "
                    "completes and the store is byte-identical to the clean run")
    job = ctx.start("actor-kill", ctx.encode_cmd(out))
    deadline = time.monotonic() + ctx.options.timeout_s
    actor, killed, restarted = None, None, None
    while job.poll() is None and time.monotonic() < deadline:
        if actor is None:
            actor = _encoder_actor(ctx)
            time.sleep(0.1)
            continue
        # Ray titles a worker ray::<class>.<method> while a method runs: .submit is a shard being encoded.
        title = proc_title(actor["pid"])
        if ".submit" in title and records_written(store) < num_shards:
            os.kill(actor["pid"], signal.SIGKILL)
            killed = {"pid": actor["pid"], "records_at_kill": records_written(store),
                      "after_s": round(job.seconds, 1), "title": title}
            break
        if not title:
            actor = None  # the actor is gone (restarted by something else, or the job ended)
        time.sleep(0.005)
    if killed:
        t_kill = time.monotonic()
        while job.poll() is None and time.monotonic() < deadline:
            now = _encoder_actor(ctx)
            if now and now.get("pid") and now["pid"] != killed["pid"]:
                restarted = {"pid": now["pid"], "num_restarts": now["num_restarts"],
                             "after_s": round(time.monotonic() - t_kill, 1)}
                break
            time.sleep(0.1)
    rc = job.wait(max(deadline - time.monotonic(), 30))
    outcome = encode_outcome(job, rc)
    cmp = compare_digests(store_digests(store), clean["digests"]) if rc == 0 else None
    rec.details = {"killed": killed, "restarted": restarted, "outcome": outcome, "comparison": cmp,
                   "actor_table": ctx.ray().actor_method}
    rec.figures = {"records_at_kill": killed and killed["records_at_kill"], "num_shards": num_shards,
                   "restart_after_s": restarted and restarted["after_s"], "job_s": outcome["seconds"],
                   "clean_run_s": clean["seconds"]}
    rec.ok = bool(killed and rc == 0 and cmp and cmp["identical"])
    if not killed:
        rec.happened = f"no kill landed: the job ended (exit {rc}) before its encoder actor was seen running a shard"
    else:
        rec.happened = (
            f"actor pid {killed['pid']} ({killed['title']}) SIGKILLed {killed['after_s']} s into the job with "
            f"{killed['records_at_kill']}/{num_shards} shards written; "
            + (f"a new actor (pid {restarted['pid']}, restarts {restarted['num_restarts']}) was up "
               f"{restarted['after_s']} s later; " if restarted else "no replacement actor was seen; ")
            + f"the job exited {rc} after {outcome['seconds']} s"
            + (f"; store: {describe_comparison(cmp)}" if cmp else f": {outcome.get('error')}"))
    rec.lost = "nothing: the shard in flight was redone, store identical" if rec.ok else "see happened"


@drill("encode_concurrent", "encode", "two encode jobs on one output at once: one complete, identical store")
def encode_concurrent(ctx: DrillContext, rec: DrillRecord) -> None:
    from pipeline.store import verify_store

    clean = ctx.clean_store()
    out = ctx.path("encode_concurrent", "stores")
    store = os.path.join(out, clean["name"])
    rec.did = "started two `rae-pipeline encode` processes with the same config and --out at the same moment"
    rec.expected = ("both exit 0 (each encodes the shards it finds pending, or reuses the finished store); one "
                    "complete store, byte-identical to the clean run, `verify` OK")
    jobs = [ctx.start(f"concurrent-{i}", ctx.encode_cmd(out)) for i in range(2)]
    rcs = [j.wait(ctx.options.timeout_s) for j in jobs]
    outcomes = [encode_outcome(j, rc) for j, rc in zip(jobs, rcs)]
    cmp = compare_digests(store_digests(store), clean["digests"]) if os.path.isdir(store) else None
    report = verify_store(store) if os.path.isdir(store) else None
    rec.details = {"jobs": outcomes, "comparison": cmp, "verify": str(report) if report else None}
    rec.figures = {"shards_encoded": [o.get("shards_encoded") for o in outcomes],
                   "job_s": [o["seconds"] for o in outcomes], "clean_run_s": clean["seconds"]}
    rec.ok = bool(all(rc == 0 for rc in rcs) and cmp and cmp["identical"] and report and report.ok)
    said = ["reused the finished store" if o.get("reused") else
            (f"encoded {o.get('shards_encoded')} shard(s)" if o["rc"] == 0 else f"failed: {o.get('error')}")
            for o in outcomes]
    rec.happened = (f"job A exited {rcs[0]} ({said[0]}, {outcomes[0]['seconds']} s), job B exited {rcs[1]} "
                    f"({said[1]}, {outcomes[1]['seconds']} s); store: "
                    + (describe_comparison(cmp) if cmp else "missing")
                    + (f"; verify {'OK' if report.ok else 'FAILED'}" if report else ""))
    rec.lost = "nothing: one store, identical to the clean run" if rec.ok else "see happened"


# --------------------------------------------------------------------------------------------
# storage drills


def _fault_proxy(ctx: DrillContext, name: str):
    from bench.faultproxy import FaultProxy, FaultRates

    proxy = FaultProxy(ctx.s3().url, FaultRates(**S3_FAULTS), seed=0, log_path=ctx.path("logs", f"{name}.err"))
    return proxy.start()


def _fault_summary(stats: dict) -> str:
    f = stats["faults"]
    return (f"{stats['faulted']} of {stats['requests']} requests faulted ({f['error']} 500/503, {f['drop']} dropped, "
            f"{f['lost_response']} lost responses, {f['truncate']} truncated bodies)")


@drill("s3_faults_encode", "storage", "encode to s3:// through a proxy failing 15% of requests; verify direct")
def s3_faults_encode(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    s3 = ctx.s3()
    out = s3.uri("encode")
    store = f"{out}/{clean['name']}"
    proxy = _fault_proxy(ctx, "faultproxy-encode")
    rates = ", ".join(f"{k} {v:.0%}" for k, v in S3_FAULTS.items())
    rec.did = (f"ran `rae-pipeline encode --out {out}` (shared config) with AWS_ENDPOINT_URL at a fault proxy "
               f"(its own process) in front of moto, failing {sum(S3_FAULTS.values()):.0%} of requests ({rates}); "
               "rerun on failure (up to 3 runs); then `stores verify` against moto directly; then an outage: another "
               "encode through a clean proxy switched to fail every request once its first shard record existed")
    rec.expected = ("the job finishes through retries (or stops with a clear error and no COMPLETE marker); the "
                    "finished store verifies OK against the direct endpoint and is byte-identical to the clean local "
                    "run; in the outage the job stops (no hang) with an error and leaves no COMPLETE marker (whether "
                    "the error names the shard/object it could not write is reported); never a COMPLETE store with "
                    "wrong bytes")
    runs = []
    try:
        for attempt in range(1 if ctx.options.quick else 3):
            job, rc = ctx.run(f"s3-encode-{attempt}", ctx.encode_cmd(out), ctx.s3_env(proxy.url))
            runs.append(encode_outcome(job, rc))
            if rc == 0:
                break
        stats = proxy.stats()
    finally:
        proxy.stop()
    so = ctx.s3_options()
    from pipeline import uri as U

    complete = U.exists(f"{store}/COMPLETE", so)
    vjob, vrc = ctx.run("s3-encode-verify", ctx.verify_cmd(store), ctx.s3_env(s3.url), 300)
    verify_out = vjob.stdout().strip()
    cmp = compare_digests(store_digests(store, so), clean["digests"]) if complete else None
    finished = runs[-1]["rc"] == 0
    ctx.s3_store_from_encode = store if finished and complete and vrc == 0 and cmp and cmp["identical"] else None
    outage = _encode_outage(ctx, clean["name"])
    rec.details = {"runs": runs, "proxy": stats, "verify_exit": vrc, "verify": verify_out[-2000:], "comparison": cmp,
                   "outage": outage}
    rec.figures = {"runs": len(runs), "requests": stats["requests"], "faulted": stats["faulted"],
                   "faults": stats["faults"], "job_s": [r["seconds"] for r in runs], "clean_run_s": clean["seconds"],
                   "outage_seconds_to_stop": outage["seconds_to_stop"]}
    clear_errors = all(r.get("error") for r in runs if r["rc"] != 0)
    if finished:
        rec.ok = bool(complete and vrc == 0 and cmp and cmp["identical"])
    else:
        rec.ok = bool(not complete and clear_errors)
    rec.ok = rec.ok and outage["ok"]
    rec.happened = (
        f"{len(runs)} run(s): " + "; ".join(
            f"exit {r['rc']} after {r['seconds']} s" + (f" ({r['error']})" if r.get("error") else
                                                        f" ({r.get('shards_encoded')} shards encoded)")
            for r in runs)
        + f"; proxy: {_fault_summary(stats)}; `stores verify` (direct) exit {vrc}"
        + (f"; store: {describe_comparison(cmp)}" if cmp else "; no COMPLETE store")
        + f"; outage after {outage['records_at_outage']} shard record(s): the job exited {outage['rc']} "
        f"{outage['seconds_to_stop']} s later, COMPLETE {'PRESENT' if outage['complete'] else 'absent'}, "
        f"{outage['records_after']} record(s) kept; stderr names the failing object: "
        f"{outage['names_object'] or 'no'}; its last line: '{outage['last_line']}'")
    if outage["ok"] and not outage["last_line_says_what"]:
        where = (f"the failing object ({outage['names_object']}) appears only inside the chained traceback"
                 if outage["names_object"] else "no line of the error names the shard or object that failed (the "
                 "store appears only in the job's opening INFO line)")
        rec.findings.append(
            "`rae-pipeline encode` on a storage outage (every request answered 500/503) ends with a Ray traceback "
            f"whose last line is '{outage['last_line']}'; {where}. pipeline/cli_encode.py turns only its own error "
            "types into a one-line `Error: ...`; the write path (write_shard_row -> StoreWriter.write_shard) does not "
            "wrap storage errors with the shard and object the way LatentStore's read path does. Ray Data also makes "
            "one attempt per write task (DataContext max_map_retries / retried_io_errors not set), so one write whose "
            "s3fs retries are exhausted fails the whole job (resumable: finished shards are kept).")
    rec.lost = ("faulted run: nothing (store complete, verified, identical); outage: the shards not yet written "
                "(the job stops, the written shards stay for the rerun)" if finished and rec.ok else
                "the job stopped with a clear error and left an incomplete store (resumable)" if rec.ok else
                "see happened")


def _encode_outage(ctx: DrillContext, store_name: str) -> dict:
    """An encode to s3:// through a proxy that starts failing every request once the first shard
    record exists: how the job stops, what it says, what it leaves."""
    from bench.faultproxy import FaultProxy

    s3 = ctx.s3()
    prefix = f"outage/{store_name}"
    client = s3.access.client()

    def keys(sub: str) -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=f"{prefix}/{sub}")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    proxy = FaultProxy(s3.url, seed=2, log_path=ctx.path("logs", "faultproxy-encode-outage.err")).start()
    try:
        job = ctx.start("s3-encode-outage", ctx.encode_cmd(s3.uri("outage")), ctx.s3_env(proxy.url))
        reached = _wait_until(lambda: len(keys("records/")) >= 1, job, ctx.options.timeout_s, poll_s=0.1)
        at_outage = len(keys("records/"))
        proxy.set_rates(error=1.0)  # the endpoint answers 500/503 to everything from now on
        t = time.monotonic()
        rc = job.wait(300)
        to_stop = time.monotonic() - t
    finally:
        proxy.stop()
    err = job.stderr()
    last = error_line(err)
    named = line_with(err, rf"{S3_BUCKET}/{prefix}/\S+")
    named_object = re.search(rf"{S3_BUCKET}/{prefix}/([^\s\"']+)", named).group(1) if named else None
    complete = bool(keys("COMPLETE"))
    return {"ok": bool(reached and rc not in (0, -signal.SIGKILL) and not complete and last),
            "rc": rc, "records_at_outage": at_outage, "records_after": len(keys("records/")),
            "seconds_to_stop": round(to_stop, 1), "complete": complete, "names_object": named_object,
            "object_line": named, "last_line": last,
            "last_line_says_what": bool(named_object and named_object in last)}


def _s3_training_store(ctx: DrillContext) -> str:
    """A complete copy of the clean store on moto: the one the S3 encode drill wrote, or an upload."""
    if ctx.s3_store_from_encode:
        return ctx.s3_store_from_encode
    clean = ctx.clean_store()
    prefix = f"train-store/{clean['name']}"
    ctx.s3().upload_dir(clean["uri"], prefix)
    return ctx.s3().uri(prefix)


def _describe_checkpoints(entries) -> list[tuple[int, str]]:
    return [(e.step, "complete" if e.complete else "INCOMPLETE") for e in entries]


def _same_weights(run_a: str, run_b: str) -> tuple[bool, int]:
    """(model and EMA weights of the newest checkpoints equal, their step)."""
    import torch

    from trainer.checkpoint import load_checkpoint

    a, b = load_checkpoint(run_a, load_train_state=False), load_checkpoint(run_b, load_train_state=False)
    same = a.step == b.step and all(
        set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in ((a.model_state, b.model_state), (a.ema_state or {}, b.ema_state or {})))
    return same, a.step


def _batch_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "debug", "batches-rank0.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _metrics_steps(run_dir: str) -> list[int]:
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["step"] for line in f if line.strip()]
    except (OSError, ValueError, KeyError):
        return []


@drill("s3_faults_train", "storage", "train from an s3:// store through the fault proxy; then an outage")
def s3_faults_train(ctx: DrillContext, rec: DrillRecord) -> None:
    from trainer.checkpoint import list_checkpoints, load_checkpoint

    s3 = ctx.s3()
    store = _s3_training_store(ctx)
    steps = 3 if ctx.options.quick else 6
    sets = [f"train.max_steps={steps}", "train.ckpt_every=1000", "train.debug_record_batches=true",
            "data.num_workers=1"]
    rec.did = (f"trained the debug DiT^DH {steps} steps (global batch 16 = the whole 16-sample store per step, one "
               f"DataLoader worker) from {store}: once with moto directly, once through the fault proxy failing "
               f"{sum(S3_FAULTS.values()):.0%} of requests; then an outage: a run through a clean proxy switched to "
               "fail every request once step 3 was logged")
    rec.expected = ("the faulted run finishes with the direct run's batches and weights (retries), or stops with a "
                    "clear error; in the outage the trainer stops (no hang) with an error naming what it could not "
                    "read, its last checkpoint complete and loadable; never training on wrong data")
    direct_dir, proxied_dir = ctx.path("s3_train", "direct"), ctx.path("s3_train", "proxied")
    dj, drc = ctx.run("s3-train-direct", ctx.train_cmd(store, direct_dir, *sets), ctx.s3_env(s3.url))
    proxy = _fault_proxy(ctx, "faultproxy-train")
    try:
        pj, prc = ctx.run("s3-train-proxied", ctx.train_cmd(store, proxied_dir, *sets), ctx.s3_env(proxy.url))
        stats = proxy.stats()
    finally:
        proxy.stop()
    same_batches = drc == 0 and prc == 0 and _batch_records(direct_dir) == _batch_records(proxied_dir)
    same_weights, step = _same_weights(direct_dir, proxied_dir) if drc == 0 and prc == 0 else (False, None)

    # The outage: every request fails from some point on.
    from bench.faultproxy import FaultProxy

    outage_dir = ctx.path("s3_train", "outage")
    proxy = FaultProxy(s3.url, seed=1, log_path=ctx.path("logs", "faultproxy-outage.err")).start()
    try:
        cmd = ctx.train_cmd(store, outage_dir, "train.max_steps=100000", "train.log_every=1", "train.ckpt_every=2",
                            "data.num_workers=1")
        oj = ctx.start("s3-train-outage", cmd, ctx.s3_env(proxy.url))
        reached = _wait_until(lambda: max(_metrics_steps(outage_dir), default=0) >= 3, oj, 240, poll_s=0.05)
        at_outage = max(_metrics_steps(outage_dir), default=0)
        proxy.set_rates(error=0.5, drop=0.5)
        t_out = time.monotonic()
        orc = oj.wait(240)
        to_stop = time.monotonic() - t_out
        ostats = proxy.stats()
    finally:
        proxy.stop()
    oerr = line_with(oj.stderr(), r"StoreError|shard\(s\)") or error_line(oj.stderr())
    oentries = list_checkpoints(outage_dir)
    last_good = load_checkpoint(outage_dir, load_train_state=False).step if any(e.complete for e in oentries) else None
    outage_ok = bool(reached and orc not in (0, -signal.SIGKILL) and oerr and last_good is not None
                     and all(e.complete for e in oentries))

    rec.details = {"direct": {"rc": drc, "seconds": round(dj.seconds, 1), "error": drc and error_line(dj.stderr())},
                   "proxied": {"rc": prc, "seconds": round(pj.seconds, 1), "error": prc and error_line(pj.stderr())},
                   "proxy": stats,
                   "outage": {"rc": orc, "logged_step_at_outage": at_outage, "seconds_to_stop": round(to_stop, 1),
                              "error": oerr, "checkpoints": [(e.step, e.complete) for e in oentries],
                              "last_good_step": last_good, "proxy": ostats}}
    rec.figures = {"steps": steps, "requests": stats["requests"], "faulted": stats["faulted"],
                   "faults": stats["faults"], "direct_s": round(dj.seconds, 1), "proxied_s": round(pj.seconds, 1),
                   "outage_seconds_to_stop": round(to_stop, 1)}
    outage_text = (f"outage at logged step {at_outage}: the trainer exited {orc} {to_stop:.1f} s later with "
                   f"'{oerr[:300]}'; checkpoints {_describe_checkpoints(oentries)}, "
                   f"newest loads at step {last_good}")
    if prc == 0:
        rec.ok = drc == 0 and same_batches and same_weights and outage_ok
        rec.happened = (f"direct run exit {drc} ({dj.seconds:.1f} s); faulted run exit {prc} ({pj.seconds:.1f} s), "
                        f"proxy: {_fault_summary(stats)}; batches {'identical' if same_batches else 'DIFFERENT'}, "
                        f"step-{step} weights {'identical' if same_weights else 'DIFFERENT'}; " + outage_text)
        rec.lost = (f"faulted run: nothing (same batches and weights as the direct run); outage: the steps after "
                    f"checkpoint {last_good}" if rec.ok else "see happened")
    else:
        err = error_line(pj.stderr())
        rec.ok = drc == 0 and bool(err) and outage_ok
        rec.happened = (f"direct run exit {drc}; faulted run stopped with exit {prc}: {err}; proxy: "
                        f"{_fault_summary(stats)}; " + outage_text)
        rec.lost = "the faulted run stopped with a clear error (resumable from its last checkpoint)"


@drill("corrupt_chunk", "storage", "flip bytes in one shard object: verify and the trainer's loader name it")
def corrupt_chunk(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    store = ctx.path("corrupt_chunk", clean["name"])
    shutil.copytree(clean["uri"], store)
    shard = 1
    obj = os.path.join(store, "latents", "c", str(shard), "0", "0", "0")
    size = os.path.getsize(obj)
    offset = size // 3
    flip_bytes(obj, offset, 64)
    rec.did = (f"copied the clean store and flipped 64 bytes at offset {offset} of latents/c/{shard}/0/0/0 (shard "
               f"{shard}, {size} bytes); ran `stores verify` and `train-dit` (debug, 0 and 1 DataLoader workers) on it")
    rec.expected = (f"`stores verify` exits 1 naming shard {shard} and its object; training stops with an error "
                    f"naming shard {shard}")
    vjob, vrc = ctx.run("corrupt-verify", ctx.verify_cmd(store), timeout_s=300)
    verify_out = vjob.stdout()
    named = re.findall(r"shard (\d+)", verify_out)
    verify_ok = vrc == 1 and f"latents/c/{shard}/0/0/0" in verify_out and set(named) == {str(shard)}
    trains = {}
    for workers in (0, 1):
        run_dir = ctx.path("corrupt_chunk", f"run-w{workers}")
        cmd = ctx.train_cmd(store, run_dir, "train.max_steps=20", "train.ckpt_every=1000",
                            f"data.num_workers={workers}")
        tjob, trc = ctx.run(f"corrupt-train-w{workers}", cmd, timeout_s=180)
        # The line naming the shard (with DataLoader workers it is the last line of the worker's traceback).
        err = line_with(tjob.stderr(), r"StoreError|shard\(s\)") or error_line(tjob.stderr())
        trains[workers] = {"rc": trc, "error": err, "seconds": round(tjob.seconds, 1),
                           "names_shard": bool(re.search(rf"shard\(s\) \[{shard}\]|shard {shard}\b", tjob.stderr())
                                               and f"latents/c/{shard}/0/0/0" in tjob.stderr())}
    rec.details = {"verify_exit": vrc, "verify": verify_out.strip()[-2000:], "train": trains}
    rec.figures = {"verify_exit": vrc, "train_exit": {f"workers_{w}": t["rc"] for w, t in trains.items()}}
    rec.ok = verify_ok and all(t["rc"] != 0 and t["names_shard"] for t in trains.values())
    rec.happened = (f"`stores verify` exit {vrc}: " + " / ".join(
        ln.strip() for ln in verify_out.splitlines() if ln.strip().startswith("-"))[:400]
        + "; " + "; ".join(f"train-dit with {w} worker(s) exit {t['rc']}: {t['error'][:300]}"
                           for w, t in trains.items()))
    rec.lost = (f"nothing silently: the damaged shard {shard} is named; re-encoding that shard (or restoring its "
                "object) repairs the store" if rec.ok else "see happened")


# --------------------------------------------------------------------------------------------
# training drills


@drill("train_ckpt_kill", "training", "SIGKILL during a checkpoint write; resume = the uninterrupted run")
def train_ckpt_kill(ctx: DrillContext, rec: DrillRecord) -> None:
    from trainer.checkpoint import list_checkpoints

    store = ctx.clean_store()["uri"]
    target = 5 if ctx.options.quick else 6
    base = [*TRAIN_WIDE, "data.global_batch=8", "train.debug_record_batches=true"]
    rec.did = ("trained a wide debug DiT^DH (hidden 256, head 512; ~140 MB checkpoints) with a checkpoint every "
               "step and SIGKILLed the trainer while a checkpoint folder was being written; resumed that run "
               f"directory to step {target}; trained the same config uninterrupted to step {target} (at the same time "
               "as the killed run: the results do not depend on timing)")
    rec.expected = ("the half-written checkpoint is never listed as complete; the resume starts from the newest "
                    "complete one, and its batches and final weights equal the uninterrupted run's")
    whole = ctx.path("train_ckpt_kill", "uninterrupted")
    ujob = ctx.start("ckpt-kill-uninterrupted", ctx.train_cmd(store, whole, *base, "train.ckpt_every=1000",
                                                              f"train.max_steps={target}"))
    hit, attempts = None, 0
    for attempt in range(3):
        attempts += 1
        run = ctx.path("train_ckpt_kill", f"run{attempt}")
        root = os.path.join(run, "checkpoints")
        job = ctx.start(f"ckpt-kill-{attempt}", ctx.train_cmd(
            store, run, *base, "train.ckpt_every=1", "train.max_steps=10000", "train.keep_last=2"))

        def writing() -> bool:
            names = os.listdir(root) if os.path.isdir(root) else []
            return any(n.startswith("step-") for n in names) and any(n.startswith(".tmp-step-") for n in names)

        landed = _wait_until(writing, job, 240, poll_s=0.005)
        job.kill()
        job.wait(60)
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        if landed and any(n.startswith(".tmp-step-") for n in names):
            hit = {"run": run, "names": names, "after_s": round(job.seconds, 1)}
            break
    urc = ujob.wait(ctx.options.timeout_s)
    if hit is None:
        rec.happened = f"could not land a SIGKILL inside a checkpoint write in {attempts} attempts"
        rec.lost = "not tested"
        return
    run = hit["run"]
    entries = list_checkpoints(run)
    survivor = max(e.step for e in entries if e.complete)
    if survivor >= target:
        raise RuntimeError(f"the kill landed after step {survivor}, past the compared steps (..{target})")
    n_before = len(_batch_records(run))
    rjob, rrc = ctx.run("ckpt-kill-resume", ctx.train_cmd(store, run, *base, "train.ckpt_every=1000",
                                                          f"train.max_steps={target}"))
    resumed_msg = re.search(r"resuming from checkpoint (\S+) at step (\d+)", rjob.stdout() + rjob.stderr())
    killed_recs, resumed_recs = _batch_records(run)[:n_before], _batch_records(run)[n_before:]
    whole_recs = _batch_records(whole)
    same_after = resumed_recs == whole_recs[survivor:] and [r["step"] for r in resumed_recs] == list(
        range(survivor + 1, target + 1))
    same_before = killed_recs[:survivor] == whole_recs[:survivor] and len(whole_recs) == target
    same_weights, step = _same_weights(run, whole) if rrc == 0 and urc == 0 else (False, None)
    incomplete_listed = [e.step for e in entries if not e.complete]
    leftover = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".tmp-"))
    rec.details = {"checkpoint_folder_at_kill": hit["names"], "listed": [(e.step, e.complete) for e in entries],
                   "temporary_folders_after_resume": leftover,
                   "resume": {"rc": rrc, "seconds": round(rjob.seconds, 1),
                              "message": resumed_msg[0] if resumed_msg else None},
                   "uninterrupted": {"rc": urc, "seconds": round(ujob.seconds, 1)}}
    rec.figures = {"killed_after_s": hit["after_s"], "kill_attempts": attempts, "resumed_from_step": survivor,
                   "compared_steps": f"{survivor + 1}..{target}", "resume_s": round(rjob.seconds, 1),
                   "uninterrupted_s": round(ujob.seconds, 1)}
    rec.ok = bool(rrc == 0 and urc == 0 and resumed_msg and int(resumed_msg[2]) == survivor and same_after
                  and same_before and same_weights and not incomplete_listed)
    rec.happened = (
        f"SIGKILL after {hit['after_s']} s with checkpoints folder {hit['names']}; listed complete: "
        f"{[e.step for e in entries if e.complete]}, incomplete listed: {incomplete_listed or 'none'}; the resume "
        f"(exit {rrc}) {'said ' + repr(resumed_msg[0]) if resumed_msg else 'did not say it resumed'}; batches of steps "
        f"{survivor + 1}..{target} {'identical' if same_after else 'DIFFERENT'} to the uninterrupted run's (steps "
        f"1..{survivor} {'identical' if same_before else 'DIFFERENT'}); step-{step} model+EMA weights "
        f"{'identical' if same_weights else 'DIFFERENT'}; temporary folders left after the resume: "
        f"{leftover or 'none'}")
    rec.lost = (f"the steps after step {survivor} (redone identically) and the half-written checkpoint "
                f"({'pruned by the resumed run' if not leftover else 'still on disk'})" if rec.ok else "see happened")
    for folder in glob.glob(os.path.join(ctx.work, "train_ckpt_kill", "*", "checkpoints")):
        shutil.rmtree(folder)  # ~140 MB each; the batch records and logs stay for inspection


@drill("train_nan", "training", "a NaN loss at step 5: clean stop, last good checkpoint kept and loadable")
def train_nan(ctx: DrillContext, rec: DrillRecord) -> None:
    import torch

    from trainer.checkpoint import list_checkpoints, load_checkpoint

    store = ctx.clean_store()["uri"]
    run = ctx.path("train_nan", "run")
    rec.did = ("ran `train-dit` (debug, checkpoint every 2 steps, 10 steps) with train.debug_nan_at_step=5 (the "
               "loss of step 5 multiplied by NaN); loaded the newest checkpoint; resumed without the fault to step 6")
    rec.expected = ("exit 1 with a message naming the non-finite loss and step 5; checkpoints 2 and 4 complete and "
                    "nothing after; step 4 loads with finite weights; the resume continues from it")
    job, rc = ctx.run("nan", ctx.train_cmd(store, run, "train.max_steps=10", "train.ckpt_every=2",
                                           "train.debug_nan_at_step=5", "data.global_batch=8"))
    err = error_line(job.stderr())
    entries = list_checkpoints(run)
    good = load_checkpoint(run)
    finite = all(torch.isfinite(v).all() for v in good.model_state.values()) and all(
        torch.isfinite(v).all() for v in (good.ema_state or {}).values())
    rjob, rrc = ctx.run("nan-resume", ctx.train_cmd(store, run, "train.max_steps=6", "train.ckpt_every=2",
                                                    "data.global_batch=8"))
    resumed = re.search(r"resuming from checkpoint (\S+) at step (\d+)", rjob.stdout())
    rec.details = {"rc": rc, "error": err, "checkpoints": [(e.step, e.complete) for e in entries],
                   "resume_rc": rrc, "resume_message": resumed[0] if resumed else None}
    rec.figures = {"exit_code": rc, "checkpoints": [e.step for e in entries], "last_good_step": good.step,
                   "seconds": round(job.seconds, 1)}
    rec.ok = bool(rc == 1 and "non-finite loss" in err and "step 5" in err and [e.step for e in entries] == [2, 4]
                  and all(e.complete for e in entries) and good.step == 4 and finite and rrc == 0 and resumed
                  and int(resumed[2]) == 4)
    rec.happened = (f"exit {rc}: {err[:300]}; checkpoints {_describe_checkpoints(entries)}; "
                    f"newest loads at step {good.step} with {'finite' if finite else 'NON-FINITE'} weights; "
                    "resume exit "
                    f"{rrc}{' from step ' + resumed[2] if resumed else ' (no resume message)'}")
    rec.lost = "step 5 onwards (not saved); the last good checkpoint (step 4) kept" if rec.ok else "see happened"


# --------------------------------------------------------------------------------------------
# bad input


def _jpeg_with_header_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF marker claims ``width`` x ``height`` (the rest of the file unchanged)."""
    i = 2
    while i + 4 <= len(jpeg):
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # SOF0/1/2: length, precision, height, width
            return jpeg[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9:]
        i += 2 + length
    raise ValueError("no SOF marker in the JPEG")


def write_bad_input(root: str, sample_data: str) -> dict[str, str]:
    """An ImageFolder ``root/train/...`` of good and bad files; {relative key: expected outcome}, an
    outcome being "ok", a failure reason, or "not an item" (no image extension)."""
    from pipeline.sample_data import write_odd_images

    good_cls, odd_cls = "n01440764", "odd"
    good_dir, odd_dir = os.path.join(root, "train", good_cls), os.path.join(root, "train", odd_cls)
    os.makedirs(good_dir)
    src = sorted(glob.glob(os.path.join(sample_data, "train", good_cls, "*")))[:4]
    expected = {}
    for path in src:
        shutil.copy(path, good_dir)
        expected[f"{good_cls}/{os.path.basename(path)}"] = "ok"
    reasons = {"zero_bytes.JPEG": "empty file", "not_an_image.JPEG": "not an image",
               "bomb_20000x20000.png": "decompression bomb (20000 x 20000)", "truncated.JPEG": "truncated|corrupt"}
    for name, outcome in write_odd_images(odd_dir).items():
        expected[f"{odd_cls}/{name}"] = "ok" if outcome == "ok" else reasons[name]
    with open(src[0], "rb") as f:
        jpeg = f.read()
    extra = {
        "jpeg_bytes_named.png": (jpeg, "ok"),  # wrong extension, good content
        "bomb_jpeg_20000x20000.JPEG": (_jpeg_with_header_size(jpeg, 20000, 20000),
                                       "decompression bomb (20000 x 20000)"),
        "notes.txt": (b"not an image; no image extension\n", "not an item"),
    }
    for name, (data, outcome) in extra.items():
        with open(os.path.join(odd_dir, name), "wb") as f:
            f.write(data)
        expected[f"{odd_cls}/{name}"] = outcome
    return expected


@drill("bad_input", "input", "corrupt, empty, non-image, 20000x20000-header, misnamed files: holes, bounded memory")
def bad_input(ctx: DrillContext, rec: DrillRecord) -> None:
    from pipeline.store import LatentStore

    clean = ctx.clean_store()
    data = ctx.path("bad_input", "data")
    expected = write_bad_input(data, ctx.sample_data())
    out = ctx.path("bad_input", "stores")
    bad = {k: v for k, v in expected.items() if v not in ("ok", "not an item")}
    rec.did = (f"encoded an ImageFolder of {len(expected)} files (shared config): 4 good JPEGs, 8 odd but valid "
               "images (grayscale, CMYK, palette, 16-bit, 3x2, PNG named .JPEG, JPEG named .png) and "
               f"{len(bad)} bad ones (zero bytes, truncated JPEG, text named .JPEG, PNG and JPEG headers claiming "
               "20000 x 20000) plus notes.txt; measured the job's peak resident memory")
    rec.expected = (f"the job finishes; each bad file is a hole with its reason in the store's spec, every good one "
                    f"is encoded; no process grows more than {BAD_INPUT_RSS_SLACK_MIB} MiB over the clean run's "
                    "(decoding one 20000 x 20000 RGB image would take 1144 MiB)")
    job, rc = ctx.run("bad-input-encode", ctx.encode_cmd(out, data=os.path.join(data)), measure=True)
    memory = job.memory()
    outcome = encode_outcome(job, rc)
    rec.details = {"outcome": outcome, "memory": memory, "clean_memory": clean["memory"], "expected": expected}
    if rc != 0:
        rec.happened = f"the job exited {rc}: {outcome.get('error')}"
        rec.lost = "the whole job"
        return
    store = LatentStore.open(outcome["uri"])
    spec = store.spec
    failures = {f["key"]: f["reason"] for f in spec["failures"]}
    valid = store.valid()
    valid_keys = {store.source_ref(int(r))["key"] for r in range(store.num_samples) if valid[r]}
    wrong = []
    for key, want in expected.items():
        if want == "ok" and key not in valid_keys:
            wrong.append(f"{key}: expected encoded, got {failures.get(key, 'missing')}")
        elif want not in ("ok", "not an item") and not re.fullmatch(want.replace("(", r"\(").replace(")", r"\)"),
                                                                    failures.get(key, "")):
            got = failures.get(key, "encoded" if key in valid_keys else "missing")
            wrong.append(f"{key}: expected '{want}', got {got}")
        elif want == "not an item" and (key in failures or key in valid_keys):
            wrong.append(f"{key}: expected not to be an item")
    # Where, if anywhere, is a file without an image extension reported?
    run_log_text = ""
    runs = sorted(glob.glob(os.path.join(out, "_runs", "*.json")))
    if runs:
        with open(runs[-1], encoding="utf-8") as f:
            run_log_text = f.read()
    unreported = [k for k, v in expected.items() if v == "not an item"
                  and os.path.basename(k) not in json.dumps(spec) + run_log_text + job.stderr()]
    ref_by_role = (clean["memory"] or {}).get("peak_mib_by_role", {})
    by_role = memory["peak_mib_by_role"]
    over = {role: round(mib - ref_by_role[role], 1) for role, mib in by_role.items() if role in ref_by_role}
    worst = max(over.values(), default=0.0)
    bound = max(ref_by_role.values(), default=0.0) + BAD_INPUT_RSS_SLACK_MIB
    memory_ok = memory["max_process_peak_mib"] <= bound and worst <= BAD_INPUT_RSS_SLACK_MIB
    rec.figures = {"files": len(expected), "encoded": int(valid.sum()), "holes": len(failures),
                   "max_process_peak_mib": memory["max_process_peak_mib"], "clean_max_process_peak_mib":
                   (clean["memory"] or {}).get("max_process_peak_mib"), "bound_mib": round(bound, 1),
                   "tree_peak_mib": memory["tree_peak_mib"],
                   "clean_tree_peak_mib": (clean["memory"] or {}).get("tree_peak_mib"),
                   "peak_growth_mib_by_role": over, "job_s": outcome["seconds"]}
    rec.ok = not wrong and memory_ok
    reasons = sorted(set(failures.values()))
    rec.happened = (
        f"the job exited 0 in {outcome['seconds']} s: {int(valid.sum())} encoded, {len(failures)} holes with reasons "
        f"{reasons}" + (f"; mismatches: {wrong}" if wrong else "; every file as expected")
        + f"; peak RSS: largest process {memory['max_process_peak_mib']} MiB (clean run "
        f"{(clean['memory'] or {}).get('max_process_peak_mib')} MiB, bound {bound:.0f} MiB), per role "
        f"{by_role} vs clean {ref_by_role}; whole job {memory['tree_peak_mib']} MiB (clean "
        f"{(clean['memory'] or {}).get('tree_peak_mib')} MiB)")
    if unreported:
        rec.findings.append(
            f"{', '.join(unreported)}: a file without an image extension inside a class folder is not an item "
            "(pipeline/sources.py keeps it in Source.ignored 'for reporting'), but the encode job reports it nowhere: "
            "not in the store's spec, not in the run log, not on stderr. It is skipped silently.")
    rec.lost = (f"the {len(bad)} bad files (holes at their rows, reasons recorded); "
                + (f"{', '.join(unreported)} skipped without a record" if unreported else "nothing else")
                if not wrong else "see happened")


# --------------------------------------------------------------------------------------------
# the command


def run_drills(names: list[str], options: DrillOptions) -> tuple[dict[str, dict], dict]:
    ctx = DrillContext(options)
    records: dict[str, dict] = {}
    reference: dict = {}
    try:
        # Every drill compares with the clean run: make it (and start Ray) first, timed on its own.
        t0 = time.monotonic()
        ctx.clean_store()
        reference["setup_s"] = round(time.monotonic() - t0, 1)
        for name in names:
            d = DRILLS[name]
            rec = DrillRecord(name, d.category)
            log(f"{name}: {d.summary}")
            t0 = time.monotonic()
            try:
                d.run(ctx, rec)
            except Exception as e:  # noqa: BLE001 - one drill's failure must not stop the others
                import traceback

                rec.ok = False
                rec.error = f"{type(e).__name__}: {e}"
                log(f"{name}: the drill raised:\n{traceback.format_exc()}")
            rec.seconds = round(time.monotonic() - t0, 1)
            records[name] = rec.to_dict()
            log(f"{name}: {'PASS' if rec.ok else 'FAIL'} in {rec.seconds:.1f} s")
        reference.update({k: v for k, v in ctx._clean.items() if k != "digests"})
        reference["objects"] = len(ctx._clean["digests"])
    finally:
        ctx.close()
    return records, reference


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.drills", description="Faults the pipeline must survive.")
    p.add_argument("--quick", action="store_true", help="fewer steps and attempts (the code paths, quickly)")
    p.add_argument("--only", default=None, help=f"comma-separated drills: {', '.join(DRILLS)}")
    p.add_argument("--out", default="bench/drills.json", help="results file (merged by drill name)")
    p.add_argument("--work-dir", default="bench/work/drills", help="scratch folder (emptied first)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per command")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: hide GPUs from the jobs; cuda: let the encoder actors and the trainer use them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = select_drills(args.only)
    options = DrillOptions(quick=args.quick, work_dir=args.work_dir, timeout_s=args.timeout, device=args.device)
    started = time.time()
    t0 = time.monotonic()
    try:
        records, reference = run_drills(names, options)
    except (RuntimeError, ValueError) as e:  # the Ray cluster or the clean reference run could not be made
        print(f"drills: setup failed: {e}", file=sys.stderr)
        return 2
    run = {
        "command": " ".join(["python -m bench.drills", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.monotonic() - t0, 1),
        "quick": args.quick,
        "device": args.device,
        "environment": {"cpus": os.cpu_count(), "ray_cpus": RAY_CPUS, "host": socket.gethostname(),
                        "python": sys.version.split()[0]},
        "reference_clean_encode": reference,
    }
    merge_results(args.out, run, records)
    mem = reference.get("memory") or {}
    print(f"reference: Ray start + clean encode {reference.get('setup_s')} s (the clean encode "
          f"{reference.get('seconds')} s, {reference.get('objects')} objects, largest process "
          f"{mem.get('max_process_peak_mib')} MiB)\n")
    print(format_table(records))
    failed = [n for n, r in records.items() if not r["ok"]]
    print(f"\n{len(records) - len(failed)}/{len(records)} drills passed in {run['seconds']:.0f} s; results in "
          f"{args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
