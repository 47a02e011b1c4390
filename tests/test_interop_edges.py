"""The edges of import-rae / export-rae (trainer/interop.py, pipeline/cli/interop.py) and the identity
checks of sample and reconstruct (trainer/loading.py): a model of a width none of our encoders has,
imported with ``--encoder none``, and export naming the weights of an imported checkpoint. The
published-file builders are those of tests/test_interop.py (written from docs/checkpoint-format.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cli import app
from tests.test_fit_decoder import encoded_store
from tests.test_interop import _cli, decoder_manifest, dit_dh_manifest, random_published, runner
from trainer.checkpoint import load_checkpoint, read_meta, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread

# A DiT^DH and a decoder on 8 x 4 x 4 latents: a width (8) none of our encoders (768) has.
TINY_DIT = dict(C=8, G=4, D0=32, depth0=2, heads0=2, D1=48, depth1=2, heads1=3, classes=10, freqs=32)
TINY_DECODER = dict(C=8, T=16, D=64, depth=2, mlp=128, patch=16)  # decoder_tiny: heads from the size table


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    dit, decoder = str(root / "dit.pt"), str(root / "decoder.pt")
    torch.save(random_published(dit_dh_manifest(**TINY_DIT), seed=40), dit)
    torch.save(random_published(decoder_manifest(**TINY_DECODER), seed=41), decoder)
    return dit, decoder


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("WARNING: no encoder identity could be checked")]


@pytest.mark.timeout(120)
def test_encoder_none_imports_a_custom_width_that_sample_and_reconstruct_accept(tiny_files, tmp_path):
    dit, decoder = tiny_files
    refused = runner.invoke(app, ["import-rae", "--dit", dit, "--decoder", decoder, "--encoder", "dinov2",
                                  "--out", str(tmp_path / "as-dinov2")])
    assert refused.exit_code == 1 and "dinov2 at 256px gives 768 x 16 x 16" in refused.output

    res = runner.invoke(app, ["import-rae", "--dit", dit, "--decoder", decoder, "--encoder", "none",
                              "--out", str(tmp_path / "imported")])
    assert res.exit_code == 0, res.output
    assert "no encoder identity recorded (--encoder none)" in res.stderr
    imported = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())
    for kind in ("dit", "decoder"):
        meta = read_meta(imported[kind])
        assert meta.encoder is None and meta.config["import"]["encoder"] is None and "imported" in meta.extra

    # sample: the pair is accepted on its shapes, with one warning line naming both checkpoints.
    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--dit-ckpt", imported["dit"], "--decoder-ckpt", imported["decoder"],
                              "--out", str(out), "--num", "2", "--steps", "3", "--labels", "1,2", "--no-progress"])
    assert res.exit_code == 0, res.output
    warned = _warnings(res.stderr)
    assert len(warned) == 1 and imported["dit"] in warned[0] and imported["decoder"] in warned[0]
    assert "8 x 4 x 4" in warned[0]
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 64, 64, 3)

    # reconstruct: a store that knows its encoder, latents of the decoder's shape: accepted, warned.
    store, _ = encoded_store(tmp_path / "enc", n=2, channels=8, grid=4)
    res = runner.invoke(app, ["reconstruct", "--decoder-ckpt", imported["decoder"], "--store", store.uri,
                              "--out", str(tmp_path / "recon.png"), "--num", "2"])
    assert res.exit_code == 0, res.output
    assert len(_warnings(res.stderr)) == 1 and "imported with --encoder none" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["num"] == 2 and summary["output_size"] == 64 and "--encoder none" in summary["warning"]

    # ... but not latents of another shape: the shapes are what is still checked.
    other, _ = encoded_store(tmp_path / "enc16", n=2, channels=8, grid=16)
    res = runner.invoke(app, ["reconstruct", "--decoder-ckpt", imported["decoder"], "--store", other.uri,
                              "--out", str(tmp_path / "other.png")])
    assert res.exit_code == 1 and "reads 8 x 4 x 4 latents" in res.output
    assert not (tmp_path / "other.png").exists()


@pytest.mark.timeout(60)
def test_reconstruct_still_refuses_a_decoder_without_identity_that_was_not_imported(tiny_files, tmp_path):
    """A decoder trained on a synthetic store records no identity either; nobody vouched for it."""
    imported = _cli(["import-rae", "--decoder", tiny_files[1], "--encoder", "none", "--out", str(tmp_path / "imp")])
    ck = load_checkpoint(imported["decoder"])
    meta = {"kind": "decoder", "epoch": 1.0, "samples_seen": 8, "config": {"test": True}, "model": ck.meta.model,
            "store": {"store_id": "synthetic", "uri": "memory://synthetic", "latent_shape": [8, 4, 4]}}
    synthetic = save_checkpoint(str(tmp_path / "synthetic"), 3, model_state=ck.model_state, meta=meta)
    store, _ = encoded_store(tmp_path / "enc", n=2, channels=8, grid=4)
    res = runner.invoke(app, ["reconstruct", "--decoder-ckpt", synthetic, "--store", store.uri,
                              "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 1 and "records no encoder identity" in res.output and "--encoder none" in res.output


@pytest.mark.timeout(60)
def test_export_of_an_imported_training_checkpoint_says_which_weights_it_writes(tmp_path):
    manifest = dit_dh_manifest(**TINY_DIT)
    model_sd, ema_sd = random_published(manifest, seed=50), random_published(manifest, seed=51)
    training = str(tmp_path / "train.pt")
    torch.save({"step": 70, "epoch": 2, "model": model_sd, "ema": ema_sd}, training)
    imported = _cli(["import-rae", "--dit", training, "--encoder", "none", "--out", str(tmp_path / "imp")])

    res = runner.invoke(app, ["export-rae", "--ckpt", imported["dit"], "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    assert f"exported the imported weights: the ema weights of the training checkpoint {training}" in res.stderr
    assert "no ema" not in res.stderr.lower()
    back = torch.load(dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())["dit"], weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in ema_sd.items())

    # Our own checkpoints: the EMA weights when there are some, else the model's, said as such.
    ck = load_checkpoint(imported["dit"])
    meta = {"kind": "dit", "epoch": 1.0, "samples_seen": 8, "config": {"test": True}, "model": ck.meta.model}
    with_ema = save_checkpoint(str(tmp_path / "ours-ema"), 5, model_state=model_sd, ema_state=ema_sd, meta=meta)
    without = save_checkpoint(str(tmp_path / "ours"), 5, model_state=model_sd, meta=meta)
    res = runner.invoke(app, ["export-rae", "--ckpt", with_ema, "--out", str(tmp_path / "e1")])
    assert res.exit_code == 0 and "exported the EMA weights" in res.stderr
    res = runner.invoke(app, ["export-rae", "--ckpt", without, "--out", str(tmp_path / "e2")])
    assert res.exit_code == 0 and "exported the trained model weights (the checkpoint has no EMA weights)" in res.stderr
