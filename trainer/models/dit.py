"""DiT^DH and plain DiT (LightningDiT-style) velocity models for RAE latents.

The function computed, and the parameter/buffer names, are exactly those of the public RAE reference
(`DiTwDDTHead`, `LightningDiT`), as fixed by `docs/checkpoint-format.md` sections 1-2. Our module
names *are* the reference key layout, so a published state dict loads with a plain key match
(`model.load_state_dict(sd)`) and our `state_dict()` is already in the published format.

Conventions (format doc section 2):
- t in [0, 1], 0 = data, 1 = noise, passed unscaled to Gaussian Fourier features `[sin, cos]`.
- Labels 0..num_classes-1; label `num_classes` (1000 on ImageNet) is the null label for CFG.
  Class dropout (rate `class_dropout_prob`) only in train mode, only when `force_drop_ids` is None.
- Tokens are row-major: token k sits at (row k // G, column k % G) of the G x G token grid.
- Blocks: RMSNorm (eps 1e-6, fp32 compute), adaLN shift/scale/gate, SwiGLU, 2-D axial RoPE, no QK-norm.

Reads small parts -> whole: helpers -> embedders -> block -> final layer -> models -> sizes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.position import sincos_pos_embed_2d


@dataclass
class DiTConfig:
    """Architecture of a DiT^DH (``head_hidden_size`` set) or a plain DiT (``head_hidden_size=None``)."""

    in_channels: int = 768  # latent channels C; callers take it from the store spec
    input_size: int = 16  # latent grid side H = W; callers take it from the store spec
    patch_size: int = 1  # p: tokens = (H/p)^2, each embedding a p x p x C patch
    hidden_size: int = 1152  # backbone width D0
    depth: int = 28  # backbone blocks
    num_heads: int = 16  # backbone attention heads
    head_hidden_size: int | None = 2048  # DDT head width D1; None -> plain DiT (no head)
    head_depth: int = 2  # DDT head blocks
    head_num_heads: int = 16  # DDT head attention heads
    num_classes: int = 1000  # label `num_classes` is the null label
    class_dropout_prob: float = 0.1  # train-mode label dropout for classifier-free guidance
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 * mlp_ratio * D)
    rope_theta: float = 10000.0
    num_time_freqs: int = 256  # Gaussian Fourier frequencies W (features: 2x this)
    train_pos_embed: bool = False  # the reference *trainer* in fact updates pos_embed; we keep it frozen

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos pos_embed)")
        widths = [("backbone", self.hidden_size, self.num_heads)]
        if self.head_hidden_size is not None:
            widths.append(("head", self.head_hidden_size, self.head_num_heads))
        for name, width, heads in widths:
            if width % heads or (width // heads) % 4:
                raise ValueError(
                    f"{name}: width {width} / {heads} heads must give a head_dim divisible by 4 (2-D RoPE pairs)"
                )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def grid_size(self) -> int:
        """Token grid side G = input_size / patch_size."""
        return self.input_size // self.patch_size


#################################################################################
#                    Position tables (sin-cos, RoPE) and helpers                #
#################################################################################


def axial_rope_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-style 2-D RoPE tables (cos, sin), each [G*G, head_dim], float32 like the reference.

    With d = head_dim/2 and f_j = theta^(-2j/d) (j < d/2), each f_j fills an adjacent channel pair.
    Channels [0, d) rotate by row * f, channels [d, 2d) by column * f (the opposite axis order of
    pos_embed). Computed in float32 with the reference's operation order so the buffers match bitwise.
    """
    d = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    pos = torch.arange(grid_size, dtype=torch.float32)
    angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=1)  # (G, d), adjacent pairs
    by_row = angles[:, None, :].expand(grid_size, grid_size, d)
    by_col = angles[None, :, :].expand(grid_size, grid_size, d)
    table = torch.cat([by_row, by_col], dim=-1).reshape(grid_size * grid_size, 2 * d)
    return table.cos(), table.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Maps each adjacent channel pair (a, b) to (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; the normalization runs in fp32, the gain in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class AxialRoPE(nn.Module):
    """Applies the 2-D RoPE tables to q or k of shape (B, heads, T, head_dim).

    The tables are *persistent* buffers (`freqs_cos`, `freqs_sin`), as in the published checkpoints.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float):
        super().__init__()
        cos, sin = axial_rope_tables(head_dim, grid_size, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos + rotate_half(x) * self.freqs_sin


#################################################################################
#                     Embedding layers for latents, time and labels             #
#################################################################################


class PatchEmbed(nn.Module):
    """p x p patches of a [B, C, H, W] latent -> row-major tokens [B, (H/p)*(W/p), D] (a strided conv)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class GaussianFourierEmbedder(nn.Module):
    """t in [0, 1] -> [sin(2 pi W t), cos(2 pi W t)] -> Linear -> SiLU -> Linear.

    W ~ N(0, 1) is a frozen *parameter* (the reference counts it and stores it; it is random, so a
    model must always load it with the rest of the weights).
    """

    def __init__(self, hidden_size: int, num_freqs: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_freqs), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_freqs, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.W.detach()[None, :] * 2 * math.pi  # same op order as the reference
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row `num_classes` is the null label used for CFG.

    The table always has the null row (even with dropout 0), so guidance works for every model.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Labels with dropped entries replaced by the null label.

        `force_drop_ids` (1 = drop) overrides the random dropout; all zeros disables it in train mode.
        Random dropout happens only when `train` and `force_drop_ids is None`.
        """
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return labels
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding_table(self.drop_labels(labels, train, force_drop_ids))


#################################################################################
#                                 Core DiT block                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on q and k; scale 1/sqrt(head_dim); no QK-norm."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # rows: all q heads, all k, all v
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: AxialRoPE) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)  # fp32 tables may upcast under autocast
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """W3(SiLU(a) * b) with (a, b) = chunk(W12 x): the first half of W12's rows is the gate."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """LightningDiT block with adaLN-Zero conditioning by c: (B, Dc) broadcast or (B, T, Dc) per token."""

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))
        # SiLU here on top of the model's own SiLU(t + y): the reference applies it twice.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: AxialRoPE) -> torch.Tensor:
        if c.dim() == 2:
            c = c[:, None]  # (B, 1, Dc): one condition for every token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """RMSNorm -> adaLN shift/scale (no gate) -> Linear to p*p*C values per token."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() == 2:
            c = c[:, None]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                   Models                                      #
#################################################################################


class _DiTBase(nn.Module):
    """What DiT and DiT^DH share: conditioning embedders, pos_embed, unpatchify, init and frozen params."""

    cfg: DiTConfig

    def _build_common(self, cfg: DiTConfig) -> None:
        self.cfg = cfg
        D0 = cfg.hidden_size
        self.t_embedder = GaussianFourierEmbedder(D0, cfg.num_time_freqs)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D0, cfg.class_dropout_prob)
        # A parameter (not a buffer) because the published checkpoints store it as one.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, D0), requires_grad=cfg.train_pos_embed)

    def frozen_parameter_names(self) -> list[str]:
        """Parameters kept out of the optimizer: the Fourier frequencies, and pos_embed unless
        `cfg.train_pos_embed`. (The reference declares pos_embed frozen but its trainer does update it,
        so published checkpoints carry a trained pos_embed; always load it from the file.)"""
        return ["t_embedder.W"] + ([] if self.cfg.train_pos_embed else ["pos_embed"])

    def trainable_parameters(self) -> list[nn.Parameter]:
        frozen = set(self.frozen_parameter_names())
        return [p for n, p in self.named_parameters() if n not in frozen]

    def initialize_weights(self) -> None:
        """Reference init. DiT^DH: other Linears keep the PyTorch default. Plain DiT (LightningDiT):
        every Linear first gets Xavier-uniform weights and zero bias. Then, for both:
        embedders Xavier on the flattened conv weight, zero bias; label table and time-MLP weights
        N(0, 0.02); W ~ N(0, 1); pos_embed the sin-cos table; adaLN and final linear zero."""
        if self.xavier_linears:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        for embedder in self.patch_embedders():
            nn.init.xavier_uniform_(embedder.proj.weight.view(embedder.proj.weight.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_embedder.W, mean=0.0, std=1.0)
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid_size)
            self.pos_embed.copy_(table.to(self.pos_embed.device, torch.float32)[None])
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W). Token n = i*G + j; value (pr*p + pc)*C + ch goes to pixel
        [ch, i*p + pr, j*p + pc] (channel innermost, as DiT and the RAE decoder)."""
        B, p, C, G = x.shape[0], self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid_size
        x = x.reshape(B, G, G, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, G * p, G * p)

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"latent shape {tuple(x.shape[1:])} does not match the model's (C, H, W) = {want}")

    def _embed_condition(self, t, y, force_drop_ids):
        """t_emb (B, D0) and y_emb (B, D0); y None means the null label for every sample."""
        if y is None:
            y = torch.full((t.shape[0],), self.cfg.num_classes, dtype=torch.long, device=t.device)
        return self.t_embedder(t), self.y_embedder(y, self.training, force_drop_ids)


class DiTDH(_DiTBase):
    """DiT with a wide DDT head (reference `DiTwDDTHead`); computes format doc section 2 exactly.

    The backbone (width D0) reads the noisy latent plus pos_embed and is conditioned by
    c = SiLU(t_emb + y_emb). Its output tokens s, fused as s_projector(SiLU(t_emb + s)), are a
    per-token condition for the head (width D1), which re-embeds the same noisy latent (no position
    embedding) and predicts the velocity. `blocks` is ONE list: backbone blocks first, head blocks last.
    """

    xavier_linears = False

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.head_hidden_size is None:
            raise ValueError("DiTDH needs cfg.head_hidden_size; use DiT for a model without a head")
        self._build_common(cfg)
        D0, D1, p, G = cfg.hidden_size, cfg.head_hidden_size, cfg.patch_size, cfg.grid_size
        self.s_embedder = PatchEmbed(cfg.in_channels, D0, p)  # backbone input
        self.x_embedder = PatchEmbed(cfg.in_channels, D1, p)  # head input
        self.s_projector = nn.Linear(D0, D1) if D0 != D1 else nn.Identity()
        self.enc_feat_rope = AxialRoPE(D0 // cfg.num_heads, G, cfg.rope_theta)
        self.dec_feat_rope = AxialRoPE(D1 // cfg.head_num_heads, G, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            [DiTBlock(D0, cfg.num_heads, D0, cfg.mlp_ratio) for _ in range(cfg.depth)]
            + [DiTBlock(D1, cfg.head_num_heads, D1, cfg.mlp_ratio) for _ in range(cfg.head_depth)]
        )
        self.final_layer = FinalLayer(D1, D1, p, cfg.in_channels)
        self.initialize_weights()

    def patch_embedders(self) -> list[PatchEmbed]:
        return [self.x_embedder, self.s_embedder]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy latent, t (B,) float in [0, 1] (0 = data), y (B,) long -> velocity (B, C, H, W)."""
        self._check_input(x)
        t_emb, y_emb = self._embed_condition(t, y, force_drop_ids)   # (B, D0) each
        c = F.silu(t_emb + y_emb)                                    # (B, D0)
        s = self.s_embedder(x) + self.pos_embed                      # (B, T, D0)
        for block in self.blocks[: self.cfg.depth]:
            s = block(s, c, self.enc_feat_rope)                      # (B, T, D0)
        s = self.s_projector(F.silu(t_emb[:, None] + s))             # (B, T, D1) per-token condition
        h = self.x_embedder(x)                                       # (B, T, D1)
        for block in self.blocks[self.cfg.depth :]:
            h = block(h, s, self.dec_feat_rope)                      # (B, T, D1)
        return self.unpatchify(self.final_layer(h, s))               # (B, C, H, W)


class DiT(_DiTBase):
    """Plain LightningDiT-style DiT (the paper's DiT-S/B/L/XL ablations on RAE latents).

    Follows the reference `LightningDiT` forward: c = t_emb + y_emb *without* an outer SiLU (each
    adaLN applies SiLU once), Xavier-init Linears, final layer conditioned on c. Keys: x_embedder,
    pos_embed, t_embedder, y_embedder, feat_rope, blocks, final_layer. The reference built with
    `learn_sigma=True` (the released code defaults to False; an early version to True) doubles
    final_layer.linear's rows and discards the second C channels; we predict only the velocity
    (trainer/interop.py keeps the velocity outputs of such a file's final linear).
    """

    xavier_linears = True

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self._build_common(cfg)
        D0 = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D0, cfg.patch_size)
        self.feat_rope = AxialRoPE(D0 // cfg.num_heads, cfg.grid_size, cfg.rope_theta)
        self.blocks = nn.ModuleList([DiTBlock(D0, cfg.num_heads, D0, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D0, D0, cfg.patch_size, cfg.in_channels)
        self.initialize_weights()

    def patch_embedders(self) -> list[PatchEmbed]:
        return [self.x_embedder]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy latent, t (B,) float in [0, 1] (0 = data), y (B,) long -> velocity (B, C, H, W)."""
        self._check_input(x)
        t_emb, y_emb = self._embed_condition(t, y, force_drop_ids)   # (B, D) each
        c = t_emb + y_emb                                            # (B, D)
        h = self.x_embedder(x) + self.pos_embed                      # (B, T, D)
        for block in self.blocks:
            h = block(h, c, self.feat_rope)                          # (B, T, D)
        return self.unpatchify(self.final_layer(h, c))               # (B, C, H, W)


#################################################################################
#                                   Sizes                                       #
#################################################################################

_BACKBONES = {
    "s": dict(hidden_size=384, depth=12, num_heads=6),
    "b": dict(hidden_size=768, depth=12, num_heads=12),
    "l": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
}
_DDT_HEAD = dict(head_hidden_size=2048, head_depth=2, head_num_heads=16)

MODEL_SIZES: dict[str, dict] = {
    **{f"dit_dh_{k}": {**v, **_DDT_HEAD} for k, v in _BACKBONES.items()},
    **{f"dit_{k}": {**v, "head_hidden_size": None} for k, v in _BACKBONES.items()},
}


def dit_config(size: str, in_channels: int, input_size: int, **overrides) -> DiTConfig:
    """The config of a named size (`MODEL_SIZES`) for a latent of C = in_channels, H = W = input_size."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DiTConfig fields {unknown}")
    return DiTConfig(**{**MODEL_SIZES[size], "in_channels": in_channels, "input_size": input_size, **overrides})


def build_model(cfg: DiTConfig) -> DiTDH | DiT:
    """DiTDH when cfg.head_hidden_size is set, else plain DiT."""
    return DiTDH(cfg) if cfg.head_hidden_size is not None else DiT(cfg)


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (pos_embed, t_embedder.W), as the reference counts them."""
    return sum(p.numel() for p in model.parameters())
