"""Pieces of the bench item ``scale`` (the bench itself is not part of the suite): the projection
arithmetic, the FLOPs behind the GPU side, the stand-in encoder plugged into the real encode job,
and one rank's loader on a metadata-only store."""
from __future__ import annotations

import numpy as np
import pytest

from bench import scale_model as M
from bench.scale_encode import STANDIN_CHANNELS, STANDIN_GRID, make_small_jpegs, standin_job
from bench.scale_loader import measure_rank, write_metadata_store


def test_projection_keeps_superlinear_and_fixed_costs():
    linear = M.Projection("linear", "s", 1000, 2.0, 4000, 8.0, 64000)
    assert linear.exponent == pytest.approx(1.0) and linear.value == pytest.approx(128.0)
    # n^1.5: the power law carries the curvature on; the line through the points would understate it.
    curved = M.Projection("curved", "s", 1000, 1000**1.5, 4000, 4000**1.5, 64000)
    assert curved.exponent == pytest.approx(1.5) and curved.value == pytest.approx(64000**1.5)
    assert curved.value > curved.line
    # 100 + n / 10: a fixed part makes the fitted exponent < 1; the line is exact and is taken.
    fixed = M.Projection("fixed", "MiB", 1000, 200.0, 4000, 500.0, 64000)
    assert fixed.exponent < 1 and fixed.value == pytest.approx(100 + 6400) and fixed.value > fixed.power
    assert "ln(500 / 200)" in fixed.formula() and fixed.to_dict()["projected"] == pytest.approx(6500)


def test_dinov2_b_forward_flops_and_the_derived_gpu_rate():
    n, d = 256 + 5, 768  # 16 x 16 patches at 224 px, class token and 4 registers
    per_block = 4 * n * d * d + 2 * n * n * d + 8 * n * d * d
    assert M.vit_forward_flops() == 2 * (256 * 3 * 14 * 14 * d + 12 * per_block)
    assert M.vit_forward_flops() == pytest.approx(47.08e9, rel=1e-3)
    fp32 = M.gpu_images_per_s("float32")
    assert fp32 == pytest.approx(67e12 * 0.4 / (2 * M.vit_forward_flops()))
    assert M.cores_per_gpu(0.01, "float32") == pytest.approx(fp32 * 0.01)
    assert M.imagenet_bytes() == 1_281_167 * 2 * 768 * 16 * 16 * 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_standin_encoder_runs_inside_the_real_encode_job(ray_local, tmp_path):
    from pipeline.encode import EncodeConfig, _encode_pending
    from pipeline.store import LatentStore, verify_store
    from bench.scale_encode import _standin_actor_class

    root = make_small_jpegs(str(tmp_path / "images"), 40)
    assert make_small_jpegs(root, 40) == root  # kept: a complete folder is not rewritten
    cfg = EncodeConfig(data=root, out=str(tmp_path / "out"), weights="random", samples_per_shard=16, batch_size=8,
                       num_actors=1, threads=1, actor_cpus=0.5, progress=False)
    job, module = standin_job(cfg)
    assert job.plan.latent_shape == (STANDIN_CHANNELS, STANDIN_GRID, STANDIN_GRID)
    assert "stand-in" in job.plan.encoder["arch"] and job.uri.endswith(job.plan.store_id)
    writer = job.writer.create()
    tally = _encode_pending(job, module, writer.pending_shards(), 40, actor_cls=_standin_actor_class())
    assert len(tally.counts) == 3 and tally.images == 40
    writer.finalize()
    store = LatentStore.open(job.uri)
    assert verify_store(job.uri).ok
    # The "latent" is the crop's colour means per 64 px cell, image and flip.
    for array in ("latents", "latents_flip"):
        x = store.read_rows(0, 40, array)
        assert x.shape == (40, STANDIN_CHANNELS, STANDIN_GRID, STANDIN_GRID) and 0 < float(x.max()) <= 1.0
    # The flip's cells are the image's, mirrored left to right.
    np.testing.assert_allclose(store.read_rows(0, 40, "latents_flip"), store.read_rows(0, 40)[..., ::-1], atol=2e-3)


def test_metadata_only_store_gives_one_ranks_loader_and_epoch_plans(tmp_path):
    uri = write_metadata_store(str(tmp_path / "meta"), 12_800)
    got = measure_rank(uri, world_size=4, epochs=2)
    assert got["rows"] == 12_800 and got["valid"] == 12_800 and got["streams"] == 4
    assert len(got["epoch_plan_s"]) == 2 and got["plans_held"] == 2
    assert got["epoch_plan_bytes_each"] >= got["valid"] * 8  # the epoch's order, int64 per valid row
    assert got["traced_peak_bytes"] >= got["traced_held_bytes"] > 0
