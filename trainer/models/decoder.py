"""The RAE pixel decoder: a ViT in the style of the MAE decoder that maps encoder tokens to pixels.

The module computes exactly the function of section 3 of ``docs/checkpoint-format.md`` and uses
the reference's parameter names (``decoder_embed``, ``decoder_pos_embed``, ``trainable_cls_token``,
``decoder_layers.{i}.attention.attention.query`` ... ``decoder_pred``), so ``state_dict()`` has the
keys and shapes of a released decoder file and such a file loads with ``load_state_dict`` as is.

Reads from small parts to the whole: position table -> attention -> MLP -> layer -> decoder ->
sizes -> noise augmentation -> weight files.

Paper vs reference code, and what this file picks (both are available):
- Position embedding: the paper calls it fixed; the reference trainer calls
  ``decoder.requires_grad_(True)``, which makes it trainable. Default: trainable (reference code),
  ``DecoderConfig.train_pos_embed=False`` freezes it.
- Noise augmentation sigma: paper |N(0, tau^2)| (default here), reference code tau * U(0, 1)
  (``rule="uniform"``).
- Init: the reference leaves every Linear at PyTorch's default init, the class token at zero and
  the position table at 2-D sin-cos; so does this file.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.weights import read_state_dict
from trainer.models.position import sincos_pos_embed_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Blocks (module names follow the reference's HF ViT-MAE layer so the state dict matches)
# --------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention projections ``query``/``key``/``value`` (all with bias)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D) attention context, before the output projection."""
        B, T, D = x.shape
        split = (B, T, self.num_heads, D // self.num_heads)  # heads' dims are contiguous
        q = self.query(x).view(split).transpose(1, 2)  # (B, H, T, Dh)
        k = self.key(x).view(split).transpose(1, 2)
        v = self.value(x).view(split).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(Dh), no mask
        return out.transpose(1, 2).reshape(B, T, D)


class Dense(nn.Module):
    """A Linear stored under ``.dense`` (the HF naming of the reference's checkpoints)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class Attention(nn.Module):
    """``attention.attention.{query,key,value}`` then ``attention.output.dense``."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.attention = SelfAttention(hidden_size, num_heads)
        self.output = Dense(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class DecoderLayer(nn.Module):
    """Pre-LN transformer layer: ``h += Out(MHA(LN_before(h)))``; ``h += Dense2(GELU(Dense1(LN_after(h))))``.

    GELU is the exact (erf) one; LayerNorm eps comes from the config (1e-12 in the reference).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.attention = Attention(hidden_size, num_heads)
        self.intermediate = Dense(hidden_size, mlp_dim)
        self.output = Dense(mlp_dim, hidden_size)
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=eps)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.layernorm_before(h))
        return h + self.output(F.gelu(self.intermediate(self.layernorm_after(h))))


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
@dataclass
class DecoderConfig:
    """Architecture of an RAE decoder. Defaults: the XL decoder for 768x16x16 DINOv2-B latents."""

    in_channels: int = 768
    """encoder token width C of the latent [B, C, g, g]"""
    num_tokens: int = 256
    """tokens of the trained grid (16x16 -> 256 px; 1024 = 32x32 -> 512 px); a perfect square"""
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 16
    """pixels per token side"""
    out_channels: int = 3
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """the encoder's input normalization (un-normalization of the output)"""
    image_std: tuple[float, float, float] = IMAGENET_STD
    layer_norm_eps: float = 1e-12
    allow_token_resize: bool = False
    """a token grid other than the trained one is resized (bilinear) instead of refused"""
    train_pos_embed: bool = True
    """reference code trains decoder_pos_embed (requires_grad_(True)); False keeps it fixed (paper)"""


DECODER_SIZES: dict[str, dict[str, int]] = {
    "decoder_b": dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "decoder_l": dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "decoder_xl": dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
    "decoder_tiny": dict(hidden_size=64, depth=2, num_heads=4, mlp_dim=128),  # tests only
}


def decoder_config(size: str, **overrides: Any) -> DecoderConfig:
    """A :class:`DecoderConfig` for a named size (``DECODER_SIZES``) with field overrides."""
    if size not in DECODER_SIZES:
        raise ValueError(f"unknown decoder size {size!r}; known: {', '.join(DECODER_SIZES)}")
    return replace(DecoderConfig(), **{**DECODER_SIZES[size], **overrides})


class RAEDecoder(nn.Module):
    """Tokens [B, C, g, g] -> image [B, 3, G*p, G*p] in encoder-normalized pixel space.

    G = sqrt(config.num_tokens) is the trained grid. An input grid g != G is refused unless
    ``config.allow_token_resize``, in which case the embedded tokens are resized to G x G
    (bilinear, align_corners False, as the reference) and the output is still G*p pixels.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        grid = math.isqrt(config.num_tokens)
        if grid * grid != config.num_tokens:
            raise ValueError(f"num_tokens must be a perfect square, got {config.num_tokens}")
        if config.hidden_size % config.num_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.grid_size = grid
        D = config.hidden_size
        self.decoder_embed = nn.Linear(config.in_channels, D)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_tokens, D),
                                              requires_grad=config.train_pos_embed)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(D, config.num_heads, config.mlp_dim, config.layer_norm_eps) for _ in range(config.depth)
        )
        self.decoder_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(D, config.patch_size ** 2 * config.out_channels)
        # Not persistent: a released decoder file holds exactly the parameters above.
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, -1, 1, 1), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Reference init: PyTorch defaults for Linear/LayerNorm, zero class token, sin-cos table
        (row 0, the class token's, zero)."""
        table = sincos_pos_embed_2d(self.config.hidden_size, self.grid_size)  # (N, D) float64
        table = torch.cat([torch.zeros(1, table.shape[1], dtype=table.dtype, device="cpu"), table], dim=0)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(table.to(torch.float32).unsqueeze(0))
            self.trainable_cls_token.zero_()

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is measured at (``decoder_pred.weight``)."""
        return self.decoder_pred.weight

    # ---- phases ---------------------------------------------------------------------------
    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) tokens -> (B, 1 + N, D): embedded, resized if allowed, class token, + pos."""
        B, C, H, W = z.shape
        if C != self.config.in_channels:
            raise ValueError(f"decoder expects {self.config.in_channels} channels, got {C} (input {tuple(z.shape)})")
        x = self.decoder_embed(z.flatten(2).transpose(1, 2))  # (B, H*W, D); token k = row*W + col
        G = self.grid_size
        if (H, W) != (G, G):
            if not self.config.allow_token_resize:
                raise ValueError(
                    f"token grid {H}x{W} differs from the trained {G}x{G}; set "
                    "DecoderConfig.allow_token_resize=True to resize it (bilinear) to the trained grid"
                )
            x = x.transpose(1, 2).reshape(B, -1, H, W)
            x = F.interpolate(x, size=(G, G), mode="bilinear", align_corners=False)
            x = x.flatten(2).transpose(1, 2)  # (B, G*G, D)
        cls = self.trainable_cls_token.expand(B, -1, -1)
        return torch.cat([cls, x], dim=1) + self.decoder_pos_embed  # (B, 1 + N, D)

    def forward_blocks(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, 1 + N, D) through the transformer layers."""
        for layer in self.decoder_layers:
            h = layer(h)
        return h

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, N, p*p*out_channels) patch values, class token dropped."""
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*c) -> (B, c, G*p, G*p). Token n = i*G + j; value (pr*p + pc)*c + ch goes to
        pixel [ch, i*p + pr, j*p + pc] (channel innermost)."""
        B, N, _ = patches.shape
        G, p, c = math.isqrt(N), self.config.patch_size, self.config.out_channels
        x = patches.reshape(B, G, G, p, p, c)  # (B, i, j, pr, pc, ch)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, c, G * p, G * p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) latent (unnormalized encoder tokens) -> (B, 3, G*p, G*p) normalized pixels."""
        return self.unpatchify(self.predict(self.forward_blocks(self.embed(z))))

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder-normalized pixels -> [0, 1] scale (x * std + mean), *not* clamped: the
        reference's L1 and GAN terms see the unclamped values."""
        return x * self.image_std + self.image_mean

    def decode_to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) latent -> (B, 3, H, W) image in [0, 1] (un-normalized and clamped)."""
        return self.unnormalize(self(z)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Noise augmentation (training input of the decoder)
# --------------------------------------------------------------------------------------------
def noise_augment(
    z: torch.Tensor,
    tau: float = 0.8,
    rule: Literal["half_normal", "uniform"] = "half_normal",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``z + sigma * N(0, I)`` with one sigma per sample; z is (B, ...) unnormalized tokens.

    ``half_normal`` (paper, default): sigma ~ |N(0, tau^2)|, E[sigma] = tau*sqrt(2/pi).
    ``uniform`` (reference code): sigma ~ tau * U(0, 1), E[sigma] = tau/2.
    A ``generator`` must live on z's device.
    """
    if tau < 0:
        raise ValueError(f"noise tau must be >= 0, got {tau}")
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)
    kw = dict(generator=generator, device=z.device, dtype=z.dtype)
    if rule == "half_normal":
        sigma = tau * torch.randn(shape, **kw).abs()
    elif rule == "uniform":
        sigma = tau * torch.rand(shape, **kw)
    else:
        raise ValueError(f"unknown noise rule {rule!r}; use 'half_normal' (paper) or 'uniform' (reference code)")
    return z + sigma * torch.randn(z.shape, **kw)


# --------------------------------------------------------------------------------------------
# Weight files (shared by the decoder, the discriminator and LPIPS)
# --------------------------------------------------------------------------------------------
def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor in name order: the same weights
    hash the same whichever file or hub they came from."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming ``source`` and the offending keys if key sets or shapes differ."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    if missing or unexpected or wrong:
        shapes = ", ".join(f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5])
        raise ValueError(
            f"{source}: state dict does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, wrong shapes [{shapes}]"
        )


def decoder_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                                   **overrides: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` of a released (bare) decoder state dict. Heads cannot be read
    from shapes: they come from ``num_heads`` or from the matching entry of ``DECODER_SIZES``."""
    try:
        hidden, in_channels = sd["decoder_embed.weight"].shape
        num_tokens = sd["decoder_pos_embed"].shape[1] - 1
        mlp_dim = sd["decoder_layers.0.intermediate.dense.weight"].shape[0]
        pred_out = sd["decoder_pred.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an RAE decoder state dict: key {e} is missing") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_layers.")})
    out_channels = overrides.pop("out_channels", 3)
    patch = math.isqrt(pred_out // out_channels)
    if num_heads is None:
        match = [s for s in DECODER_SIZES.values() if (s["hidden_size"], s["depth"], s["mlp_dim"]) == (hidden, depth, mlp_dim)]
        if not match:
            raise ValueError(f"decoder of width {hidden}, depth {depth}, MLP {mlp_dim} is not a known size; pass num_heads")
        num_heads = match[0]["num_heads"]
    return replace(DecoderConfig(), in_channels=in_channels, num_tokens=num_tokens, hidden_size=hidden, depth=depth,
                   num_heads=num_heads, mlp_dim=mlp_dim, patch_size=patch, out_channels=out_channels, **overrides)


def load_decoder_weights(model: RAEDecoder, uri: str) -> dict[str, str]:
    """Load a released decoder file (bare state dict with the reference keys) into ``model``,
    strictly. Returns ``{"source": "file", "ref": uri, "sha256": weights hash}``."""
    sd = read_state_dict(uri)
    check_state_dict(model.state_dict(), sd, uri)
    model.load_state_dict(sd, strict=True)
    return {"source": "file", "ref": str(uri), "sha256": state_dict_sha256(sd)}
