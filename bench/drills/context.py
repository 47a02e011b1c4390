"""The drills' context: each drill's record, the registry of drills (on ``bench.harness``), the
options, and :class:`DrillContext` (the work folder, the children's environment and commands, the
servers, the clean reference store every drill compares with)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from bench.drills.tools import REPO, Job, MemorySampler, RayHost, encode_outcome, log, store_digests
from bench.harness import Registry

# The shared encode configuration (see the docstring of ``bench.drills``).
ENCODE_SAMPLES_PER_SHARD = 4
ENCODE_ARGS = [
    "--encoder", "dinov2", "--weights", "random", "--split", "train", "--resolution", "256",
    "--samples-per-shard", str(ENCODE_SAMPLES_PER_SHARD), "--batch-size", "4", "--num-actors", "1",
    "--threads", "1", "--set", 'encoder_overrides={"depth": 1}', "--set", "actor_cpus=0.5", "--no-progress",
]  # fmt: skip
S3_BUCKET = "drills"
# What the drills' Ray cluster holds for S3 (moto accepts any key pair): the workers' own credentials.
CLUSTER_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
# Training drills: the debug preset, quiet, on the clean sample store.
TRAIN_QUIET = ["train.progress=false", "train.tensorboard=false"]
WORK_MARKER = ".drills-work"  # only a work folder holding this file is ever emptied

# --------------------------------------------------------------------------------------------
# records and the registry


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


# A drill is a function ``fn(ctx: DrillContext, record: DrillRecord)``, run in registration order.
DRILLS = Registry("drill")
select_drills = DRILLS.select


def drill(name: str, category: str, summary: str) -> Callable:
    """Register ``fn(ctx, record)``: it fills the record (and may raise: the drill then fails)."""
    return DRILLS.register(name, summary, category)


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
            # The cluster's own credentials (a real cluster's instance role or AWS config): jobs send none
            # to their workers, only the endpoint they use.
            self._ray = RayHost(self.env(**CLUSTER_AWS_ENV), self.path("logs", "ray-host.err")).start()
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
