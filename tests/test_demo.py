"""``make demo`` (pipeline.cli.demo): every stage after encode on the session's sample store, with
tiny step counts; the report must show each stage's output, and the random-weights banner must be
printed."""
import os
import re

import numpy as np
import pytest

from pipeline.cli import demo


@pytest.mark.timeout(600)
def test_demo_runs_every_stage_and_writes_the_report(sample_store, tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = demo.DemoConfig(
        out=str(out), store=sample_store, num_samples=4, sample_steps=3,
        decoder_overrides=("train.max_steps=2",),
        dit_overrides=("train.max_steps=3", "train.preview_num=4", "train.preview_steps=3"),
    )
    report = demo.run_demo(cfg)
    printed = capsys.readouterr().out
    assert "DEMO WITH RANDOM WEIGHTS" in printed
    assert f"report: {report}" in printed

    text = open(report).read()
    assert "**Random weights.**" in text
    for stage in ("encode", "fit-decoder", "train-dit", "sample", "evaluate", "reconstruct"):
        assert re.search(rf"^\| {stage} \|", text, re.M), stage
    # Every image the report links exists and is a PNG.
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 4
    for rel in images:
        with open(out / rel, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", rel
    with np.load(out / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape[0] == 4 and z["arr_0"].dtype == np.uint8
    assert re.search(r"^\| fid \| \d", text, re.M)
    assert '"store_id"' in text  # the spec is embedded
    assert os.path.exists(out / "metrics.json")
