"""Loading trained checkpoints for use, and the identity checks between them: what sampling,
reconstruction, rFID and train-dit's preview grids share (none of those stages imports another).

- :func:`load_dit`: a DiT^DH / DiT checkpoint with the shift alpha and latent statistics it trained with.
- :func:`load_decoder`: an RAE decoder checkpoint.
- :func:`check_decoder_reads`, :func:`check_compatible`, :func:`check_decoder_for_store`: refuse a
  decoder, DiT or AutoGuidance model made for other latents (encoder identities compared with
  ``schemas.store_v1.encoder_mismatch``; shapes).

Unknown identities. A checkpoint records no encoder identity when it was trained on a synthetic
store or imported with ``import-rae --encoder none`` (a model whose width is none of our encoders').
Sampling and rFID accept such a DiT or decoder when the latent shapes match, and the checks return
a one-line note saying that no identity could be checked (the caller prints it). Reconstruction
against a store, which does know its encoder, accepts an unknown decoder only when it was imported
with ``--encoder none`` (the user vouched for it); a decoder trained on a synthetic store is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from schemas.errors import UserError
from schemas.store_v1 import encoder_identity, encoder_mismatch
from trainer.flow import shift_alpha
from trainer.normalize import STATS_MODES, LatentNormalizer

if TYPE_CHECKING:
    from pipeline.store import LatentStore

WEIGHTS = ("ema", "model")
DIT_CLASSES = ("DiTDH", "DiT")
DECODER_CLASS = "RAEDecoder"


class LoadError(UserError, ValueError):
    """A checkpoint that cannot be used as asked (wrong kind, shape or encoder); says which and why."""


@dataclass
class LoadedDiT:
    """A DiT checkpoint ready to sample: the model (eval mode) and what it was trained with."""

    model: nn.Module
    uri: str  # the checkpoint folder
    weights: str  # "ema" or "model": the weights loaded
    weights_sha256: str  # of the loaded safetensors file (from meta.json)
    latent_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # labels 0..num_classes-1; num_classes is the null label
    shift_alpha: float
    shift_alpha_source: str  # "meta.extra.shift_alpha" | "config.flow" | "latent shape (base 4096)"
    normalizer: LatentNormalizer | None  # None: the model was trained on raw latents
    encoder: dict | None  # encoder identity of the latents it was trained on
    step: int
    stats_mode: str = "mean_var"  # how it used its statistics (trainer.normalize.STATS_MODES)


@dataclass
class LoadedDecoder:
    """A decoder checkpoint: the model (eval mode) and the latents and pixels it maps between."""

    model: nn.Module
    uri: str
    weights: str
    weights_sha256: str
    in_channels: int
    grid: int  # token grid side g (num_tokens = g * g)
    image_size: int  # output side in pixels
    encoder: dict | None
    allow_token_resize: bool
    step: int = 0  # the checkpoint's step
    imported_without_encoder: bool = False  # import-rae --encoder none: no identity, on the user's word


def _load(uri: str, weights: str, classes: Sequence[str], what: str, storage_options: dict | None):
    """(model in eval mode, Checkpoint, weights used, sha256 of their file)."""
    from trainer.checkpoint import load_checkpoint
    from trainer.models import build_model_from_meta

    if weights not in WEIGHTS:
        raise LoadError(f"weights {weights!r} is not one of {list(WEIGHTS)}")
    ck = load_checkpoint(uri, load_train_state=False, storage_options=storage_options)
    cls = ck.meta.model.get("class")
    if cls not in classes:
        raise LoadError(f"{what} {ck.uri} holds a {cls!r} model ({ck.meta.kind!r} checkpoint); "
                          f"expected one of {list(classes)}")
    used = "ema" if weights == "ema" and ck.ema_state is not None else "model"
    model = build_model_from_meta(ck.meta.model)
    model.load_state_dict(ck.ema_state if used == "ema" else ck.model_state, strict=True)
    sha = ck.meta.files.get("ema.safetensors" if used == "ema" else "model.safetensors", "")
    return model.eval().requires_grad_(False), ck, used, sha


def checkpoint_latent_shape(meta) -> tuple[int, int, int]:
    """(C, H, W) a DiT checkpoint generates: its store's latent shape, else its model config's."""
    if meta.store and meta.store.get("latent_shape"):
        c, h, w = (int(v) for v in meta.store["latent_shape"])
        return c, h, w
    conf = meta.model["config"]
    return int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"])


def checkpoint_shift_alpha(meta) -> tuple[float, str]:
    """(alpha, where it came from): meta.extra.shift_alpha (train-dit records it), else the config's
    flow section (explicit flow.shift_alpha, else sqrt(C*H*W / flow.shift_base)), else
    sqrt(C*H*W / 4096) (imported checkpoints: the reference's base)."""
    extra = meta.extra or {}
    if extra.get("shift_alpha") is not None:
        return float(extra["shift_alpha"]), "meta.extra.shift_alpha"
    shape = checkpoint_latent_shape(meta)
    flow = (meta.config or {}).get("flow") if isinstance(meta.config, dict) else None
    if isinstance(flow, dict):
        if flow.get("shift_alpha") is not None:
            return float(flow["shift_alpha"]), "config.flow.shift_alpha"
        base = int(flow.get("shift_base", 4096))
        return shift_alpha(shape, base), f"latent shape {list(shape)}, config.flow.shift_base {base}"
    return shift_alpha(shape, 4096), f"latent shape {list(shape)}, base 4096"


def checkpoint_stats_mode(meta, uri: str = "") -> str:
    """How a DiT checkpoint normalized its latents (one of ``STATS_MODES``): meta.extra.stats_mode
    (train-dit records it), else its config's data.stats_mode, else "mean_var" (checkpoints written
    before the mode existed, and imports: whatever statistics they carry, used as they are)."""
    extra = meta.extra or {}
    if extra.get("stats_mode") is not None:
        mode = extra["stats_mode"]
    else:
        data = meta.config.get("data") if isinstance(meta.config, dict) else None
        mode = data.get("stats_mode", "mean_var") if isinstance(data, dict) else "mean_var"
    if mode not in STATS_MODES:
        raise LoadError(f"DiT checkpoint {uri} records statistics mode {mode!r}, not one of {list(STATS_MODES)}")
    return mode


def load_dit(uri: str, *, weights: str = "ema", stats: str | None = None, device: str | torch.device = "cpu",
             storage_options: dict | None = None) -> LoadedDiT:
    """A DiT^DH / DiT checkpoint (checkpoint or run directory) with its shift and statistics.

    stats: a statistics file (``--stats``: .safetensors, .npz or stat.pt) replacing the checkpoint's.
    The checkpoint's own statistics are ``stats.safetensors`` (absent mean = 0, absent var = 1); a
    checkpoint without any samples raw latents (no denormalization). Either is used in the
    checkpoint's statistics mode (:func:`checkpoint_stats_mode`): a "var" model ignores the mean
    of a ``stats`` file, as it was trained.
    """
    model, ck, used, sha = _load(uri, weights, DIT_CLASSES, "DiT checkpoint", storage_options)
    shape = checkpoint_latent_shape(ck.meta)
    conf = ck.meta.model["config"]
    if (int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"])) != tuple(shape):
        raise LoadError(f"DiT checkpoint {ck.uri}: its store's latents are {list(shape)} but the model reads "
                          f"{conf['in_channels']} x {conf['input_size']} x {conf['input_size']}")
    alpha, alpha_source = checkpoint_shift_alpha(ck.meta)
    stats_mode = checkpoint_stats_mode(ck.meta, ck.uri)
    if stats is not None:
        try:
            normalizer = LatentNormalizer.from_file(stats, storage_options)
        except ValueError as e:
            raise LoadError(str(e)) from None
    elif ck.stats:
        normalizer = LatentNormalizer(ck.stats.get("mean"), ck.stats.get("var"), source=f"checkpoint:{ck.uri}")
    else:
        normalizer = None
    if normalizer is not None:
        normalizer = normalizer.with_mode(stats_mode)
        try:
            normalizer.check_shape(shape)
        except ValueError as e:
            raise LoadError(f"{e} (DiT checkpoint {ck.uri})") from None
        normalizer.to(device)
    return LoadedDiT(model.to(device), ck.uri, used, sha, shape, int(conf["num_classes"]), alpha, alpha_source,
                     normalizer, ck.meta.encoder, ck.step, stats_mode)


def load_decoder(uri: str, *, weights: str = "ema", device: str | torch.device = "cpu",
                 storage_options: dict | None = None) -> LoadedDecoder:
    """An RAE decoder checkpoint (fit-decoder's or an import) in eval mode on ``device``."""
    model, ck, used, sha = _load(uri, weights, (DECODER_CLASS,), "decoder checkpoint", storage_options)
    conf = model.config
    grid = math.isqrt(conf.num_tokens)
    return LoadedDecoder(model.to(device), ck.uri, used, sha, conf.in_channels, grid, grid * conf.patch_size,
                         ck.meta.encoder, bool(conf.allow_token_resize), ck.step,
                         imported_without_encoder=imported_without_encoder(ck.meta))


def imported_without_encoder(meta) -> bool:
    """Whether a checkpoint was imported (``import-rae``) with no encoder named (``--encoder none``)."""
    return meta.encoder is None and isinstance(meta.extra, dict) and "imported" in meta.extra


def _unchecked_note(models: list[tuple[str, dict | None]], shape: tuple[int, int, int]) -> str | None:
    """The note saying which of the (model, encoder identity) pairs record no identity, or None."""
    unknown = [what for what, identity in models if identity is None]
    if not unknown:
        return None
    c, h, w = shape
    return (f"no encoder identity could be checked: {' and '.join(unknown)} record{'s' if len(unknown) == 1 else ''} "
            f"none (imported with --encoder none, or trained on a synthetic store); only the latent shapes "
            f"({c} x {h} x {w}) were checked")


def check_decoder_reads(decoder: LoadedDecoder, latent_shape: tuple[int, int, int], what: str,
                        encoder: dict | None) -> str | None:
    """LoadError unless ``decoder`` decodes latents of ``latent_shape`` made by ``encoder``
    (identities compared with ``schemas.store_v1.encoder_mismatch``: name, arch, input size;
    weight hashes when both are known). Returns a note when an identity is unknown (module docstring)."""
    why = encoder_mismatch(encoder, decoder.encoder)
    if why:
        raise LoadError(f"decoder {decoder.uri} and {what} come from different encoders ({why}): the decoder "
                          f"would decode latents it was not trained on. {what}: {encoder}; decoder: {decoder.encoder}")
    c, h, w = latent_shape
    if c != decoder.in_channels or ((h, w) != (decoder.grid, decoder.grid) and not decoder.allow_token_resize):
        raise LoadError(f"decoder {decoder.uri} reads {decoder.in_channels} x {decoder.grid} x {decoder.grid} "
                          f"latents; {what} has {c} x {h} x {w}")
    return _unchecked_note([(what, encoder), (f"decoder {decoder.uri}", decoder.encoder)], latent_shape)


def check_compatible(dit: LoadedDiT, decoder: LoadedDecoder, weak: LoadedDiT | None = None) -> str | None:
    """The decoder must decode the DiT's latents; an AutoGuidance model must generate the same
    latents (encoder, shape) for the same classes. Returns a one-line note when a model records no
    encoder identity (then only the shapes were checked), else None."""
    check_decoder_reads(decoder, dit.latent_shape, f"DiT {dit.uri}", dit.encoder)
    models = [(f"DiT {dit.uri}", dit.encoder), (f"decoder {decoder.uri}", decoder.encoder)]
    if weak is None:
        return _unchecked_note(models, dit.latent_shape)
    why = encoder_mismatch(dit.encoder, weak.encoder)
    if why:
        raise LoadError(f"AutoGuidance model {weak.uri} and DiT {dit.uri} come from different encoders ({why})")
    if weak.latent_shape != dit.latent_shape or weak.num_classes != dit.num_classes:
        raise LoadError(
            f"AutoGuidance model {weak.uri} generates {list(weak.latent_shape)} latents for {weak.num_classes} "
            f"classes; DiT {dit.uri}: {list(dit.latent_shape)} for {dit.num_classes}: they must agree"
        )
    if weak.stats_mode != dit.stats_mode:  # the two would predict velocities in different latent spaces
        raise LoadError(
            f"AutoGuidance model {weak.uri} was trained with statistics mode {weak.stats_mode}; DiT {dit.uri} with "
            f"{dit.stats_mode}: guidance needs both in one normalized space (train the weak model with "
            f"--stats-mode {dit.stats_mode})"
        )
    return _unchecked_note(models + [(f"AutoGuidance model {weak.uri}", weak.encoder)], dit.latent_shape)


def check_decoder_for_store(theirs: dict | None, ckpt_uri: str, store: "LatentStore", *,
                            imported_without_encoder: bool = False) -> str | None:
    """Refuse a decoder (encoder identity ``theirs``) trained on another encoder's latents than
    ``store``'s, or on unknown ones, unless it was imported with ``--encoder none``
    (``imported_without_encoder``): then the note saying that no identity could be checked is
    returned (the caller checks the shapes). None when the identities agree."""
    ours = encoder_identity(store.spec)
    if ours is None:
        raise LoadError(f"store {store.uri} records no encoder (a synthetic store): no decoder applies to it")
    if theirs is None:
        if imported_without_encoder:
            return (f"no encoder identity could be checked: decoder {ckpt_uri} was imported with --encoder none; "
                    f"store {store.uri} was encoded by {ours['name']} ({ours['arch']}); only the latent shapes "
                    "were checked")
        raise LoadError(f"decoder {ckpt_uri} records no encoder identity (trained on a synthetic store?); "
                               f"store {store.uri} was encoded by {ours['name']} ({ours['arch']}). Only a decoder "
                               "imported with `import-rae --encoder none` is taken on trust")
    why = encoder_mismatch(theirs, ours)
    if why:
        raise LoadError(f"decoder {ckpt_uri} was trained on latents of another encoder than store {store.uri}'s "
                               f"({why}): decoder {theirs}, store {ours}")
    return None
