"""The encode job (pipeline/encode.py) end to end: real Ray Data pipeline on the session's local
Ray, real (shallow) DINOv2-B with random weights. S3 stores: tests/test_cli_encode.py."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from pipeline import encode as encode_mod
from pipeline import encode_tasks
from pipeline import uri as U
from pipeline.encode import EncodeConfig, build_configured_encoder, encode, plan_encode
from pipeline.preprocess import preprocess_image_bytes, to_unit_float
from pipeline.sources import open_source, storage_order
from pipeline.store import LatentStore, StoreWriter, verify_store
from schemas import store_v1 as S


def store_objects(uri: str) -> dict[str, bytes]:
    """{key relative to the store: bytes} of every object under the store's prefix."""
    fs, root = U.get_fs(uri)
    root = root.rstrip("/")
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in sorted(fs.find(root))}


def direct_latents(cfg: EncodeConfig, store: LatentStore) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's own output on the store's rows (same preprocessing), one forward per
    orientation over all rows: float32 [N, C, g, g] twice."""
    source = open_source(cfg.data, cfg.split)
    encoder, _ = build_configured_encoder(cfg)
    pixels = np.stack(
        [preprocess_image_bytes(source.read_bytes(source.items[int(i)]), cfg.resolution) for i in store.sample_ids()]
    )
    x = to_unit_float(pixels)
    with torch.inference_mode():
        return encoder(x).numpy(), encoder(torch.flip(x, dims=[3])).numpy()


def assert_fp16_close(stored: np.ndarray, direct: np.ndarray) -> None:
    # float16 keeps 11 significant bits: relative error <= 2**-11 plus float32 noise of the batching.
    np.testing.assert_allclose(stored, direct, rtol=2**-10, atol=1e-4)


def test_sample_store_rows_are_the_encoders_output(sample_store, sample_store_config):
    cfg = sample_store_config
    store = LatentStore.open(sample_store)
    source = open_source(cfg.data, cfg.split)
    n = len(source.items)
    # Layout: rows follow the seeded storage order; 16 rows in shards of 5, 5, 5, 1.
    assert store.num_samples == n == 16 and store.num_shards == 4
    assert [sh["stop"] - sh["start"] for sh in store.spec["shards"]] == [5, 5, 5, 1]
    order = storage_order(source, cfg.order_seed)
    np.testing.assert_array_equal(store.sample_ids(), order)
    np.testing.assert_array_equal(store.labels(), [source.items[i].label for i in order])
    assert store.valid().all() and store.spec["failures"] == []
    assert len(set(store.labels()[:5].tolist())) > 1, "a contiguous chunk should mix classes"

    # Identity: the encoder and its weights checksum, the override visible in the arch.
    encoder, info = build_configured_encoder(cfg)
    enc = store.encoder
    assert enc["weights"] == info and enc["weights"]["source"] == "random"
    assert enc["arch"].endswith("[depth=1]") and enc["input_size"] == 224 and store.latent_shape == (768, 16, 16)
    assert store.spec["source"]["fingerprint"] == source.fingerprint()
    assert store.spec["preprocessing"]["flip"] == "horizontal"

    # Latents equal the encoder's direct output on the same preprocessed images.
    direct, direct_flip = direct_latents(cfg, store)
    assert_fp16_close(store.read_rows(0, n), direct)
    assert_fp16_close(store.read_rows(0, n, S.LATENTS_FLIP), direct_flip)
    assert not np.allclose(direct, direct_flip, atol=1e-2)  # the flip really is a different image

    # Per-row source references: the file's size and the sha256 of its bytes.
    for row in (0, 7, 15):
        ref = store.source_ref(row)
        item = source.items[int(order[row])]
        data = source.read_bytes(item)
        assert (ref["index"], ref["id"], ref["key"], ref["label"]) == (row, item.index, item.key, item.label)
        assert ref["size"] == len(data) and ref["sha256"] == U.sha256_bytes(data)

    assert verify_store(sample_store).ok
    # The run log lives beside the stores, never inside one.
    runs = U.get_fs(U.join(cfg.out, encode_mod.RUNS_DIR))[0].ls(U.join(cfg.out, encode_mod.RUNS_DIR))
    assert any(store.store_id in p for p in runs)
    assert not any(key.startswith("_runs") for key in store_objects(sample_store))


def test_second_run_reuses_the_complete_store(sample_store, sample_store_config, monkeypatch):
    before = store_objects(sample_store)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete store must be reused without Ray, decoding or encoding")

    for name in ("ray_session", "_run_pipeline", "read_shard", "encode_pixels"):
        monkeypatch.setattr(encode_mod, name, must_not_run)
    for name in ("read_shard", "encode_pixels", "write_shard_row"):
        monkeypatch.setattr(encode_tasks, name, must_not_run)
    monkeypatch.setattr(StoreWriter, "write_shard", must_not_run)
    monkeypatch.setattr(StoreWriter, "finalize", must_not_run)
    t = time.perf_counter()
    result = encode(sample_store_config)
    seconds = time.perf_counter() - t
    assert result.reused and result.uri == sample_store and result.images_encoded == 0
    assert seconds < 30, f"reusing a store took {seconds:.1f} s"
    assert store_objects(sample_store) == before


def test_content_inputs_name_a_different_store(sample_store, sample_store_config):
    cfg = sample_store_config
    base, encoder = plan_encode(cfg)
    assert base.uri == sample_store
    # Execution options do not change the store.
    same, _ = plan_encode(dataclasses.replace(cfg, num_actors=2, threads=2, batch_size=3), encoder=encoder, weights_info=base.weights_info)
    assert same.uri == sample_store
    variants = {
        "resolution": dataclasses.replace(cfg, resolution=512),
        "split": dataclasses.replace(cfg, split="val"),
        "weights": dataclasses.replace(cfg, weights_seed=1),
        "dtype": dataclasses.replace(cfg, dtype="bfloat16"),
        "shards": dataclasses.replace(cfg, samples_per_shard=4),
        "order": dataclasses.replace(cfg, order_seed=1),
        "depth": dataclasses.replace(cfg, encoder_overrides={"depth": 2}),
    }
    ids = {name: plan_encode(v)[0].plan.store_id for name, v in variants.items()}
    assert len(set(ids.values()) | {base.plan.store_id}) == len(variants) + 1, ids
    res512 = plan_encode(variants["resolution"])[0].plan
    assert res512.latent_shape == (768, 32, 32) and res512.encoder["input_size"] == 448


@pytest.mark.timeout(240)
def test_two_actors_write_the_same_bytes_and_exact_statistics(sample_store, sample_store_config, tmp_path):
    two = encode(dataclasses.replace(sample_store_config, out=str(tmp_path), num_actors=2))
    assert two.details["num_actors"] == 2 and two.shards_encoded == 4
    assert store_objects(two.uri) == store_objects(sample_store)

    store = LatentStore.open(sample_store)
    valid = store.valid()
    values = np.concatenate(
        [store.read_rows(0, store.num_samples, name)[valid].astype(np.float64) for name in (S.LATENTS, S.LATENTS_FLIP)]
    )
    mean, var = store.stats()
    assert store.spec["statistics"]["count"] == len(values) == 32
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, values.var(axis=0), rtol=1e-10, atol=1e-14)
