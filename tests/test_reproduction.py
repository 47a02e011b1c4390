"""README's "Reproducing the paper": its commands run, and its presets are what its table says.

The table of paper-vs-released-code choices is written out below (``TABLE``: each preset's values)
and checked three ways: every ``key=value`` of the README table's "our preset" column is one of
``TABLE``'s, every README command's preset resolves (``--print-config``) to ``TABLE``'s values, and
every README command runs through the CLI in-process, shrunk (tiny models, a few steps, random
weights, the built-in sample data instead of ImageNet).
"""
from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
runner = CliRunner()

# The README table's "our preset" values, per preset the README commands use.
_FP32 = {"train.precision": "fp32", "train.tf32": True}
_DECODER = {**_FP32, "loss.noise_rule": "uniform", "loss.noise_tau": 0.8}
TABLE = {
    "dit_dh_xl_dinov2_256": {**_FP32, "data.stats_mode": "var", "train.epochs": 800.0},
    "dit_dh_s_dinov2_256_ag_guide": {**_FP32, "data.stats_mode": "var", "train.epochs": 14.0,
                                     "train.keep_epochs": [14]},
    "decoder_b_dinov2": {**_DECODER, "data.mode": "cached"},
    "decoder_b_dinov2_reference": {**_DECODER, "data.mode": "encode_on_the_fly"},
    "decoder_xl_dinov2": {**_DECODER, "data.mode": "cached"},
}
MODEL_SIZES = {"dit_dh_xl_dinov2_256": "dit_dh_xl", "dit_dh_s_dinov2_256_ag_guide": "dit_dh_s",
               "decoder_b_dinov2": "decoder_b", "decoder_b_dinov2_reference": "decoder_b",
               "decoder_xl_dinov2": "decoder_xl"}
VARIABLES = {"DATA", "STORES", "RUNS", "ADM_REF"}  # set by the README block; TRAIN_STORE/VAL_STORE by encode


# --------------------------------------------------------------------------------------------
# reading the README section


def section() -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index("### Reproducing the paper")
    return text[start:text.index("\n### ", start + 1)]


def commands() -> tuple[dict[str, str], list[list[str]]]:
    """(the block's variables, its rae-pipeline commands as argument lists without the program)."""
    block = re.search(r"```bash\n(.*?)```", section(), re.S).group(1).replace("\\\n", " ")
    variables, cmds = {}, []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        m = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
        if m:
            variables[m[1]] = m[2]
            continue
        assert line.startswith("rae-pipeline "), line
        cmds.append(shlex.split(line)[1:])
    return variables, cmds


def table_rows() -> dict[str, list[str]]:
    """The table's rows: first cell -> the other cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")]
            for line in section().splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == ["choice", "paper", "released code", "our preset", "the other choice"], header
    return {r[0]: r[1:] for r in body}


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def render(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# the table and the presets


def test_the_table_and_the_presets_agree():
    """README table <-> TABLE <-> each preset's --print-config, and the flags the table names."""
    rows = table_rows()
    assert set(rows) == {"training precision", "DiT epochs", "decoder noise", "decoder data", "DiT statistics",
                         "labels in `samples.npz`, IS splits", "AutoGuidance's weak model"}
    assert not any("TODO" in cell for cells in rows.values() for cell in cells)
    spans = {s for cells in rows.values() for s in re.findall(r"`([\w.]+=[^`\s]+)`", cells[2])}
    assert spans == {f"{k}={render(v)}" for values in TABLE.values() for k, v in values.items()}

    variables, cmds = commands()
    assert set(variables) == VARIABLES
    presets = {option(c, "--preset"): c for c in cmds if "--preset" in c}
    assert set(presets) == set(TABLE)
    for preset, args in presets.items():
        res = runner.invoke(app, args + ["--print-config"])
        assert res.exit_code == 0, res.output
        resolved = flatten(json.loads(res.stdout))
        for key, value in {**TABLE[preset], "model.size": MODEL_SIZES[preset]}.items():
            assert resolved[key] == value, (preset, key, resolved[key])

    samples = [c for c in cmds if c[0] == "sample"]
    assert len(samples) == 2 and all(option(c, "--labels") == "equal" and option(c, "--num") == "50000"
                                     for c in samples)
    guided = [c for c in samples if "--autoguidance-ckpt" in c]
    assert len(guided) == 1 and option(guided[0], "--ag-scale") == "1.42"
    assert option(guided[0], "--autoguidance-ckpt") == option(presets["dit_dh_s_dinov2_256_ag_guide"], "--run-dir")
    assert all(option(c, "--is-splits") == "adm" for c in cmds if c[0] == "evaluate")
    assert "`sample --labels equal`" in rows["labels in `samples.npz`, IS splits"][2]
    assert "`evaluate --is-splits adm`" in rows["labels in `samples.npz`, IS splits"][2]
    assert "`sample --ag-scale 1.42`" in rows["AutoGuidance's weak model"][2]


# --------------------------------------------------------------------------------------------
# the commands, shrunk

_QUIET = ["train.progress=false", "train.tensorboard=false"]
SHRINK = {
    "encode": ["--weights", "random", "--samples-per-shard", "8", "--batch-size", "4", "--num-actors", "1",
               "--threads", "1", "--no-progress", "--set", 'encoder_overrides={"depth": 1}'],
    "fit-decoder": [f"--set={s}" for s in _QUIET + [
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64", "data.global_batch=4",
        "data.num_workers=0", "data.encoder_weights=random", "train.max_steps=1", "train.ckpt_every=1",
        "train.grid_samples=0", "loss.use_lpips=false", "loss.use_gan=false"]],
    "train-dit": [f"--set={s}" for s in _QUIET + [
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.head_hidden_size=64",
        "model.head_depth=1", "model.head_num_heads=2", "data.global_batch=8", "data.num_workers=0",
        "train.grad_accum_steps=1", "train.max_steps=2", "train.ckpt_every=2", "train.log_every=1"]],
    # evaluate needs at least 4 samples
    "sample": ["--num", "4", "--batch-size", "4", "--block-size", "4", "--steps", "2", "--no-progress"],
    "rfid": ["--inception-weights", "random", "--no-progress"],
    "ref-stats": ["--inception-weights", "random", "--no-progress"],
    "evaluate": ["--inception-weights", "random", "--no-progress"],
}
# The guide's kept epoch, shrunk with the run: epoch 1 of the 16 sample images ends at step 2.
SHRINK_GUIDE = ["--set=train.keep_epochs=[1]"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_commands_run_shrunk(ray_local, sample_data_dir, tmp_path):
    from trainer.checkpoint import list_checkpoints, read_meta

    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"  # the reference batch's layout, 4 random images
    np.savez(adm, arr_0=np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))
    env = {"DATA": sample_data_dir, "STORES": str(tmp_path / "stores"), "RUNS": str(tmp_path / "runs"),
           "ADM_REF": str(adm)}
    _, cmds = commands()
    for args in cmds:
        args = [re.sub(r"\$(\w+)", lambda m: env[m[1]], a) for a in args]
        extra = SHRINK[args[0]] + (SHRINK_GUIDE if option(args, "--preset") == "dit_dh_s_dinov2_256_ag_guide" else [])
        res = runner.invoke(app, args + extra)
        assert res.exit_code == 0, f"{shlex.join(args)}\n{res.output[-3000:]}"
        if args[0] == "encode":
            env[f"{option(args, '--split').upper()}_STORE"] = res.stdout.strip().splitlines()[-1]

    runs = tmp_path / "runs"
    guide = list_checkpoints(str(runs / "dit-dh-s-guide"))
    assert [e.step for e in guide] == [2] and read_meta(guide[0].uri).extra.get("keep")
    for name in ("samples-xl", "samples-xl-ag"):
        with np.load(runs / name / "samples.npz") as z:
            assert z["arr_0"].shape == (4, 256, 256, 3)
    assert json.loads((runs / "rfid-decoder-b.json").read_text())["num_images"] == 8
    assert read_meta(str(runs / "decoder-b-reference")).config["data"]["mode"] == "encode_on_the_fly"
