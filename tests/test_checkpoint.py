"""Checkpoint format v1: save/load round trips (local and S3), resolution, completion marker,
corruption detection, pruning, and a real SIGKILL in the middle of a checkpoint write."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import jsonschema
import numpy as np
import pytest
import safetensors
import torch
from torch import nn

from schemas import checkpoint_v1 as spec
from schemas.checkpoint_v1 import CheckpointMeta, CheckpointMetaError, validate_meta
from trainer.checkpoint import (
    CorruptCheckpointError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    unwrap_state_dict,
)
from trainer.optim import EMA, DiTLRSchedule, build_adamw, build_lr_scheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
    """A small MLP with two layers sharing one weight (tied) and a persistent buffer."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.mid2 = nn.Linear(hidden, hidden, bias=False)
        self.mid2.weight = self.mid.weight
        self.out = nn.Linear(hidden, dim)
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.mid2(h))) * self.scale


MODEL_REGISTRY = {"TinyNet": TinyNet}


def make_meta(**over) -> dict:
    meta = {
        "kind": "dit",
        "epoch": 0.5,
        "samples_seen": 64,
        "config": {"optim": {"lr": 2e-4}, "preset": "debug"},
        "model": {"class": "TinyNet", "config": {"dim": 8, "hidden": 16}},
        "store": {"store_id": "store-abc", "uri": "s3://bucket/store", "latent_shape": [8, 4, 4]},
        "encoder": {"name": "dinov2-b", "resolution": 224},
        "statistics": {"mean": True, "var": True, "source": "store"},
        "data_state": {"epoch": 0, "position": 64},
        "extra": {"note": "test"},
    }
    meta.update(over)
    return meta


def tiny_stats() -> dict[str, torch.Tensor]:
    return {"mean": torch.randn(8, 4, 4), "var": torch.rand(8, 4, 4) + 0.5}


def save_simple(run_dir, step, value: float | None = None, **kw):
    """A small checkpoint whose weights encode ``value`` (default: the step)."""
    v = float(step if value is None else value)
    return save_checkpoint(
        run_dir,
        step,
        model_state={"w": torch.full((4, 4), v)},
        ema_state={"w": torch.full((4, 4), v + 0.5)},
        train_state={"step": step},
        meta=make_meta(statistics=None),
        **kw,
    )


def assert_states_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def train_one_step(model, opt, sched, ema):
    x = torch.randn(4, 8)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    ema.update(model)


@pytest.mark.timeout(60)
def test_round_trip_local(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = build_adamw(model)
    sched = build_lr_scheduler(opt, DiTLRSchedule(samples_per_epoch=100, global_batch_size=10, constant_epochs=0.2, end_epoch=1.0))
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        train_one_step(model, opt, sched, ema)
    stats = tiny_stats()
    train_state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "grad_scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": rng_state(),
        "data": {"epoch": 0, "position": 30, "order_seed": 7, "perm": torch.randperm(10)},
    }
    # Keys as DDP would hand them over: they must be stored plain.
    ddp_state = {"module." + k: v for k, v in model.state_dict().items()}
    uri = save_checkpoint(
        str(tmp_path / "run"), 3, model_state=ddp_state, ema_state=ema.state_dict(),
        train_state=train_state, meta=make_meta(), stats=stats,
    )
    assert uri == str(tmp_path / "run" / "checkpoints" / "step-0000003")
    names = sorted(os.listdir(uri))
    assert names == sorted(["model.safetensors", "ema.safetensors", "stats.safetensors", "state.pt", "meta.json", "COMPLETE"])
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.startswith(".tmp")]

    # meta.json on disk satisfies the published JSON Schema and records every file's hash.
    meta_raw = json.loads((tmp_path / "run/checkpoints/step-0000003/meta.json").read_text())
    jsonschema.validate(meta_raw, spec.json_schema())
    assert meta_raw["step"] == 3 and meta_raw["format"] == "rae-checkpoint" and meta_raw["version"] == 1
    assert set(meta_raw["files"]) == {"model.safetensors", "ema.safetensors", "stats.safetensors", "state.pt"}
    assert set(meta_raw["created_by"]) >= {"rae_pipeline", "torch"}
    with safetensors.safe_open(os.path.join(uri, "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("module.")]
        assert f.metadata()["format"] == "rae-checkpoint"
    # state.pt is plain-weights_only loadable, without our loader.
    raw_state = torch.load(os.path.join(uri, "state.pt"), weights_only=True)
    assert raw_state["data"]["position"] == 30

    ckpt = load_checkpoint(str(tmp_path / "run"))  # a run dir resolves to its newest checkpoint
    assert ckpt.uri == uri and ckpt.step == 3 and ckpt.meta.store["store_id"] == "store-abc"
    assert ckpt.meta.statistics == {"mean": True, "var": True, "source": "store"}
    assert_states_equal(ckpt.model_state, model.state_dict())
    assert_states_equal(ckpt.ema_state, ema.state_dict())
    assert_states_equal(ckpt.stats, stats)
    assert ckpt.train_state["data"]["order_seed"] == 7
    torch.testing.assert_close(ckpt.train_state["data"]["perm"], train_state["data"]["perm"])

    # The checkpoint describes itself: rebuild the model from meta alone, then resume training
    # and match an uninterrupted continuation exactly.
    rebuilt = MODEL_REGISTRY[ckpt.meta.model["class"]](**ckpt.meta.model["config"])
    rebuilt.load_state_dict(ckpt.model_state)
    opt2 = build_adamw(rebuilt)
    # Order matters: build the scheduler on the fresh optimizer, then load both states.
    sched2 = build_lr_scheduler(opt2, DiTLRSchedule(samples_per_epoch=100, global_batch_size=10, constant_epochs=0.2, end_epoch=1.0))
    opt2.load_state_dict(ckpt.train_state["optimizer"])
    sched2.load_state_dict(ckpt.train_state["scheduler"])
    ema2 = EMA(rebuilt, decay=0.9)
    ema2.load_state_dict(ckpt.ema_state)
    rng_after_save = rng_state()
    restore_rng_state(ckpt.train_state["rng"])
    train_one_step(rebuilt, opt2, sched2, ema2)
    restore_rng_state(ckpt.train_state["rng"])
    train_one_step(model, opt, sched, ema)
    assert_states_equal(rebuilt.state_dict(), model.state_dict())
    assert_states_equal(ema2.state_dict(), ema.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    restore_rng_state(rng_after_save)

    # load without the train state
    assert load_checkpoint(uri, load_train_state=False).train_state is None


def test_shared_noncontiguous_and_prefixed_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "_orig_mod.module.a": base,
        "_orig_mod.module.b": base,  # tied: same storage
        "_orig_mod.module.c": base.t(),  # non-contiguous view of the same storage
        "_orig_mod.module.d": base[1],  # contiguous view into a larger storage
    }
    assert set(unwrap_state_dict(state)) == {"a", "b", "c", "d"}
    uri = save_checkpoint(tmp_path, 1, model_state=state, meta=make_meta(statistics=None))
    ckpt = load_checkpoint(uri)
    assert_states_equal(ckpt.model_state, {"a": base, "b": base, "c": base.t().contiguous(), "d": base[1]})
    assert ckpt.ema_state is None and ckpt.train_state is None and ckpt.stats is None
    # A module works too, and tied weights load back into a fresh module.
    net = TinyNet()
    save_checkpoint(tmp_path, 2, model_state=net, extra_weights={"disc": {"k": torch.ones(2)}}, meta=make_meta(statistics=None))
    ckpt = load_checkpoint(tmp_path)
    fresh = TinyNet()
    fresh.load_state_dict(ckpt.model_state)
    assert_states_equal(fresh.state_dict(), net.state_dict())
    assert_states_equal(ckpt.extra_weights["disc"], {"k": torch.ones(2)})


def test_bad_inputs_refused_before_writing(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(TypeError, match=r"train_state\['data'\]\['perm'\].*numpy"):
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, train_state={"data": {"perm": np.arange(3)}},
                        meta=make_meta(statistics=None))
    with pytest.raises(TypeError, match=r"numpy"):  # numpy.float64 subclasses float but does not unpickle
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, train_state={"loss": np.float64(1.0)},
                        meta=make_meta(statistics=None))
    with pytest.raises(ValueError, match="statistics"):
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, meta=make_meta(), stats=None)
    with pytest.raises(ValueError, match="var"):
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, meta=make_meta(), stats={"mean": torch.zeros(1)})
    with pytest.raises(CheckpointMetaError, match="kind"):
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, meta=make_meta(kind="Bad Kind", statistics=None))
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, meta=make_meta(step=2, statistics=None))
    with pytest.raises(CheckpointMetaError, match="JSON"):
        save_checkpoint(run, 1, model_state={"w": torch.ones(1)}, meta=make_meta(statistics=None, extra={"x": float("nan")}))
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(run, 1, model_state={"w": 3}, meta=make_meta(statistics=None))
    assert list_checkpoints(run) == []
    assert not os.path.exists(os.path.join(run, "checkpoints")) or os.listdir(os.path.join(run, "checkpoints")) == []


def test_meta_contract():
    full = CheckpointMeta(step=5, files={"model.safetensors": "a" * 64}, **{k: v for k, v in make_meta(statistics=None).items()}).to_dict()
    validate_meta(full)
    assert CheckpointMeta.from_dict(full).to_dict() == full
    broken = dict(full, store={"store_id": "x", "uri": "u"})
    with pytest.raises(CheckpointMetaError, match=r"store.*latent_shape"):
        validate_meta(broken, source="x/meta.json")
    with pytest.raises(CheckpointMetaError, match="version 2 is not supported"):
        validate_meta(dict(full, version=2))
    with pytest.raises(CheckpointMetaError, match="model.safetensors"):
        validate_meta(dict(full, files={"state.pt": "b" * 64}))
    with pytest.raises(CheckpointMetaError, match="stats.safetensors"):
        validate_meta(dict(full, statistics={"mean": False, "var": True, "source": "file:/x/stat.pt"}))
    with pytest.raises(CheckpointMetaError, match="source"):
        validate_meta(dict(full, statistics={"mean": False, "var": True, "source": "elsewhere"},
                           files={"model.safetensors": "a" * 64, "stats.safetensors": "c" * 64}))
    missing = {k: v for k, v in full.items() if k != "encoder"}
    with pytest.raises(CheckpointMetaError, match="encoder"):
        validate_meta(missing)


def test_resolve_picks_newest_complete(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError, match="neither a checkpoint directory"):
        resolve_checkpoint(run)
    for step in (10, 20, 30):
        save_simple(run, step)
    assert [(e.step, e.complete) for e in list_checkpoints(run)] == [(10, True), (20, True), (30, True)]
    assert resolve_checkpoint(run).endswith("step-0000030")
    assert resolve_checkpoint(run + "/checkpoints").endswith("step-0000030")
    # A checkpoint without its marker is never picked...
    os.remove(os.path.join(run, "checkpoints", "step-0000030", "COMPLETE"))
    assert [(e.step, e.complete) for e in list_checkpoints(run)] == [(10, True), (20, True), (30, False)]
    assert resolve_checkpoint(run).endswith("step-0000020")
    ckpt = load_checkpoint(run)
    assert ckpt.step == 20 and float(ckpt.model_state["w"][0, 0]) == 20.0
    # ...nor loaded when named directly.
    with pytest.raises(IncompleteCheckpointError, match="COMPLETE"):
        load_checkpoint(os.path.join(run, "checkpoints", "step-0000030"))
    # A run whose checkpoints are all incomplete is a clear error.
    for step in (10, 20):
        os.remove(os.path.join(run, "checkpoints", spec.step_dir_name(step), "COMPLETE"))
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(run)


def test_corruption_is_named(tmp_path):
    run = str(tmp_path / "run")
    uri = save_simple(run, 7)
    ema_path = os.path.join(uri, "ema.safetensors")
    data = bytearray(open(ema_path, "rb").read())
    data[-1] ^= 0xFF
    open(ema_path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"ema\.safetensors is corrupt"):
        load_checkpoint(run)
    assert load_checkpoint(run, verify=False).ema_state["w"].shape == (4, 4)  # flipped a value byte

    uri = save_simple(run, 8)
    os.remove(os.path.join(uri, "state.pt"))
    with pytest.raises(CorruptCheckpointError, match=r"state\.pt is missing"):
        load_checkpoint(uri)
    assert load_checkpoint(uri, load_train_state=False).step == 8

    uri = save_simple(run, 9)
    meta_path = os.path.join(uri, "meta.json")
    meta = json.load(open(meta_path))
    meta["step"] = 10
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"meta\.json is corrupt"):
        load_checkpoint(uri)

    uri = save_simple(run, 11)
    with open(os.path.join(uri, "model.safetensors"), "r+b") as f:
        f.truncate(20)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        load_checkpoint(uri)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        load_checkpoint(uri, verify=False)


def test_prune_keeps_last_k_and_every_m(tmp_path):
    run = str(tmp_path / "run")
    for step in range(100, 1001, 100):
        save_simple(run, step)
    root = os.path.join(run, "checkpoints")
    os.makedirs(os.path.join(root, "step-0000050"))  # incomplete leftover, older than newest complete
    os.makedirs(os.path.join(root, "step-0002000"))  # incomplete, newer: may be a write in progress
    os.makedirs(os.path.join(root, ".tmp-step-0000300-deadbeef"))  # interrupted local write
    os.makedirs(os.path.join(root, ".tmp-step-0005000-cafecafe"))  # newer than newest complete
    removed = prune_checkpoints(run, keep_last=3, keep_every=400)
    left = sorted(os.listdir(root))
    assert left == [".tmp-step-0005000-cafecafe", "step-0000400", "step-0000800", "step-0000900",
                    "step-0001000", "step-0002000"]
    assert len(removed) == 8  # 100, 200, 300, 500, 600, 700, step-0000050, .tmp-step-0000300
    assert [e.step for e in list_checkpoints(run) if e.complete] == [400, 800, 900, 1000]
    # keep_last=1 without keep_every keeps only the newest complete one.
    prune_checkpoints(run, keep_last=1)
    assert [e.step for e in list_checkpoints(run) if e.complete] == [1000]
    with pytest.raises(ValueError):
        prune_checkpoints(run, keep_last=0)


def test_resave_same_step_replaces(tmp_path):
    run = str(tmp_path / "run")
    save_simple(run, 5, value=1.0)
    save_simple(run, 5, value=2.0)
    assert float(load_checkpoint(run).model_state["w"][0, 0]) == 2.0
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step-0000005"]


@pytest.mark.timeout(90)
def test_s3_round_trip(s3_endpoint):
    run = f"s3://test-bucket/ckpt-{uuid.uuid4().hex[:8]}/run"
    stats = {"var": torch.rand(8, 4, 4) + 0.1}  # variance only, as in the reference release
    weights = {"w": torch.randn(16, 16), "b": torch.randn(16)}
    for step in (1, 2, 3):
        uri = save_checkpoint(
            run, step, model_state={k: v * step for k, v in weights.items()}, ema_state=weights,
            train_state={"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}},
            meta=make_meta(statistics={"mean": False, "var": True, "source": "file:s3://x/stat.pt"}), stats=stats,
        )
    assert uri == f"{run}/checkpoints/step-0000003"
    ckpt = load_checkpoint(run)
    assert ckpt.uri == uri and ckpt.step == 3
    assert_states_equal(ckpt.model_state, {k: v * 3 for k, v in weights.items()})
    assert_states_equal(ckpt.stats, stats)
    assert ckpt.train_state["optimizer"]["param_groups"][0]["lr"] == 2e-4

    import fsspec

    fs = fsspec.filesystem("s3")
    fs.rm(uri.removeprefix("s3://") + "/COMPLETE")
    assert resolve_checkpoint(run) == f"{run}/checkpoints/step-0000002"
    with pytest.raises(IncompleteCheckpointError):
        load_checkpoint(uri)
    # Corruption is detected on S3 as well.
    key = f"{run}/checkpoints/step-0000002/model.safetensors".removeprefix("s3://")
    data = bytearray(fs.cat(key))
    data[-1] ^= 1
    fs.pipe(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_checkpoint(run)
    # Pruning: the incomplete step 3 is newer than the newest complete (2) and stays.
    removed = prune_checkpoints(run, keep_last=1)
    assert removed == [f"{run}/checkpoints/step-0000001"]
    assert [(e.step, e.complete) for e in list_checkpoints(run)] == [(2, True), (3, False)]
    # Re-saving step 3 completes it.
    save_simple(run, 3, value=9.0)
    assert float(load_checkpoint(run).model_state["w"][0, 0]) == 9.0


KILL_WRITER = textwrap.dedent(
    """
    import sys, torch
    from trainer.checkpoint import save_checkpoint
    run_dir, numel = sys.argv[1], int(sys.argv[2])
    meta = {"kind": "dit", "epoch": 0.0, "samples_seen": 0, "config": {}, "model": {"class": "X", "config": {}}}
    step = 0
    while True:
        step += 1
        w = torch.full((numel,), float(step))
        save_checkpoint(run_dir, step, model_state={"w": w}, ema_state={"w": w + 0.5},
                        train_state={"moment": w * 2, "step": step}, meta=meta)
        print("saved", step, flush=True)
    """
)


def _run_writer_and_kill(run_dir: str, numel: int, progress) -> bool:
    """Start the looping writer; once ``progress()`` reports a complete checkpoint and a later
    write under way, SIGKILL it. Return whether the kill left a partial write behind.
    ``progress() -> (any_complete, write_in_progress)`` costs one listing, polled gently so the
    poller does not starve the writer (or the S3 server) of CPU."""
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, run_dir, str(numel)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"writer exited early: {proc.stderr.read().decode()[-2000:]}")
            if all(progress()):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        else:
            raise AssertionError("writer never reached a second write")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return progress()[1]


def _check_survivor(run_dir: str):
    ckpt = load_checkpoint(run_dir)  # verifies COMPLETE, meta hash and every file hash
    step = ckpt.step
    assert float(ckpt.model_state["w"][0]) == step and float(ckpt.ema_state["w"][-1]) == step + 0.5
    assert float(ckpt.train_state["moment"][0]) == 2 * step
    return step


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_write_leaves_previous_checkpoint(tmp_path):
    numel = 4_000_000  # 16 MB per tensor file: a write lasts long enough to be hit mid-way
    for attempt in range(3):
        run = str(tmp_path / f"run{attempt}")
        root = os.path.join(run, "checkpoints")

        def progress_local():
            names = os.listdir(root) if os.path.isdir(root) else []
            return any(n.startswith("step-") for n in names), any(n.startswith(".tmp-step-") for n in names)

        if _run_writer_and_kill(run, numel, progress_local):
            break
    else:
        pytest.fail("could not land a SIGKILL inside a checkpoint write in 3 attempts")
    step = _check_survivor(run)
    # The half-written folder is hidden, never listed, and pruning cleans it up once a newer
    # checkpoint exists; saving again works.
    assert all(e.complete for e in list_checkpoints(run))
    save_simple(run, step + 1)
    prune_checkpoints(run, keep_last=1)
    assert sorted(os.listdir(root)) == [spec.step_dir_name(step + 1)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_s3_write_leaves_previous_checkpoint(s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    numel = 1_000_000  # 4 MB per file through the loopback S3 server
    for attempt in range(3):
        run = f"s3://test-bucket/kill-{uuid.uuid4().hex[:8]}/run"
        prefix = run.removeprefix("s3://") + "/checkpoints"

        def progress_s3():
            fs.invalidate_cache()
            keys = fs.find(prefix)
            dirs = {k.split("/")[-2] for k in keys}
            done = {k.split("/")[-2] for k in keys if k.endswith("/COMPLETE")}
            return bool(done), bool(dirs - done)

        if _run_writer_and_kill(run, numel, progress_s3):
            break
    else:
        pytest.fail("could not land a SIGKILL inside a checkpoint write in 3 attempts")
    step = _check_survivor(run)
    assert [e.complete for e in list_checkpoints(run)][-1] is False  # the partial one is listed as such
    assert resolve_checkpoint(run).endswith(spec.step_dir_name(step))
