"""The DiT trainer (trainer/train_dit.py), its CLI (`rae-pipeline train-dit`) and the model registry,
on tiny synthetic stores with tiny models (CPU, one thread)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.config import ConfigError, to_dict
from pipeline.store import IncompleteStoreError, StoreLayout, write_array_store
from schemas import store_v1
from trainer.checkpoint import list_checkpoints, load_checkpoint, read_meta
from trainer.flow import euler_sample, reference_grid
from trainer.models import (
    MODEL_REGISTRY,
    UnknownModelError,
    build_model_from_meta,
    model_config_from_meta,
    model_meta,
)
from trainer.models.dit import build_model, dit_config
from trainer.normalize import LatentNormalizer
from trainer.optim import NonFiniteLossError
from trainer.train_dit import (
    PRESETS,
    DiTTrainer,
    keep_epoch_steps,
    TrainError,
    config_from_run_dir,
    model_config_for,
    resolve_config,
    step_randomness,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 4, 4)
# Quiet, fast runs: no progress bar or TensorBoard unless a test is about them.
QUIET = ["train.progress=false", "train.tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per process


def _store(path, n=48, shape=SHAPE, classes=4, seed=0, flips=True, chunk=4):
    rng = np.random.default_rng(seed)
    lat = rng.normal(size=(n,) + tuple(shape)).astype(np.float32)
    return write_array_store(
        str(path), lat, rng.integers(0, classes, n), latents_flip=-lat if flips else None, num_classes=classes,
        layout=StoreLayout(dtype="float32", samples_per_shard=4 * chunk, samples_per_chunk=chunk),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("store") / "s")


@pytest.fixture(scope="module")
def other_store(tmp_path_factory):
    """Same latent shape and (no) encoder as `store`, other content: another store id."""
    return _store(tmp_path_factory.mktemp("other") / "s", seed=1)


def _cfg(*overrides: str):
    return resolve_config("debug", [*QUIET, *overrides])


def _train(cfg, store, run_dir, **kw):
    return DiTTrainer(cfg, store.uri if hasattr(store, "uri") else store, str(run_dir), **kw).train()


def _records(run_dir, rank=0) -> list[dict]:
    with open(os.path.join(run_dir, "debug", f"batches-rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# config and presets
# ---------------------------------------------------------------------------------------------


def test_presets_match_the_reference_configs():
    """bytetriper/RAE configs/training/ImageNet256/DiTDH-{S,XL}_DINOv2-B.yaml and the paper."""
    sizes = {"dit_dh_s_dinov2_256": "dit_dh_s", "dit_dh_b_dinov2_256": "dit_dh_b",
             "dit_dh_xl_dinov2_256": "dit_dh_xl", "dit_dh_xl_dinov2_512": "dit_dh_xl", "dit_xl_dinov2_256": "dit_xl"}
    for name, size in sizes.items():
        cfg = resolve_config(name)
        assert cfg.model.size == size and cfg.model.patch_size is None and cfg.model.class_dropout_prob == 0.1
        o = cfg.optim
        assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.ema_decay) == (2e-4, (0.9, 0.95), 0.0, 1.0, 0.9995)
        assert (o.final_lr, o.constant_epochs, o.end_epoch) == (2e-5, 40.0, 800.0)
        assert cfg.data.global_batch == 1024 and cfg.data.num_workers == 4
        t = cfg.train
        assert (t.grad_accum_steps, t.log_every, t.ckpt_every, t.seed) == (4, 100, 5000, 0)
        assert t.epochs == (400.0 if name.endswith("512") else 800.0) and t.max_steps is None
        assert (cfg.flow.time_dist, cfg.flow.shift_base, cfg.flow.shift_alpha) == ("logit_normal", 4096, None)
        # Where paper and released code differ, the code: fp32 with TF32 matmuls, variance-only statistics.
        assert (t.precision, t.tf32, cfg.data.stats_mode) == ("fp32", True, "var")
        assert resolve_config(name, ["train.precision=bf16"]).train.precision == "bf16"  # the opt-in
    # AutoGuidance's guide: the DiT^DH-S recipe for 14 epochs at 256 px, its epoch-14 checkpoint kept.
    guide, s_run = resolve_config("dit_dh_s_dinov2_256_ag_guide"), resolve_config("dit_dh_s_dinov2_256")
    assert (guide.model.size, guide.train.epochs, guide.train.keep_epochs) == ("dit_dh_s", 14.0, [14])
    assert dataclasses.replace(guide.train, epochs=800.0, keep_epochs=[]) == s_run.train
    assert (guide.model, guide.flow, guide.optim, guide.data) == (s_run.model, s_run.flow, s_run.optim, s_run.data)
    assert s_run.optim.constant_epochs >= 14  # its LR is still constant: the first 14 epochs of the full S run
    # The architecture comes from the size and the store: XL with the 2048-wide, 2-block head.
    xl = dit_config("dit_dh_xl", 768, 16)
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.head_hidden_size, xl.head_depth) == (1152, 28, 16, 2048, 2)
    debug = resolve_config("debug")
    assert (debug.train.precision, debug.data.stats_mode, debug.train.keep_epochs) == ("auto", "mean_var", [])
    assert (debug.model.hidden_size, debug.model.depth, debug.model.head_hidden_size, debug.model.head_depth) == \
        (64, 2, 128, 1)
    assert debug.train.max_steps <= 500 and 8 <= debug.data.global_batch <= 16


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown preset 'dit_dh_xxl'.*debug"):
        resolve_config("dit_dh_xxl")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        resolve_config("debug", ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="flow.time_dist 'beta' is not one of"):
        resolve_config("debug", ["flow.time_dist=beta"])
    with pytest.raises(ConfigError, match="model.size"):
        resolve_config("debug", ["model.size=dit_dh_xxl"])
    with pytest.raises(ConfigError, match="model.head_hidden_size is set but model.size 'dit_xl'"):
        resolve_config("debug", ["model.size=dit_xl"])
    with pytest.raises(ConfigError, match="train.max_steps or train.epochs"):
        resolve_config("debug", ["train.max_steps=null"])
    assert resolve_config("debug", ["flow.time_dist=uniform", "optim.betas=[0.9,0.99]"]).optim.betas == (0.9, 0.99)


def test_step_randomness_does_not_depend_on_the_split():
    """Rows drawn for a whole batch equal the same rows drawn in two halves (ranks) or any order."""
    kw = dict(flow=_cfg().flow, alpha=0.5, drop_prob=0.3, device=torch.device("cpu"))
    whole = step_randomness(7, 3, torch.arange(8), 8, SHAPE, **kw)
    for rows in (torch.tensor([4, 5, 6, 7]), torch.tensor([6, 1])):
        part = step_randomness(7, 3, rows, 8, SHAPE, **kw)
        assert torch.equal(part.t, whole.t[rows]) and torch.equal(part.eps, whole.eps[rows])
        assert torch.equal(part.drop, whole.drop[rows])
    other = step_randomness(7, 4, torch.arange(8), 8, SHAPE, **kw)
    assert not torch.equal(other.eps, whole.eps) and not torch.equal(other.t, whole.t)


# ---------------------------------------------------------------------------------------------
# model registry
# ---------------------------------------------------------------------------------------------


def test_registry_rebuilds_models_from_meta():
    for size, cls in (("dit_dh_s", "DiTDH"), ("dit_s", "DiT")):
        extra = dict(head_hidden_size=64, head_depth=1, head_num_heads=4) if cls == "DiTDH" else {}
        model = build_model(dit_config(size, 8, 4, hidden_size=32, depth=1, num_heads=2, num_classes=5, **extra))
        meta = json.loads(json.dumps(model_meta(model)))  # as it comes back from meta.json
        assert meta["class"] == cls and meta["config"]["in_channels"] == 8
        rebuilt = build_model_from_meta(meta)
        assert type(rebuilt) is type(model) and rebuilt.cfg == model.cfg
        rebuilt.load_state_dict(model.state_dict())  # same keys and shapes
    with pytest.raises(UnknownModelError, match="'Unet' is not registered.*DiTDH"):
        build_model_from_meta({"class": "Unet", "config": {}})
    with pytest.raises(ConfigError, match="model.config.depthh"):
        model_config_from_meta({"class": "DiT", "config": {"depthh": 3}})


def test_registry_decoder_hook():
    """RAEDecoder is registered lazily; its config (tuples included) survives the JSON round trip."""
    decoder = pytest.importorskip("trainer.models.decoder")
    assert MODEL_REGISTRY["RAEDecoder"].module == "trainer.models.decoder"
    model = decoder.RAEDecoder(decoder.decoder_config("decoder_tiny", in_channels=8, num_tokens=16, patch_size=2))
    meta = json.loads(json.dumps(model_meta(model)))
    rebuilt = build_model_from_meta(meta)
    assert isinstance(rebuilt, decoder.RAEDecoder) and rebuilt.config == model.config


# ---------------------------------------------------------------------------------------------
# checkpoints, resume, signals
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_resume_is_exact_and_says_so(store, tmp_path, capsys):
    """Stop after 3 steps, resume to 6: the same parameters, optimizer state and batches as 6 steps at once."""
    common = ["train.debug_record_batches=true", "train.ckpt_every=3", "data.global_batch=8", "train.log_every=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(_cfg(*common, "train.max_steps=6"), store, whole)
    first = _train(_cfg(*common, "train.max_steps=3"), store, split)
    assert first.step == 3 and first.resumed_from is None
    capsys.readouterr()
    second = _train(_cfg(*common, "train.max_steps=6"), store, split)
    out = capsys.readouterr().out
    assert second.resumed_from.endswith("step-0000003") and second.step == 6
    assert "resuming from checkpoint" in out and "at step 3" in out and "train.max_steps" in out

    a, b = load_checkpoint(str(whole)), load_checkpoint(str(split))
    assert a.step == b.step == 6 and a.meta.samples_seen == b.meta.samples_seen == 48
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
        assert torch.equal(a.ema_state[key], b.ema_state[key]), key
    for sa, sb in zip(a.train_state["optimizer"]["state"].values(), b.train_state["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a.meta.data_state == b.meta.data_state
    assert _records(whole) == _records(split)  # identical batches, steps 1..6
    assert [r["step"] for r in _records(split)] == [1, 2, 3, 4, 5, 6]
    # The interrupted run's log continues where the checkpoint was, with no duplicate steps.
    steps = [json.loads(line)["step"] for line in open(split / "logs" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def _cli_cmd(store, run_dir, *sets):
    cmd = [sys.executable, "-m", "pipeline.cli", "train-dit", "--store", store, "--run-dir", str(run_dir),
           "--preset", "debug"]
    for s in [*QUIET, *sets]:
        cmd += ["--set", s]
    return cmd


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_during_checkpoint_write_resumes_from_previous(store, tmp_path, capsys):
    """A trainer killed while writing a checkpoint leaves the previous one complete; the run resumes from it."""
    # A wider model (about 5M parameters, checkpoints of ~80 MB with EMA and Adam moments) so a
    # write lasts long enough to be hit; a checkpoint every step.
    big = ["model.hidden_size=256", "model.head_hidden_size=512", "train.ckpt_every=1", "train.max_steps=10000",
           "train.keep_last=2", "data.global_batch=8"]
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        root = run / "checkpoints"
        proc = subprocess.Popen(_cli_cmd(store.uri, run, *big), cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        hit = False
        try:
            deadline = time.time() + 150
            while time.time() < deadline and proc.poll() is None:
                names = os.listdir(root) if root.is_dir() else []
                if any(n.startswith("step-") for n in names) and any(n.startswith(".tmp-step-") for n in names):
                    os.kill(proc.pid, signal.SIGKILL)
                    hit = True
                    break
                time.sleep(0.005)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
        if hit and any(n.startswith(".tmp-step-") for n in os.listdir(root)):
            break
    else:
        pytest.fail("could not land a SIGKILL inside a checkpoint write in 3 attempts")
    survivor = load_checkpoint(str(run))  # checks COMPLETE and every hash
    step = survivor.step
    assert all(e.complete for e in list_checkpoints(str(run)))
    capsys.readouterr()
    result = _train(_cfg(*big[:2], "train.ckpt_every=1", f"train.max_steps={step + 1}", "data.global_batch=8"),
                    store, run)
    assert f"resuming from checkpoint {survivor.uri} at step {step}" in capsys.readouterr().out
    assert result.step == step + 1 and result.resumed_from == survivor.uri


@pytest.mark.timeout(120)
def sigterm_once_logging(metrics, *, timeout_s: float, poll_s: float) -> threading.Thread:
    """A started thread that SIGTERMs this process once ``metrics`` (a run's metrics.jsonl) has a
    line: the handler is installed before the first step is logged."""

    def send_when_training():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if metrics.exists() and metrics.stat().st_size > 0:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(poll_s)

    sender = threading.Thread(target=send_when_training, daemon=True)
    sender.start()
    return sender


def test_sigterm_saves_a_checkpoint_and_stops(store, tmp_path):
    """SIGTERM mid-run: the loop saves at the current step and returns normally; the run then resumes."""
    run = tmp_path / "run"
    metrics = run / "logs" / "metrics.jsonl"

    sender = sigterm_once_logging(metrics, timeout_s=60, poll_s=0.01)
    result = _train(_cfg("train.max_steps=100000", "train.log_every=1", "train.ckpt_every=100000"), store, run)
    sender.join()
    assert result.stopped_by == "sigterm" and 1 <= result.step < 100000
    assert load_checkpoint(str(run)).step == result.step
    after = _train(_cfg(f"train.max_steps={result.step + 2}"), store, run)
    assert after.resumed_from == result.checkpoint and after.step == result.step + 2


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------


GAUSS_SHAPE = (8, 2, 2)


def _gaussian_store(path, n_per=512):
    """4 classes of 8x2x2 latents: class c ~ N(mu_c, sigma_c^2 I) with mu_c = +-2 per channel (the same
    at every token) and sigma = 0.6, 0.8, 1.0, 1.2. Returns (store, mu [4, 8, 2, 2], sigma [4])."""
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(4, GAUSS_SHAPE[0], 1, 1))
    mu = np.broadcast_to(2.0 * signs, (4,) + GAUSS_SHAPE).astype(np.float32)
    sigma = np.array([0.6, 0.8, 1.0, 1.2], dtype=np.float32)
    labels = rng.permutation(np.repeat(np.arange(4), n_per))
    noise = rng.normal(size=(len(labels),) + GAUSS_SHAPE).astype(np.float32)
    lat = mu[labels] + sigma[labels, None, None, None] * noise
    store = write_array_store(str(path), lat, labels, num_classes=4,
                              layout=StoreLayout(dtype="float32", samples_per_shard=256, samples_per_chunk=32))
    return store, mu, sigma


def _class_statistics(model, normalizer, alpha, n):
    """Per class: (mean [32], mean per-element variance) of n Euler samples (reference grid), denormalized."""
    model.eval()
    y = torch.arange(4).repeat_interleave(n)
    noise = torch.randn((4 * n,) + GAUSS_SHAPE, generator=torch.Generator().manual_seed(123))
    x = normalizer.denormalize(euler_sample(lambda x, t: model(x, t, y), noise, reference_grid(50, alpha=alpha)))
    x = x.reshape(4, n, -1).double().numpy()
    return x.mean(1), x.var(1).mean(1)


def _fits(model, normalizer, alpha, mu, sigma, n) -> tuple[bool, str]:
    """Every class mean within 10% of the closest distance between true class means, every variance within 25%."""
    means, variances = _class_statistics(model, normalizer, alpha, n)
    truth = mu.reshape(4, -1)
    spacing = min(np.linalg.norm(truth[a] - truth[b]) for a in range(4) for b in range(a + 1, 4))
    mean_err = np.linalg.norm(means - truth, axis=1) / spacing
    var_ratio = variances / sigma.astype(np.float64) ** 2
    ok = bool((mean_err < 0.10).all() and (np.abs(var_ratio - 1) < 0.25).all())
    return ok, f"mean error / class spacing {np.round(mean_err, 3)}, variance ratio {np.round(var_ratio, 3)}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_learning_is_real(tmp_path):
    """Euler samples of the trained model match a known class-conditional Gaussian; the untrained model's do not.

    A tiny DiT^DH (width 64, depth 1, head 64x1), 800 steps of 32. The shift base is C*H*W = 32
    (alpha 1): the default n = 4096 is made for 768x16x16 latents and would put almost every
    training time at the data end of this 32-number latent. Times are uniform (the released
    configs' choice): the ends of [0, 1], where the spread of each class is decided, get more
    training than under the logit-normal. Euler on the 50-point grid itself shrinks the variance
    of such a Gaussian by about 7%, which the 25% tolerance absorbs.
    """
    store, mu, sigma = _gaussian_store(tmp_path / "gauss")
    steps, batch, n = 800, 32, 2048
    epochs = steps * batch / n  # the LR schedule counts in epochs of the store's 2048 samples
    cfg = _cfg(f"train.max_steps={steps}", f"data.global_batch={batch}", "model.depth=1",
               "model.head_hidden_size=64", "flow.shift_base=32", "flow.time_dist=uniform", "optim.lr=5e-3",
               f"optim.constant_epochs={0.6 * epochs}", f"optim.end_epoch={epochs}", "optim.final_lr=5e-5",
               "train.ckpt_every=100000")
    run = tmp_path / "run"
    _train(cfg, store, run)
    ckpt = load_checkpoint(str(run))
    assert ckpt.meta.extra["shift_alpha"] == 1.0
    normalizer = LatentNormalizer(ckpt.stats.get("mean"), ckpt.stats.get("var"))
    model = build_model_from_meta(ckpt.meta.model)  # no flags: the checkpoint describes the model
    untrained_ok, untrained = _fits(model, normalizer, 1.0, mu, sigma, n=64)
    assert not untrained_ok, untrained
    model.load_state_dict(ckpt.model_state)
    trained_ok, trained = _fits(model, normalizer, 1.0, mu, sigma, n=256)
    assert trained_ok, trained


# ---------------------------------------------------------------------------------------------
# shapes from the store
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_32x32_tokens_train_with_the_shift_from_the_store(tmp_path):
    store = _store(tmp_path / "s32", n=8, shape=(8, 32, 32), flips=False, chunk=2)
    cfg = _cfg("train.max_steps=2", "data.global_batch=4", "model.hidden_size=32", "model.num_heads=2",
               "model.depth=1", "model.head_hidden_size=32", "model.head_num_heads=2")
    result = _train(cfg, store, tmp_path / "run")
    expected = math.sqrt(8 * 32 * 32 / 4096)
    assert result.step == 2 and result.shift_alpha == pytest.approx(expected, rel=1e-12)
    meta = read_meta(str(tmp_path / "run"))
    assert meta.extra["shift_alpha"] == pytest.approx(expected, rel=1e-12)
    assert meta.model["config"]["input_size"] == 32 and meta.model["config"]["patch_size"] == 1
    assert meta.store["latent_shape"] == [8, 32, 32]
    # The times the trainer draws are shifted with that alpha: the same draws as the flow module's.
    from trainer.flow import sample_train_times
    from trainer.train_dit import _mix_seed

    rnd = step_randomness(0, 1, torch.arange(4), 4, (8, 32, 32), flow=cfg.flow, alpha=result.shift_alpha,
                          drop_prob=0.1, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(_mix_seed(0, 1))
    assert torch.equal(rnd.t, sample_train_times(4, alpha=expected, generator=g))


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_incomplete_store_is_refused(tmp_path):
    s = _store(tmp_path / "s", n=16)
    os.remove(os.path.join(s.uri, store_v1.COMPLETE_MARKER))
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        DiTTrainer(_cfg(), s.uri, str(tmp_path / "run"))


@pytest.mark.timeout(120)
def test_resume_on_another_store_and_init_from_another_shape_are_refused(store, other_store, tmp_path):
    run = tmp_path / "run"
    _train(_cfg("train.max_steps=1", "data.global_batch=8"), store, run)
    with pytest.raises(TrainError, match=f"trained on store {store.store_id}.*is store {other_store.store_id}"):
        DiTTrainer(_cfg("train.max_steps=2"), other_store.uri, str(run))
    small = _store(tmp_path / "small", n=16, shape=(4, 4, 4))
    with pytest.raises(TrainError, match=r"latents of shape \[8, 4, 4\].*latents of shape \[4, 4, 4\]"):
        DiTTrainer(_cfg(), small.uri, str(tmp_path / "fresh"), init_from=str(run))
    with pytest.raises(TrainError, match="hidden_size: checkpoint 64, config 32"):
        DiTTrainer(_cfg("model.hidden_size=32"), store.uri, str(tmp_path / "fresh2"), init_from=str(run))


@pytest.mark.timeout(120)
def test_init_from_fine_tunes_on_another_store(store, other_store, tmp_path):
    source = tmp_path / "source"
    _train(_cfg("train.max_steps=2", "data.global_batch=8"), store, source)
    ckpt = load_checkpoint(str(source))
    trainer = DiTTrainer(_cfg("train.max_steps=1", "data.global_batch=8"), other_store.uri, str(tmp_path / "tune"),
                         init_from=str(source))
    assert trainer.step == 0 and trainer.optimizer.state_dict()["state"] == {}  # a fresh optimizer
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, ckpt.model_state[key]), key
    result = trainer.train()
    meta = read_meta(result.checkpoint)
    assert result.step == 1 and meta.store["store_id"] == other_store.store_id
    assert meta.extra["init_from"] == ckpt.uri


@pytest.mark.timeout(120)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg("train.max_steps=10", "train.ckpt_every=2", "train.debug_nan_at_step=5", "data.global_batch=8")
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*at step 5.*last good one"):
        _train(cfg, store, run)
    assert [e.step for e in list_checkpoints(str(run))] == [2, 4]
    good = load_checkpoint(str(run))
    assert good.step == 4 and all(torch.isfinite(v).all() for v in good.model_state.values())
    # Resuming without the fault continues from it.
    assert _train(_cfg("train.max_steps=6", "data.global_batch=8"), store, run).resumed_from == good.uri


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_cli_trains_writes_its_outputs_and_resumes(store, other_store, tmp_path):
    from pipeline.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train-dit", "--store", store.uri, "--run-dir", str(run), "--preset", "debug",
            "--set", "train.max_steps=20", "--set", "train.ckpt_every=10"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "trained to step 20" in first.output
    config = json.loads((run / "config.json").read_text())
    expected = resolve_config("debug", ["train.max_steps=20", "train.ckpt_every=10"])
    assert config == json.loads(json.dumps(to_dict(expected))) and config_from_run_dir(str(run)) == expected
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "data_wait_frac"} <= set(records[-1])
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(run / "logs" / "tensorboard")
    assert [e.step for e in list_checkpoints(str(run))] == [10, 20]
    meta = read_meta(str(run))
    assert meta.store == {"store_id": store.store_id, "uri": store.uri, "latent_shape": list(SHAPE)}
    assert meta.statistics == {"mean": True, "var": True, "source": "store"} and meta.encoder is None
    assert meta.data_state["samples_seen"] == meta.samples_seen == 20 * 16 and meta.config == config

    second = runner.invoke(app, args[:-4] + ["--set", "train.max_steps=25"])
    assert second.exit_code == 0, second.output
    assert "resuming from checkpoint" in second.output and "at step 20" in second.output
    assert read_meta(str(run)).step == 25

    base = ["train-dit", "--store", store.uri, "--run-dir", str(run)]
    for bad, message in (
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "debug", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    ):
        out = runner.invoke(app, base + bad)
        assert out.exit_code == 1 and message in out.output, out.output
    out = runner.invoke(app, ["train-dit", "--store", other_store.uri, "--run-dir", str(run), "--preset", "debug"])
    assert out.exit_code == 1 and "Resuming needs the same store" in out.output


def test_model_follows_the_store(store):
    """C, H and the class count come from the store's spec; the size and overrides from the config."""
    m = model_config_for(_cfg(), store)
    assert (m.in_channels, m.input_size, m.num_classes, m.hidden_size, m.head_hidden_size) == (8, 4, 4, 64, 128)
    assert model_config_for(_cfg("model.num_classes=10"), store).num_classes == 10
    assert set(PRESETS) == {"dit_dh_s_dinov2_256", "dit_dh_b_dinov2_256", "dit_dh_xl_dinov2_256",
                            "dit_dh_xl_dinov2_512", "dit_xl_dinov2_256", "dit_dh_s_dinov2_256_ag_guide", "debug"}


@pytest.mark.timeout(120)
def test_store_and_run_directory_on_s3(s3_endpoint, tmp_path):
    """Every path is an fsspec URI: store and run directory on an S3 endpoint, train, then resume."""
    import uuid

    prefix = f"s3://test-bucket/train-dit-{uuid.uuid4().hex[:8]}"
    s3_store = _store(f"{prefix}/store", n=16)
    run = f"{prefix}/run"
    first = _train(_cfg("train.max_steps=2", "data.global_batch=8"), s3_store, run)
    assert first.checkpoint == f"{run}/checkpoints/step-0000002"
    second = _train(_cfg("train.max_steps=3", "data.global_batch=8"), s3_store, run)
    assert second.resumed_from == first.checkpoint and read_meta(run).step == 3
    from pipeline import uri as uri_lib

    assert uri_lib.read_json(f"{run}/config.json")["train"]["max_steps"] == 3
    steps = [json.loads(line)["step"] for line in uri_lib.read_bytes(f"{run}/logs/metrics.jsonl").splitlines()]
    assert steps == [2, 3]


@pytest.mark.timeout(120)
def test_stats_file_is_used_recorded_and_required_on_resume(store, tmp_path):
    """--stats: a reference-style stat.pt with the variance only; resuming needs the same statistics."""
    stat = tmp_path / "stat.pt"
    var = torch.full(SHAPE, 4.0)
    torch.save({"var": var}, stat)
    run = tmp_path / "run"
    _train(_cfg("train.max_steps=1", "data.global_batch=8"), store, run, stats=str(stat))
    ckpt = load_checkpoint(str(run))
    assert ckpt.meta.statistics == {"mean": False, "var": True, "source": f"file:{stat}"}
    assert set(ckpt.stats) == {"var"} and torch.equal(ckpt.stats["var"], var)
    with pytest.raises(TrainError, match=f"statistics from file:{stat}; this run would use store"):
        DiTTrainer(_cfg("train.max_steps=2", "data.global_batch=8"), store.uri, str(run))
    assert _train(_cfg("train.max_steps=2", "data.global_batch=8"), store, run, stats=str(stat)).step == 2


@pytest.mark.timeout(120)
def test_stats_mode_var_trains_with_the_variance_alone_and_is_recorded(store, tmp_path):
    """data.stats_mode=var (--stats-mode var): latents divided by sqrt(var + eps), mean zero, as the
    released DiT^DH-XL; the checkpoint holds the variance alone and records the mode; resuming
    with the other mode is refused, naming it."""
    from trainer.loading import load_dit

    run = tmp_path / "run"
    trainer = DiTTrainer(_cfg("train.max_steps=1", "data.global_batch=8", "data.stats_mode=var"), store.uri, str(run))
    mean, var = store.stats()
    assert trainer.normalizer.mean is None and np.allclose(trainer.normalizer.var.numpy(), var)
    assert "statistics store (var)" in trainer.describe_run()
    x = torch.from_numpy(store.read_rows(0, 2)).float()
    torch.testing.assert_close(trainer.normalizer.normalize(x), x / torch.sqrt(torch.from_numpy(var).float() + 1e-5))
    trainer.train()
    ckpt = load_checkpoint(str(run))
    assert ckpt.meta.statistics == {"mean": False, "var": True, "source": "store"} and set(ckpt.stats) == {"var"}
    assert ckpt.meta.extra["stats_mode"] == "var" and ckpt.meta.config["data"]["stats_mode"] == "var"
    assert load_dit(str(run)).stats_mode == "var" and load_dit(str(run)).normalizer.mean is None
    with pytest.raises(TrainError, match=r"the same data.stats_mode \(the run's: var; now: mean_var\)"):
        DiTTrainer(_cfg("train.max_steps=2", "data.global_batch=8"), store.uri, str(run))
    # The command-line flag is the config key.
    from pipeline.cli import app

    out = CliRunner().invoke(app, ["train-dit", "--store", store.uri, "--run-dir", str(run), "--preset", "debug",
                                   "--stats-mode", "var", "--print-config"])
    assert out.exit_code == 0 and json.loads(out.stdout)["data"]["stats_mode"] == "var", out.output


def test_keep_epoch_steps_end_each_epoch():
    assert keep_epoch_steps([14], 1_281_167, 1024) == {17516: 14}  # ImageNet-1k train, global batch 1024
    assert 17515 * 1024 < 14 * 1_281_167 <= 17516 * 1024
    assert keep_epoch_steps([2, 1, 2], 48, 10) == {5: 1, 10: 2}
    assert keep_epoch_steps([], 48, 8) == {}


@pytest.mark.timeout(120)
def test_keep_epochs_checkpoints_are_saved_and_never_pruned(store, tmp_path):
    """train.keep_epochs=[1,2] on 48 samples in batches of 8: the steps ending epochs 1 and 2 (6, 12)
    are saved although ckpt_every (5) does not land on them, and survive pruning (keep_last 1),
    also in a resumed run whose config no longer lists them."""
    run = tmp_path / "run"
    common = ["data.global_batch=8", "train.ckpt_every=5", "train.keep_last=1", "train.keep_every=0"]
    trainer = DiTTrainer(_cfg(*common, "train.max_steps=14", "train.keep_epochs=[1,2,9]"), store.uri, str(run))
    assert "keeping the checkpoints ending epoch 1 at step 6, epoch 2 at step 12, epoch 9 at step 54 (after the " \
        "last step: not reached)" in trainer.describe_run()
    assert trainer.train().step == 14
    assert [e.step for e in list_checkpoints(str(run)) if e.complete] == [6, 12, 14]
    for step, epoch in ((6, 1), (12, 2)):
        meta = read_meta(str(run / "checkpoints" / f"step-{step:07d}"))
        assert meta.extra["keep"] == f"the step ending epoch {epoch} (train.keep_epochs)"
        assert meta.samples_seen == epoch * 48 and meta.epoch == pytest.approx(epoch)
    assert "keep" not in read_meta(str(run)).extra
    _train(_cfg(*common, "train.max_steps=16"), store, run)
    assert [e.step for e in list_checkpoints(str(run)) if e.complete] == [6, 12, 16]


def _decoder_ckpt(run_dir, encoder=None, in_channels=SHAPE[0]) -> str:
    """A tiny decoder of `store`'s 8x4x4 latents (4x4 patches: 16x16 px)."""
    from trainer.checkpoint import save_checkpoint
    from trainer.models.decoder import RAEDecoder, decoder_config

    torch.manual_seed(3)
    model = RAEDecoder(decoder_config("decoder_tiny", in_channels=in_channels, num_tokens=SHAPE[1] * SHAPE[2],
                                      patch_size=4))
    meta = {"kind": "decoder", "epoch": 1.0, "samples_seen": 16, "config": {"preset": "test"},
            "model": model_meta(model), "store": None, "encoder": encoder, "statistics": None}
    return save_checkpoint(str(run_dir), 1, model_state=model, ema_state=model.state_dict(), meta=meta)


def test_preview_grids_with_a_decoder(store, tmp_path):
    """--preview-decoder: a grid at each checkpoint (or every train.preview_every steps and at the
    end), equal to what `sample` makes of that step's checkpoint (EMA, equal labels, the seed's noise)."""
    from PIL import Image

    from pipeline.cli import app
    from trainer.images import image_grid
    from trainer.loading import load_decoder, load_dit
    from trainer.sample import SampleConfig, SamplingJob
    from trainer.sampling import sample_labels

    decoder = _decoder_ckpt(tmp_path / "decoder")
    run = tmp_path / "run"
    out = CliRunner().invoke(app, [
        "train-dit", "--store", store.uri, "--run-dir", str(run), "--preset", "debug", "--preview-decoder", decoder,
        *[a for kv in [*QUIET, "train.max_steps=4", "train.ckpt_every=2", "train.preview_num=6",
                       "train.preview_steps=5"] for a in ("--set", kv)]])
    assert out.exit_code == 0, out.output
    assert sorted(os.listdir(run / "previews")) == ["step-0000002.png", "step-0000004.png"]
    shown = np.asarray(Image.open(run / "previews" / "step-0000004.png").convert("RGB"))
    dit, dec = load_dit(str(run)), load_decoder(decoder)
    labels = sample_labels("equal", 6, store.spec["classes"]["num_classes"], class_order=True)
    job = SamplingJob(SampleConfig(num=6, steps=5, seed=0), dit, dec, None, labels, torch.device("cpu"))
    expected = image_grid(job.sample_indices(range(6)))
    assert shown.shape == expected.shape and np.abs(shown.astype(int) - expected).max() <= 1

    run2 = tmp_path / "run2"
    _train(_cfg("train.max_steps=4", "train.ckpt_every=10", "train.preview_every=3", "train.preview_num=2",
                "train.preview_steps=3"), store, run2, preview_decoder=decoder)
    assert sorted(os.listdir(run2 / "previews")) == ["step-0000003.png", "step-0000004.png"]

    other = _decoder_ckpt(tmp_path / "other", in_channels=4)
    with pytest.raises(TrainError, match="--preview-decoder: decoder .* reads 4 x 4 x 4 latents; store .* 8 x 4 x 4"):
        DiTTrainer(_cfg(), store.uri, str(tmp_path / "run3"), preview_decoder=other)


def test_errors_from_dataloader_workers_are_one_line():
    from pipeline.cli.common import error_line
    from pipeline.store import StoreError

    worker = StoreError("Caught StoreError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 3, in f\n    raise StoreError(...)\n'
                        "pipeline.store.StoreError: store s3://b/s: reading latents[8:16] failed in shard(s) [0]\n")
    assert error_line(worker) == "store s3://b/s: reading latents[8:16] failed in shard(s) [0]"
    assert error_line(StoreError("plain message")) == "plain message"
