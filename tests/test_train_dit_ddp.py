"""`rae-pipeline train-dit` under torchrun (gloo, 2 CPU processes) equals the 1-process run with the same
global batch, and the two ranks train on disjoint samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.store import StoreLayout, write_array_store
from tests.conftest import free_port
from trainer.checkpoint import load_checkpoint
from trainer.models import build_model_from_meta
from trainer.train_dit import DiTTrainer, resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT")


def _records(run_dir, rank) -> dict[int, dict]:
    with open(os.path.join(run_dir, "debug", f"batches-rank{rank}.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one_process(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(64, 8, 4, 4)).astype(np.float32)
    store = write_array_store(str(tmp_path / "store"), lat, rng.integers(0, 4, 64), latents_flip=-lat, num_classes=4,
                              layout=StoreLayout(dtype="float32", samples_per_shard=16, samples_per_chunk=4))
    # The same global batch of 8 over 2 streams; the 2-process run also splits each rank's 4 rows into
    # 2 accumulation micro-steps, so its gradient is a mean of 4 means of 2 samples against the 1-process
    # run's one mean of 8: equal only if accumulation and the DDP average are scaled right.
    common = ["data.global_batch=8", "data.num_streams=2", "train.max_steps=4", "train.ckpt_every=4",
              "train.log_every=1", "train.debug_record_batches=true", "train.progress=false",
              "train.tensorboard=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        DiTTrainer(resolve_config("debug", common), store.uri, str(one)).train()
    finally:
        torch.set_num_threads(before)

    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "pipeline.cli", "train-dit", "--store", store.uri, "--run-dir", str(two), "--preset", "debug"]
    for s in [*common, "train.grad_accum_steps=2"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("train-dit: store") == 1  # rank 0 speaks, rank 1 does not
    assert "world size 2, global batch 8 = 2 x 2 x 2" in proc.stdout

    a, b = load_checkpoint(str(one)), load_checkpoint(str(two))
    assert a.step == b.step == 4 and a.meta.samples_seen == b.meta.samples_seen == 32
    assert b.meta.extra["world_size"] == 2 and b.meta.data_state["num_streams"] == 2
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(b.ema_state[key], a.ema_state[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.manual_seed(0)  # train.seed: the trainers' initial weights
    initial = build_model_from_meta(a.meta.model).state_dict()
    moved = max((a.model_state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # the comparison is between trained weights, not two copies of the init

    # Each rank served its rows of the 1-process run's global batch; the ranks' samples are disjoint.
    whole, rank0, rank1 = _records(one, 0), _records(two, 0), _records(two, 1)
    assert sorted(whole) == sorted(rank0) == sorted(rank1) == [1, 2, 3, 4]
    seen: list[set] = [set(), set()]
    for step, full in whole.items():
        for r, rec in enumerate((rank0[step], rank1[step])):
            assert rec["rows"] == list(range(4 * r, 4 * r + 4))
            assert rec["sums"] == [full["sums"][i] for i in rec["rows"]]
            assert rec["labels"] == [full["labels"][i] for i in rec["rows"]]
            seen[r] |= set(rec["sums"])
    assert len(seen[0]) == len(seen[1]) == 16 and not seen[0] & seen[1]
