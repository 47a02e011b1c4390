"""Session-wide servers and data for the suite.

One moto S3 server (a real HTTP endpoint on a random loopback port, in its own process) and one
local Ray instance serve every test that needs them. Environment variables are set here, by the
tests, never by library code.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# Keep everything on loopback and offline, even when pytest is run without `make test`.
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MASTER_ADDR": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1:<random port>; yields its URL. AWS_* variables point at it.

    A bucket named ``test-bucket`` exists. Tests that need isolation use their own key prefix.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="test-bucket")
    try:
        yield url
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray instance on loopback for the whole session; yields its GCS address.

    Started once the moto server's AWS_* variables are set: its workers inherit them, as workers
    inherit credentials from their node's environment on a real cluster (the encode job sends none).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    addr = ray.get_runtime_context().gcs_address
    yield addr
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The sample store (encode job): the built-in sample data encoded once per session.

# A shallow DINOv2-B (1 of its 12 blocks, random weights): the real architecture's code paths at
# a tenth of the cost. The store records the override in its encoder "arch", so it never passes
# for a real DINOv2 store.
SAMPLE_STORE_OVERRIDES = {"depth": 1}


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> str:
    """The built-in sample ImageFolder (train: 16 images in 4 classes, val: 8), in a session folder."""
    from pipeline.sample_data import ensure_sample_data

    return ensure_sample_data(str(tmp_path_factory.mktemp("sample-data")))


@pytest.fixture(scope="session")
def sample_store_config(sample_data_dir, tmp_path_factory):
    """The EncodeConfig that made ``sample_store``: dinov2 (depth 1, random weights seed 0), train
    split, 256 px, 5 samples per shard (shards of 5, 5, 5, 1 rows), float16, flips, 1 actor with
    1 thread. Tests that re-encode compare against it with ``dataclasses.replace(cfg, out=...)``."""
    from pipeline.encode import EncodeConfig

    return EncodeConfig(
        encoder="dinov2",
        data=sample_data_dir,
        out=str(tmp_path_factory.mktemp("sample-store")),
        weights="random",
        split="train",
        resolution=256,
        samples_per_shard=5,
        batch_size=4,
        num_actors=1,
        threads=1,
        progress=False,
        encoder_overrides=dict(SAMPLE_STORE_OVERRIDES),
    )


@pytest.fixture(scope="session")
def sample_store(ray_local, sample_store_config) -> str:
    """URI of a complete latent store of the sample data (see ``sample_store_config``); read it
    with ``pipeline.store.LatentStore.open(sample_store)``. Shared: do not modify it."""
    from pipeline.encode import encode

    return encode(sample_store_config).uri


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: one intra-op thread per process is several times faster than two competing
    ones. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
