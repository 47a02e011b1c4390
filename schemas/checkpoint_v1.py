"""Checkpoint format v1 (``rae-checkpoint``): one self-describing layout for every stage.

A run directory holds its checkpoints as folders named by step::

    <run_dir>/checkpoints/step-0000100/
        model.safetensors     model weights, plain keys (no ``module.`` / ``_orig_mod.``)
        ema.safetensors       EMA weights, same keys (optional)
        stats.safetensors     latent statistics used for normalization: "mean", "var" (optional)
        <name>.safetensors    further weights, e.g. ``disc`` for the decoder's discriminator (optional)
        state.pt              optimizer, scheduler, grad scaler, RNG, data state; every object is
                              loadable with ``torch.load(weights_only=True)`` (optional)
        meta.json             this module's contract, with the SHA-256 of every file above
        COMPLETE              written last: {"format", "step", "meta_sha256"}

A checkpoint without ``COMPLETE`` is a write that did not finish: readers never pick it. On a
local filesystem the folder is also built under a hidden temporary name and renamed into place;
on object stores the marker-last rule is the guarantee.

``meta.json`` is validated against ``checkpoint_v1.schema.json`` (JSON Schema 2020-12) plus the
cross-field rules in :func:`validate_meta`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.resources
import json
import re
from typing import Any, ClassVar

from schemas.errors import UserError

FORMAT = "rae-checkpoint"
VERSION = 1

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATS_FILE = "stats.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
STATS_KEYS = ("mean", "var")

_STEP_DIR = re.compile(r"^step-(\d+)$")
_EXTRA_WEIGHTS_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class CheckpointMetaError(UserError, ValueError):
    """meta.json (or a meta dict about to become one) breaks the v1 contract."""


def step_dir_name(step: int) -> str:
    """``step-0000100``: zero-padded so names sort like steps up to 10 million."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:07d}"


def parse_step_dir_name(name: str) -> int | None:
    """The step of a ``step-NNNNNNN`` folder name, or None for any other name."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def weights_file_name(name: str) -> str:
    """File name of a further weights group (``disc`` -> ``disc.safetensors``)."""
    if not _EXTRA_WEIGHTS_NAME.match(name) or name in ("model", "ema", "stats"):
        raise ValueError(
            f"weights group name {name!r} must match [a-z0-9][a-z0-9_-]* and not be model/ema/stats"
        )
    return f"{name}.safetensors"


@functools.cache
def json_schema() -> dict:
    """The JSON Schema of meta.json (``schemas/checkpoint_v1.schema.json``)."""
    text = importlib.resources.files("schemas").joinpath("checkpoint_v1.schema.json").read_text()
    return json.loads(text)


@functools.cache
def _validator():
    import jsonschema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_meta(meta: dict, source: str = "meta.json") -> None:
    """Raise :class:`CheckpointMetaError` naming ``source`` and the offending key if ``meta`` is
    not a valid v1 checkpoint meta. Checks the JSON Schema, then rules the schema cannot say:
    statistics flags agree with ``stats.safetensors`` being listed in ``files``."""
    if not isinstance(meta, dict):
        raise CheckpointMetaError(f"{source}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointMetaError(f"{source}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointMetaError(
            f"{source}: checkpoint format version {meta.get('version')!r} is not supported "
            f"(this code reads version {VERSION})"
        )
    errors = sorted(_validator().iter_errors(meta), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:5]:
            where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            lines.append(f"{where}: {err.message}")
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise CheckpointMetaError(f"{source}: invalid checkpoint meta: " + "; ".join(lines) + more)
    stats, files = meta["statistics"], meta["files"]
    if stats is None and STATS_FILE in files:
        raise CheckpointMetaError(f"{source}: {STATS_FILE} is listed in files but statistics is null")
    if stats is not None and STATS_FILE not in files:
        raise CheckpointMetaError(f"{source}: statistics is set but {STATS_FILE} is not listed in files")


def created_by_now() -> dict[str, str]:
    """Versions of the code writing a checkpoint."""
    import torch

    try:
        ours = importlib.metadata.version("rae-pipeline")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"rae_pipeline": ours, "torch": str(torch.__version__)}


@dataclasses.dataclass
class CheckpointMeta:
    """Typed view of meta.json. ``to_dict`` adds ``format``/``version``; ``from_dict`` validates.

    kind: the stage that wrote it ("dit", "decoder", "imported", ...).
    step: optimizer steps taken; epoch: fractional epochs; samples_seen: samples over all ranks.
    config: the resolved stage config. model: {"class": name, "config": {...}} to rebuild the model.
    store: {"store_id", "uri", "latent_shape" [C, H, W]} or None. encoder: encoder identity or None.
    statistics: {"mean": bool, "var": bool, "source": "store" | "file:<uri>" | "imported"} or None.
    data_state: JSON view of the loader position or None. files: {file name: sha256 hex}.
    """

    kind: str
    step: int
    epoch: float
    samples_seen: int
    config: dict
    model: dict
    store: dict | None = None
    encoder: dict | None = None
    statistics: dict | None = None
    data_state: dict | None = None
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    created_by: dict[str, str] = dataclasses.field(default_factory=created_by_now)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    format: ClassVar[str] = FORMAT
    version: ClassVar[int] = VERSION

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "version": VERSION}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, meta: dict, source: str = "meta.json") -> "CheckpointMeta":
        validate_meta(meta, source)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})

    def validate(self, source: str = "meta") -> None:
        validate_meta(self.to_dict(), source)
