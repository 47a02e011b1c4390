"""The pieces of `make bench` (the benchmark itself is not part of the test suite): the interleaving,
ratio, table and results-merging helpers, the raw-read helper, the peer layouts reading back exactly
what was written (local and S3), and a quick storage run's JSON."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bench.common import (BENCHMARKS, Measurement, ObjectReader, S3Access, check_target, format_table, load_results,
                          merge_results, ratio_figure, raw_read, run_interleaved, select_benchmarks, side)
from bench.peers import (NpyPerSample, SafetensorsPerItem, read_safetensors_header, write_npy_per_sample,
                         write_safetensors_shards)

# --------------------------------------------------------------------------------------------
# helpers


def test_run_interleaved_rotates_the_order_of_the_sides():
    calls = []

    def make(name, rate):
        def run():
            calls.append(name)
            return Measurement(rate, 1.0)
        return run

    out = run_interleaved({"a": make("a", 10), "b": make("b", 20), "c": make("c", 30)}, rounds=4)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [m.rate for m in out["b"]] == [20, 20, 20, 20]
    with pytest.raises(ValueError):
        run_interleaved({"a": make("a", 1)}, rounds=0)


def test_ratio_figure_is_the_ratio_of_medians_with_both_sides_beside_it():
    fig = ratio_figure("x / y", side("x", [10.0, 30.0, 20.0], "samples/s"), side("y", [40.0, 40.0, 100.0], "samples/s"),
                       target=">= 0.5", note="n")
    assert fig["ratio"] == 0.5  # median 20 / median 40
    assert fig["numerator"]["median"] == 20 and fig["denominator"]["median"] == 40
    assert fig["numerator"]["values"] == [10, 30, 20]
    assert fig["round_ratios"] == [0.25, 0.75, 0.2]
    assert fig["target_met"] is True and fig["note"] == "n"
    below = ratio_figure("x / y", side("x", [1.0], "u"), side("y", [4.0], "u"), target=">= 0.5")
    assert below["target_met"] is False and "round_ratios" not in below
    assert ratio_figure("x / y", side("x", [1.0], "u"), side("y", [0.0], "u"))["ratio"] is None
    assert check_target(0.9, "< 1") is True and check_target(1.0, "< 1") is False
    assert check_target(None, "< 1") is None and check_target(0.3, None) is None
    with pytest.raises(ValueError):
        check_target(1.0, "about 1")
    with pytest.raises(ValueError):
        side("x", [], "u")


def test_results_merge_by_item_name_and_the_table_shows_every_figure(tmp_path):
    path = str(tmp_path / "results.json")
    fig = ratio_figure("ours / raw", side("ours", [5.0], "samples/s"), side("raw", [10.0], "samples/s"),
                       target=">= 0.5", note="a note")
    merge_results(path, {"alpha": {"figures": [fig], "runtime_s": 1}})
    merge_results(path, {"beta": {"figures": [], "runtime_s": 2}})
    merge_results(path, {"alpha": {"figures": [fig], "runtime_s": 3}})
    doc = load_results(path)
    assert doc["format"] == "rae-bench-results"
    assert list(doc["items"]) == ["alpha", "beta"]
    assert doc["items"]["alpha"]["runtime_s"] == 3 and doc["items"]["beta"]["runtime_s"] == 2
    table = format_table(doc["items"]).splitlines()
    assert table[0].split() == ["item", "figure", "ratio", "numerator", "denominator", "target"]
    row = next(line for line in table if line.startswith("alpha"))
    assert "ours / raw" in row and "0.5" in row and "ours: 5.00 samples/s" in row and ">= 0.5 ok" in row
    assert any(line.strip() == "note: a note" for line in table)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(path)
    with open(path, "w") as f:
        json.dump({"something": "else"}, f)
    with pytest.raises(ValueError, match="not a bench results file"):
        merge_results(path, {"alpha": {}})


def test_the_registry_holds_the_items_in_order_and_only_checks_names():
    import bench.bench  # noqa: F401  (registers the items)

    assert list(BENCHMARKS)[:3] == ["loader_efficiency", "format_peers", "storage"]
    assert select_benchmarks(None) == list(BENCHMARKS)
    assert select_benchmarks("storage, loader_efficiency") == ["loader_efficiency", "storage"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        select_benchmarks("storage,nope")


def test_the_harness_registry_and_results_file_serve_both_layouts(tmp_path):
    """The harness under the bench and the drills: registration order, categories, checked names;
    a results file in insertion order with run facts (the drills') and a strict one (the bench's)."""
    from bench.harness import Registry, ResultsFile

    reg = Registry("thing")
    reg.register("b", "second", category="x")(len)
    reg.register("a", "first")(len)
    assert list(reg) == ["b", "a"] and reg["b"].category == "x" and reg["a"].category is None
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        reg.register("a", "again")(len)
    with pytest.raises(ValueError, match=r"unknown thing\(s\) \['c'\]"):
        reg.select("a,c")
    ordered = ResultsFile("t", 1, "things", "test", canonical=False, strict=False)
    path = str(tmp_path / "t.json")
    ordered.merge(path, {"z": {"v": 1}}, facts={"run": 1})
    doc = ordered.merge(path, {"a": {"v": 2}, "z": {"v": 3}}, facts={"run": 2})
    assert list(doc) == ["format", "version", "run", "things"] and list(doc["things"]) == ["z", "a"]
    assert ordered.load(path) == doc and doc["things"]["z"] == {"v": 3}
    with pytest.raises(ValueError, match="not a test results file"):
        ResultsFile("t", 2, "things", "test", canonical=True, strict=True).load(path)  # a version-1 file


def test_raw_read_counts_every_byte_of_a_stores_latent_objects(tmp_path):
    from bench.bench import _latent_objects
    from pipeline.store import StoreLayout, write_array_store

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    write_array_store(str(tmp_path / "store"), x, np.zeros(6, dtype=int), latents_flip=x[:, :, :, ::-1],
                      num_classes=1, layout=StoreLayout(samples_per_shard=4, samples_per_chunk=2))
    objects = _latent_objects(str(tmp_path / "store"), ["latents", "latents_flip"])
    expected = sum(os.path.getsize(os.path.join(tmp_path, "store", rel)) for rel, _ in objects)
    assert {rel.split("/")[0] for rel, _ in objects} == {"latents", "latents_flip"}
    assert any(rel.endswith("zarr.json") for rel, _ in objects) and len(objects) == 2 * (1 + 2)  # 2 shards each
    nbytes, seconds = raw_read(ObjectReader(str(tmp_path / "store")), [rel for rel, _ in objects])
    assert nbytes == expected == sum(size for _, size in objects) and seconds > 0


def test_loader_efficiency_denominator_reads_the_uncompressed_float16_latents(tmp_path):
    from bench.bench import ensure_loader_data
    from bench.common import BenchContext, BenchOptions
    from pipeline.store import LatentStore

    data = ensure_loader_data(BenchContext(BenchOptions(quick=True, work_dir=str(tmp_path)), log=lambda _: None))
    store = LatentStore.open(data.store_uri)
    assert store.spec["layout"]["compressor"]["name"] != "none"  # the store compresses...
    assert data.raw_bytes_per_sample == int(np.prod(data.latent_shape)) * 2
    nbytes, _ = raw_read(ObjectReader(data.raw_dir), data.raw_keys)
    # ...the raw side reads every latent of both orientations once, as float16 bytes: the same
    # samples per byte whatever the store's codec.
    assert nbytes == 2 * data.num_samples * data.raw_bytes_per_sample > data.latent_bytes
    stored = [np.concatenate([store.read_chunk_stored(c, a) for c in range(store.num_chunks)])
              for a in ("latents", "latents_flip")]
    raw = b"".join(ObjectReader(data.raw_dir).read(k) for k in data.raw_keys)
    assert raw == b"".join(x.astype(np.float16).tobytes() for x in stored)


# --------------------------------------------------------------------------------------------
# peer layouts


def _peer_data(n=10, shape=(4, 3, 5)):
    rng = np.random.default_rng(1)
    lat = rng.standard_normal((n, *shape)).astype(np.float16)
    flip = rng.standard_normal((n, *shape)).astype(np.float16)
    return lat, flip, rng.integers(0, 7, n)


def _check_reads_back(make, lat, flip, labels):
    shift = np.linspace(-1, 1, lat[0].size, dtype=np.float32).reshape(lat.shape[1:])
    scale = np.full(lat.shape[1:], 2.0, dtype=np.float32)
    for prob, want in ((0.0, lat), (1.0, flip)):
        ds = make(flip_prob=prob)
        assert len(ds) == len(lat)
        for i in range(len(lat)):
            x, y = ds[i]
            assert x.dtype == torch.float32 and tuple(x.shape) == lat.shape[1:]
            assert torch.equal(x, torch.from_numpy(want[i].astype(np.float32)))
            assert y.dtype == torch.int64 and int(y) == labels[i]
    x, _ = make(flip_prob=0.0, shift=shift, scale=scale)[3]
    assert torch.equal(x, (torch.from_numpy(lat[3].astype(np.float32)) - torch.from_numpy(shift)) / 2.0)
    # Through a shuffled DataLoader as the bench runs them: every sample once per epoch.
    from torch.utils.data import DataLoader

    seen = torch.cat([y for _, y in DataLoader(make(flip_prob=0.0), batch_size=4, shuffle=True)])
    assert sorted(seen.tolist()) == sorted(labels.tolist())


def test_npy_per_sample_reads_back_exactly_the_latents_written(tmp_path):
    lat, flip, labels = _peer_data()
    assert write_npy_per_sample(str(tmp_path), lat, flip, labels) == 2 * len(lat) + 1
    assert np.load(tmp_path / "features" / "00000003.npy").shape == (1,) + lat.shape[1:]  # fast-DiT's [1, C, H, W]
    _check_reads_back(lambda **kw: NpyPerSample(str(tmp_path), **kw), lat, flip, labels)


def test_safetensors_per_item_reads_back_exactly_the_latents_written(tmp_path):
    from safetensors import safe_open

    lat, flip, labels = _peer_data()
    names = write_safetensors_shards(str(tmp_path), lat, flip, labels, samples_per_file=4)
    assert names == [f"latents_shard{k:03d}.safetensors" for k in range(3)]
    start, header = read_safetensors_header(ObjectReader(str(tmp_path)), names[2])
    with safe_open(str(tmp_path / names[2]), framework="np") as f:
        assert sorted(f.keys()) == sorted(header) and f.get_tensor("labels").tolist() == labels[8:].tolist()
    assert header["latents"]["shape"] == [2, *lat.shape[1:]] and header["latents"]["dtype"] == "F16"
    _check_reads_back(lambda **kw: SafetensorsPerItem(str(tmp_path), **kw), lat, flip, labels)


@pytest.mark.timeout(60)
def test_peers_and_raw_reads_over_s3_read_the_same_bytes(tmp_path, s3_endpoint):
    from bench.common import upload_dir

    lat, flip, labels = _peer_data()
    write_npy_per_sample(str(tmp_path / "npy"), lat, flip, labels)
    write_safetensors_shards(str(tmp_path / "st"), lat, flip, labels, samples_per_file=4)
    access = S3Access(s3_endpoint)
    uploaded = upload_dir(access, "test-bucket", str(tmp_path / "npy"), "bench-peers/npy")
    upload_dir(access, "test-bucket", str(tmp_path / "st"), "bench-peers/st")
    local, remote = ObjectReader(str(tmp_path / "npy")), ObjectReader("s3://test-bucket/bench-peers/npy", access)
    assert remote.list() == local.list() and uploaded == sum(size for _, size in local.list())
    keys = [rel for rel, _ in local.list()]
    assert raw_read(remote, keys)[0] == raw_read(local, keys)[0] == uploaded
    assert remote.read_range(keys[0], 3, 11) == local.read(keys[0])[3:11]
    _check_reads_back(lambda **kw: NpyPerSample("s3://test-bucket/bench-peers/npy", s3=access, **kw),
                      lat, flip, labels)
    _check_reads_back(lambda **kw: SafetensorsPerItem("s3://test-bucket/bench-peers/st", s3=access, **kw),
                      lat, flip, labels)


# --------------------------------------------------------------------------------------------
# a quick storage run


@pytest.mark.timeout(120)
def test_quick_storage_run_writes_every_option_with_its_error(tmp_path, sample_data_dir):
    from bench.bench import main

    out = str(tmp_path / "results.json")
    merge_results(out, {"other_item": {"figures": []}})
    assert main(["--quick", "--only", "storage", "--out", out, "--work-dir", str(tmp_path / "work"),
                 "--sample-data", sample_data_dir]) == 0
    items = load_results(out)["items"]
    assert set(items) == {"other_item", "storage"}  # merged, the other item kept
    res = items["storage"]
    assert {"figures", "settings", "data", "notes", "options", "latent_data", "runtime_s", "device", "quick",
            "command", "contrast_random_normal_bytes_over_float32"} <= set(res)
    assert res["quick"] is True and res["device"] == "cpu" and "DINOv2" in res["data"]
    rows = {(r["dtype"], r["compressor"]): r for r in res["options"]}
    compressors = ("blosc-zstd", "blosc-lz4", "zstd", "none")
    assert set(rows) == {(d, c) for d in ("float16", "float32", "bfloat16") for c in compressors}
    assert len(res["figures"]) == 12
    f32 = res["settings"]["float32_bytes_per_sample"]
    for (dtype, comp), r in rows.items():
        assert {"bytes_per_sample", "store_bytes_per_sample", "max_abs_error_over_std", "rms_error_over_std"} <= set(r)
        if comp == "none":  # the stored dtype's bytes, plus the metadata and shard index
            itemsize_ratio = 1.0 if dtype == "float32" else 0.5
            assert itemsize_ratio <= r["bytes_per_sample"] / f32 < itemsize_ratio + 0.05
        assert r["rms_error_over_std"] <= r["max_abs_error_over_std"]
    assert rows[("float32", "zstd")]["max_abs_error_over_std"] == 0
    f16, bf16 = rows[("float16", "zstd")], rows[("bfloat16", "zstd")]
    assert 0 < f16["max_abs_error_over_std"] < bf16["max_abs_error_over_std"] < 0.05
    for dtype in ("float16", "float32", "bfloat16"):  # every compressor is lossless
        for comp in compressors:
            assert rows[(dtype, comp)]["max_abs_error_over_std"] == rows[(dtype, "none")]["max_abs_error_over_std"]
            assert rows[(dtype, comp)]["codec"]["name"] == comp


# --------------------------------------------------------------------------------------------
# the bench's S3 server


def test_parse_range_reads_single_ranges_as_s3_does():
    from bench.common import _parse_range

    assert _parse_range("bytes=2-5", 10) == (2, 5)
    assert _parse_range("bytes=7-", 10) == (7, 9)
    assert _parse_range("bytes=5-100", 10) == (5, 9)  # clamped to the object
    assert _parse_range("bytes=-3", 10) == (7, 9)
    assert _parse_range("bytes=-30", 10) == (0, 9)
    for bad in ("bytes=12-14", "bytes=0-1,4-5", "bytes=-", "items=0-1", None, ""):
        assert _parse_range(bad, 10) is None
    assert _parse_range("bytes=0-1", 0) is None


@pytest.mark.timeout(60)
def test_ranged_moto_server_serves_the_same_bytes_to_boto3_and_zarr(tmp_path):
    from bench.common import S3Server, upload_dir
    from pipeline.store import LatentStore, StoreLayout, write_array_store

    x = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32)
    local = write_array_store(str(tmp_path / "store"), x, np.zeros(6, dtype=int), latents_flip=-x, num_classes=1,
                              layout=StoreLayout(samples_per_shard=4, samples_per_chunk=2))
    with S3Server(ranged_reads=True) as s3:
        data = bytes(range(256)) * 40
        s3.access.client().put_object(Bucket=s3.bucket, Key="blob", Body=data)
        reader = ObjectReader(f"s3://{s3.bucket}", s3.access)
        assert reader.read("blob") == data
        assert reader.read_range("blob", 100, 5000) == data[100:5000]
        client = s3.access.client()
        assert client.get_object(Bucket=s3.bucket, Key="blob", Range="bytes=-7")["Body"].read() == data[-7:]
        assert client.get_object(Bucket=s3.bucket, Key="blob", Range="bytes=9000-")["Body"].read() == data[9000:]
        resp = client.get_object(Bucket=s3.bucket, Key="blob", Range="bytes=10-19")
        assert resp["ContentRange"] == f"bytes 10-19/{len(data)}" and resp["ContentLength"] == 10
        upload_dir(s3.access, s3.bucket, str(tmp_path / "store"), "store")
        remote = LatentStore.open(s3.uri("store"), s3.access.storage_options())
        for array in ("latents", "latents_flip"):  # zarr reads shard indexes with suffix ranges
            assert np.array_equal(remote.read_rows(1, 6, array), local.read_rows(1, 6, array))
