"""The edges of the training commands a hostile or unlucky user hits (issue 12, items 3 and 6): bad
``--set data.*`` values and ``--stats`` files end as one line with nothing written; a SIGTERM saves
and exits 143 so a `&&` chain stops; a corrupt newest checkpoint falls back to the newest intact
one; ``import-rae`` lists every missing key; ``evaluate`` refuses object arrays without unpickling."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import StoreLayout, write_array_store
from trainer.checkpoint import SET_ASIDE_MARKER, list_checkpoints, load_checkpoint
from trainer.loop import SIGTERM_EXIT_CODE, TrainError
from trainer.train_dit import DiTTrainer, resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 4, 4)
QUIET = ["train.progress=false", "train.tensorboard=false"]
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per process


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """48 latents [8, 4, 4], 4 classes, flips; chunks of 4."""
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(48,) + SHAPE).astype(np.float32)
    return write_array_store(
        str(tmp_path_factory.mktemp("store") / "s"), lat, rng.integers(0, 4, 48), latents_flip=-lat, num_classes=4,
        layout=StoreLayout(dtype="float32", samples_per_shard=16, samples_per_chunk=4),
    )


def _sets(*overrides: str) -> list[str]:
    return sum((["--set", s] for s in [*QUIET, *overrides]), [])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]


def _assert_one_line(result, *names: str) -> str:
    """Exit code 1, no traceback, stderr one ``Error:`` line naming each of ``names``."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# item 3: bad data settings and statistics files are one line, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,named", [
    (["data.global_batch=0"], "data.global_batch must be >= 1, got 0"),
    (["data.global_batch=-4"], "data.global_batch must be >= 1, got -4"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
    (["data.num_streams=3"], "data.global_batch 16 is not divisible by data.num_streams 3"),
    (["data.num_streams=0"], "data.num_streams must be >= 1"),
    (["train.grad_accum_steps=3"], "data.global_batch 16 is not divisible by train.grad_accum_steps 3"),
    # Needs the store to tell: more streams than valid samples (a loader check, also one line).
    (["data.global_batch=64", "data.num_streams=64"], "data.num_streams 64 exceeds the store's 48 valid samples"),
])
def test_bad_data_settings_are_one_line_and_write_nothing(store, tmp_path, overrides, named):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-dit", "--store", store.uri, "--run-dir", str(run), "--preset", "debug",
                                 *_sets(*overrides)])
    _assert_one_line(result, named)
    assert not run.exists()


class _RunsCodeOnLoad:
    """Unpickling it would create a marker file (a malicious pickle could do worse)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_statistics_files_are_one_line_and_write_nothing(store, tmp_path):
    marker = tmp_path / "code_ran"
    with open(tmp_path / "evil.pt", "wb") as f:  # a plain pickle, as a hostile stat.pt would be
        pickle.dump({"var": _RunsCodeOnLoad(str(marker))}, f)
    torch.save({"mean": torch.zeros(3, 4, 4), "var": torch.ones(3, 4, 4)}, tmp_path / "wrong.pt")
    cases = {"missing.pt": "does not exist", "evil.pt": "refused", "wrong.pt": "[3, 4, 4]"}
    for name, says in cases.items():
        run = tmp_path / f"run-{name}"
        stats = str(tmp_path / name)
        result = runner.invoke(app, ["train-dit", "--store", store.uri, "--run-dir", str(run), "--preset", "debug",
                                     "--stats", stats, *_sets()])
        _assert_one_line(result, stats, says)
        assert not run.exists(), name
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# item 6a: SIGTERM saves, then the command exits 143
# ---------------------------------------------------------------------------------------------


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_saves_then_train_dit_exits_143(store, tmp_path):
    """Exit 143 (not 0): `train-dit ... && sample ...` stops at an unfinished model."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "train-dit", "--store", store.uri, "--run-dir", str(run),
           "--preset", "debug", *_sets("train.max_steps=100000", "train.log_every=1", "train.ckpt_every=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "logs" / "metrics.jsonl"
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.stat().st_size > 0:  # training: the handler is installed
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == SIGTERM_EXIT_CODE == 143, err[-3000:]
    assert f"exit code {SIGTERM_EXIT_CODE}" in err and "Traceback" not in err
    step = load_checkpoint(str(run)).step
    assert 1 <= step < 100000 and f"trained to step {step} (sigterm)" in out


@pytest.mark.timeout(120)
def test_sigterm_saves_then_fit_decoder_exits_143(tmp_path):
    from tests.test_fit_decoder import CHEAP, encoded_store

    dstore, _ = encoded_store(tmp_path, n=4)
    run = tmp_path / "run"
    metrics = run / "logs" / "metrics.jsonl"

    from tests.test_train_dit import sigterm_once_logging

    sender = sigterm_once_logging(metrics, timeout_s=90, poll_s=0.02)
    sets = sum((["--set", s] for s in CHEAP + ["data.global_batch=4", "train.max_steps=100000", "train.epochs=null",
                                               "train.log_every=1", "train.ckpt_every=100000"]), [])
    result = runner.invoke(app, ["fit-decoder", "--store", dstore.uri, "--run-dir", str(run), "--preset", "debug",
                                 *sets])
    sender.join()
    assert result.exit_code == SIGTERM_EXIT_CODE, (result.output, result.exception)
    step = load_checkpoint(str(run)).step
    assert 1 <= step < 100000 and f"trained to step {step} (sigterm)" in result.stdout


# ---------------------------------------------------------------------------------------------
# item 6c: a corrupt newest checkpoint: resume from the newest intact one, saying so
# ---------------------------------------------------------------------------------------------


def _cfg(*overrides: str):
    return resolve_config("debug", [*QUIET, "data.global_batch=8", "train.ckpt_every=2", "train.keep_last=5",
                                    *overrides])


def _corrupt(ckpt_uri: str) -> None:
    path = os.path.join(ckpt_uri, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-8:] = bytes(8)  # the last tensor bytes: the file still parses, its hash no longer matches
    open(path, "wb").write(bytes(data))


@pytest.mark.timeout(120)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(store, tmp_path, capsys):
    run = tmp_path / "run"
    DiTTrainer(_cfg("train.max_steps=4"), store.uri, str(run)).train()
    entries = list_checkpoints(str(run))
    assert [(e.step, e.complete) for e in entries] == [(2, True), (4, True)]
    _corrupt(entries[-1].uri)
    capsys.readouterr()
    result = DiTTrainer(_cfg("train.max_steps=6"), store.uri, str(run)).train()
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and entries[-1].uri in warning[0] and "model.safetensors is corrupt" in warning[0]
    assert f"resuming from checkpoint {entries[0].uri} at step 2" in out
    assert result.resumed_from == entries[0].uri and result.step == 6
    # Step 4 was trained again and saved over the set-aside folder; everything now reads intact.
    assert [(e.step, e.complete) for e in list_checkpoints(str(run))] == [(2, True), (4, True), (6, True)]
    assert all(load_checkpoint(e.uri).step == e.step for e in list_checkpoints(str(run)))


@pytest.mark.timeout(120)
def test_no_intact_checkpoint_is_one_clear_error(store, tmp_path):
    run = tmp_path / "run"
    DiTTrainer(_cfg("train.max_steps=4"), store.uri, str(run)).train()
    entries = list_checkpoints(str(run))
    for e in entries:
        _corrupt(e.uri)
    result = runner.invoke(app, ["train-dit", "--store", store.uri, "--run-dir", str(run), "--preset", "debug",
                                 *_sets("data.global_batch=8", "train.max_steps=6")])
    _assert_one_line(result, "no intact checkpoint", "step-0000002", "step-0000004")
    # Set aside, files kept: nothing lists them as complete any more.
    assert all(os.path.exists(os.path.join(e.uri, SET_ASIDE_MARKER)) for e in entries)
    assert not any(e.complete for e in list_checkpoints(str(run)))
    with pytest.raises(TrainError, match="no intact checkpoint"):  # the next run too: no silent restart
        DiTTrainer(_cfg("train.max_steps=6"), store.uri, str(run))


# ---------------------------------------------------------------------------------------------
# item 6b: import-rae lists every missing key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deleted", [
    ("s_embedder.proj.weight", "x_embedder.proj.weight"),  # both embedders: the class is still known
    ("enc_feat_rope.freqs_cos", "blocks.1.attn.proj.bias"),  # heads cannot be inferred, a block key gone
    ("pos_embed", "final_layer.norm_final.weight", "s_projector.bias"),
])
def test_import_rae_reports_every_missing_architecture_key(tmp_path, deleted):
    from tests.test_interop import TINY, dit_dh_manifest, random_published
    from trainer.interop import import_dit_weights
    from trainer.published import LayoutMismatchError

    sd = random_published(dit_dh_manifest(**TINY), seed=1)
    path = str(tmp_path / "dit.pt")
    torch.save({k: v for k, v in sd.items() if k not in deleted}, path)
    with pytest.raises(LayoutMismatchError) as info:
        import_dit_weights(path)
    assert info.value.missing == sorted(deleted)
    out = tmp_path / "out"
    result = runner.invoke(app, ["import-rae", "--dit", path, "--encoder", "dinov2", "--out", str(out)])
    assert result.exit_code == 1 and f"missing ({len(deleted)})" in result.stderr
    assert all(k in result.stderr for k in deleted) and not out.exists()


def test_import_of_a_decoder_reports_every_missing_architecture_key(tmp_path):
    from tests.test_interop import decoder_manifest, random_published
    from trainer.interop import import_decoder_weights
    from trainer.published import LayoutMismatchError

    sd = random_published(decoder_manifest(C=8, T=16, D=64, depth=2, mlp=128, patch=4), seed=1)
    deleted = ("decoder_embed.weight", "decoder_norm.bias")
    torch.save({k: v for k, v in sd.items() if k not in deleted}, tmp_path / "dec.pt")
    with pytest.raises(LayoutMismatchError) as info:
        import_decoder_weights(str(tmp_path / "dec.pt"))
    assert info.value.missing == sorted(deleted)


# ---------------------------------------------------------------------------------------------
# item 3: evaluate refuses object arrays, without unpickling them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_evaluate_refuses_an_npz_of_object_arrays_in_one_line(tmp_path, compressed):
    marker = tmp_path / "code_ran"
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((8, 8, 3), np.uint8), _RunsCodeOnLoad(str(marker))
    samples = tmp_path / "samples.npz"
    (np.savez_compressed if compressed else np.savez)(samples, arr_0=images)
    result = runner.invoke(app, ["evaluate", "--samples", str(samples), "--ref", str(samples),
                                 "--inception-weights", "random", "--device", "cpu", "--no-progress"])
    _assert_one_line(result, str(samples), "'arr_0'", "Python objects")
    assert not marker.exists() and not (tmp_path / "samples.metrics.json").exists()
