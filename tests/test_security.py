"""No credential reaches Ray, a log, a store or a printed line (issue 12, item 1).

An encode to the moto server runs with a recognisable fake secret (moto accepts any key pair); then every
file under the Ray session folder the run used, every object under its output prefix (the store and its
run log) and everything it printed are scanned for the secret, its hex and its base64 forms: zero hits.

Two ways Ray is met: the suite's Ray (an existing cluster, as with ``--ray-address``: its workers have
their own credentials, the driver's secret must not travel to them), and a Ray the job starts itself
(its workers inherit the driver's environment, secret included: Ray must not write it anywhere).
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from typer.testing import CliRunner

from bench.drills.security import scan_bytes, secret_forms
from bench.drills.security import scan_tree as drill_scan_tree
from pipeline.cli import app

runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANARY_KEY_ID = "AKIARAECANARY7Q2W4E6"
CANARY_SECRET = "rae-canary-secret-5c1e9f0a7b3d48e2b6a4"
ENCODE = ["encode", "--encoder", "dinov2", "--weights", "random", "--split", "val", "--samples-per-shard", "8",
          "--batch-size", "4", "--num-actors", "1", "--threads", "1", "--set", 'encoder_overrides={"depth": 1}',
          "--no-progress"]


def scan_tree(root: str, forms: dict[str, bytes]) -> list[str]:
    """Hits in every regular file under ``root`` (the drill's scan, without its file count)."""
    return drill_scan_tree(root, forms)[0]


def scan_s3_prefix(endpoint: str, bucket: str, prefix: str, forms: dict[str, bytes]) -> tuple[list[str], int]:
    """(hits, objects scanned) in every object under ``prefix`` (read with the moto server's own keys)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    hits, count = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            data = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            hits += scan_bytes(data, f"s3://{bucket}/{obj['Key']}", forms)
            count += 1
    return hits, count


def test_secret_forms_find_the_secret_in_every_encoding():
    forms = secret_forms(CANARY_SECRET)
    for blob in (CANARY_SECRET.encode(), CANARY_SECRET.encode().hex().encode(),
                 *(base64.b64encode(b"x" * pad + CANARY_SECRET.encode() + b"yz") for pad in range(3)),
                 base64.urlsafe_b64encode(b'{"AWS_SECRET_ACCESS_KEY": "' + CANARY_SECRET.encode() + b'"}')):
        assert scan_bytes(b"..." + blob + b"...", "blob", forms), blob
    assert not scan_bytes(b"testing " * 100, "blob", forms)


@pytest.fixture
def canary_credentials(monkeypatch):
    """This process (the driver) with the canary credentials; fsspec's cached S3 clients dropped before
    and after, so the driver really uses them."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_credential_reaches_an_existing_ray_cluster(ray_local, s3_endpoint, sample_data_dir, canary_credentials,
                                                        capfd):
    import ray

    ctx = ray.get_runtime_context()
    session = os.path.join(ctx.get_temp_dir(), ctx.get_session_name())
    assert os.path.isdir(os.path.join(session, "logs")), session
    prefix = "security/existing-cluster"
    result = runner.invoke(app, [*ENCODE, "--data", sample_data_dir, "--out", f"s3://test-bucket/{prefix}"])
    assert result.exit_code == 0, result.output
    printed = result.output + "".join(capfd.readouterr())
    forms = secret_forms(CANARY_SECRET)
    s3_hits, objects = scan_s3_prefix(s3_endpoint, "test-bucket", prefix, forms)
    assert objects > 10  # the store and its run log were scanned
    hits = scan_tree(session, forms) + s3_hits + scan_bytes(printed.encode(), "output", forms)
    assert hits == []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_no_credential_in_the_session_of_a_ray_the_job_starts(s3_endpoint, sample_data_dir):
    """`python -m pipeline.cli encode` starting its own Ray (its workers inherit the canary), in a
    Ray temp folder of its own: nothing in that session folder gives the secret away."""
    # Short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket path.
    ray_tmp = tempfile.mkdtemp(prefix="rae-ray-")
    prefix = "security/job-started-ray"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=CANARY_KEY_ID, AWS_SECRET_ACCESS_KEY=CANARY_SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=s3_endpoint, AWS_EC2_METADATA_DISABLED="true", RAY_TMPDIR=ray_tmp,
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *ENCODE, "--data", sample_data_dir,
                               "--out", f"s3://test-bucket/{prefix}"],
                              env=env, cwd=REPO, capture_output=True, timeout=400)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        sessions = [d for d in os.listdir(os.path.join(ray_tmp, "ray")) if d.startswith("session_2")]
        assert len(sessions) == 1, sessions
        forms = secret_forms(CANARY_SECRET)
        s3_hits, objects = scan_s3_prefix(s3_endpoint, "test-bucket", prefix, forms)
        assert objects > 10
        hits = (scan_tree(ray_tmp, forms) + s3_hits + scan_bytes(proc.stdout, "stdout", forms)
                + scan_bytes(proc.stderr, "stderr", forms))
        assert hits == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
