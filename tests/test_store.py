"""The store library: spec v1 written and read back, dtypes, holes, statistics, verification."""
from __future__ import annotations

import copy
import json
import os

import fsspec
import numpy as np
import pytest

from pipeline import uri as U
from pipeline.store import (
    IncompleteStoreError,
    LatentStore,
    StoreError,
    StoreLayout,
    StorePlan,
    StoreWriter,
    from_stored,
    list_stores,
    remove_store,
    to_stored,
    verify_store,
    write_array_store,
)
from schemas import store_v1 as S

SHAPE = (8, 4, 4)


def _arrays(n=13, seed=0, invalid=(5,)):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n,) + SHAPE).astype(np.float32) * 2 + 1
    flip = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    labels = rng.integers(0, 3, n)
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    return lat, flip, labels, valid


def _all_objects(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    lat, flip, labels, valid = _arrays()
    uri = str(tmp_path_factory.mktemp("store") / "s")
    st = write_array_store(
        uri, lat, labels, latents_flip=flip, valid=valid, num_classes=3,
        layout=StoreLayout(samples_per_shard=5, samples_per_chunk=1),
    )
    return st, (lat, flip, labels, valid)


def test_roundtrip_holes_and_spec(store):
    st, (lat, flip, labels, valid) = store
    spec = st.spec
    S.validate_spec(spec)
    assert spec["layout"]["num_shards"] == 3  # 5 + 5 + 3: uneven
    assert [s["stop"] - s["start"] for s in spec["shards"]] == [5, 5, 3]
    assert spec["counts"] == {"num_samples": 13, "num_valid": 12, "num_failed": 1}
    assert spec["failures"][0]["index"] == 5
    x = st.read_rows(0, 13)
    np.testing.assert_array_equal(x[valid], lat[valid].astype(np.float16).astype(np.float32))
    assert not x[5].any()  # holes stay zero
    np.testing.assert_array_equal(st.read_rows(0, 13, S.LATENTS_FLIP)[valid], flip[valid].astype(np.float16))
    assert st.labels()[5] == -1 and (st.labels()[valid] == labels[valid]).all()
    assert st.valid().tolist() == valid.tolist()
    assert st.sample_ids().tolist() == list(range(13))
    np.testing.assert_array_equal(st.read_chunk(7), x[7:8])


def test_statistics_match_float64_reference(store):
    st, (lat, flip, labels, valid) = store
    vals = np.concatenate([lat[valid], flip[valid]]).astype(np.float16).astype(np.float64)
    mean, var = st.stats()
    assert mean.dtype == np.float64 and mean.shape == SHAPE
    np.testing.assert_allclose(mean, vals.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(var, vals.var(0), rtol=1e-12, atol=1e-12)
    assert st.spec["statistics"]["count"] == 24


def test_verify_passes_then_names_the_corrupt_shard(store, tmp_path):
    st, _ = store
    assert verify_store(st.uri).ok
    copy_root = str(tmp_path / "copy")
    fs = fsspec.filesystem("file")
    fs.copy(st.uri, copy_root, recursive=True)
    key = os.path.join(copy_root, "latents", "c", "1", "0", "0", "0")
    data = bytearray(open(key, "rb").read())
    data[len(data) // 3] ^= 0xFF
    open(key, "wb").write(bytes(data))
    report = verify_store(copy_root)
    assert not report.ok
    assert any("shard 1" in p for p in report.problems), report.problems
    # The reader names the shard too (crc32c on every chunk).
    broken = LatentStore.open(copy_root)
    with pytest.raises(StoreError, match=r"shard\(s\) \[1\]"):
        for c in range(broken.num_chunks):
            broken.read_chunk(c)


@pytest.mark.parametrize("dtype,compressor", [("float32", "none"), ("bfloat16", "zstd"), ("float16", "none")])
def test_dtypes_and_compressors(tmp_path, dtype, compressor):
    lat, flip, labels, valid = _arrays(invalid=())
    st = write_array_store(
        str(tmp_path / dtype), lat, labels, num_classes=3,
        layout=StoreLayout(dtype=dtype, compressor=compressor, samples_per_shard=4),
    )
    assert st.spec["latent"]["logical_dtype"] == dtype
    assert st.spec["latent"]["storage_dtype"] == S.STORAGE_DTYPE[dtype]
    assert not st.has_flips
    x = st.read_rows(0, len(lat))
    err = np.abs(x - lat).max() / np.abs(lat).max()
    assert err <= {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]


def test_bfloat16_rounding_is_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 3.0e38], np.float32)
    bits = to_stored(x, "bfloat16")
    assert bits.dtype == np.uint16
    back = from_stored(bits, "bfloat16")
    # 1 + 2^-8 is a tie -> rounds to even (1.0); 1 + 3*2^-8 -> 1 + 2^-6 (even mantissa)
    np.testing.assert_array_equal(back[:4], np.array([1.0, 1.0, 1.0 + 2**-6, -2.5], np.float32))
    import torch

    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back, ref)


def test_rewrites_are_byte_identical_and_idempotent(tmp_path):
    lat, flip, labels, valid = _arrays()
    kw = dict(latents_flip=flip, valid=valid, num_classes=3, layout=StoreLayout(samples_per_shard=5))
    a = write_array_store(str(tmp_path / "a"), lat, labels, **kw)
    b = write_array_store(str(tmp_path / "b"), lat, labels, **kw)
    assert a.store_id == b.store_id
    assert _all_objects(a.uri) == _all_objects(b.uri)
    # Writing the same store again over itself changes nothing.
    before = _all_objects(a.uri)
    write_array_store(str(tmp_path / "a"), lat, labels, **kw)
    assert _all_objects(a.uri) == before
    assert not any(".tmp-" in k for k in before)


def _plan(n=6, **layout) -> StorePlan:
    return StorePlan(
        kind="synthetic",
        num_samples=n,
        latent_shape=SHAPE,
        layout=StoreLayout(flips=False, samples_per_shard=4, **layout),
        source={"kind": "synthetic", "uri": None, "split": "train", "fingerprint": "0" * 64, "num_items": n,
                "order": {"seed": 0, "granularity": "none"}},
        classes={"num_classes": 2, "names": ["a", "b"]},
        content_hash="x",
    )


def test_incomplete_store_is_never_read_as_complete(tmp_path):
    plan = _plan()
    w = StoreWriter(str(tmp_path / "inc"), plan).create()
    assert w.pending_shards() == [0, 1]
    w.write_shard(0, latents=np.ones((4,) + SHAPE, np.float32), labels=np.zeros(4), valid=np.ones(4), sample_ids=np.arange(4))
    assert w.pending_shards() == [1]
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        LatentStore.open(w.uri)
    with pytest.raises(IncompleteStoreError, match="no completion record"):
        w.finalize()
    st = list_stores(str(tmp_path))
    assert len(st) == 1 and not st[0].complete and st[0].shards_done == 1 and st[0].num_shards == 2
    with pytest.raises(StoreError, match="not a latent store"):
        LatentStore.open(str(tmp_path))


def test_write_shard_checks_its_input(tmp_path):
    w = StoreWriter(str(tmp_path / "chk"), _plan()).create()
    good = dict(latents=np.ones((4,) + SHAPE), labels=np.zeros(4), valid=np.ones(4), sample_ids=np.arange(4))
    with pytest.raises(StoreError, match="latents has shape"):
        w.write_shard(0, **{**good, "latents": np.ones((3,) + SHAPE)})
    with pytest.raises(StoreError, match="labels outside"):
        w.write_shard(0, **{**good, "labels": np.full(4, 7)})
    with pytest.raises(StoreError, match="do not match the invalid rows"):
        w.write_shard(0, **{**good, "valid": np.array([1, 0, 1, 1])})
    with pytest.raises(IndexError):
        w.write_shard(5, **good)


def test_other_store_in_same_location_is_refused(tmp_path):
    StoreWriter(str(tmp_path / "x"), _plan()).create()
    with pytest.raises(StoreError, match="other metadata"):
        StoreWriter(str(tmp_path / "x"), _plan(n=7)).create()


def test_spec_validation_names_the_key(store):
    st, _ = store
    spec = copy.deepcopy(st.spec)
    spec["latent"]["logical_dtype"] = "int8"
    with pytest.raises(S.StoreSpecError, match="latent/logical_dtype"):
        S.validate_spec(spec)
    spec = copy.deepcopy(st.spec)
    spec["counts"]["num_failed"] = 0
    with pytest.raises(S.StoreSpecError, match="num_valid"):
        S.validate_spec(spec)
    spec = copy.deepcopy(st.spec)
    del spec["statistics"]
    with pytest.raises(S.StoreSpecError, match="statistics"):
        S.validate_spec(spec)


def test_tampered_spec_is_refused(store, tmp_path):
    st, _ = store
    root = str(tmp_path / "t")
    fsspec.filesystem("file").copy(st.uri, root, recursive=True)
    spec = json.load(open(os.path.join(root, S.SPEC_FILE)))
    spec["counts"]["num_valid"] = 12  # same value, other bytes
    open(os.path.join(root, S.SPEC_FILE), "w").write(json.dumps(spec))
    with pytest.raises(StoreError, match="does not match the checksum"):
        LatentStore.open(root)


def test_s3_roundtrip_and_remove(s3_endpoint):
    lat, flip, labels, valid = _arrays()
    uri = "s3://test-bucket/store-lib/s"
    st = write_array_store(uri, lat, labels, latents_flip=flip, valid=valid, num_classes=3,
                           layout=StoreLayout(samples_per_shard=5, samples_per_chunk=5))
    again = LatentStore.open(uri)
    np.testing.assert_array_equal(again.read_chunk(1), st.read_rows(5, 10))
    assert again.source_ref(6)["id"] == 6
    assert verify_store(uri).ok
    assert [s.complete for s in list_stores("s3://test-bucket/store-lib")] == [True]
    remove_store(uri)
    assert list_stores("s3://test-bucket/store-lib") == []


def test_reader_is_picklable_and_reopens(store):
    import pickle

    st, _ = store
    st.read_chunk(0)
    clone = pickle.loads(pickle.dumps(st))
    np.testing.assert_array_equal(clone.read_chunk(3), st.read_chunk(3))
