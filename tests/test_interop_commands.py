"""The published-layout files, imported, run through the user's commands as they are (``sample``,
``reconstruct``). The file builders are those of tests/test_interop.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.cli import app
from tests.test_fit_decoder import encoded_store
from tests.test_interop import CLI_DIT, _cli, decoder_manifest, dit_dh_manifest, random_published, runner


@pytest.mark.timeout(180)
def test_imported_checkpoints_through_the_sample_and_reconstruct_commands(tmp_path):
    """Published-layout files, imported, drive the user's commands as they are: `sample` rebuilds the
    model, the shift and the imported statistics from the checkpoint alone; `reconstruct` accepts the
    imported decoder on a store of DINOv2-B latents (identity given at import, weight hash unknown)."""
    dit_path, dec_path, stat_path = (str(tmp_path / n) for n in ("dit.pt", "decoder.pt", "stat.pt"))
    torch.save(random_published(dit_dh_manifest(**CLI_DIT), seed=30), dit_path)
    torch.save(random_published(decoder_manifest(C=768, T=256, D=64, depth=2, mlp=128, patch=16), seed=31), dec_path)
    torch.save({"mean": torch.zeros(768, 16, 16), "var": torch.full((768, 16, 16), 2.0)}, stat_path)
    imported = _cli(["import-rae", "--dit", dit_path, "--decoder", dec_path, "--stats", stat_path,
                     "--encoder", "dinov2", "--out", str(tmp_path / "imported")])

    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--dit-ckpt", imported["dit"], "--decoder-ckpt", imported["decoder"],
                              "--out", str(out), "--num", "2", "--steps", "4", "--cfg-scale", "1.5",
                              "--cfg-interval", "0,0.7", "--labels", "3,7", "--no-progress"])
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 256, 256, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [3, 7]
    plan = json.loads((out / "sample.json").read_text())
    text = json.dumps(plan)
    # import-rae records the reference's shift (sqrt(768 * 16 * 16 / 4096)) where train-dit records its own.
    assert "checkpoint:" in text and '"shift_alpha_source": "meta.extra.shift_alpha"' in text
    assert plan["shift_alpha"] == pytest.approx(math.sqrt(48))

    store, _ = encoded_store(tmp_path / "enc", n=2, channels=768, arch="vit_base_patch14_reg4_dinov2")
    res = runner.invoke(app, ["reconstruct", "--decoder-ckpt", imported["decoder"], "--store", store.uri,
                              "--out", str(tmp_path / "recon.png"), "--num", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["num"] == 2 and summary["output_size"] == 256 and np.isfinite(summary["psnr"])
