"""The published RAE layout (docs/checkpoint-format.md, sections 1-5): reading the published files,
the keys and shapes each architecture expects, converting state dicts both ways, and inferring an
architecture from a state dict's shapes. The ``import-rae`` / ``export-rae`` stage (``trainer/interop.py``)
is built on it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Literal

import torch

from pipeline.weights import WeightsFileError, load_tensor_file
from schemas.errors import UserError
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
    reference ``LightningDiT(learn_sigma=True)`` builds it (the released code defaults to False).
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


def _layout_key_names(family: str, sd: dict[str, torch.Tensor]) -> tuple[str, set[str]]:
    """(what, key names of the published layout) of the model the file's names point at. Names depend
    only on the class and the block count, so they are known even without the keys inference needs:
    DiT^DH if any DiT^DH-only key is there (s_projector when the embedders' widths differ, as in every
    published one), else plain DiT, blocks = highest index + 1; a decoder likewise by decoder_layers."""
    from trainer.models.decoder import DecoderConfig
    from trainer.models.dit import DiTConfig

    def count(prefix: str) -> int:
        found = [int(k.split(".")[1]) for k in sd if k.startswith(prefix) and k.split(".")[1].isdigit()]
        return max(found, default=0) + 1

    if family == "decoder":
        cfg = DecoderConfig(in_channels=4, num_tokens=4, hidden_size=8, depth=count("decoder_layers."), num_heads=2,
                            mlp_dim=8, patch_size=1)
        return "an RAE decoder", set(published_layout(config_meta(DECODER_CLASS, cfg)))
    n, tiny = count("blocks."), dict(in_channels=4, input_size=2, hidden_size=8, num_heads=2, num_classes=2,
                                     num_time_freqs=4)
    if not any(k.startswith(("s_embedder.", "s_projector.", "enc_feat_rope.", "dec_feat_rope.")) for k in sd):
        cfg = DiTConfig(**tiny, depth=n, head_hidden_size=None)
        return "a plain DiT (LightningDiT)", set(published_layout(config_meta("DiT", cfg)))
    embeds = ("s_embedder.proj.weight", "x_embedder.proj.weight")
    same = all(k in sd for k in embeds) and _shape(sd, embeds[0])[0] == _shape(sd, embeds[1])[0]
    cfg = DiTConfig(**tiny, depth=max(n - 1, 1), head_hidden_size=8 if same else 16, head_depth=1, head_num_heads=2)
    return "a DiT^DH (DiTwDDTHead)", set(published_layout(config_meta("DiTDH", cfg)))


def _reports_missing_keys(family: str):
    """For an ``infer_*_config``: when inference fails with keys of the layout absent, a
    LayoutMismatchError listing every absent key (:func:`_layout_key_names`), not the first one only."""

    def wrap(infer):
        @functools.wraps(infer)
        def run(sd: dict[str, torch.Tensor], source: str = "state dict", **kwargs) -> "InferredModel":
            try:
                return infer(sd, source, **kwargs)
            except InteropError as e:
                what, names = _layout_key_names(family, sd)
                if not names - set(sd):
                    raise
                raise LayoutMismatchError(source, what, sorted(names - set(sd)), [], [], note=(
                    " (keys are absent, so the architecture cannot be inferred; is this the right kind of file?)"
                )) from e

        return run

    return wrap


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


@_reports_missing_keys("dit")
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


@_reports_missing_keys("decoder")
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


def rope_report(sd: dict[str, torch.Tensor], model_meta: dict, source: str) -> str | None:
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
