"""The two-node Ray drill, and the local multi-node cluster it runs on.

:class:`LocalRayCluster` starts Ray nodes on this machine the way Ray's own CLI does on real
machines: ``ray start --head`` for the head, then ``ray start --address <head>`` for each further
node, every node its own ``ray start --block`` child process (its raylet, object store and workers
are that process's descendants). A further node starts with a clean environment (``env -i``: PATH,
its own HOME, its own AWS config and credentials files, Ray's switches), so nothing reaches it from
the driver's environment or the driver's AWS files: whatever its workers read or write on S3, they
do with what the node itself was given, as on a cluster of real machines.

Everything stays on loopback. The head listens on 127.0.0.1. Ray rewrites ``127.0.0.1`` and
``localhost`` to the machine's routable address as soon as multi-node clusters are enabled (which
``ray start --address`` requires), so a further node names the head, and itself, by the
IPv4-mapped form of the same loopback address, ``::ffff:127.0.0.1``, which Ray leaves as it is.
That also tells the nodes apart in each shard's ``written_by`` record (both share the hostname).

The drill (``encode_node_loss``): the sample data on the drills' moto S3; a single-node reference
encode on the head alone; a second node joins; the same encode to another prefix, with the encoder
actor kept on the head by a custom resource only the head offers (as GPU nodes would) and the read
and write tasks spread over both nodes; once a shard written by the second node exists, every
process of that node is SIGKILLed. The same job must finish on the head, without a rerun, and its
store must equal the reference object by object (the records' ``written_by``, which names the node
that wrote each shard, set aside).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench.drills.context import ENCODE_ARGS, DrillContext, DrillRecord, drill
from bench.drills.tools import (REPO, compare_digests, describe_comparison, encode_outcome, kill_titled, log,
                                proc_env, proc_title, proc_tree, store_digests, wait_until)

HEAD_IP = "127.0.0.1"
# 127.0.0.1 as a further node must spell it: Ray rewrites the dotted form to the routable address.
LOOPBACK_MAPPED = "::ffff:127.0.0.1"
# A custom resource only the head offers, asked for by the encoder actor: the actor lives on the
# node that stays (on a real cluster: the GPU nodes, which advertise such a resource or GPUs).
ENCODER_SLOT = "encoder_slot"
NODE2_RESOURCE = "node2"  # the second node's own custom resource: work asking for it lands there
RAY_OBJECT_STORE_BYTES = 192 * 1024 * 1024  # per node
STARTED_LINE = "This command will now block forever"  # `ray start --block` prints it once the node is up
# The cluster drill's shards: 8 of 2 (the shared 16 sample images), so both nodes get some.
CLUSTER_SAMPLES_PER_SHARD = 2


def _free_port() -> int:
    from bench.common import free_port

    return free_port()


def aws_files(folder: str, endpoint_url: str, key: str = "testing", secret: str = "testing",
              region: str = "us-east-1") -> dict[str, str]:
    """A node's own AWS config and credentials files (the way a machine image or a Kubernetes
    secret provides them); returns the environment variables that point botocore at them."""
    os.makedirs(folder, exist_ok=True)
    config, credentials = os.path.join(folder, "config"), os.path.join(folder, "credentials")
    with open(config, "w", encoding="utf-8") as f:
        f.write(f"[default]\nregion = {region}\nendpoint_url = {endpoint_url}\n")
    with open(credentials, "w", encoding="utf-8") as f:
        f.write(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    os.chmod(credentials, 0o600)
    return {"AWS_CONFIG_FILE": config, "AWS_SHARED_CREDENTIALS_FILE": credentials}


@dataclass
class RayNode:
    """One node: its ``ray start --block`` process, its log, the address it registered with."""

    name: str
    proc: subprocess.Popen
    log_path: str
    ip: str
    home: str | None = None  # a further node's own HOME (marks its processes)

    def pids(self) -> list[int]:
        """The node's processes alive now: the ``ray start`` process's tree, and any process
        carrying the node's own HOME (a further node's processes, should one leave the tree)."""
        pids = set(proc_tree(self.proc.pid))
        if self.home:
            for name in os.listdir("/proc"):
                if name.isdigit() and proc_env(int(name), "HOME") == self.home:
                    pids.add(int(name))
        return sorted(pids)

    def worker_pids(self) -> list[int]:
        return [p for p in self.pids() if proc_title(p).startswith("ray::")]


class LocalRayCluster:
    """A Ray cluster of nodes on this machine, each started with ``ray start`` as a child process.

    ``head_env``: the head's environment (the driver's kind: Ray on loopback, the hub offline...).
    Further nodes get only what :meth:`add_node` gives them. Ray's temporary folders live in a
    short folder of their own (Ray's socket paths must stay under 108 bytes), removed by :meth:`stop`.
    """

    def __init__(self, log_dir: str, head_env: dict):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        # Nodes stop at once when told (nothing of theirs is left to drain when the cluster is stopped).
        # The head keeps multi-node clustering off: Ray then keeps every address it derives on 127.0.0.1.
        self.head_env = dict(head_env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.root = tempfile.mkdtemp(prefix="rae-ray-")
        self.port: int | None = None
        self.nodes: dict[str, RayNode] = {}

    @property
    def address(self) -> str:
        """The GCS address a driver connects to (``--ray-address``)."""
        return f"{HEAD_IP}:{self.port}"

    @staticmethod
    def _ray_cli() -> str:
        return os.path.join(os.path.dirname(sys.executable), "ray")

    def _start(self, name: str, args: list[str], env: dict, ip: str, home: str | None, timeout_s: float) -> RayNode:
        log_path = os.path.join(self.log_dir, f"ray-{name}.log")
        temp_dir = os.path.join(self.root, name)
        cmd = [self._ray_cli(), "start", *args, "--temp-dir", temp_dir, "--disable-usage-stats", "--block"]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home or REPO)
        node = RayNode(name, proc, log_path, ip, home)
        self.nodes[name] = node
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                if STARTED_LINE in f.read():
                    return node
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"Ray node {name} did not start (exit {proc.poll()}); see {log_path}")

    def start_head(self, *, num_cpus: int, resources: dict | None = None, timeout_s: float = 120.0) -> RayNode:
        self.port = _free_port()
        args = ["--head", "--node-ip-address", HEAD_IP, "--port", str(self.port), "--num-cpus", str(num_cpus),
                "--num-gpus", "0", "--object-store-memory", str(RAY_OBJECT_STORE_BYTES), "--include-dashboard",
                "false"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        node = self._start("head", args, self.head_env, HEAD_IP, None, timeout_s)
        log(f"Ray head on {self.address} (pid {node.proc.pid})")
        return node

    def add_node(self, name: str, *, num_cpus: int, resources: dict | None = None, env: dict | None = None,
                 timeout_s: float = 120.0) -> RayNode:
        """Start a further node with a clean environment: PATH (this Python's bin first), its own HOME
        under the cluster's log folder, Ray's switches, and ``env`` (e.g. :func:`aws_files`); nothing else."""
        if self.port is None:
            raise RuntimeError("start the head first")
        home = os.path.join(self.log_dir, f"{name}-home")
        os.makedirs(home, exist_ok=True)
        clean = {
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": home,
            # `ray start --address` refuses to run unless multi-node clusters are enabled (the head's
            # environment disables them, which keeps its addresses on 127.0.0.1).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # This node's own setting: never ask an instance-metadata endpoint (not loopback) for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
            **(env or {}),
        }
        args = ["--address", f"[{LOOPBACK_MAPPED}]:{self.port}", "--node-ip-address", LOOPBACK_MAPPED,
                "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(RAY_OBJECT_STORE_BYTES)]
        if resources:
            args += ["--resources", json.dumps(resources)]
        node = self._start(name, args, clean, LOOPBACK_MAPPED, home, timeout_s)
        log(f"Ray node {name} joined {self.address} as {LOOPBACK_MAPPED} (pid {node.proc.pid}, HOME {home})")
        return node

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of the node at once (a machine lost): returns the pids killed."""
        node = self.nodes[name]
        pids = node.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(timeout=30)
        return pids

    def stop(self) -> None:
        """Stop every node (SIGTERM to its ``ray start``, which stops what it started; after 30 s,
        SIGKILL what is left of it, by pid), the further nodes first, then remove Ray's folders."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            node = self.nodes[name]
            tree = {pid: proc_title(pid) for pid in node.pids()}
            if node.proc.poll() is None:
                node.proc.terminate()
                try:
                    node.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            kill_titled(tree)
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait(timeout=10)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# records: which node wrote which shard; stores compared with that provenance set aside


def shard_writers(store_uri: str, storage_options: dict | None = None) -> dict[int, dict]:
    """{shard: the ``written_by`` of its completion record} for every record present now."""
    from pipeline import uri as U
    from schemas import store_v1 as S

    fs, root = U.get_fs(U.join(store_uri, S.RECORDS_DIR), storage_options)
    fs.invalidate_cache()
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for path in sorted(paths):
        try:
            rec = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue  # being written
        out[int(rec["shard"])] = rec.get(S.RECORD_WRITTEN_BY) or {}
    return out


def digests_without_provenance(store_uri: str, storage_options: dict | None = None) -> dict[str, str]:
    """:func:`store_digests`, each completion record hashed without its ``written_by`` (which names
    the node that wrote it, the one field of a store allowed to differ between identical runs)."""
    from pipeline import uri as U
    from schemas import store_v1 as S

    digests = store_digests(store_uri, storage_options)
    for key in digests:
        if key.startswith(S.RECORDS_DIR + "/"):
            rec = U.read_json(U.join(store_uri, key), storage_options)
            rec.pop(S.RECORD_WRITTEN_BY, None)
            digests[key] = hashlib.sha256(U.canonical_json(rec)).hexdigest()
    return digests


def cluster_encode_args(samples_per_shard: int = CLUSTER_SAMPLES_PER_SHARD, *extra: str) -> list[str]:
    """The drills' shared encode options with ``samples_per_shard`` rows per shard, the encoder actor
    on the node offering :data:`ENCODER_SLOT`, and ``extra``."""
    args = list(ENCODE_ARGS)
    i = args.index("--samples-per-shard")
    args[i + 1] = str(samples_per_shard)
    return args + ["--set", f"actor_resources={json.dumps({ENCODER_SLOT: 1})}", *extra]


def node_aws_variables(node: RayNode) -> dict[str, list[str]]:
    """{pid: names of the AWS_* variables} of each Ray worker of ``node`` now (names only)."""
    out = {}
    for pid in node.worker_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                names = sorted(item.split(b"=", 1)[0].decode() for item in f.read().split(b"\0")
                               if item.startswith(b"AWS_"))
        except OSError:
            continue
        out[str(pid)] = names
    return out


def _describe(cmp: dict) -> str:
    if cmp["identical"]:
        return (f"all {cmp['objects']} objects equal to the single-node run's (byte for byte; the records without "
                "their written_by)")
    return describe_comparison(cmp).replace("the clean run", "the single-node run")


# --------------------------------------------------------------------------------------------
# the drill


@drill("encode_node_loss", "encode",
       "2-node Ray cluster (ray start; node 2 env -i with its own AWS files): node 2 killed mid-job, same store")
def encode_node_loss(ctx: DrillContext, rec: DrillRecord) -> None:
    s3 = ctx.s3()
    options = ctx.s3_options()
    data = s3.uri("cluster", "data")
    s3.upload_dir(ctx.sample_data(), "cluster/data")
    env = ctx.s3_env(s3.url)
    args = cluster_encode_args()
    folder = os.path.join(ctx.work, "cluster")
    cluster = LocalRayCluster(os.path.join(folder, "logs"), env)

    def encode_cmd(out: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "encode", "--data", data, "--out", out,
                "--ray-address", cluster.address, *args]

    rec.did = (
        f"`ray start --head` (127.0.0.1, 2 CPUs, custom resource {ENCODER_SLOT}) with the driver's environment; the "
        "sample data on moto S3; a single-node reference `rae-pipeline encode --ray-address` on the head alone; "
        f"then `ray start --address` of a second node ({LOOPBACK_MAPPED}, 1 CPU, custom resource {NODE2_RESOURCE}) "
        "under `env -i` with only PATH, its own HOME and its own AWS config + credentials files; the same encode "
        f"(8 shards of {CLUSTER_SAMPLES_PER_SHARD}, encoder actor on the {ENCODER_SLOT} node, read/write tasks spread "
        "over both) to another prefix; once a shard record written by node 2 existed, every process of node 2 "
        "SIGKILLed (raylet, object store, workers)")
    rec.expected = ("node 2's workers carry no AWS variable but its own files' paths; node 2 writes at least one "
                    "shard (its record names node 2); after node 2 is lost the same job (no rerun) finishes on the "
                    "head, exit 0, every shard encoded once by the job; the store equals the single-node one object "
                    "by object (records compared without written_by)")
    try:
        cluster.start_head(num_cpus=2, resources={ENCODER_SLOT: 1})
        single, rc1 = ctx.run("cluster-single", encode_cmd(s3.uri("cluster", "single")), env)
        ref = encode_outcome(single, rc1)
        if rc1 != 0:
            raise RuntimeError(f"the single-node reference encode failed ({rc1}): {ref.get('error')}")
        name = ref["uri"].rstrip("/").rsplit("/", 1)[-1]
        ref_digests = digests_without_provenance(ref["uri"], options)
        num_shards = sum(1 for k in ref_digests if k.startswith("records/"))

        node2 = cluster.add_node("node2", num_cpus=1, resources={NODE2_RESOURCE: 1},
                                 env=aws_files(os.path.join(folder, "node2-aws"), s3.url))
        store = s3.uri("cluster", "two", name)
        job = ctx.start("cluster-two", encode_cmd(s3.uri("cluster", "two")), env)

        def node2_wrote() -> bool:
            return any(w.get("node_ip") == LOOPBACK_MAPPED for w in shard_writers(store, options).values())

        node2_env: dict = {}

        def landed() -> bool:
            if not node2_env:
                node2_env.update(node_aws_variables(node2))
            return node2_wrote()

        landed_ok = wait_until(landed, job, ctx.options.timeout_s, poll_s=0.3)
        at_kill = shard_writers(store, options)
        node2_env.update(node_aws_variables(node2))
        t_kill = job.seconds
        killed = cluster.kill_node("node2") if job.poll() is None else []
        rc2 = job.wait(ctx.options.timeout_s)
        outcome = encode_outcome(job, rc2)
        writers = shard_writers(store, options)
        cmp = compare_digests(digests_without_provenance(store, options), ref_digests) if rc2 == 0 else None
    finally:
        cluster.stop()

    on_node2 = sorted(s for s, w in writers.items() if w.get("node_ip") == LOOPBACK_MAPPED)
    on_head = sorted(s for s, w in writers.items() if w.get("node_ip") == HEAD_IP)
    at_kill_node2 = sorted(s for s, w in at_kill.items() if w.get("node_ip") == LOOPBACK_MAPPED)
    allowed = {"AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED"}
    leaked = sorted({v for names in node2_env.values() for v in names} - allowed)
    rec.figures = {"num_shards": num_shards, "records_at_kill": len(at_kill),
                   "node2_records_at_kill": len(at_kill_node2),
                   "shards_by_node_final": {"head": len(on_head), "node2": len(on_node2)},
                   "killed_after_s": round(t_kill, 1), "processes_killed": len(killed),
                   "job_s": outcome["seconds"], "single_node_s": ref["seconds"],
                   "shards_encoded_by_the_job": outcome.get("shards_encoded")}
    rec.details = {"node2_worker_aws_variables": node2_env, "records": {str(k): v for k, v in writers.items()},
                   "outcome": outcome, "reference": ref, "comparison": cmp, "cluster_address": cluster.address}
    rec.ok = bool(landed_ok and killed and len(at_kill) < num_shards and at_kill_node2 and node2_env and not leaked
                  and rc2 == 0 and outcome.get("shards_encoded") == num_shards and cmp and cmp["identical"])
    rec.happened = (
        f"node 2's workers' AWS variables: {sorted({v for n in node2_env.values() for v in n}) or 'none seen'}; "
        f"{len(at_kill)}/{num_shards} records ({len(at_kill_node2)} by node 2) when node 2's {len(killed)} processes "
        f"were SIGKILLed {t_kill:.1f} s into the job; the job exited {rc2} after {outcome['seconds']} s having "
        f"encoded {outcome.get('shards_encoded')} shard(s); final records: {len(on_head)} by the head, "
        f"{len(on_node2)} by node 2 (shards {on_node2})"
        + (f"; store: {_describe(cmp)}" if cmp else f": {outcome.get('error')}"))
    if not landed_ok:
        rec.happened += "; no shard by node 2 was seen before the job ended or timed out: the kill did not land"
    if leaked:
        rec.findings.append(f"node 2's Ray workers carry AWS variables it was not given: {leaked}")
    rec.lost = ("nothing: node 2's shards in flight were redone on the head by the same job, store identical"
                if rec.ok else "see happened")


__all__ = ["LocalRayCluster", "RayNode", "aws_files", "cluster_encode_args", "digests_without_provenance",
           "encode_node_loss", "node_aws_variables", "shard_writers"]
