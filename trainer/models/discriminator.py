"""The decoder's GAN discriminator (a frozen DINO ViT-S/8 with small trainable heads) and DiffAug.

What the reference (``src/disc/dinodisc.py``, ``diffaug.py`` and the stage-1 config
``DINOv2-B_decXL.yaml`` of the RAE code, read in copies of it) does, and what this file mirrors:
- Backbone: DINO ViT-S/8 (``dino_deitsmall8_pretrain.pth`` = timm ``vit_small_patch8_224.dino``),
  frozen, eval mode, LayerNorm eps 1e-6, built for 224 px (28x28 = 784 patch tokens). Its MLP uses
  the **tanh-approximate GELU** (DINO itself was trained with exact GELU); ``gelu="exact"``
  selects the original. The reference zeroes the key biases, which changes nothing (softmax is
  invariant to a per-query constant), so weights are loaded as they are.
- Input: images in [-1, 1], resized (bilinear, align_corners False, no antialias) to the input
  size, mapped to ImageNet normalization. At another input size than 224 the 28x28 position grid
  is resized bilinearly at every forward (the class token's position is kept).
- Features: patch tokens (class token dropped) after blocks 2, 5, 8, 11 and the final block output
  (no final LayerNorm; with 12 blocks it equals block 11's), ordered [final, 2, 5, 8, 11].
- Head per feature, on tokens as a 1-D sequence [B, 384, T]: spectral-norm Conv1d k=1 -> norm ->
  LeakyReLU(0.2); residual (x + f(x)) / sqrt(2) with f = spectral-norm Conv1d k=9 (circular
  padding) -> norm -> LeakyReLU(0.2); spectral-norm Conv1d 384 -> 1. The "BatchNorm" is the
  reference's ``BatchNormLocal`` with virtual batch 1: per-sample statistics over the tokens,
  biased variance, eps 1e-6, affine, no running statistics. Spectral norm: one power iteration
  per training-mode forward, eps 1e-12.
- Output: per-token logits of the 5 heads concatenated, [B, 5*T] (T = 784 at 224 px).
- State dict: only the heads (``heads.{i}...``), like the reference's ``disc`` entry; the frozen
  backbone is rebuilt from its weights source and is not part of ``parameters()``.
- DiffAug (StyleGAN-T's, as the reference, with prob 1 and cutout 0): per sample, an integer
  translation up to 1/8 of each side with zero fill, then brightness + U(-0.5, 0.5), saturation
  x U(0, 2) about the channel mean, contrast x U(0.5, 1.5) about the image mean. Real and fake
  batches are augmented by separate calls (same policy, independent draws).
"""
from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.weights import read_state_dict
from trainer.models.decoder import IMAGENET_MEAN, IMAGENET_STD, check_state_dict, state_dict_sha256

DINO_BACKBONE = "vit_small_patch8_224.dino"
"""timm name of the DINO ViT-S/8 (pretrained_cfg url: dino_deitsmall8_pretrain.pth)"""
TAP_BLOCKS = (2, 5, 8, 11)
BACKBONE_SIZE = 224
"""pixel size the backbone's position table is laid out for"""


# --------------------------------------------------------------------------------------------
# DiffAug
# --------------------------------------------------------------------------------------------
def translate(x: torch.Tensor, shift_h: torch.Tensor, shift_w: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + shift_h[b], j + shift_w[b]], zero outside. x (B, C, H, W);
    shifts (B,) integer tensors."""
    B, C, H, W = x.shape
    padded = F.pad(x, (1, 1, 1, 1))  # one zero ring; every out-of-range index lands on it
    rows = (torch.arange(H, device=x.device)[None] + shift_h[:, None] + 1).clamp(0, H + 1)  # (B, H)
    cols = (torch.arange(W, device=x.device)[None] + shift_w[:, None] + 1).clamp(0, W + 1)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor,
                 contrast: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W); per-sample factors (B,): x + b, then saturation s about the channel mean,
    then contrast c about the image mean."""
    b, s, c = (t.view(-1, 1, 1, 1).to(x.dtype) for t in (brightness, saturation, contrast))
    x = x + b
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * s + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def diff_augment(x: torch.Tensor, policy: str = "color,translation",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable augmentation of a batch (B, C, H, W) in [-1, 1] (StyleGAN-T DiffAug).

    ``policy``: comma-separated subset of {"translation", "color"} ("" = identity); translation is
    applied before color whatever the order. Random factors are drawn per sample from
    ``generator`` (any device; the global RNG when None).
    """
    parts = {p.strip() for p in policy.split(",") if p.strip()}
    unknown = parts - {"translation", "color"}
    if unknown:
        raise ValueError(f"unknown DiffAug policy {sorted(unknown)}; known: 'translation', 'color'")
    B, _, H, W = x.shape
    device = generator.device if generator is not None else x.device
    u = torch.rand(5, B, generator=generator, device=device).to(x.device)  # (5, B) in [0, 1)
    if "translation" in parts:
        dh, dw = round(H * 0.125), round(W * 0.125)
        shift_h = (u[0] * (2 * dh + 1)).floor().long() - dh  # uniform integer in [-dh, dh]
        shift_w = (u[1] * (2 * dw + 1)).floor().long() - dw
        x = translate(x, shift_h, shift_w)
    if "color" in parts:
        x = color_jitter(x, brightness=u[2] - 0.5, saturation=2 * u[3], contrast=u[4] + 0.5)
    return x


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------
class TokenNorm(nn.Module):
    """The reference's ``BatchNormLocal`` (virtual batch 1): normalizes each sample's channels over
    its tokens (biased variance), then a per-channel affine. (B, C, T) -> (B, C, T), fp32 math."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(dim=2, keepdim=True)
        var = xf.var(dim=2, keepdim=True, unbiased=False)
        xf = (xf - mean) / torch.sqrt(var + self.eps)
        return xf * self.weight[None, :, None] + self.bias[None, :, None]


def sn_conv1d(c_in: int, c_out: int, kernel_size: int) -> nn.Conv1d:
    """Spectral-norm Conv1d with circular padding (state keys weight_orig/_u/_v as the reference)."""
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12)


def conv_norm_act(channels: int, kernel_size: int, eps: float) -> nn.Sequential:
    return nn.Sequential(sn_conv1d(channels, channels, kernel_size), TokenNorm(channels, eps), nn.LeakyReLU(0.2))


class Residual(nn.Module):
    """(x + fn(x)) / sqrt(2)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1.0 / math.sqrt(2.0))


def make_head(channels: int, kernel_size: int = 9, eps: float = 1e-6) -> nn.Sequential:
    """(B, C, T) token features -> (B, 1, T) logits."""
    return nn.Sequential(
        conv_norm_act(channels, 1, eps),
        Residual(conv_norm_act(channels, kernel_size, eps)),
        sn_conv1d(channels, 1, 1),
    )


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------
class DinoDiscriminator(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> per-token logits (B, 5*T), T = (input_size/8)**2.

    ``backbone`` is a timm DINO ViT-S/8 built for 224 px; it is frozen and kept outside the module
    tree (not in ``parameters()``/``state_dict()``), but follows ``.to()``/``.half()``.
    Gradients flow through it to the input (the generator's GAN term needs them).
    """

    def __init__(self, backbone: nn.Module, input_size: int = 224, kernel_size: int = 9,
                 tap_blocks: tuple[int, ...] = TAP_BLOCKS, norm_eps: float = 1e-6):
        super().__init__()
        patch = backbone.patch_embed.patch_size[0]
        if input_size % patch != 0:
            raise ValueError(f"discriminator input size {input_size} is not a multiple of the patch size {patch}")
        if max(tap_blocks) >= len(backbone.blocks):
            raise ValueError(f"tap blocks {tap_blocks} exceed the backbone's {len(backbone.blocks)} blocks")
        backbone.requires_grad_(False).eval()
        self._backbone = (backbone,)  # a tuple hides it from the module tree
        self.input_size = input_size
        self.patch_size = patch
        self.tap_blocks = tuple(tap_blocks)
        self.weights_info: dict[str, str] = {}
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # [-1, 1] -> ImageNet-normalized in one affine map: ((x + 1)/2 - mean)/std.
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            make_head(backbone.embed_dim, kernel_size, norm_eps) for _ in range(len(tap_blocks) + 1)
        )

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def _apply(self, fn, recurse: bool = True):
        # Device and dtype moves must reach the hidden backbone too.
        super()._apply(fn, recurse)
        self._backbone[0]._apply(fn, recurse)
        return self

    def pos_embed(self, grid: int) -> torch.Tensor:
        """(1, 1 + grid**2, C) position table, the patch part resized bilinearly if needed."""
        table = self.backbone.pos_embed
        base = math.isqrt(table.shape[1] - 1)
        if grid == base:
            return table
        patch_part = table[:, 1:].reshape(1, base, base, -1).permute(0, 3, 1, 2)
        patch_part = F.interpolate(patch_part, size=(grid, grid), mode="bilinear", align_corners=False)
        return torch.cat([table[:, :1], patch_part.flatten(2).transpose(1, 2)], dim=1)

    def token_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> [final, block 2, 5, 8, 11] patch tokens, each (B, C, T)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        vit = self.backbone
        h = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, T, C)
        h = torch.cat([vit.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos_embed(self.input_size // self.patch_size)  # (B, 1 + T, C)
        taps = []
        for i, block in enumerate(vit.blocks):
            h = block(h)
            if i in self.tap_blocks:
                taps.append(h[:, 1:].transpose(1, 2))
        return [h[:, 1:].transpose(1, 2)] + taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 5*T) logits."""
        feats = self.token_features(x)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, feats)], dim=1)


def build_dino_backbone(gelu: Literal["tanh", "exact"] = "tanh", pretrained: bool = False) -> nn.Module:
    """timm DINO ViT-S/8 at 224 px, classifier-free; ``pretrained`` fetches the hub weights."""
    import timm

    act = {"tanh": "gelu_tanh", "exact": "gelu"}[gelu]
    return timm.create_model(DINO_BACKBONE, pretrained=pretrained, num_classes=0, act_layer=act)


def _dino_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept DINO / timm key layouts: strip ``module.``/``backbone.`` prefixes, drop a ``head``."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("head."):
            out[k] = v
    return out


def build_discriminator(weights: str = "hub", input_size: int = 224, seed: int = 0, kernel_size: int = 9,
                        gelu: Literal["tanh", "exact"] = "tanh") -> DinoDiscriminator:
    """The reference discriminator; ``disc.weights_info`` = {"source", "ref", "sha256"}.

    ``weights``: ``"hub"`` (timm / Hugging Face ``timm/vit_small_patch8_224.dino``; with
    ``HF_HUB_OFFLINE=1`` and no cached copy it fails at once), a local path or fsspec URI of the
    DINO ViT-S/8 state dict (``dino_deitsmall8_pretrain.pth`` or the timm file), or ``"random"``
    (explicit random backbone from ``seed``). The heads are always drawn from ``seed``, and the
    global RNG is left as it was. ``sha256`` hashes the backbone's weights (see
    :func:`state_dict_sha256`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights == "hub":
            try:
                backbone = build_dino_backbone(gelu, pretrained=True)
            except (OSError, RuntimeError) as e:
                raise RuntimeError(
                    f"could not fetch the discriminator backbone {DINO_BACKBONE!r} from the hub "
                    f"({type(e).__name__}: {str(e)[:200]}). Offline, pass weights=<path to "
                    "dino_deitsmall8_pretrain.pth or the timm file> or weights='random'."
                ) from e
            info = {"source": "hub", "ref": f"timm/{DINO_BACKBONE}"}
        else:
            backbone = build_dino_backbone(gelu, pretrained=False)
            if weights == "random":
                info = {"source": "random", "ref": f"seed={seed}"}
            else:
                sd = _dino_state_dict(read_state_dict(weights))
                check_state_dict(backbone.state_dict(), sd, weights)
                backbone.load_state_dict(sd, strict=True)
                info = {"source": "file", "ref": os.fspath(weights)}
        disc = DinoDiscriminator(backbone, input_size=input_size, kernel_size=kernel_size)
    disc.weights_info = {**info, "sha256": state_dict_sha256(backbone.state_dict())}
    return disc
