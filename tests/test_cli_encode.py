"""`rae-pipeline encode` and `rae-pipeline stores ...` in-process through typer's CliRunner, on the
session's Ray and S3 endpoint."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from pipeline import uri as U
from pipeline.cli import app
from pipeline.encode import plan_encode
from pipeline.store import LatentStore
from schemas import store_v1 as S
from tests.test_encode import assert_fp16_close, direct_latents, store_objects

runner = CliRunner()
S3_ROOT = "s3://test-bucket/cli-test/stores"


def encode_args(cfg, **changes) -> list[str]:
    values = {
        "--encoder": cfg.encoder, "--data": cfg.data, "--out": cfg.out, "--weights": cfg.weights,
        "--split": cfg.split, "--samples-per-shard": str(cfg.samples_per_shard),
        "--batch-size": str(cfg.batch_size), "--num-actors": str(cfg.num_actors), "--threads": str(cfg.threads),
    }  # fmt: skip
    values.update(changes)
    args = ["encode"]
    for flag, value in values.items():
        args += [flag, value]
    return args + ["--set", f"encoder_overrides={json.dumps(cfg.encoder_overrides)}", "--no-progress"]


@pytest.fixture(scope="module")
def s3_val_store(ray_local, s3_endpoint, sample_store_config):
    """The sample data's val split encoded to S3 through the CLI: (result, uri)."""
    result = runner.invoke(app, encode_args(sample_store_config, **{"--out": S3_ROOT, "--split": "val"}))
    assert result.exit_code == 0, result.output
    return result, result.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(240)
def test_encode_to_s3_prints_the_uri_and_reads_back(s3_val_store, sample_store_config):
    result, uri = s3_val_store
    assert uri.startswith(f"{S3_ROOT}/dinov2_val_256px_")
    assert "encoded 8 images in 2 shard(s)" in result.stderr
    store = LatentStore.open(uri)
    assert store.num_samples == 8 and store.spec["source"]["split"] == "val" and store.valid().all()
    cfg = dataclasses.replace(sample_store_config, split="val")
    direct, direct_flip = direct_latents(cfg, store)
    assert_fp16_close(store.read_rows(0, 8), direct)
    assert_fp16_close(store.read_rows(0, 8, S.LATENTS_FLIP), direct_flip)
    fs, runs = U.get_fs(U.join(S3_ROOT, "_runs"))
    assert any(store.store_id in p for p in fs.ls(runs))

    # Again: the complete store is found and its URI printed, nothing is encoded.
    t = time.perf_counter()
    again = runner.invoke(app, encode_args(sample_store_config, **{"--out": S3_ROOT, "--split": "val"}))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().splitlines()[-1] == uri and "reused" in again.stderr
    assert time.perf_counter() - t < 30


def test_stores_list_describe_verify(s3_val_store, sample_store_config):
    _, uri = s3_val_store
    # An incomplete store beside it: created, no shard written.
    job, _ = plan_encode(dataclasses.replace(sample_store_config, out=S3_ROOT))
    job.writer.create()

    listed = runner.invoke(app, ["stores", "list", S3_ROOT])
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[1]: line for line in listed.stdout.splitlines() if "dinov2_" in line}
    name = uri.rsplit("/", 1)[-1]
    assert name in lines and " complete " in lines[name] and " 2/2 " in lines[name]
    incomplete = job.uri.rsplit("/", 1)[-1]
    assert incomplete in lines and "INCOMPLETE" in lines[incomplete] and " 0/4 " in lines[incomplete]

    described = runner.invoke(app, ["stores", "describe", uri])
    assert described.exit_code == 0, described.output
    assert json.loads(described.stdout) == LatentStore.open(uri).spec
    not_done = runner.invoke(app, ["stores", "describe", job.uri])
    assert not_done.exit_code == 1 and "incomplete" in not_done.stderr and "0/4 shards" in not_done.stderr

    verified = runner.invoke(app, ["stores", "verify", uri])
    assert verified.exit_code == 0 and "OK (2 shards checked)" in verified.stdout

    removed = runner.invoke(app, ["stores", "rm", job.uri, "--yes"])
    assert removed.exit_code == 0, removed.output
    assert not U.exists(U.join(job.uri, "zarr.json"))


def test_verify_names_the_corrupt_shard_then_rm(sample_store, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(sample_store, copy)
    assert runner.invoke(app, ["stores", "verify", copy]).exit_code == 0
    shard_object = tmp_path / "copy" / S.LATENTS / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard_object.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard_object.write_bytes(bytes(data))

    bad = runner.invoke(app, ["stores", "verify", copy])
    assert bad.exit_code == 1
    assert "FAILED" in bad.stdout and "shard 2: object latents/c/2/0/0/0 is corrupt" in bad.stdout
    assert "shard 0" not in bad.stdout and "shard 1" not in bad.stdout

    assert runner.invoke(app, ["stores", "rm", copy], input="n\n").exit_code != 0  # declined
    assert U.exists(U.join(copy, S.COMPLETE_MARKER))
    assert runner.invoke(app, ["stores", "rm", copy], input="y\n").exit_code == 0
    assert not (tmp_path / "copy").exists()
    assert store_objects(sample_store)  # the original is untouched
    gone = runner.invoke(app, ["stores", "describe", copy])
    assert gone.exit_code == 1 and "not a latent store" in gone.stderr


def test_hub_weights_offline_fail_at_once_with_advice(sample_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    result = runner.invoke(app, ["encode", "--encoder", "siglip", "--data", sample_data_dir, "--out", str(tmp_path)])
    assert result.exit_code not in (0, None) and time.perf_counter() - t < 30
    message = " ".join(result.output.split())
    assert "--weights" in message and "random" in message and "local weights file" in message
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not any(tmp_path.iterdir())  # nothing written
