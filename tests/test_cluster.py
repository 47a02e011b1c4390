"""Encode on a multi-node Ray cluster: each shard's record names the node that wrote it, and a
two-node cluster started with ``ray start`` (the second node under ``env -i`` with its own AWS files)
encodes from and to S3 with the second node doing the reads and writes. The node-loss drill
(``python -m bench.drills --only encode_node_loss``) runs the same cluster with a node killed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from bench.common import S3Access, upload_dir
from bench.drills.cluster import (ENCODER_SLOT, LOOPBACK_MAPPED, NODE2_RESOURCE, LocalRayCluster, aws_files,
                                  cluster_encode_args, digests_without_provenance, node_aws_variables, shard_writers)
from pipeline import uri as U
from pipeline.encode import EncodeConfig, EncodeError, plan_encode
from pipeline.store import StoreLayout, StorePlan, StoreWriter, verify_store
from schemas import store_v1 as S

SHAPE = (4, 2, 2)


def _plan(n: int = 6) -> StorePlan:
    return StorePlan(
        kind="synthetic", num_samples=n, latent_shape=SHAPE, layout=StoreLayout(flips=False, samples_per_shard=4),
        source={"kind": "synthetic", "uri": None, "split": "train", "fingerprint": "0" * 64, "num_items": n,
                "order": {"seed": 0, "granularity": "none"}},
        classes={"num_classes": 2, "names": ["a", "b"]}, content_hash="x")


def _write(uri: str, written_by: dict | None) -> StoreWriter:
    w = StoreWriter(uri, _plan()).create()
    for shard in range(2):
        a, b = w.plan.shard_bounds(shard)
        w.write_shard(shard, latents=np.full((b - a,) + SHAPE, shard + 1.0, np.float32), labels=np.zeros(b - a),
                      valid=np.ones(b - a), sample_ids=np.arange(a, b), written_by=written_by)
    w.finalize()
    return w


def test_record_names_its_writer_outside_every_hash(tmp_path):
    node = {"node_id": "ab" * 28, "node_ip": "10.0.0.7", "hostname": "worker-7"}
    named, plain = _write(str(tmp_path / "named"), node), _write(str(tmp_path / "plain"), None)
    assert U.read_json(U.join(named.uri, S.record_name(1)))[S.RECORD_WRITTEN_BY] == node
    assert S.RECORD_WRITTEN_BY not in U.read_json(U.join(plain.uri, S.record_name(1)))  # as stores made before
    assert verify_store(named.uri).ok and verify_store(plain.uri).ok
    # Only the records differ, and only by written_by: the spec, the data and the statistics are the same bytes.
    assert digests_without_provenance(named.uri) == digests_without_provenance(plain.uri)
    assert shard_writers(named.uri) == {0: node, 1: node}


def test_custom_resources_are_checked_before_anything_runs(tmp_path):
    for bad in ({"CPU": 1}, {"node2": 0}, {"node2": "one"}, ["node2"]):
        with pytest.raises(EncodeError, match="task_resources"):
            plan_encode(EncodeConfig(out=str(tmp_path), weights="random", task_resources=bad))
    with pytest.raises(EncodeError, match="actor_resources"):
        plan_encode(EncodeConfig(out=str(tmp_path), weights="random", actor_resources={"GPU": 1}))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_cluster_encode_from_and_to_s3(s3_endpoint, sample_data_dir, tmp_path):
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    upload_dir(S3Access(s3_endpoint), "test-bucket", sample_data_dir, f"{prefix}/data")
    env = {k: v for k, v in os.environ.items()}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with LocalRayCluster(str(tmp_path / "ray"), env) as cluster:
        cluster.start_head(num_cpus=1, resources={ENCODER_SLOT: 1})
        node2 = cluster.add_node("node2", num_cpus=1, resources={NODE2_RESOURCE: 1},
                                 env=aws_files(str(tmp_path / "node2-aws"), s3_endpoint))
        # Reads and writes ask for node 2's resource: they can only run there.
        args = cluster_encode_args(8, "--set", f"task_resources={json.dumps({NODE2_RESOURCE: 1})}")
        cmd = [sys.executable, "-m", "pipeline.cli", "encode", "--data", f"s3://test-bucket/{prefix}/data",
               "--out", f"s3://test-bucket/{prefix}/out", "--ray-address", cluster.address, *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        worker_aws = node_aws_variables(node2)  # node 2's workers, still up after the job
    store = proc.stdout.strip().splitlines()[-1]
    writers = shard_writers(store)
    assert sorted(writers) == [0, 1]
    assert {w["node_ip"] for w in writers.values()} == {LOOPBACK_MAPPED}
    assert len({w["node_id"] for w in writers.values()}) == 1
    assert verify_store(store).ok
    # Node 2's workers never saw the driver's credentials: only the paths of its own files.
    assert worker_aws and all(set(names) <= {"AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                             "AWS_EC2_METADATA_DISABLED"} for names in worker_aws.values())
    log = json.loads(U.read_bytes(proc.stderr.rsplit("run log ", 1)[1].split()[0]))
    assert log["execution"]["shards_by_node"] == {next(iter(writers.values()))["node_id"]: 2}
