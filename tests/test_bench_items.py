"""Pieces of the bench items encode_efficiency, cache_speedup and data_wait (the bench itself is not
part of the suite): the encode job's rates from its own timings, the sample-image copies, the
trainer's metrics log read back into a time-weighted data-wait fraction, and the reference-path
dataset giving exactly the encode job's crop."""
from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


# --------------------------------------------------------------------------------------------
# loader_latency: the latency proxy and the throughput budget


class _Objects(BaseHTTPRequestHandler):
    """A tiny upstream: GET /<n> answers n bytes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"x" * int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def objects_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Objects)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _timed_get(url: str, size: int) -> float:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        t0 = time.perf_counter()
        conn.request("GET", f"/{size}")
        resp = conn.getresponse()
        assert resp.status == 200 and len(resp.read()) == size
        return time.perf_counter() - t0
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_latency_proxy_injects_the_delay_it_claims(objects_upstream):
    from bench.faultproxy import FaultProxy, Latency

    delay = 0.4
    with FaultProxy(objects_upstream, latency=Latency(delay_ms=delay * 1000)) as proxy:
        assert delay <= _timed_get(proxy.url, 1000) < delay + 0.3
        # Requests on separate connections wait at the same time, as on an object store.
        with ThreadPoolExecutor(4) as pool:
            t0 = time.perf_counter()
            times = list(pool.map(lambda _: _timed_get(proxy.url, 1000), range(4)))
            wall = time.perf_counter() - t0
        assert min(times) >= delay and wall < 2 * delay, (times, wall)
        stats = proxy.stats()
        assert stats["in_flight"]["peak"] == 4 and stats["in_flight"]["now"] == 0
        assert stats["latency"] == {"delay_ms": delay * 1000, "bytes_per_s": None}
        assert stats["by_method"] == {"GET": 5} and stats["bytes_sent"] == 5000
        # Between snapshots the in-flight integral is request-seconds: 5 requests of >= 0.4 s.
        assert stats["in_flight"]["request_seconds"] >= 5 * delay
        # A per-connection cap: 1 MB at 4 MB/s takes >= 0.25 s; no delay, no cap: at once.
        proxy.set_latency(0, bytes_per_s=4e6)
        assert 0.25 <= _timed_get(proxy.url, 1_000_000) < 0.25 + 0.4
        proxy.set_latency(0)
        assert _timed_get(proxy.url, 1_000_000) < 0.2
        assert proxy.stats()["in_flight"]["peak"] == 1  # restarted when the latency was set
        with pytest.raises(urllib.error.HTTPError, match="400"):
            proxy._control("latency", {"delay_ms": -1})


def test_dit_flops_formula_counts_what_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from bench.bench_stream import dit_flops_per_sample, throughput_budget
    from trainer.models.dit import DiTConfig, build_model

    cfg = DiTConfig(in_channels=12, input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                    head_hidden_size=48, head_depth=1, head_num_heads=2, num_time_freqs=8, num_classes=10)
    with torch.device("meta"):  # on the meta device torch counts attention too (not CPU's flash kernel)
        model = build_model(cfg).eval()
        x, t, y = torch.randn(3, 12, 4, 4), torch.rand(3), torch.tensor([1, 2, 3])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert dit_flops_per_sample(cfg)["forward_flops"] * 3 == counter.get_total_flops()  # batch of 3
    budget = throughput_budget(8, delay_s=0.05, time_per_get_s=0.03, delivered_per_rank=300.0)
    assert budget["forward_flops_per_sample"] == 323_157_393_408  # DiT^DH-XL, 256 tokens: torch's count too
    bf16 = budget["per_precision"]["bf16"]
    rate = 0.4 * 989e12 / (3 * 323_157_393_408)
    assert bf16["samples_per_s_per_gpu"] == pytest.approx(rate, abs=0.1)
    assert bf16["gets_in_flight_per_rank"] == pytest.approx(rate / 8 * 0.08, abs=0.01)
    assert budget["per_precision"]["tf32"]["samples_per_s_per_node"] == round(8 * 0.4 * 495e12 / (3 * 323_157_393_408))
