"""Pieces of the bench items encode_efficiency, cache_speedup and data_wait (the bench itself is not
part of the suite): the encode job's rates from its own timings, the sample-image copies, the
trainer's metrics log read back into a time-weighted data-wait fraction, and the reference-path
dataset giving exactly the encode job's crop."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import bench.bench  # noqa: F401  (first: registers every item in the bench's order, ours after its own)
from bench.bench_encode import (encode_rates, read_pixels, replicate_images, sample_image_files, shard_completions,
                                steady_rate)
from bench.bench_train import (ReferenceImages, labelled_files, read_run_metrics, reference_batches, reference_loader,
                               wait_fraction)
from pipeline.encode import EncodeResult
from pipeline.preprocess import preprocess_image_bytes
from pipeline.sample_data import generate_sample_data
from trainer.runlog import RunLogger


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    return generate_sample_data(str(tmp_path_factory.mktemp("sample")), train_per_class=2, val_per_class=1)


# --------------------------------------------------------------------------------------------
# encode_efficiency


def _result(**kw) -> EncodeResult:
    base = dict(uri="/x/store", store_id="abc", reused=False, num_shards=4, shards_encoded=4, images_encoded=30,
                num_failed=0, seconds=80.0, encode_seconds=60.0, images_per_s=0.5,
                details={"steady_images_per_s": 0.95, "first_shard_s": 30.0, "threads_per_actor": 2})
    base.update(kw)
    return EncodeResult(**base)


# shards of 8, 8, 8 and 6 images completing (any order) at 100 s, 110 s, 118 s and 130 s
COMPLETIONS = [(118.0, 8), (100.0, 8), (130.0, 6), (110.0, 8)]


def test_steady_rate_counts_the_images_after_the_first_completion():
    got = steady_rate(COMPLETIONS)
    assert got["images_per_s"] == pytest.approx(22 / 30.0)  # 8 + 8 + 6 images in 130 - 100 s
    assert got["images"] == 22 and got["seconds"] == 30.0 and got["intervals_s"] == [10.0, 8.0, 12.0]
    with pytest.raises(ValueError, match="at least 2"):
        steady_rate(COMPLETIONS[:1])
    with pytest.raises(ValueError, match="same instant"):
        steady_rate([(5.0, 8), (5.0, 8)])


def test_encode_rates_come_from_the_jobs_timings():
    r = encode_rates(_result(), COMPLETIONS)
    assert r["steady"] == pytest.approx(22 / 30.0) and r["steady_driver"] == 0.95
    assert r["end_to_end"] == pytest.approx(30 / 80.0)
    assert r["ray_pipeline"] == pytest.approx(30 / 60.0)
    assert r["first_shard_s"] == 30.0


@pytest.mark.parametrize("kw, message", [
    ({"reused": True}, "reused"),
    ({"num_failed": 2}, "failed"),
    ({"shards_encoded": 1, "details": {"first_shard_s": 3.0}}, "steady state"),
    ({"seconds": 0.0}, "no elapsed time"),
])
def test_encode_rates_refuse_a_job_that_measured_nothing_steady(kw, message):
    with pytest.raises(ValueError, match=message):
        encode_rates(_result(**kw), COMPLETIONS)


def test_shard_completions_are_the_record_times_of_a_real_store(tmp_path):
    from pipeline.store import StoreLayout, write_array_store
    from schemas import store_v1 as S

    rng = np.random.default_rng(0)
    folder = str(tmp_path / "store")
    write_array_store(folder, rng.standard_normal((10, 4, 2, 2), dtype=np.float32), rng.integers(0, 3, 10),
                      num_classes=3, layout=StoreLayout(samples_per_shard=4, flips=False))
    for shard, when in enumerate([300.0, 100.0, 200.0]):  # as if the shards finished out of order
        path = os.path.join(folder, S.record_name(shard))
        os.utime(path, (when, when))
    assert shard_completions(folder, 3) == [(100.0, 4), (200.0, 2), (300.0, 4)]
    with pytest.raises(ValueError, match="local"):
        shard_completions("s3://bucket/store", 3)


def test_replicated_images_are_distinct_copies_in_one_split(sample_root, tmp_path):
    files = sample_image_files(sample_root)
    assert len(files) == 12  # 4 classes x (2 train + 1 val), same names in train and val
    dest, copies = replicate_images(files, str(tmp_path / "rep"), 30)
    assert len(set(copies)) == 30 and all(os.path.isfile(p) for p in copies)
    assert sorted(os.listdir(dest)) == ["replicas.json", "train"]
    for i, path in enumerate(copies):  # copy i is files[i % 12], byte for byte, in the same class folder
        src = files[i % len(files)]
        assert os.path.basename(os.path.dirname(path)) == os.path.basename(os.path.dirname(src))
        with open(path, "rb") as a, open(src, "rb") as b:
            assert a.read() == b.read()
    mtime = os.path.getmtime(copies[0])
    assert replicate_images(files, dest, 30)[1] == copies and os.path.getmtime(copies[0]) == mtime  # reused
    assert len(replicate_images(files, dest, 13)[1]) == 13 and not os.path.exists(copies[20])  # rewritten
    pixels = read_pixels(copies[:2], 64)
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == np.uint8
    with pytest.raises(ValueError):
        replicate_images([], dest, 3)


# --------------------------------------------------------------------------------------------
# data_wait: the trainer's metrics log


def test_wait_fraction_is_time_weighted_over_the_windows_after_the_first(tmp_path):
    run_dir = str(tmp_path / "run")
    logger = RunLogger(run_dir, True, tensorboard=False)  # the trainer's own writer
    # windows of 10 steps: the first (loader start) slow and waiting; then 1 s and 4 s windows
    logger.log(10, {"loss": 1.0, "samples_per_s": 16.0, "steps_per_s": 1.0, "data_wait_frac": 0.9})
    logger.log(20, {"loss": 1.0, "samples_per_s": 160.0, "steps_per_s": 10.0, "data_wait_frac": 0.5})
    logger.log(30, {"loss": float("nan"), "samples_per_s": 40.0, "steps_per_s": 2.5, "data_wait_frac": 0.1})
    logger.close()
    records = read_run_metrics(run_dir)
    assert [r["step"] for r in records] == [10, 20, 30]
    got = wait_fraction(records, skip=1)
    assert got["data_wait_frac"] == pytest.approx((0.5 * 1 + 0.1 * 4) / 5)  # not the plain mean 0.3
    assert got["samples_per_s"] == pytest.approx(20 * 16 / 5)
    assert got["seconds"] == pytest.approx(5.0) and got["steps"] == 20 and got["windows"] == [0.5, 0.1]
    assert wait_fraction(records, skip=0)["data_wait_frac"] == pytest.approx((0.9 * 10 + 0.5 + 0.4) / 15)
    with pytest.raises(ValueError, match="nothing left"):
        wait_fraction(records, skip=3)
    with pytest.raises(ValueError, match="steps_per_s"):
        wait_fraction([{"step": 1}, {"step": 2, "data_wait_frac": 0.1, "samples_per_s": 3.0}])
    with pytest.raises(ValueError, match="no metric records"):
        read_run_metrics(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# cache_speedup: the reference's data path


def test_reference_dataset_yields_the_encode_jobs_crop_and_its_flip(sample_root):
    files, labels = labelled_files(sample_image_files(sample_root))
    assert sorted(set(labels)) == [0, 1, 2, 3]
    plain = ReferenceImages(files, labels, 64, hflip_prob=0.0)
    flipped = ReferenceImages(files, labels, 64, hflip_prob=1.0)
    for i in (0, 5, len(files) - 1):
        with open(files[i], "rb") as f:
            crop = torch.from_numpy(preprocess_image_bytes(f.read(), 64)).float() / 255.0  # (3, 64, 64)
        x, y = plain[i]
        assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and y == labels[i]
        assert torch.equal(x, crop)
        assert torch.equal(flipped[i][0], torch.flip(crop, dims=[2]))
    with pytest.raises(ValueError):
        ReferenceImages(files, labels[:-1], 64)


def test_reference_batches_encode_every_batch_in_this_process(sample_root):
    from pipeline.encoders import build_encoder
    from trainer.normalize import LatentNormalizer

    files, labels = labelled_files(sample_image_files(sample_root))
    encoder, _ = build_encoder("dinov2", 256, weights="random", seed=0, depth=1)  # the real architecture, 1 block
    g = torch.Generator().manual_seed(0)
    normalizer = LatentNormalizer(mean=torch.randn(768, 16, 16, generator=g),
                                  var=torch.rand(768, 16, 16, generator=g) + 0.5)
    one = ReferenceImages(files[3:4], labels[3:4], 256, hflip_prob=0.0)  # one file: every batch is known
    loader = reference_loader(one, batch=2, workers=0, device=torch.device("cpu"), seed=1)
    batches = reference_batches(loader, encoder, normalizer, torch.device("cpu"), None)
    with torch.no_grad():
        want = normalizer.normalize(encoder(one[0][0][None]))[0]  # (768, 16, 16)
    for _ in range(2):  # endless: more batches than the dataset has items
        x, y = next(batches)
        assert x.shape == (2, 768, 16, 16) and y.tolist() == [labels[3]] * 2
        torch.testing.assert_close(x, torch.stack([want, want]), atol=1e-4, rtol=1e-4)
