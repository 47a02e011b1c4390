"""Storage failures are one line naming the URI, in seconds, with nothing half-written (issue 12, item 3's
encode cases and item 6's `--data` check): at the storage layer (``pipeline.uri``, the store writer) and
through `rae-pipeline encode` (in-process, CliRunner; every case fails before Ray starts).

The tests run as root here, and root writes into a chmod 0555 folder anyway: the unwritable output is a
path under a *file* (a file where a folder is expected), which fails for every user; the chmod case runs
only for other users.
"""
from __future__ import annotations

import os
import time

import pytest
from typer.testing import CliRunner

import pipeline.encode  # noqa: F401  (imported up front: the timings below are the command's, not imports')
import pipeline.encoders  # noqa: F401
from pipeline import uri as U
from pipeline.cli import app
from pipeline.store import StoreLayout, StorePlan, StoreWriter
from schemas.errors import StorageError, UserError
from tests.conftest import free_port

runner = CliRunner()
# The encode job's options for a tiny, quick job (a one-block DINOv2 with random weights).
ENCODE = ["encode", "--encoder", "dinov2", "--weights", "random", "--samples-per-shard", "8", "--batch-size", "4",
          "--num-actors", "1", "--threads", "1", "--set", 'encoder_overrides={"depth": 1}', "--no-progress"]
CANARY_SECRET = "rae-canary-secret-0b9d27c4e1f3a65d"  # recognisable; moto accepts any key pair


def _encode(*args: str) -> tuple[object, float]:
    t = time.perf_counter()
    result = runner.invoke(app, [*ENCODE, *args])
    return result, time.perf_counter() - t


def _error_line(result) -> str:
    """The command's only output line, which must be its error (exit code 1, no traceback)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (result.exit_code,
                                                                                          result.output)
    return lines[0]


def _tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path) for n in dirs + files)


def _s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                          endpoint_url=endpoint, region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket="test-bucket", Prefix=prefix).get("Contents", [])]


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """This process without AWS credentials: no variables, no config files (the moto endpoint stays)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


# ---------------------------------------------------------------------------------------------
# the storage layer


def test_a_write_under_a_file_is_a_storage_error_naming_the_uri(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is expected\n")
    target = str(blocker / "store" / "zarr.json")
    with pytest.raises(StorageError, match=f"cannot write {target}: Not a directory") as e:
        U.atomic_write_bytes(target, b"{}")
    assert isinstance(e.value, UserError) and isinstance(e.value, OSError)
    with pytest.raises(StorageError, match=f"cannot write {blocker / 'out'}: .* is a file, not a folder"):
        U.check_location(str(blocker / "out"), write=True)
    assert _tree(tmp_path) == ["not-a-folder"] and blocker.read_text().startswith("a file")
    # A missing object is still FileNotFoundError (callers test for it), not a StorageError.
    with pytest.raises(FileNotFoundError):
        U.read_bytes(str(tmp_path / "missing.json"))


def test_store_writer_on_a_dead_endpoint_is_a_storage_error(s3_endpoint):
    dead = f"http://127.0.0.1:{free_port()}"
    plan = StorePlan(kind="synthetic", num_samples=4, latent_shape=(2, 2, 2), layout=StoreLayout(dtype="float32"),
                     source={"kind": "synthetic", "uri": None, "split": "train", "fingerprint": "0" * 64,
                             "num_items": 4, "order": {"seed": 0, "granularity": "none"}},
                     classes={"num_classes": 2, "names": ["a", "b"]}, content_hash="0" * 64)
    uri = "s3://test-bucket/storage-errors/dead"
    # Its own client, on the dead endpoint; one attempt per request (the test is about the error, not retries).
    so = {"endpoint_url": dead, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    writer = StoreWriter(uri, plan, so)
    t = time.perf_counter()
    with pytest.raises(StorageError, match="s3://test-bucket/storage-errors/dead/.*cannot reach the storage endpoint"):
        writer.create()
    with pytest.raises(StorageError, match="cannot list s3://test-bucket/storage-errors/dead/records"):
        writer.pending_shards()
    assert time.perf_counter() - t < 60
    with pytest.raises(StorageError, match=f"cannot use {uri}: cannot reach the storage endpoint"):
        U.check_location(uri, so, write=True)


# ---------------------------------------------------------------------------------------------
# `rae-pipeline encode`: one line, exit 1, in seconds, nothing written


def test_encode_out_under_a_file_is_one_line(sample_data_dir, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x\n")
    out = str(blocker / "stores")
    result, seconds = _encode("--data", sample_data_dir, "--out", out)
    line = _error_line(result)
    assert f"cannot write {out}: {blocker} is a file, not a folder" in line, line
    assert seconds < 10 and _tree(tmp_path) == ["not-a-folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0555) folder anyway")
def test_encode_out_in_a_read_only_folder_is_one_line(sample_data_dir, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result, seconds = _encode("--data", sample_data_dir, "--out", str(folder / "stores"))
        assert f"{folder} is not writable" in _error_line(result) and seconds < 10
        assert _tree(folder) == []
    finally:
        folder.chmod(0o755)


def test_encode_to_s3_without_credentials_is_one_line(s3_endpoint, sample_data_dir, no_aws_credentials):
    out = "s3://test-bucket/storage-errors/no-credentials/stores"
    result, seconds = _encode("--data", sample_data_dir, "--out", out)
    line = _error_line(result)
    assert f"cannot use {out}: no credentials found" in line, line
    assert seconds < 10 and _s3_keys(s3_endpoint, "storage-errors/no-credentials/") == []


def test_encode_to_a_dead_endpoint_is_one_line_without_the_secret(s3_endpoint, sample_data_dir, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    out = "s3://test-bucket/storage-errors/dead-endpoint/stores"
    result, seconds = _encode("--data", sample_data_dir, "--out", out)
    line = _error_line(result)
    assert f"cannot use {out}: cannot reach the storage endpoint" in line and dead in line, line
    assert CANARY_SECRET not in result.output and seconds < 10
    assert _s3_keys(s3_endpoint, "storage-errors/dead-endpoint/") == []


def test_encode_checks_data_before_building_the_encoder(tmp_path):
    """A wrong --data is reported first and at once: before the encoder is built (here its weights
    file is missing too; building it first would report that instead) and before Ray starts."""
    missing = str(tmp_path / "no-such-dataset")
    result, seconds = _encode("--data", missing, "--out", str(tmp_path / "stores"),
                              "--weights", str(tmp_path / "no-such-weights.safetensors"))
    line = _error_line(result)
    assert f"no such folder or file: {missing}" in line, line
    assert seconds < 5 and _tree(tmp_path) == []
