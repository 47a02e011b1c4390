"""The drills' tools: /proc readers (Linux) and the memory sampler of a job, subprocess jobs and
the lines their output says, the drills' Ray cluster (a child process of ours), store snapshots
and damage, and readers of a training run's folder.

Nothing here sets environment variables of this process: the children get theirs explicitly.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1024 * 1024

# The local Ray cluster of the drills: logical CPUs (the machine's 2 cores) and a small object store.
RAY_CPUS = 2
RAY_OBJECT_STORE_BYTES = 512 * MIB


def log(msg: str) -> None:
    print(f"[drills {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def kill_titled(tree: dict[int, str], skip: int | None = None, ray_retitled: bool = False) -> None:
    """SIGKILL every process of ``tree`` ({pid: title when it was ours}) that still shows that title,
    so a reused pid is never killed; ``ray_retitled``: a ``ray::`` worker showing another ``ray::``
    title (Ray retitles its workers per task) still counts. ``skip``: a pid left alone."""
    for pid, title in tree.items():
        now = proc_title(pid)
        ours = now == title or (ray_retitled and title.startswith("ray::") and now.startswith("ray::"))
        if pid != skip and title and ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def json_from_child(code: str, env: dict, log_path: str, timeout_s: float, what: str) -> dict:
    """Run ``python -c code`` in the repository (stderr appended to ``log_path``) and return the
    JSON of its last stdout line; RuntimeError naming ``what`` and the log when it fails."""
    with open(log_path, "ab") as err:
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO,
                              timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}); see {log_path}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


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
        cmd = [sys.executable, "-c", "from bench.drills.tools import ray_host_main; ray_host_main()"]
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
        kill_titled(tree, skip=self.proc.pid, ray_retitled=True)
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
# waiting for a condition while a job runs


def wait_until(predicate: Callable[[], bool], job: Job, timeout_s: float, poll_s: float = 0.02) -> bool:
    """True once ``predicate()`` holds; False when the job exits first or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if job.poll() is not None:
            return predicate()
        time.sleep(poll_s)
    return False


# --------------------------------------------------------------------------------------------
# training runs: checkpoints, weights, batch records, logged steps


def describe_checkpoints(entries) -> list[tuple[int, str]]:
    return [(e.step, "complete" if e.complete else "INCOMPLETE") for e in entries]


def same_weights(run_a: str, run_b: str) -> tuple[bool, int]:
    """(model and EMA weights of the newest checkpoints equal, their step)."""
    import torch

    from trainer.checkpoint import load_checkpoint

    a, b = load_checkpoint(run_a, load_train_state=False), load_checkpoint(run_b, load_train_state=False)
    same = a.step == b.step and all(
        set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in ((a.model_state, b.model_state), (a.ema_state or {}, b.ema_state or {})))
    return same, a.step


def batch_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "debug", "batches-rank0.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_steps(run_dir: str) -> list[int]:
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["step"] for line in f if line.strip()]
    except (OSError, ValueError, KeyError):
        return []
