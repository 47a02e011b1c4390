"""Frozen representation encoders and the RAE latent recipe.

An encoder turns a batch of center-cropped images into RAE latents:

    x [B, 3, R, R] in [0, 1]  (R = crop resolution, 256 or 512)
      -> bicubic resize to the encoder input S (antialias off, align_corners off)
      -> normalize with the encoder's own mean / std
      -> ViT trunk (timm blocks), position embeddings resized to S/patch the way the
         Hugging Face ``transformers`` model resizes them
      -> drop class / register tokens
      -> final LayerNorm *without* its learned affine (each token standardized)
      -> z [B, 768, g, g], g = S / patch (16 at 256px, 32 at 512px), row-major tokens.

The reference RAE code runs the ``transformers`` models (``Dinov2WithRegistersModel``,
``SiglipModel(...).vision_model``, ``ViTMAEForPreTraining(...).vit``). Those resize their position
embeddings at every forward, each with its own filter:

    dinov2   37x37 (518 px) -> g x g, bicubic, antialias ON, align_corners off, in float32
    siglip2  16x16 (256 px) -> g x g, bicubic, antialias off (identity at 256 px)
    mae      14x14 (224 px) -> g x g, bicubic, antialias off

timm would resample once at load with its own filter, which gives different latents. Here the
weights keep the pretraining grid and :func:`resize_pos_embed` applies the transformers filter at
each forward (a few hundred microseconds), so latents match the reference to float rounding.
MAE runs with mask ratio 0 and noise ``arange(N)``, as the reference does, which keeps every patch
in its original order: no masking and no shuffle, so none is done here.

Weights live in timm's key layout (``RAEEncoder.state_dict()``). They come from the Hugging Face
Hub (the reference's repositories, converted), from a local file or URI in timm or ``transformers``
layout, or from a seeded random init. Nothing here touches the network at import.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import uri as uri_lib
from pipeline.pretrained import is_pretrained_folder, read_pretrained_folder
from pipeline.weights import TORCH_SUFFIXES, WeightsFileError, read_state_dict
from schemas.errors import UserError

ENCODER_NAMES: tuple[str, ...] = ("dinov2", "siglip2", "mae")
ALIASES: dict[str, str] = {"siglip": "siglip2"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Resolution at which `base_input_size` applies; other resolutions scale it linearly.
BASE_RESOLUTION = 256


class EncoderWeightsError(UserError, ValueError):
    """A weights file that cannot be read, or does not fit the encoder's architecture."""


class HubWeightsUnavailableError(UserError, RuntimeError):
    """The model hub cannot be reached (offline, or the files are not cached)."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that fixes one encoder's function (architecture, filters, normalization).

    ``base_input_size`` is the encoder input at 256 px crops; ``pretrained_input_size`` is the
    image size the stored position embeddings were trained at (their grid is that / patch).
    ``num_prefix_tokens`` counts the class + register tokens dropped from the output.
    """

    name: str
    timm_arch: str
    hf_repo: str
    timm_hub_id: str
    patch_size: int
    base_input_size: int
    hidden_size: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    depth: int = 12
    num_heads: int = 12
    pretrained_input_size: int = 224
    layer_norm_eps: float = 1e-6
    # Filter the transformers model uses to resize its position embeddings.
    pos_embed_antialias: bool = False
    # timm's activation name where transformers' differs from timm's default (exact GELU).
    act_layer: str | None = None


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2": EncoderSpec(
        name="dinov2",
        timm_arch="vit_base_patch14_reg4_dinov2",
        hf_repo="facebook/dinov2-with-registers-base",
        timm_hub_id="timm/vit_base_patch14_reg4_dinov2.lvd142m",
        patch_size=14,
        base_input_size=224,
        hidden_size=768,
        num_prefix_tokens=1 + 4,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pretrained_input_size=518,
        layer_norm_eps=1e-6,
        pos_embed_antialias=True,
    ),
    "siglip2": EncoderSpec(
        name="siglip2",
        timm_arch="vit_base_patch16_siglip_256",
        hf_repo="google/siglip2-base-patch16-256",
        timm_hub_id="timm/vit_base_patch16_siglip_256.v2_webli",
        patch_size=16,
        base_input_size=256,
        hidden_size=768,
        num_prefix_tokens=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pretrained_input_size=256,
        layer_norm_eps=1e-6,
        # transformers' SigLIP uses gelu_pytorch_tanh; timm's SigLIP models default to exact GELU.
        act_layer="gelu_tanh",
    ),
    "mae": EncoderSpec(
        name="mae",
        timm_arch="vit_base_patch16_224",
        hf_repo="facebook/vit-mae-base",
        timm_hub_id="timm/vit_base_patch16_224.mae",
        patch_size=16,
        base_input_size=256,
        hidden_size=768,
        num_prefix_tokens=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pretrained_input_size=224,
        # transformers' ViTMAE config uses 1e-12 (the original MAE code used 1e-6).
        layer_norm_eps=1e-12,
    ),
}


def resolve_encoder_name(name: str) -> str:
    """Canonical encoder name for a name or alias; ValueError listing the valid names otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in ENCODERS:
        valid = ", ".join(ENCODER_NAMES + tuple(f"{a} (= {c})" for a, c in ALIASES.items()))
        raise ValueError(f"unknown encoder {name!r}; valid encoders: {valid}")
    return key


def encoder_input_size(name: str, resolution: int) -> int:
    """Side of the square image the encoder sees for crops of ``resolution`` px.

    256 px: dinov2 224, siglip2 256, mae 256; 512 px: 448, 512, 512 (linear in the resolution).
    """
    spec = ENCODERS[resolve_encoder_name(name)]
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    scaled = spec.base_input_size * resolution
    size = scaled // BASE_RESOLUTION
    if scaled % BASE_RESOLUTION or size % spec.patch_size:
        raise ValueError(
            f"resolution {resolution} does not give a whole number of {spec.patch_size}px patches "
            f"for {spec.name} (input = {spec.base_input_size} * {resolution} / {BASE_RESOLUTION}); "
            f"use a multiple of {BASE_RESOLUTION}, e.g. 256 or 512"
        )
    return size


def latent_shape(name: str, resolution: int) -> tuple[int, int, int]:
    """(channels, grid, grid) of one latent: (768, 16, 16) at 256 px, (768, 32, 32) at 512 px."""
    spec = ENCODERS[resolve_encoder_name(name)]
    grid = encoder_input_size(spec.name, resolution) // spec.patch_size
    return (spec.hidden_size, grid, grid)


# ---------------------------------------------------------------------------------------------
# The position-embedding resize of the transformers models
# ---------------------------------------------------------------------------------------------


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, antialias: bool) -> torch.Tensor:
    """Resize patch position embeddings [1, n*n, C] to [1, grid*grid, C] as transformers does.

    Bicubic, align_corners off, computed in float32; unchanged when the grid already matches
    (transformers skips the resize then too). ``antialias`` is on for DINOv2 only.
    """
    _, num_positions, dim = pos_embed.shape
    source = math.isqrt(num_positions)
    if source * source != num_positions:
        raise ValueError(f"position embeddings of {num_positions} tokens do not form a square grid")
    if source == grid:
        return pos_embed
    square = pos_embed.reshape(1, source, source, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        square.to(torch.float32), size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias
    ).to(pos_embed.dtype)
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


def _create_timm_trunk(spec: EncoderSpec, depth: int) -> nn.Module:
    """timm VisionTransformer at the pretraining image size, without any pooling or head."""
    import timm  # heavy import, only when a model is built

    kwargs: dict[str, Any] = dict(
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=spec.pretrained_input_size,
        depth=depth,
        norm_layer=functools.partial(nn.LayerNorm, eps=spec.layer_norm_eps),
    )
    if spec.act_layer is not None:
        kwargs["act_layer"] = spec.act_layer
    return timm.create_model(spec.timm_arch, **kwargs)


class RAEEncoder(nn.Module):
    """Frozen ViT encoder giving RAE latents.

    forward(x: float32 [B, 3, R, R] in [0, 1], R = ``resolution``) -> float32 [B, 768, g, g]:
    bicubic resize to ``input_size`` (antialias off, align_corners off) as the reference does,
    normalize with the encoder's mean/std, timm ViT blocks, drop class/register tokens, final
    LayerNorm without affine (each token has mean 0, variance 1 over its 768 channels), tokens laid
    out row-major as [C, g, g].

    ``state_dict()`` is in timm's key layout (``cls_token``, ``reg_token``, ``pos_embed`` at the
    pretraining grid, ``patch_embed.proj.*``, ``blocks.N.*``); the final norm's affine and the
    heads are not part of it. ``seed`` gives a deterministic random init; ``seed=None`` leaves the
    parameters on the meta device, to be filled by :meth:`load_timm_state_dict`. ``depth`` below
    the real depth is for tests and debugging only.
    """

    def __init__(self, name: str, resolution: int = BASE_RESOLUTION, *, seed: int | None = 0,
                 depth: int | None = None):
        super().__init__()
        self.spec: EncoderSpec = ENCODERS[resolve_encoder_name(name)]
        self.resolution = resolution
        self.input_size = encoder_input_size(self.spec.name, resolution)
        self.grid_size = self.input_size // self.spec.patch_size
        self.depth = self.spec.depth if depth is None else int(depth)
        if not 1 <= self.depth <= self.spec.depth:
            raise ValueError(f"depth must be in [1, {self.spec.depth}], got {depth}")

        if seed is None:
            init_context: Any = torch.device("meta")
        else:
            init_context = _seeded(int(seed))
        with init_context:
            trunk = _create_timm_trunk(self.spec, self.depth)
        # Adopt the trunk's parts so that this module's state_dict is exactly timm's layout.
        self.patch_embed = trunk.patch_embed
        self.cls_token = trunk.cls_token  # None for SigLIP
        self.reg_token = trunk.reg_token  # None unless DINOv2
        self.pos_embed = trunk.pos_embed
        self.norm_pre = trunk.norm_pre
        self.blocks = trunk.blocks

        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, S, S] -> tokens [B, P + g*g, C] (P prefix tokens first).

        Order of additions as in transformers: patch tokens + resized patch position embeddings;
        class token + its own position embedding (for DINOv2 the latter is folded into
        ``cls_token`` when weights are converted, as timm does); registers get none.
        """
        batch = x.shape[0]
        patches = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, g*g, C)
        name = self.spec.name
        if name == "mae":
            patch_pos = resize_pos_embed(self.pos_embed[:, 1:], self.grid_size, antialias=False)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
            tokens = torch.cat([cls, patches + patch_pos], dim=1)
        else:
            patch_pos = resize_pos_embed(self.pos_embed, self.grid_size, self.spec.pos_embed_antialias)
            tokens = patches + patch_pos
            prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
            tokens = torch.cat(prefix + [tokens], dim=1)
        return self.norm_pre(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(
                f"{self.spec.name} encoder at {self.resolution}px expects images [B, 3, {self.resolution}, "
                f"{self.resolution}], got {list(x.shape)}"
            )
        if self.input_size != self.resolution:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        tokens = self.blocks(self.embed(x))  # (B, P + g*g, C)
        patch_tokens = tokens[:, self.spec.num_prefix_tokens:]
        # The reference removes the final LayerNorm's affine: tokens are only standardized.
        patch_tokens = F.layer_norm(patch_tokens, (patch_tokens.shape[-1],), eps=self.spec.layer_norm_eps)
        batch, _, channels = patch_tokens.shape
        return patch_tokens.transpose(1, 2).reshape(batch, channels, self.grid_size, self.grid_size).float()

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load timm-layout weights strictly (cast to float32); EncoderWeightsError naming every
        missing, unexpected and mis-shaped key otherwise. Heads, pooling and the final norm's
        affine (``norm.*``, ``fc_norm.*``, ``head.*``, ``attn_pool.*``) are accepted and ignored."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        given = {k: v for k, v in state_dict.items() if not _IGNORED_TIMM_KEYS.match(k)}
        missing = sorted(expected.keys() - given.keys())
        unexpected = sorted(given.keys() - expected.keys())
        misshaped = [
            f"{k}: file {tuple(given[k].shape)} vs model {expected[k]}"
            for k in sorted(expected.keys() & given.keys())
            if tuple(given[k].shape) != expected[k]
        ]
        not_float = [k for k in sorted(expected.keys() & given.keys()) if not given[k].is_floating_point()]
        if missing or unexpected or misshaped or not_float:
            raise EncoderWeightsError(
                f"{source}: weights do not fit the {self.spec.name} encoder "
                f"({self.spec.timm_arch}, depth {self.depth}, timm layout):"
                + _key_report("missing keys", missing)
                + _key_report("unexpected keys", unexpected)
                + _key_report("mis-shaped keys", misshaped)
                + _key_report("non-float tensors", not_float)
            )
        weights = {k: given[k].to(torch.float32).contiguous() for k in expected}
        self.load_state_dict(weights, strict=True, assign=True)
        self.requires_grad_(False)


_IGNORED_TIMM_KEYS = re.compile(r"^(norm|fc_norm|head|attn_pool|head_drop)\.")


def _key_report(title: str, items: list[str], limit: int = 16) -> str:
    """One report line; per-block entries that differ only in the block index are merged
    (``blocks.{1-11}.attn.qkv.weight``) so that whole-architecture mismatches stay readable."""
    if not items:
        return ""
    plain: list[str] = []
    per_block: dict[tuple[str, str], list[int]] = {}
    for item in items:
        m = re.match(r"^(.*?blocks\.)(\d+)(\..*)$", item)
        if m:
            per_block.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
        else:
            plain.append(item)
    entries = plain + [f"{head}{_index_ranges(sorted(idx))}{tail}" for (head, tail), idx in per_block.items()]
    shown = ", ".join(entries[:limit])
    more = f", ... ({len(entries) - limit} more patterns)" if len(entries) > limit else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def _index_ranges(indices: list[int]) -> str:
    if len(indices) == 1:
        return str(indices[0])
    spans: list[str] = []
    start = prev = indices[0]
    for cur in indices[1:] + [None]:
        if cur is None or cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
        prev = cur
    return "{" + ",".join(spans) + "}"


@contextlib.contextmanager
def _seeded(seed: int):
    """Run with the global CPU RNG seeded, restoring its previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers layout -> timm layout
# ---------------------------------------------------------------------------------------------

# Per encoder: prefixes of the whole model in hub files, keys that are not part of the trunk
# (ignored), and per-layer renames. Both the classic key names of the hub files and the names
# transformers 5.x uses in memory are accepted.
_HF_PREFIXES = {
    "dinov2": ("dinov2_with_registers.",),
    "siglip2": ("vision_model.",),
    "mae": ("vit.",),
}
_HF_IGNORED = {
    "dinov2": re.compile(r"^(embeddings\.mask_token$|classifier\.)"),
    "siglip2": re.compile(r"^(text_model\.|logit_scale$|logit_bias$|head\.|classifier\.)"),
    "mae": re.compile(r"^(decoder\.|pooler\.|classifier\.)"),
}
_HF_LAYER = {
    "dinov2": r"encoder\.layer\.(\d+)\.",
    "siglip2": r"encoder\.layers\.(\d+)\.",
    "mae": r"(?:encoder\.layer|layers)\.(\d+)\.",
}
_HF_LAYER_RENAMES = {
    "dinov2": {
        "norm1": "norm1", "norm2": "norm2",
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
        "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    },
    "siglip2": {
        "layer_norm1": "norm1", "layer_norm2": "norm2",
        "self_attn.out_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    },
    "mae": {
        "layernorm_before": "norm1", "layernorm_after": "norm2",
        "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
        "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
        "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    },
}
_HF_QKV = {
    "dinov2": r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)",
    "siglip2": r"self_attn\.(q|k|v)_proj",
    "mae": r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)",
}
_HF_EMBED_RENAMES = {
    "dinov2": {
        "embeddings.patch_embeddings.projection": "patch_embed.proj",
        "embeddings.register_tokens": "reg_token",
        "layernorm": "norm",
    },
    "siglip2": {
        "embeddings.patch_embedding": "patch_embed.proj",
        "post_layernorm": "norm",
    },
    "mae": {
        "embeddings.patch_embeddings.projection": "patch_embed.proj",
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "layernorm": "norm",
    },
}


def _rename_embed(table: dict[str, str], key: str) -> str | None:
    for src, dst in table.items():
        if key == src:
            return dst
        if key.startswith(src + ".") and key[len(src) + 1:] in ("weight", "bias"):
            return f"{dst}.{key[len(src) + 1:]}"
    return None


def convert_hf_state_dict(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``transformers`` layout -> this module's timm layout, for encoder ``name``.

    Accepts the hub files' key names (``attention.attention.query``, ``encoder.layer.N``...) and
    transformers 5.x in-memory names (``attention.q_proj``, ``layers.N``...), with or without the
    whole-model prefix (``vit.``, ``vision_model.``). Separate q/k/v projections are concatenated
    into timm's ``attn.qkv``; DINOv2's class position embedding is folded into ``cls_token`` and
    ``pos_embed`` keeps the patch grid only (timm's convention; the sum is the same one the
    transformers model computes). Heads, decoders, text towers and mask tokens are dropped. Keys
    that do not convert are passed through unchanged, so a strict load reports them.
    """
    name = resolve_encoder_name(name)
    layer_re = re.compile(_HF_LAYER[name] + r"(.+)\.(weight|bias|lambda1)$")
    qkv_re = re.compile(_HF_LAYER[name] + _HF_QKV[name] + r"\.(weight|bias)$")
    renames = _HF_LAYER_RENAMES[name]
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    extras: dict[str, torch.Tensor] = {}  # DINOv2 class token / position embeddings, combined below

    for key, value in sd.items():
        short = key
        for prefix in _HF_PREFIXES[name]:
            if short.startswith(prefix):
                short = short[len(prefix):]
                break
        if _HF_IGNORED[name].match(short):
            continue
        if name == "dinov2" and short in ("embeddings.cls_token", "embeddings.position_embeddings"):
            extras[short] = value
            continue
        if name == "siglip2" and short == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0) if value.ndim == 2 else value
            continue
        target = _rename_embed(_HF_EMBED_RENAMES[name], short)
        if target is not None:
            out[target] = value
            continue
        m = qkv_re.fullmatch(short)
        if m:
            layer, param = m.group(1), m.groups()[-1]
            part = next(g for g in m.groups()[1:-1] if g)[0]  # query/q -> q, key/k -> k, value/v -> v
            qkv_parts.setdefault((layer, param), {})[part] = (key, value)
            continue
        m = layer_re.fullmatch(short)
        if m:
            layer, module, param = m.groups()
            if param == "lambda1":
                module, param = f"{module}.lambda1", ""
            if module in renames:
                dst = renames[module]
                out[f"blocks.{layer}.{dst}" + (f".{param}" if param else "")] = value
                continue
        out[key] = value  # not convertible: left for the strict load to report

    for (layer, param), parts in qkv_parts.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
        else:
            out.update({orig_key: value for orig_key, value in parts.values()})

    if extras:
        cls = extras.get("embeddings.cls_token")
        pos = extras.get("embeddings.position_embeddings")
        if cls is not None and pos is not None and pos.ndim == 3 and cls.shape[-1] == pos.shape[-1]:
            out["cls_token"] = cls + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
        else:
            out.update(extras)
    return out


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """The key layout of a ViT state dict: "timm" or "hf" (transformers); EncoderWeightsError if neither."""
    keys = list(sd)
    if any(re.search(r"(^|\.)blocks\.\d+\.", k) for k in keys) or "patch_embed.proj.weight" in sd:
        return "timm"
    if any(re.search(r"(^|\.)(encoder\.layers?|layers)\.\d+\.", k) for k in keys):
        return "hf"
    raise EncoderWeightsError(
        "weights are neither in timm layout (blocks.N.attn.qkv...) nor in transformers layout "
        f"(encoder.layer.N... / encoder.layers.N...); first keys: {keys[:8]}"
    )


# ---------------------------------------------------------------------------------------------
# The config.json of a save_pretrained folder
# ---------------------------------------------------------------------------------------------

# transformers' model_type of each encoder's checkpoint (a whole SigLIP model keeps the vision
# tower's fields under vision_config), and the fields beyond those of EncoderSpec that fix its function.
_HF_MODEL_TYPES = {
    "dinov2": ("dinov2_with_registers",),
    "siglip2": ("siglip_vision_model", "siglip"),
    "mae": ("vit_mae",),
}
_HF_CONFIG_EXTRA: dict[str, dict[str, Any]] = {
    "dinov2": {"num_register_tokens": 4, "mlp_ratio": 4, "hidden_act": "gelu", "use_swiglu_ffn": False},
    "siglip2": {"intermediate_size": 3072, "hidden_act": "gelu_pytorch_tanh"},
    "mae": {"intermediate_size": 3072, "hidden_act": "gelu", "qkv_bias": True},
}


def expected_hf_config(name: str, depth: int | None = None) -> dict[str, Any]:
    """The transformers config fields of encoder ``name`` (``depth`` blocks; None: the real depth)."""
    spec = ENCODERS[resolve_encoder_name(name)]
    return {"hidden_size": spec.hidden_size, "patch_size": spec.patch_size, "image_size": spec.pretrained_input_size,
            "num_hidden_layers": spec.depth if depth is None else int(depth), "num_attention_heads": spec.num_heads,
            "layer_norm_eps": spec.layer_norm_eps, "num_channels": 3, **_HF_CONFIG_EXTRA[spec.name]}


def _same_value(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0)
    return got == want


def check_hf_config(name: str, config: dict, source: str, depth: int | None = None) -> None:
    """EncoderWeightsError naming every field of a ``save_pretrained`` config.json (transformers
    layout: ``model_type``, ``hidden_size``, ``patch_size``, ``image_size``, ``num_register_tokens``
    ...; or timm's: ``architecture``) that contradicts encoder ``name`` with ``depth`` blocks. A
    field the file leaves out is not checked: the weights' shapes are, when they load."""
    spec = ENCODERS[resolve_encoder_name(name)]
    what = f"the {spec.name} encoder ({spec.hf_repo}{f', {depth} blocks' if depth is not None else ''})"
    if "model_type" not in config and "architecture" in config:  # a timm folder (push_to_hub)
        if config["architecture"] != spec.timm_arch:
            raise EncoderWeightsError(f"{source}: architecture is {config['architecture']!r}; {what} is timm's "
                                      f"{spec.timm_arch!r}")
        return
    model_type, where = config.get("model_type"), ""
    if model_type not in _HF_MODEL_TYPES[spec.name]:
        raise EncoderWeightsError(f"{source}: model_type is {model_type!r}; {what} has model_type "
                                  f"{' or '.join(repr(t) for t in _HF_MODEL_TYPES[spec.name])}")
    if model_type == "siglip":
        config, where = config.get("vision_config") or {}, "vision_config."
    wrong = [f"{where}{key} is {config[key]!r}, expected {want!r}"
             for key, want in expected_hf_config(spec.name, depth).items()
             if key in config and not _same_value(config[key], want)]
    if wrong:
        raise EncoderWeightsError(f"{source}: does not describe {what}: " + "; ".join(wrong))


# ---------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------


def state_dict_checksum(sd: dict[str, torch.Tensor]) -> str:
    """sha256 hex digest over the sorted keys, each with its dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(sd):
        tensor = sd[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_hub_weights(name: str) -> str:
    """Local path of encoder ``name``'s weights from the Hugging Face Hub (the reference's repo).

    Offline (``HF_HUB_OFFLINE``) only the local cache is looked at, so a miss fails at once with
    HubWeightsUnavailableError telling the user to pass a weights file or ``random``.
    """
    spec = ENCODERS[resolve_encoder_name(name)]
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    filenames = ("model.safetensors", "pytorch_model.bin")
    for filename in filenames:
        try:
            return hf_hub_download(spec.hf_repo, filename, local_files_only=True)
        except (EntryNotFoundError, OSError):  # not in the local cache
            pass
    failures = []
    if offline:
        why = "HF_HUB_OFFLINE is set and they are not in the local cache"
    elif not _endpoint_reachable(constants.ENDPOINT):
        # huggingface_hub retries for about a minute on a closed network: fail at once instead.
        why = f"{constants.ENDPOINT} is unreachable and they are not in the local cache"
    else:
        for filename in filenames:
            try:
                return hf_hub_download(spec.hf_repo, filename)
            except (EntryNotFoundError, OSError) as e:  # not on the hub / connection lost
                failures.append(f"{filename}: {type(e).__name__}")
        why = "; ".join(failures)
    raise HubWeightsUnavailableError(
        f"cannot get the {spec.name} encoder weights from the Hugging Face Hub ({spec.hf_repo}): {why}. "
        "Pass a local weights file path or URI instead (weights=<file>: .safetensors, .pt or .bin, timm or "
        "transformers layout), or weights='random' for a seeded random init."
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def build_encoder(name: str, resolution: int = BASE_RESOLUTION, weights: str = "hub",
                  seed: int = 0, *, depth: int | None = None) -> tuple[RAEEncoder, dict]:
    """The frozen encoder (eval mode, no grads, on CPU) and a description of its weights.

    ``weights``: ``"hub"`` (the reference's Hugging Face repository, converted), a local path or
    fsspec URI of a weights file in timm or transformers layout, a folder ``save_pretrained`` wrote
    (``config.json`` + ``model.safetensors``, or shards with ``model.safetensors.index.json``; its
    config is checked against the encoder: :func:`check_hf_config`), or ``"random"`` (init seeded by
    ``seed``). The info dict: ``{"source": "hub"|"file"|"random", "ref": repo id / file URI /
    "seed=N", "layout": "timm"|"hf"|None, "sha256": state_dict_checksum of the loaded timm-layout
    weights, "seed": int|None}``. ``depth`` (fewer blocks than the real model) is for fast tests
    of code around the encoder only; such an encoder does not compute the RAE latents.
    """
    name = resolve_encoder_name(name)
    encoder_input_size(name, resolution)  # validate before any download or build
    if weights == "random":
        encoder = RAEEncoder(name, resolution, seed=int(seed), depth=depth)
        info = {"source": "random", "ref": f"seed={int(seed)}", "layout": None, "seed": int(seed)}
    else:
        if weights == "hub":
            path = fetch_hub_weights(name)
            info = {"source": "hub", "ref": ENCODERS[name].hf_repo, "seed": None}
        else:
            path = weights
            info = {"source": "file", "ref": uri_lib.normalize(weights), "seed": None}
        # Whole SigLIP checkpoints carry a text tower as big as the vision one: not read.
        try:
            if weights != "hub" and is_pretrained_folder(path):
                _, sd, _ = read_pretrained_folder(
                    path, skip_prefixes=("text_model.",),
                    check_config=lambda config, where: check_hf_config(name, config, where, depth=depth))
            elif not str(path).lower().endswith((".safetensors", *TORCH_SUFFIXES)) and not uri_lib.exists(path):
                raise FileNotFoundError(path)
            else:
                sd = read_state_dict(path, skip_prefixes=("text_model.",))
        except FileNotFoundError:
            raise FileNotFoundError(f"encoder weights file not found: {weights}") from None
        except WeightsFileError as e:
            raise EncoderWeightsError(str(e)) from None
        layout = detect_layout(sd)
        if layout == "hf":
            sd = convert_hf_state_dict(name, sd)
        encoder = RAEEncoder(name, resolution, seed=None, depth=depth)
        encoder.load_timm_state_dict(sd, source=str(weights if weights != "hub" else path))
        info["layout"] = layout
    info["sha256"] = state_dict_checksum(encoder.state_dict())
    return encoder, {k: info[k] for k in ("source", "ref", "layout", "sha256", "seed")}


__all__ = [
    "ALIASES", "ENCODERS", "ENCODER_NAMES", "EncoderSpec", "EncoderWeightsError", "HubWeightsUnavailableError",
    "RAEEncoder", "build_encoder", "check_hf_config", "convert_hf_state_dict", "detect_layout", "encoder_input_size",
    "expected_hf_config",
    "fetch_hub_weights", "latent_shape", "resize_pos_embed", "resolve_encoder_name",
    "state_dict_checksum",
]
