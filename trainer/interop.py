"""Import and export the published RAE checkpoints (``docs/checkpoint-format.md`` sections 1-5).

People hold the released RAE files: DiT^DH models (bare state dicts or training checkpoints), ViT
decoders and ``stat.pt`` latent statistics. This module turns them into our checkpoint format
(``schemas/checkpoint_v1``) and writes our checkpoints back in the published layout.

Our models (``trainer/models/dit.py``, ``trainer/models/decoder.py``) use the published parameter
names, so a published state dict *is* our model state; converting is: read the file safely, pick
the weights, infer the architecture from the shapes, check every key and shape, and record where
everything came from. Two layout differences exist and are converted here:

- A plain DiT (reference ``LightningDiT``) built with ``learn_sigma=True`` (its default) has 2C
  output values per pixel and discards the second C; we predict the velocity only. Import keeps the
  first C channels; export writes C channels, or 2C (zeros after the first C) with ``learn_sigma``.
- Decoder-training checkpoints hold a whole autoencoder: ``decoder.*`` is the decoder, the frozen
  ``encoder.*`` weights are dropped.

Inference rules (what each config field is read from):

- DiT^DH vs plain DiT: ``s_embedder.proj.weight`` present -> DiT^DH, else plain DiT.
- Backbone width D0 and latent channels C: ``s_embedder.proj.weight`` [D0, C, p, p] (plain DiT:
  ``x_embedder``); head width D1: ``x_embedder.proj.weight`` [D1, C, p, p]; patch p: the kernel.
- Token grid G: ``pos_embed`` [1, G*G, D0]; latent side = G * p.
- Blocks: ``blocks.{i}``, one list; with D0 != D1 the leading blocks of width D0 (``norm1.weight``)
  are the backbone, the rest the head. With D0 == D1 the split is not in the shapes: ``head_depth``
  (default 2, every published DiT^DH) decides.
- Heads: not in the weight shapes. Read from the RoPE table width (``enc_feat_rope.freqs_cos``
  [G*G, D0/heads], ``dec_feat_rope`` for the head, ``feat_rope`` for plain DiT), else from the size
  table (``MODEL_SIZES``), else the caller's value. The RoPE tables are checked against the theta =
  10000 tables; a difference is reported (the file's tables are kept: they are what the model ran).
- SwiGLU ratio: hidden H of ``mlp.w3.weight`` [D, H] with H = int(2/3 * ratio * D), ratio 4 checked
  first. Fourier frequencies: ``t_embedder.W`` [F]. Classes: ``y_embedder.embedding_table`` rows - 1
  (the last row is the null label).
- Decoder: width/in-channels from ``decoder_embed.weight``, tokens from ``decoder_pos_embed`` - 1,
  depth from ``decoder_layers.{i}``, MLP from ``intermediate.dense``, pixel patch from
  ``decoder_pred`` rows / 3; heads from the caller or the decoder size table (``DECODER_SIZES``).

Encoder identity of an import: the encoder is named by the user (DINOv2, SigLIP2 and MAE are all 768
wide), with the architecture and input size of ``pipeline/encoders.py`` at the given resolution,
``weights_source`` "imported" and ``weights_sha256`` null: the hash of the encoder weights the
published model was trained on cannot be known offline. ``schemas.store_v1.encoder_mismatch`` is the comparison
rule: name, arch and input_size must agree; weights hashes are compared only when both are known.

Everything is loaded with ``torch.load(weights_only=True)`` (or safetensors); a file that needs
arbitrary unpickling is refused. A file whose keys or shapes differ from the published layout of
the inferred architecture fails with an error listing every missing, unexpected and mis-shaped key.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

import torch

from pipeline import uri as uri_lib
from pipeline.weights import WeightsFileError, load_tensor_file
from schemas.errors import UserError
from trainer.flow import shift_alpha
from trainer.loading import DECODER_CLASS, DIT_CLASSES
from trainer.models import config_meta

Use = Literal["auto", "ema", "model"]

DIT_FILE = "dit.pt"
DECODER_FILE = "decoder.pt"
STATS_FILE = "stat.pt"
ROPE_TOLERANCE = 1e-5  # max |file table - theta 10000 table| still called a match (fp32 rounding)
_LIST_LIMIT = 25  # keys shown per category in a layout error (the exception keeps all of them)


class InteropError(UserError, ValueError):
    """A published file (or one of our checkpoints) that cannot be converted; names the file."""


class LayoutMismatchError(InteropError):
    """A state dict whose keys or shapes differ from the published layout; lists every offender.

    ``missing``: expected keys absent from the file; ``unexpected``: keys the layout does not have;
    ``mismatched``: (key, shape in the file, expected shape).
    """

    def __init__(self, source: str, what: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], note: str = ""):
        self.source, self.what = source, what
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{source}: does not match the published RAE layout of {what}{note}:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", [f"{k} (file {list(f)}, expected {list(e)})" for k, f, e in mismatched]),
        ):
            if items:
                shown = ", ".join(items[:_LIST_LIMIT])
                more = f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
                lines.append(f"  {title} ({len(items)}): {shown}{more}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Reading published files
# --------------------------------------------------------------------------------------------


def load_published_file(uri: str, storage_options: dict | None = None) -> Any:
    """The object in a ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``) or
    ``.safetensors`` file at a path or fsspec URI (``pipeline.weights``). Objects that need arbitrary
    unpickling are refused."""
    try:
        return load_tensor_file(uri, storage_options)
    except FileNotFoundError:
        raise InteropError(f"{uri}: no such file") from None
    except WeightsFileError as e:
        raise InteropError(str(e)) from None


@dataclasses.dataclass
class PublishedWeights:
    """One state dict picked out of a published file, with plain keys (no ``module.``/``_orig_mod.``).

    container: "state_dict" (a bare file) or "training_checkpoint" (``model``/``ema`` keys);
    weights: which entry was used ("ema", "model"; None for bare files); step/epoch: from a
    training checkpoint when it records them.
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    container: str
    weights: str | None
    step: int | None = None
    epoch: float | None = None

    def describe(self) -> dict:
        return {"file": self.source, "container": self.container, "weights": self.weights,
                "step": self.step, "epoch": self.epoch}


def select_weights(obj: Any, source: str, use: Use = "auto") -> PublishedWeights:
    """Pick the state dict from a loaded published object.

    A bare state dict (name -> tensor) is used as is. A training checkpoint (``model`` and/or
    ``ema`` dicts) gives ``ema`` for ``use="auto"`` when present (as the reference sampler), else
    ``model``; ``use="ema"``/``"model"`` insist on that entry. Prefixes of DDP/``torch.compile`` are
    stripped.
    """
    from trainer.checkpoint import unwrap_state_dict

    if use not in ("auto", "ema", "model"):
        raise ValueError(f"use must be 'auto', 'ema' or 'model', got {use!r}")
    if not isinstance(obj, dict) or not obj:
        raise InteropError(f"{source}: expected a state dict or a training checkpoint, got {type(obj).__name__}")
    entries = {k: v for k, v in obj.items() if k in ("model", "ema") and isinstance(v, dict)}
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        pub = PublishedWeights(dict(obj), source, "state_dict", None)
    elif entries:
        key = ("ema" if "ema" in entries else "model") if use == "auto" else use
        if key not in entries:
            raise InteropError(f"{source}: training checkpoint has no {key!r} weights (it has {sorted(entries)})")
        step, epoch = obj.get("step"), obj.get("epoch")
        pub = PublishedWeights(dict(entries[key]), source, "training_checkpoint", key,
                               step=int(step) if _is_count(step) else None,
                               epoch=float(epoch) if _is_count(epoch, float) else None)
    else:
        raise InteropError(
            f"{source}: neither a bare state dict (name -> tensor) nor a training checkpoint with "
            f"'model'/'ema' state dicts; top-level keys: {sorted(map(str, obj))[:20]}"
        )
    bad = sorted(k for k, v in pub.state_dict.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise InteropError(f"{source}: state dict entries that are not tensors: {bad[:20]}")
    pub.state_dict = unwrap_state_dict(pub.state_dict)
    return pub


def _is_count(value: Any, kind: type = int) -> bool:
    """A non-negative number of ``kind`` (int, or int/float for float), bools excluded."""
    kinds = (int, float) if kind is float else (int,)
    return isinstance(value, kinds) and not isinstance(value, bool) and value >= 0


def decoder_part(sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The decoder's state dict: a whole-autoencoder dict (``decoder.*`` + frozen ``encoder.*``, as
    decoder-training checkpoints hold) gives its ``decoder.*`` keys without the prefix; anything
    else is returned as is. Second value: whether it was an autoencoder dict."""
    if not any(k.startswith("decoder.") for k in sd):
        return sd, False
    other = sorted(k for k in sd if not k.startswith(("decoder.", "encoder.")))
    if other:
        raise LayoutMismatchError(source, "an autoencoder (decoder.* and encoder.* keys)", [], other, [])
    return {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}, True


def read_published_stats(uri: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The present statistics of a ``stat.pt`` as float32 [C, H, W] tensors ({"mean"?, "var"?}).

    An absent (or None) mean means 0 and an absent var means 1, as the reference treats them; the
    absence is kept (our checkpoints record which are present).
    """
    from trainer.normalize import load_stats_file

    mean, var = load_stats_file(uri, storage_options)
    return {k: torch.as_tensor(a, dtype=torch.float32) for k, a in (("mean", mean), ("var", var)) if a is not None}


# --------------------------------------------------------------------------------------------
# The published layout: expected keys and shapes, conversion to and from our state dicts
# --------------------------------------------------------------------------------------------


def _meta_device_model(model_meta: dict) -> torch.nn.Module:
    """The model of ``{"class", "config"}`` with no storage (meta device): shapes only."""
    from trainer.models import build_model_from_meta

    with torch.device("meta"):
        return build_model_from_meta(model_meta)


def published_layout(model_meta: dict, learn_sigma: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the published state dict of the model in ``model_meta`` ({"class", "config"}).

    ``learn_sigma`` (plain DiT only): the final linear layer has 2C outputs per pixel, as the
    reference ``LightningDiT`` builds it by default.
    """
    _check_learn_sigma(model_meta["class"], learn_sigma)
    shapes = {k: tuple(v.shape) for k, v in _meta_device_model(model_meta).state_dict().items()}
    if learn_sigma:
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            shapes[key] = (2 * shapes[key][0],) + shapes[key][1:]
    return shapes


def _check_learn_sigma(cls_name: str, learn_sigma: bool) -> None:
    if cls_name not in (*DIT_CLASSES, DECODER_CLASS):
        raise InteropError(f"model class {cls_name!r} has no published RAE layout (known: DiTDH, DiT, RAEDecoder)")
    if learn_sigma and cls_name != "DiT":
        raise InteropError(f"learn_sigma applies to a plain DiT only, not to {cls_name}")


def _sigma_rows(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Output rows of a learn_sigma final layer viewed as [p*p, 2, C, ...] (value index
    (pr*p + pc) * 2C + ch, ch < C the prediction, ch >= C the discarded sigma)."""
    return t.reshape(-1, 2, channels, *t.shape[1:])


def published_state_dict(state: dict[str, torch.Tensor], model_meta: dict,
                         learn_sigma: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict -> the published one (same tensors; contiguous). ``learn_sigma`` (plain DiT):
    the final layer gets zero sigma outputs after each pixel's C velocity values."""
    _check_learn_sigma(model_meta["class"], learn_sigma)
    out = {k: v.contiguous() for k, v in state.items()}
    if learn_sigma:
        channels = int(model_meta["config"]["in_channels"])
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            rows = out[key].reshape(-1, 1, channels, *out[key].shape[1:])  # (p*p, 1, C, ...)
            padded = torch.cat([rows, torch.zeros_like(rows)], dim=1)  # (p*p, 2, C, ...)
            out[key] = padded.reshape(-1, *out[key].shape[1:])
    return out


def state_dict_from_published(sd: dict[str, torch.Tensor], model_meta: dict,
                              learn_sigma: bool = False) -> dict[str, torch.Tensor]:
    """The published state dict -> ours: for a learn_sigma plain DiT, keep the C velocity outputs."""
    _check_learn_sigma(model_meta["class"], learn_sigma)
    out = dict(sd)
    if learn_sigma:
        channels = int(model_meta["config"]["in_channels"])
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            out[key] = _sigma_rows(out[key], channels)[:, 0].reshape(-1, *out[key].shape[1:]).contiguous()
    return out


def check_layout(expected: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor], source: str,
                 what: str) -> None:
    """Raise :class:`LayoutMismatchError` listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(
        (k, tuple(sd[k].shape), expected[k]) for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        raise LayoutMismatchError(source, what, missing, unexpected, mismatched)


# --------------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InferredModel:
    """An architecture read from a published state dict: ``model_meta`` = {"class", "config"},
    ``learn_sigma`` (plain DiT: 2C outputs in the file), ``how`` = field -> where it came from."""

    model_meta: dict
    learn_sigma: bool
    how: dict[str, str]


def _shape(sd: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _require(sd: dict[str, torch.Tensor], keys: list[str], source: str, what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise LayoutMismatchError(
            source, what, missing, [], [],
            note=" (keys needed to infer the architecture are absent; is this the right kind of file?)",
        )


def _heads(sd, table_key: str, width: int, given: int | None, fallback: int | None, fallback_how: str,
           source: str, name: str) -> tuple[int, str]:
    """Heads from the RoPE table width (head_dim = width / heads), the caller, or a size table."""
    if table_key in sd:
        head_dim = _shape(sd, table_key)[-1]
        if head_dim <= 0 or width % head_dim:
            raise InteropError(f"{source}: {table_key} is {head_dim} wide, which does not divide the width {width}")
        heads = width // head_dim
        if given is not None and given != heads:
            raise InteropError(f"{source}: {name}={given} was given but {table_key} implies {heads} heads")
        return heads, f"RoPE table {table_key} width {head_dim} -> {width}/{head_dim} = {heads} heads"
    if given is not None:
        return given, "given"
    if fallback is not None:
        return fallback, fallback_how
    raise InteropError(
        f"{source}: {table_key} is absent and width {width} is not a known size: pass {name}"
    )


def _mlp_ratio(widths: dict[int, int], hidden: dict[int, int], source: str) -> tuple[float, str]:
    """The SwiGLU ratio r with int(2/3 * r * D) == H for every block (r = 4 first)."""
    i0 = min(hidden)
    candidates = [4.0, round(1.5 * hidden[i0] / widths[i0], 6)]
    for r in candidates:
        if all(int(2 / 3 * r * widths[i]) == h for i, h in hidden.items() if i in widths):
            return r, f"SwiGLU hidden {hidden[i0]} of width {widths[i0]} -> ratio {r:g}"
    raise InteropError(f"{source}: SwiGLU hidden sizes {sorted(set(hidden.values()))} fit no single mlp_ratio")


def infer_dit_config(sd: dict[str, torch.Tensor], source: str = "state dict", *, num_heads: int | None = None,
                     head_num_heads: int | None = None, head_depth: int | None = None,
                     class_dropout_prob: float = 0.1) -> InferredModel:
    """The DiT^DH or plain DiT architecture of a published state dict (module docstring: the rules)."""
    from trainer.models.dit import MODEL_SIZES, DiTConfig

    dh = "s_embedder.proj.weight" in sd
    what = "a DiT^DH (DiTwDDTHead)" if dh else "a plain DiT (LightningDiT)"
    embed = "s_embedder.proj.weight" if dh else "x_embedder.proj.weight"
    _require(sd, [embed, "pos_embed", "t_embedder.W", "y_embedder.embedding_table.weight",
                  "final_layer.linear.weight", "blocks.0.norm1.weight", "blocks.0.mlp.w3.weight"]
             + (["x_embedder.proj.weight"] if dh else []), source, what)
    how: dict[str, str] = {"class": f"{'s_embedder present' if dh else 'no s_embedder'} -> {'DiTDH' if dh else 'DiT'}"}
    shape = _shape(sd, embed)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise InteropError(f"{source}: {embed} has shape {list(shape)}, expected [width, C, p, p]")
    D0, C, p, _ = shape
    pos = _shape(sd, "pos_embed")
    G = math.isqrt(pos[1]) if len(pos) == 3 else 0
    if len(pos) != 3 or pos[0] != 1 or G * G != pos[1] or pos[2] != D0:
        raise InteropError(f"{source}: pos_embed has shape {list(pos)}, expected [1, G*G, {D0}]")
    how["in_channels/patch_size"] = f"{embed} {list(shape)}"
    how["input_size"] = f"pos_embed {G*G} tokens -> {G}x{G} grid x patch {p}"

    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    n_blocks = blocks[-1] + 1
    widths = {i: _shape(sd, f"blocks.{i}.norm1.weight")[0] for i in blocks if f"blocks.{i}.norm1.weight" in sd}
    hidden = {i: _shape(sd, f"blocks.{i}.mlp.w3.weight")[-1] for i in widths if f"blocks.{i}.mlp.w3.weight" in sd}
    mlp_ratio, how["mlp_ratio"] = _mlp_ratio(widths, hidden, source)
    classes = _shape(sd, "y_embedder.embedding_table.weight")[0] - 1
    if classes < 1:
        raise InteropError(f"{source}: y_embedder.embedding_table has {classes + 1} rows; expected classes + 1 (null)")
    how["num_classes"] = f"label table {classes + 1} rows - 1 null row"
    fields = dict(in_channels=C, input_size=G * p, patch_size=p, hidden_size=D0, num_classes=classes,
                  class_dropout_prob=class_dropout_prob, mlp_ratio=mlp_ratio,
                  num_time_freqs=_shape(sd, "t_embedder.W")[0])
    learn_sigma = False
    if dh:
        if p != 1:
            raise InteropError(
                f"{source}: DiT^DH with patch size {p}: the reference DiTwDDTHead runs with patch size 1 only"
            )
        D1 = _shape(sd, "x_embedder.proj.weight")[0]
        if D0 != D1:
            depth = sum(1 for w in widths.values() if w == D0)
            how["depth/head_depth"] = f"blocks of width {D0} (backbone) and {D1} (head)"
        else:
            depth = n_blocks - (head_depth if head_depth is not None else 2)
            how["depth/head_depth"] = ("given head_depth" if head_depth is not None else
                                       "backbone and head widths are equal: head depth 2 (published DiT^DH)")
        h_depth = n_blocks - depth
        if head_depth is not None and head_depth != h_depth:
            raise InteropError(f"{source}: head_depth={head_depth} was given but the block widths give {h_depth}")
        if depth < 1 or h_depth < 1:
            raise InteropError(f"{source}: cannot split {n_blocks} blocks into backbone and head (widths {D0}, {D1})")
        size = next((s for s in MODEL_SIZES.values() if s["head_hidden_size"] is not None
                     and (s["hidden_size"], s["depth"]) == (D0, depth)), None)
        head_size = next((s for s in MODEL_SIZES.values() if s["head_hidden_size"] is not None
                          and (s["head_hidden_size"], s["head_depth"]) == (D1, h_depth)), None)
        heads, how["num_heads"] = _heads(sd, "enc_feat_rope.freqs_cos", D0, num_heads, size and size["num_heads"],
                                         "size table", source, "num_heads")
        h_heads, how["head_num_heads"] = _heads(sd, "dec_feat_rope.freqs_cos", D1, head_num_heads,
                                                head_size and head_size["head_num_heads"], "size table", source,
                                                "head_num_heads")
        fields.update(depth=depth, num_heads=heads, head_hidden_size=D1, head_depth=h_depth, head_num_heads=h_heads)
    else:
        size = next((s for s in MODEL_SIZES.values() if s["head_hidden_size"] is None
                     and (s["hidden_size"], s["depth"]) == (D0, n_blocks)), None)
        heads, how["num_heads"] = _heads(sd, "feat_rope.freqs_cos", D0, num_heads, size and size["num_heads"],
                                         "size table", source, "num_heads")
        fields.update(depth=n_blocks, num_heads=heads, head_hidden_size=None)
        rows = _shape(sd, "final_layer.linear.weight")[0]
        if rows == 2 * C * p * p:
            learn_sigma = True
            how["learn_sigma"] = f"final linear has {rows} = 2*C*p*p rows: sigma outputs dropped"
    try:
        cfg = DiTConfig(**fields)
    except ValueError as e:
        raise InteropError(f"{source}: inferred DiT config is invalid: {e}") from e
    return InferredModel(config_meta("DiTDH" if dh else "DiT", cfg), learn_sigma, how)


def infer_decoder_config(sd: dict[str, torch.Tensor], source: str = "state dict", *, num_heads: int | None = None,
                         image_mean: tuple[float, float, float] | None = None,
                         image_std: tuple[float, float, float] | None = None) -> InferredModel:
    """The RAE decoder architecture of a published state dict; heads from ``num_heads`` or the
    decoder size table (``DECODER_SIZES``). ``image_mean``/``image_std``: the encoder's input
    normalization (default ImageNet)."""
    from trainer.models.decoder import DECODER_SIZES, decoder_config_from_state_dict

    what = "an RAE decoder"
    _require(sd, ["decoder_embed.weight", "decoder_pos_embed", "decoder_layers.0.intermediate.dense.weight",
                  "decoder_pred.weight"], source, what)
    hidden, in_channels = _shape(sd, "decoder_embed.weight")
    depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_layers.")})
    mlp = _shape(sd, "decoder_layers.0.intermediate.dense.weight")[0]
    how = {"hidden_size/in_channels": f"decoder_embed.weight {[hidden, in_channels]}",
           "num_tokens": f"decoder_pos_embed {_shape(sd, 'decoder_pos_embed')[1]} rows - 1 class token",
           "depth": f"{depth} decoder_layers", "mlp_dim": f"intermediate.dense {mlp} rows",
           "patch_size": f"decoder_pred {_shape(sd, 'decoder_pred.weight')[0]} rows / 3 channels"}
    if num_heads is None:
        size = next((s for s in DECODER_SIZES.values()
                     if (s["hidden_size"], s["depth"], s["mlp_dim"]) == (hidden, depth, mlp)), None)
        if size is None:
            raise InteropError(
                f"{source}: a decoder of width {hidden}, depth {depth}, MLP {mlp} is not a known size "
                "(B, L, XL); its heads are not in the shapes: pass the number of heads"
            )
        how["num_heads"] = "decoder size table"
    else:
        how["num_heads"] = "given"
    overrides = {k: tuple(v) for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
    try:
        cfg = decoder_config_from_state_dict(sd, num_heads=num_heads, **overrides)
    except ValueError as e:
        raise InteropError(f"{source}: {e}") from e
    return InferredModel(config_meta(DECODER_CLASS, cfg), False, how)


def _rope_report(sd: dict[str, torch.Tensor], model_meta: dict, source: str) -> str | None:
    """Compare the file's RoPE tables with the theta = 10000 tables; warn on a difference."""
    from trainer.models.dit import axial_rope_tables

    cfg = model_meta["config"]
    tables = {"feat_rope": (cfg["hidden_size"], cfg["num_heads"])}
    if model_meta["class"] == "DiTDH":
        tables = {"enc_feat_rope": (cfg["hidden_size"], cfg["num_heads"]),
                  "dec_feat_rope": (cfg["head_hidden_size"], cfg["head_num_heads"])}
    worst = 0.0
    for name, (width, heads) in tables.items():
        cos, sin = axial_rope_tables(width // heads, cfg["input_size"] // cfg["patch_size"], cfg["rope_theta"])
        for ours, key in ((cos, f"{name}.freqs_cos"), (sin, f"{name}.freqs_sin")):
            worst = max(worst, (sd[key].double() - ours.double()).abs().max().item())
    if worst > ROPE_TOLERANCE:
        note = (f"RoPE tables differ from the theta={cfg['rope_theta']:g} tables by up to {worst:.3g}; "
                "the file's tables are kept (they are what the model was trained with)")
        warnings.warn(f"{source}: {note}", stacklevel=3)
        return note
    return f"match the theta={cfg['rope_theta']:g} tables (max diff {worst:.1e})"


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportedModel:
    """A published model converted to our layout (not yet saved): ``kind`` "dit" | "decoder",
    ``model_meta`` {"class", "config"}, ``state_dict`` in our layout, provenance and inference notes."""

    kind: str
    model_meta: dict
    state_dict: dict[str, torch.Tensor]
    source: PublishedWeights
    how: dict[str, str]
    learn_sigma: bool = False
    autoencoder: bool = False

    @property
    def config(self) -> dict:
        return self.model_meta["config"]


def import_dit_weights(uri: str, *, use: Use = "auto", num_heads: int | None = None,
                       head_num_heads: int | None = None, head_depth: int | None = None,
                       storage_options: dict | None = None) -> ImportedModel:
    """A published DiT^DH or plain DiT file -> our state dict and architecture (checked strictly)."""
    pub = select_weights(load_published_file(uri, storage_options), str(uri), use)
    inferred = infer_dit_config(pub.state_dict, str(uri), num_heads=num_heads, head_num_heads=head_num_heads,
                                head_depth=head_depth)
    what = "a DiT^DH (DiTwDDTHead)" if inferred.model_meta["class"] == "DiTDH" else "a plain DiT (LightningDiT)"
    check_layout(published_layout(inferred.model_meta, inferred.learn_sigma), pub.state_dict, str(uri), what)
    inferred.how["rope_tables"] = _rope_report(pub.state_dict, inferred.model_meta, str(uri))
    state = state_dict_from_published(pub.state_dict, inferred.model_meta, inferred.learn_sigma)
    return ImportedModel("dit", inferred.model_meta, state, pub, inferred.how, learn_sigma=inferred.learn_sigma)


def import_decoder_weights(uri: str, *, use: Use = "auto", num_heads: int | None = None,
                           image_mean: tuple[float, float, float] | None = None,
                           image_std: tuple[float, float, float] | None = None,
                           storage_options: dict | None = None) -> ImportedModel:
    """A published decoder file (bare, or a decoder-training checkpoint of the whole autoencoder)
    -> our state dict and architecture (checked strictly)."""
    pub = select_weights(load_published_file(uri, storage_options), str(uri), use)
    sd, autoencoder = decoder_part(pub.state_dict, str(uri))
    pub.state_dict = sd
    inferred = infer_decoder_config(sd, str(uri), num_heads=num_heads, image_mean=image_mean, image_std=image_std)
    check_layout(published_layout(inferred.model_meta), sd, str(uri), "an RAE decoder")
    return ImportedModel("decoder", inferred.model_meta, dict(sd), pub, inferred.how, autoencoder=autoencoder)


def imported_encoder_identity(name: str, resolution: int = 256) -> dict:
    """The encoder identity an import records: name, the timm arch and input size of
    ``pipeline/encoders.py`` at ``resolution``, ``weights_sha256`` None (unknown offline) and
    ``weights_source`` "imported"."""
    from pipeline.encoders import ENCODERS, encoder_input_size, resolve_encoder_name

    spec = ENCODERS[resolve_encoder_name(name)]
    return {"name": spec.name, "arch": spec.timm_arch, "input_size": encoder_input_size(spec.name, resolution),
            "weights_sha256": None, "weights_source": "imported"}


def _check_against_encoder(imported: ImportedModel, encoder_name: str, resolution: int) -> None:
    """The latents an imported model reads must be the encoder's at that resolution (channels, grid)."""
    from pipeline.encoders import latent_shape

    C, grid, _ = latent_shape(encoder_name, resolution)
    cfg = imported.config
    if imported.kind == "dit":
        have = (cfg["in_channels"], cfg["input_size"])
        what = f"latents of {cfg['in_channels']} x {cfg['input_size']} x {cfg['input_size']}"
    else:
        have = (cfg["in_channels"], math.isqrt(cfg["num_tokens"]))
        what = f"{cfg['num_tokens']} tokens of width {cfg['in_channels']}"
    if have != (C, grid):
        raise InteropError(
            f"{imported.source.source}: the model reads {what}, but {encoder_name} at {resolution}px gives "
            f"{C} x {grid} x {grid}; check --encoder and --resolution"
        )


def _check_pair(dit: ImportedModel, decoder: ImportedModel) -> None:
    """The decoder must read the latents the DiT generates (channels and token grid)."""
    d, e = dit.config, decoder.config
    if (d["in_channels"], d["input_size"] ** 2) != (e["in_channels"], e["num_tokens"]):
        raise InteropError(
            f"{dit.source.source} generates {d['in_channels']} x {d['input_size']} x {d['input_size']} latents but "
            f"{decoder.source.source} reads {e['num_tokens']} tokens of width {e['in_channels']}"
        )


def _checkpoint_meta(imported: ImportedModel, *, encoder: dict | None, stats: dict | None,
                     stats_uri: str | None, request: dict) -> dict:
    pub = imported.source
    extra = {"imported": {**pub.describe(), "inferred": imported.how, "learn_sigma_dropped": imported.learn_sigma,
                          "autoencoder_checkpoint": imported.autoencoder}}
    if stats is not None:
        extra["imported"]["stats_file"] = stats_uri
    if imported.kind == "dit":  # the reference's shift, sqrt(C*H*W / 4096), recorded where train-dit records it
        conf = imported.model_meta["config"]
        extra["shift_alpha"] = shift_alpha((int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"])))
    return {
        "kind": imported.kind,
        "epoch": 0.0,  # our epochs count our samples; the source's step/epoch are in extra.imported
        "samples_seen": 0,
        "config": {"import": request},
        "model": imported.model_meta,
        "store": None,
        "encoder": encoder,
        "statistics": None if stats is None else {"mean": "mean" in stats, "var": "var" in stats, "source": "imported"},
        "extra": extra,
    }


def import_rae(out: str, *, dit: str | None = None, decoder: str | None = None, stats: str | None = None,
               encoder: str | None, resolution: int = 256, use: Use = "auto",
               decoder_num_heads: int | None = None, head_depth: int | None = None, overwrite: bool = False,
               storage_options: dict | None = None) -> dict[str, str]:
    """Convert published files into our checkpoints under ``out``: ``<out>/dit`` and
    ``<out>/decoder`` run directories, one checkpoint each. Returns {"dit"?, "decoder"?: checkpoint URI}.

    The DiT carries the statistics of ``stats`` (a ``stat.pt``; absent mean = 0, absent var = 1).
    ``encoder`` names the encoder the models were trained on (recorded as the identity and checked
    against the latent shape; None records no identity). Everything is read and checked before
    anything is written. An existing ``<out>/<kind>`` is refused unless ``overwrite``.
    """
    from trainer.checkpoint import save_checkpoint

    if stats is not None and dit is None:
        raise InteropError("statistics are imported with the DiT they normalize for: give the DiT file too")
    if dit is None and decoder is None:
        raise InteropError("nothing to import: give a DiT file, a decoder file or both")
    identity = imported_encoder_identity(encoder, resolution) if encoder is not None else None
    jobs = _read_imports(dit, decoder, stats, encoder, use, decoder_num_heads, head_depth, storage_options)
    _check_imports(jobs, out, encoder, resolution, overwrite, storage_options)
    request = {"dit": dit, "decoder": decoder, "stats": stats, "encoder": encoder, "resolution": resolution, "use": use}
    written = {}
    for model, stat_tensors in jobs:
        run_dir = uri_lib.join(out, model.kind)
        if overwrite:
            uri_lib.rm(run_dir, storage_options)
        meta = _checkpoint_meta(model, encoder=identity, stats=stat_tensors, stats_uri=stats, request=request)
        written[model.kind] = save_checkpoint(run_dir, model.source.step or 0, model_state=model.state_dict,
                                              meta=meta, stats=stat_tensors, storage_options=storage_options)
    return written


def _read_imports(dit, decoder, stats, encoder, use, decoder_num_heads, head_depth, storage_options
                  ) -> list[tuple[ImportedModel, dict[str, torch.Tensor] | None]]:
    """(imported model, its statistics) for the DiT and/or the decoder, every file read and checked."""
    jobs = []
    if dit is not None:
        model = import_dit_weights(dit, use=use, head_depth=head_depth, storage_options=storage_options)
        stat_tensors = read_published_stats(stats, storage_options) if stats is not None else None
        want = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
        for key, t in (stat_tensors or {}).items():
            if tuple(t.shape) != want:
                raise InteropError(f"{stats}: {key!r} has shape {list(t.shape)}, the DiT's latents are {list(want)}")
        jobs.append((model, stat_tensors))
    if decoder is not None:
        mean = std = None
        if encoder is not None:
            from pipeline.encoders import ENCODERS, resolve_encoder_name

            spec = ENCODERS[resolve_encoder_name(encoder)]
            mean, std = spec.mean, spec.std
        jobs.append((import_decoder_weights(decoder, use=use, num_heads=decoder_num_heads, image_mean=mean,
                                            image_std=std, storage_options=storage_options), None))
    return jobs


def _check_imports(jobs, out, encoder, resolution, overwrite, storage_options) -> None:
    """Latent shapes against the encoder and each other; outputs that would be replaced."""
    for model, _ in jobs:
        if encoder is not None:
            _check_against_encoder(model, encoder, resolution)
    if len(jobs) == 2:
        _check_pair(jobs[0][0], jobs[1][0])
    for model, _ in jobs:
        run_dir = uri_lib.join(out, model.kind)
        if uri_lib.exists(run_dir, storage_options) and not overwrite:
            raise InteropError(f"{run_dir} exists; choose another output or pass overwrite (--overwrite)")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    """Files written (role -> URI: "dit" or "decoder", "stats") and which weights were exported."""

    files: dict[str, str]
    weights: str


def _write_torch(obj: Any, uri: str, storage_options: dict | None = None) -> None:
    """torch.save to a path or URI; readers see the whole file or nothing."""
    uri_lib.atomic_write_with(uri, lambda f: torch.save(obj, f), storage_options)


def _stats_object(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference ``stat.pt`` dict: the present statistics as float32 [C, H, W]."""
    return {k: stats[k].detach().to("cpu", torch.float32).contiguous() for k in ("mean", "var") if k in stats}


def export_rae(ckpt: str, out: str, *, which: Literal["ema", "model"] = "ema", learn_sigma: bool = False,
               storage_options: dict | None = None) -> ExportResult:
    """Write one of our checkpoints (checkpoint or run directory) in the published layout under ``out``:
    ``dit.pt`` or ``decoder.pt`` (a bare state dict loadable strictly by the reference classes) and,
    when the checkpoint carries statistics, ``stat.pt``.

    ``which="ema"`` exports the EMA weights, or the model weights when the checkpoint has no EMA
    (``ExportResult.weights`` says which). ``learn_sigma`` (plain DiT): write the 2C-output final
    layer of the reference's default ``LightningDiT(learn_sigma=True)``, zeros for sigma.
    """
    from trainer.checkpoint import load_checkpoint

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ck = load_checkpoint(ckpt, load_train_state=False, storage_options=storage_options)
    model_meta = ck.meta.model
    cls_name = model_meta.get("class")
    if cls_name not in (*DIT_CLASSES, DECODER_CLASS):
        raise InteropError(f"{ck.uri}: a {cls_name!r} checkpoint has no published RAE layout (DiTDH, DiT, RAEDecoder)")
    used = "ema" if which == "ema" and ck.ema_state is not None else "model"
    state = ck.ema_state if used == "ema" else ck.model_state
    sd = published_state_dict(state, model_meta, learn_sigma)
    check_layout(published_layout(model_meta, learn_sigma), sd, f"{ck.uri} ({used} weights)", f"a {cls_name}")
    files = {}
    role = "decoder" if cls_name == DECODER_CLASS else "dit"
    files[role] = uri_lib.join(out, DECODER_FILE if role == "decoder" else DIT_FILE)
    _write_torch(sd, files[role], storage_options)
    if ck.stats:
        files["stats"] = uri_lib.join(out, STATS_FILE)
        _write_torch(_stats_object(ck.stats), files["stats"], storage_options)
    return ExportResult(files, used)


def export_store_stats(store: str, out: str, storage_options: dict | None = None) -> str:
    """A latent store's statistics as the reference ``stat.pt`` under ``out`` (float32 mean and var)."""
    from pipeline.store import LatentStore

    mean, var = LatentStore.open(store, storage_options).stats()
    target = uri_lib.join(out, STATS_FILE)
    _write_torch(_stats_object({"mean": torch.as_tensor(mean), "var": torch.as_tensor(var)}), target, storage_options)
    return target


def model_from_checkpoint(ckpt: str, which: Literal["ema", "model"] = "ema",
                          storage_options: dict | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode with the checkpoint's weights, loaded Checkpoint). ``which="ema"`` falls
    back to the model weights when the checkpoint has no EMA."""
    from trainer.checkpoint import load_checkpoint
    from trainer.models import build_model_from_meta

    ck = load_checkpoint(ckpt, load_train_state=False, storage_options=storage_options)
    model = build_model_from_meta(ck.meta.model)
    state = ck.ema_state if which == "ema" and ck.ema_state is not None else ck.model_state
    model.load_state_dict(state, strict=True)
    return model.eval(), ck
