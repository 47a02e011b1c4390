"""Model registry: the class name stored in checkpoint meta -> how to rebuild that model.

Every checkpoint's ``meta["model"]`` is ``{"class": name, "config": {...}}`` (see
``schemas/checkpoint_v1.py``), written by :func:`model_meta`. :func:`build_model_from_meta` turns it
back into a model with freshly initialized weights and the same architecture, with no flags, so
sampling, evaluation and fine-tuning need only a checkpoint. Loading the weights is the caller's
step (``model.load_state_dict(ckpt.model_state)``).

Each entry names a module, the model class in it, the config dataclass its constructor takes and
the attribute where an instance keeps that config. Modules are imported on first use, so a stage
pays only for the models it builds.

Registered: ``DiTDH`` and ``DiT`` (``trainer/models/dit.py``) and the decoder hook ``RAEDecoder``
(``trainer/models/decoder.py``, ``RAEDecoder(DecoderConfig)`` with the config in ``.config``); the
decoder stage owns that entry and should cover it with its own round-trip test. A new model class
adds one :class:`ModelSpec` line here (or calls :func:`register_model`).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn

from schemas.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a registered model lives and how it is configured."""

    module: str  # dotted module path, imported on first use
    class_name: str  # the nn.Module subclass in that module
    config_class: str  # the dataclass (same module) the constructor takes as its only argument
    config_attr: str  # attribute of an instance that holds that config

    def load_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.class_name)

    def load_config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_class)


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "DiTDH": ModelSpec("trainer.models.dit", "DiTDH", "DiTConfig", "cfg"),
    "DiT": ModelSpec("trainer.models.dit", "DiT", "DiTConfig", "cfg"),
    # Decoder hook (fit-decoder stage): RAEDecoder(DecoderConfig), config kept in `.config`.
    "RAEDecoder": ModelSpec("trainer.models.decoder", "RAEDecoder", "DecoderConfig", "config"),
}


class UnknownModelError(UserError, ValueError):
    """A model class name (from checkpoint meta, usually) that is not registered."""


def register_model(name: str, spec: ModelSpec) -> None:
    """Add (or replace) a registry entry, e.g. for an experimental model outside this package."""
    MODEL_REGISTRY[name] = spec


def _spec(name: str) -> ModelSpec:
    if name not in MODEL_REGISTRY:
        raise UnknownModelError(f"model class {name!r} is not registered; known: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[name]


def registered_name(model: nn.Module) -> str:
    """The registry name of a model instance (wrappers such as DDP and torch.compile are looked through)."""
    from trainer.checkpoint import unwrap_model

    model = unwrap_model(model)
    cls = type(model)
    for name, spec in MODEL_REGISTRY.items():
        if spec.class_name == cls.__name__ and spec.module == cls.__module__:
            return name
    raise UnknownModelError(
        f"{cls.__module__}.{cls.__qualname__} is not a registered model; add it to trainer.models.MODEL_REGISTRY"
    )


def model_meta(model: nn.Module) -> dict[str, Any]:
    """``{"class": name, "config": {...}}`` for checkpoint meta: JSON-safe (tuples become lists)."""
    from trainer.checkpoint import unwrap_model

    name = registered_name(model)
    return config_meta(name, getattr(unwrap_model(model), MODEL_REGISTRY[name].config_attr))


def config_meta(name: str, config: Any) -> dict[str, Any]:
    """``{"class": name, "config": {...}}`` of a registered model's config dataclass (JSON-safe)."""
    return {"class": name, "config": _json_safe(dataclasses.asdict(config))}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def model_config_from_meta(meta_model: dict) -> Any:
    """The config dataclass of ``meta["model"]`` (unknown keys are a ConfigError naming them)."""
    from pipeline.config import from_dict

    if not isinstance(meta_model, dict) or "class" not in meta_model or "config" not in meta_model:
        raise ValueError(f"model meta must be {{'class': name, 'config': {{...}}}}, got {meta_model!r}")
    spec = _spec(meta_model["class"])
    return from_dict(spec.load_config_class(), meta_model["config"], prefix="model.config.")


def build_model_from_meta(meta_model: dict) -> nn.Module:
    """A freshly initialized model of the architecture recorded in ``meta["model"]`` (on the CPU)."""
    config = model_config_from_meta(meta_model)
    return _spec(meta_model["class"]).load_class()(config)
