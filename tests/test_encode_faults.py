"""The encode job under faults: bad images, SIGKILL mid-write and resume, two jobs on one output.

The job that is killed runs as a real CLI subprocess connected to the session's Ray
(``--ray-address``); finished stores are compared object by object with the session's sample
store, an uninterrupted run of the same configuration.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import uri as U
from pipeline.encode import encode, plan_encode
from pipeline.sample_data import write_odd_images
from pipeline.store import LatentStore, verify_store
from schemas import store_v1 as S
from tests.test_encode import store_objects


def cli_encode_command(cfg, ray_address: str) -> list[str]:
    """The `rae-pipeline encode` command line of an EncodeConfig (the options the tests use)."""
    return [
        sys.executable, "-m", "pipeline.cli", "encode",
        "--encoder", cfg.encoder, "--data", cfg.data, "--out", cfg.out, "--weights", cfg.weights,
        "--split", cfg.split, "--resolution", str(cfg.resolution),
        "--samples-per-shard", str(cfg.samples_per_shard), "--batch-size", str(cfg.batch_size),
        "--num-actors", str(cfg.num_actors), "--threads", str(cfg.threads), "--ray-address", ray_address,
        "--set", f"encoder_overrides={json.dumps(cfg.encoder_overrides)}",
        "--set", f"actor_cpus={cfg.actor_cpus}",
        "--no-progress",
    ]  # fmt: skip


def records_written(store_uri: str) -> int:
    folder = os.path.join(store_uri, S.RECORDS_DIR)
    return len([n for n in os.listdir(folder) if n.endswith(".json")]) if os.path.isdir(folder) else 0


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the encode subprocess exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(240)
def test_bad_images_become_recorded_holes(ray_local, sample_store_config, sample_data_dir, tmp_path):
    data = tmp_path / "odd"
    outcomes = write_odd_images(str(data / "train" / "n00000001"))
    good = data / "train" / "n00000002"
    good.mkdir(parents=True)
    shutil.copy(os.path.join(sample_data_dir, "train", "n01440764", "n01440764_0.JPEG"), good / "fine.JPEG")
    cfg = dataclasses.replace(sample_store_config, data=str(data), out=str(tmp_path / "stores"), samples_per_shard=4)

    result = encode(cfg)
    store = LatentStore.open(result.uri)
    spec = store.spec
    failed = {f["key"].rsplit("/", 1)[-1]: f for f in spec["failures"]}
    assert set(failed) == {name for name, outcome in outcomes.items() if outcome == "fail"}
    reasons = {name: f["reason"] for name, f in failed.items()}
    assert reasons["zero_bytes.JPEG"] == "empty file"
    assert reasons["not_an_image.JPEG"] == "not an image"
    assert reasons["bomb_20000x20000.png"] == "decompression bomb (20000 x 20000)"
    assert reasons["truncated.JPEG"] in ("truncated", "corrupt")
    assert result.num_failed == spec["counts"]["num_failed"] == 4 and spec["counts"]["num_valid"] == 9

    # Holes stay in place: invalid, label -1, zero latents, listed at their row with their id.
    valid, labels, ids = store.valid(), store.labels(), store.sample_ids()
    rows = store.read_rows(0, store.num_samples)
    for f in spec["failures"]:
        row = f["index"]
        assert not valid[row] and labels[row] == -1 and ids[row] == f["id"] and not rows[row].any()
        ref = store.source_ref(row)
        assert ref["key"] == f["key"] and ref["size"] == os.path.getsize(os.path.join(data, "train", f["key"]))
    ok_keys = {store.source_ref(int(r))["key"].rsplit("/", 1)[-1] for r in np.flatnonzero(valid)}
    assert ok_keys == {n for n, o in outcomes.items() if o == "ok"} | {"fine.JPEG"}
    assert np.isfinite(rows[valid]).all() and np.abs(rows[valid]).sum(axis=(1, 2, 3)).min() > 0
    assert spec["statistics"]["count"] == 2 * 9
    assert verify_store(result.uri).ok


@pytest.mark.timeout(300)
def test_sigkill_mid_write_then_rerun_gives_the_clean_store(ray_local, sample_store, sample_store_config, tmp_path):
    cfg = dataclasses.replace(sample_store_config, out=str(tmp_path / "stores"), actor_cpus=0.5)
    store_uri = plan_encode(cfg)[0].uri
    proc = subprocess.Popen(cli_encode_command(cfg, ray_local), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: records_written(store_uri) >= 1, proc, 200, "the first shard record")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not U.exists(U.join(store_uri, S.COMPLETE_MARKER))
    done_before = records_written(store_uri)

    result = encode(cfg)
    assert not result.reused and result.uri == store_uri
    assert result.shards_encoded <= 4 - done_before < 4
    assert store_objects(store_uri) == store_objects(sample_store)


@pytest.mark.timeout(300)
def test_two_jobs_on_one_output_leave_one_clean_store(ray_local, sample_store, sample_store_config, tmp_path):
    # Two jobs (two drivers' worth of work: plans, Ray pipelines, finalizes) in this process, on
    # the session's warm Ray workers; the second starts once the first has created the store, so
    # both see every shard pending and write the same objects at the same time.
    cfg = dataclasses.replace(sample_store_config, out=str(tmp_path / "stores"), actor_cpus=0.5)
    store_uri = plan_encode(cfg)[0].uri
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(encode, cfg)
        deadline = time.monotonic() + 200
        while not U.exists(U.join(store_uri, "zarr.json")) and not first.done():
            assert time.monotonic() < deadline, "the first job never created its store"
            time.sleep(0.02)
        assert not first.done(), "the first job finished before the second could start"
        second = encode(cfg)
        first = first.result(timeout=240)
    assert first.uri == second.uri == store_uri
    assert not first.reused and not second.reused, "both jobs must have encoded"
    assert second.shards_encoded == 4  # every shard was still pending when it planned
    assert store_objects(store_uri) == store_objects(sample_store)
    assert verify_store(store_uri).ok
