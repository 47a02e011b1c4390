"""Typed config trees: presets, overrides, errors that name the key."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, all_keys, apply_overrides, from_dict, resolve_preset, to_dict


@dataclass
class Optim:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float | None = 1.0


@dataclass
class Cfg:
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    steps: int = 10
    compile: bool = False
    name: str = "x"
    optim: Optim = field(default_factory=Optim)


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Cfg(), ["dtype=bfloat16", "steps=20", "compile=true", "optim.lr=1e-3",
                                  "optim.betas=[0.8,0.9]", "optim.clip=none", "name=123"])
    assert cfg == Cfg("bfloat16", 20, True, "123", Optim(1e-3, (0.8, 0.9), None))
    assert apply_overrides(Cfg(), ["optim.betas=0.5,0.6"]).optim.betas == (0.5, 0.6)


def test_literal_rejects_other_values():
    with pytest.raises(ConfigError, match="dtype"):
        apply_overrides(Cfg(), ["dtype=int8"])


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*valid keys:.*optim\.lr"):
        apply_overrides(Cfg(), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(Cfg(), ["steps"])
    with pytest.raises(ConfigError, match="section"):
        apply_overrides(Cfg(), ["optim=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(Cfg(), ["steps=1.5"])
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(Cfg, {"bogus": 1})


def test_round_trip_and_presets():
    cfg = apply_overrides(Cfg(), ["optim.lr=0.5"])
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert "optim.betas" in all_keys(Cfg)
    presets = {"a": Cfg, "b": lambda: Cfg(steps=3)}
    assert resolve_preset(presets, "b", ["steps=4"]).steps == 4
    with pytest.raises(ConfigError, match="known presets: a, b"):
        resolve_preset(presets, "c")


@dataclass
class Keep:
    epochs: list[int] = field(default_factory=list)


def test_list_values_from_the_command_line():
    """`--set train.keep_epochs=[14]` and its spellings: a JSON list, one value, or a comma list."""
    assert apply_overrides(Keep(), ["epochs=[14]"]).epochs == [14]
    assert apply_overrides(Keep(), ["epochs=[14, 28]"]).epochs == [14, 28]
    assert apply_overrides(Keep(), ["epochs=14"]).epochs == [14]
    assert apply_overrides(Keep(), ["epochs=14,28"]).epochs == [14, 28]
    assert apply_overrides(Keep([3]), ["epochs=[]"]).epochs == []
    assert from_dict(Keep, to_dict(Keep([14]))) == Keep([14])
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        apply_overrides(Keep(), ["epochs=[1.5]"])
    with pytest.raises(ConfigError, match="epochs: cannot parse"):
        apply_overrides(Keep(), ["epochs=[a]"])
