"""`rae-pipeline sample` under torchrun (gloo, 2 CPU processes): exactly the samples of one process,
and a distributed run killed after some parts resumes from them to the same result."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import free_port
from tests.test_sample import save_decoder, save_dit
from trainer.sample import SampleConfig, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT")
# 10 samples in blocks of 3 ([0,3) [3,6) [6,9) [9,10)), model calls of 2: ranks 0 and 1 take
# alternate blocks, and every block has a short last batch.
SETTINGS = {"num": 10, "steps": 10, "block_size": 3, "batch_size": 2, "labels": "random", "seed": 11}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoints and the 1-process reference result (one thread, as each torchrun rank)."""
    root = tmp_path_factory.mktemp("ddp")
    dit, decoder = save_dit(root / "dit"), save_decoder(root / "decoder")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample(dit, decoder, str(root / "one"), SampleConfig(**SETTINGS, progress=False))
    finally:
        torch.set_num_threads(before)
    with np.load(root / "one" / "samples.npz") as z:
        reference = z["arr_0"], z["arr_1"]
    return {"dit": dit, "decoder": decoder, "reference": reference}


def _torchrun(setup, out, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "pipeline.cli", "sample", "--dit-ckpt", setup["dit"], "--decoder-ckpt", setup["decoder"],
           "--out", str(out), "--device", "cpu"]
    for key, value in SETTINGS.items():
        # --num-samples: torchrun's own parser would take --num as an abbreviation of --numa-binding.
        cmd += ["--num-samples" if key == "num" else "--" + key.replace("_", "-"), str(value)]
    return subprocess.run(cmd + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=200)


def _samples(out) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(out, "samples.npz")) as z:
        return z["arr_0"], z["arr_1"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_write_exactly_the_one_process_samples(setup, tmp_path):
    out = tmp_path / "two"
    proc = _torchrun(setup, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines() == [str(out / "samples.npz")]  # rank 0 alone prints
    assert "world size 2" in proc.stderr and "images/s over 2 rank(s)" in proc.stderr
    images, labels = _samples(out)
    ref_images, ref_labels = setup["reference"]
    assert np.array_equal(labels, ref_labels) and len(set(labels.tolist())) > 1
    # Bitwise: each block is sampled in the same model calls whichever rank takes it.
    assert np.array_equal(images, ref_images)
    result = json.load(open(out / "sample.json"))["result"]
    assert result["world_size"] == 2 and (result["blocks_sampled"], result["blocks_reused"]) == (4, 0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_distributed_run_resumes_from_its_parts(setup, tmp_path):
    out = tmp_path / "resumed"
    # Each rank stops (exit code 3) after writing its first block; torchrun then tears the group down.
    proc = _torchrun(setup, out, "--debug-exit-after-blocks", "1")
    assert proc.returncode != 0 and "interrupted" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "samples.npz").exists()
    parts = sorted(p for p in os.listdir(out / "parts") if p.startswith("part-"))
    assert 1 <= len(parts) <= 2 and set(parts) <= {"part-00000000-00000003.npz", "part-00000003-00000006.npz"}

    # The rerun (here in this process: world size 1) samples only the missing blocks and merges everything.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = sample(setup["dit"], setup["decoder"], str(out), SampleConfig(**SETTINGS, progress=False))
    finally:
        torch.set_num_threads(before)
    assert (result.blocks_sampled, result.blocks_reused) == (4 - len(parts), len(parts))
    assert json.load(open(out / "sample.json"))["result"]["blocks_reused"] == len(parts)
    images, labels = _samples(out)
    assert np.array_equal(images, setup["reference"][0]) and np.array_equal(labels, setup["reference"][1])
    assert not (out / "parts").exists()
