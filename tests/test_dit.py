"""DiT^DH / DiT: sizes, key layout, init, class dropout, position tables, and the exact forward function.

Everything expected here is written from docs/checkpoint-format.md (sections 1-2), not derived
from the model: the key/shape tables, the pos_embed and RoPE tables, and an independent float64
re-computation of the forward equations that the model must match with random weights.
"""
from __future__ import annotations

import math

import pytest
import torch

from trainer.models.dit import DiT, DiTConfig, DiTDH, build_model, count_parameters, dit_config

# A tiny DiT^DH: C=8 on a 4x4 grid, backbone 32 wide / 2 blocks / 2 heads, head 48 / 2 / 2, 10 classes.
TINY = dict(in_channels=8, input_size=4, hidden_size=32, depth=2, num_heads=2,
            head_hidden_size=48, head_depth=2, head_num_heads=2, num_classes=10)


def tiny(**overrides) -> DiTConfig:
    return DiTConfig(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero random weights everywhere (gains near 1 so activations stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm1.weight") or name.endswith("norm2.weight")
                    or name.endswith("norm_final.weight") else 0.2 * noise)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.timeout(60)
def test_parameter_counts_match_the_reference():
    with torch.device("meta"):
        xl = build_model(dit_config("dit_dh_xl", 768, 16))
        s = build_model(dit_config("dit_dh_s", 768, 16))
    assert isinstance(xl, DiTDH)
    assert count_parameters(xl) == 838_675_796
    assert count_parameters(s) == 196_455_764


def test_build_model_picks_the_class_and_rejects_bad_configs():
    assert isinstance(build_model(tiny()), DiTDH)
    assert isinstance(build_model(tiny(head_hidden_size=None)), DiT)
    assert dit_config("dit_s", 8, 4).head_hidden_size is None
    with pytest.raises(ValueError, match="unknown model size"):
        dit_config("dit_dh_m", 768, 16)
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        dit_config("dit_dh_s", 768, 16, hidden=3)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny(patch_size=3)
    with pytest.raises(ValueError, match="head_dim"):
        tiny(hidden_size=36, num_heads=2)  # head_dim 18: not a whole number of RoPE pairs per axis


# ----------------------------------------------------------------------------- layout and init


def _block_keys(prefix: str, D: int, Dc: int, H: int) -> dict[str, tuple]:
    return {
        f"{prefix}.norm1.weight": (D,), f"{prefix}.norm2.weight": (D,),
        f"{prefix}.attn.qkv.weight": (3 * D, D), f"{prefix}.attn.qkv.bias": (3 * D,),
        f"{prefix}.attn.proj.weight": (D, D), f"{prefix}.attn.proj.bias": (D,),
        f"{prefix}.mlp.w12.weight": (2 * H, D), f"{prefix}.mlp.w12.bias": (2 * H,),
        f"{prefix}.mlp.w3.weight": (D, H), f"{prefix}.mlp.w3.bias": (D,),
        f"{prefix}.adaLN_modulation.1.weight": (6 * D, Dc), f"{prefix}.adaLN_modulation.1.bias": (6 * D,),
    }


def test_state_dict_follows_the_format_doc_tables():
    # Format doc section 1 with C=8, 16 tokens, D0=32, D1=48, 10 classes (+1 null row);
    # SwiGLU hidden int(2/3 * 4 * D): 85 for 32, 128 for 48; RoPE tables [T, head_dim] = [16, 16] / [16, 24].
    expected = {
        "pos_embed": (1, 16, 32),
        "x_embedder.proj.weight": (48, 8, 1, 1), "x_embedder.proj.bias": (48,),
        "s_embedder.proj.weight": (32, 8, 1, 1), "s_embedder.proj.bias": (32,),
        "s_projector.weight": (48, 32), "s_projector.bias": (48,),
        "t_embedder.W": (256,),
        "t_embedder.mlp.0.weight": (32, 512), "t_embedder.mlp.0.bias": (32,),
        "t_embedder.mlp.2.weight": (32, 32), "t_embedder.mlp.2.bias": (32,),
        "y_embedder.embedding_table.weight": (11, 32),
        "final_layer.norm_final.weight": (48,),
        "final_layer.linear.weight": (8, 48), "final_layer.linear.bias": (8,),
        "final_layer.adaLN_modulation.1.weight": (96, 48), "final_layer.adaLN_modulation.1.bias": (96,),
        "enc_feat_rope.freqs_cos": (16, 16), "enc_feat_rope.freqs_sin": (16, 16),
        "dec_feat_rope.freqs_cos": (16, 24), "dec_feat_rope.freqs_sin": (16, 24),
        **_block_keys("blocks.0", 32, 32, 85), **_block_keys("blocks.1", 32, 32, 85),
        **_block_keys("blocks.2", 48, 48, 128), **_block_keys("blocks.3", 48, 48, 128),
    }
    got = {k: tuple(v.shape) for k, v in build_model(tiny()).state_dict().items()}
    assert got == expected

    # D0 == D1: the reference's s_projector is an Identity, so its keys are absent.
    same_width = build_model(tiny(head_hidden_size=32)).state_dict()
    assert not any(k.startswith("s_projector") for k in same_width)


def test_plain_dit_keys_follow_the_reference_lightningdit():
    got = {k: tuple(v.shape) for k, v in build_model(tiny(head_hidden_size=None)).state_dict().items()}
    expected = {
        "pos_embed": (1, 16, 32), "x_embedder.proj.weight": (32, 8, 1, 1), "x_embedder.proj.bias": (32,),
        "t_embedder.W": (256,), "t_embedder.mlp.0.weight": (32, 512), "t_embedder.mlp.0.bias": (32,),
        "t_embedder.mlp.2.weight": (32, 32), "t_embedder.mlp.2.bias": (32,),
        "y_embedder.embedding_table.weight": (11, 32),
        "feat_rope.freqs_cos": (16, 16), "feat_rope.freqs_sin": (16, 16),
        "final_layer.norm_final.weight": (32,), "final_layer.linear.weight": (8, 32),
        "final_layer.linear.bias": (8,), "final_layer.adaLN_modulation.1.weight": (64, 32),
        "final_layer.adaLN_modulation.1.bias": (64,),
        **_block_keys("blocks.0", 32, 32, 85), **_block_keys("blocks.1", 32, 32, 85),
    }
    assert got == expected


@pytest.mark.parametrize("head", [48, None])
def test_output_is_exactly_zero_at_init(head):
    model = build_model(tiny(head_hidden_size=head)).eval()
    x = torch.randn(3, 8, 4, 4)
    out = model(x, torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


def test_frozen_parameters():
    model = build_model(tiny())
    assert model.frozen_parameter_names() == ["t_embedder.W", "pos_embed"]
    assert not model.t_embedder.W.requires_grad and not model.pos_embed.requires_grad
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(model.pos_embed) not in trainable and id(model.t_embedder.W) not in trainable
    assert count_parameters(model) - sum(p.numel() for p in model.trainable_parameters()) == 256 + 16 * 32

    model = build_model(tiny(train_pos_embed=True))
    assert model.frozen_parameter_names() == ["t_embedder.W"]
    assert model.pos_embed.requires_grad


# ----------------------------------------------------------------------------- class dropout


def test_class_dropout_only_in_train_mode():
    model = build_model(tiny(num_classes=1000))
    labels = torch.randint(0, 1000, (20000,))
    torch.manual_seed(0)
    dropped = model.y_embedder.drop_labels(labels, train=True)
    rate = (dropped == 1000).float().mean().item()
    assert abs(rate - 0.1) < 0.015
    kept = dropped != 1000
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(model.y_embedder.drop_labels(labels, train=False), labels)
    assert torch.equal(model.y_embedder.drop_labels(labels, train=True, force_drop_ids=torch.zeros(20000)), labels)


def test_class_dropout_through_forward():
    model = build_model(tiny())
    randomize_(model)
    x, t = torch.randn(64, 8, 4, 4), torch.rand(64)
    y = torch.randint(0, 10, (64,))
    eval_out = model.eval()(x, t, y)
    null_out = model(x, t, torch.full_like(y, 10))
    assert torch.allclose(model(x, t, None), null_out)

    model.train()
    torch.manual_seed(1)
    train_out = model(x, t, y)
    same = (train_out - eval_out).flatten(1).abs().amax(1) < 1e-6
    as_null = (train_out - null_out).flatten(1).abs().amax(1) < 1e-6
    assert bool((same ^ as_null).all())  # every sample is either kept or replaced by the null label
    assert 0 < int(as_null.sum()) < 20
    assert torch.allclose(model(x, t, y, force_drop_ids=torch.zeros(64)), eval_out)
    assert torch.allclose(model(x, t, y, force_drop_ids=torch.ones(64)), null_out)


# ----------------------------------------------------------------------------- position tables from the doc


def doc_pos_embed(D: int, G: int) -> torch.Tensor:
    """Format doc: token k at row k // G, column k % G; first D/2 channels the column, then the row;
    each half [sin(pos w_i)]_{i<D/4} then [cos(pos w_i)], w_i = 10000^(-i/(D/4)); float64."""
    table = torch.zeros(G * G, D, dtype=torch.float64)
    q = D // 4
    w = torch.tensor([10000.0 ** (-i / q) for i in range(q)], dtype=torch.float64)
    for k in range(G * G):
        row, col = divmod(k, G)
        for half, pos in ((0, col), (1, row)):
            base = half * D // 2
            table[k, base : base + q] = torch.sin(pos * w)
            table[k, base + q : base + 2 * q] = torch.cos(pos * w)
    return table


def doc_rope(head_dim: int, G: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Format doc: d = head_dim/2, f_j = theta^(-2j/d) duplicated into adjacent pairs; the first d
    channels rotate by row * f, the last d by column * f; float64."""
    d = head_dim // 2
    angles = torch.zeros(G * G, head_dim, dtype=torch.float64)
    for k in range(G * G):
        row, col = divmod(k, G)
        for ch in range(d):
            f = theta ** (-2 * (ch // 2) / d)
            angles[k, ch] = row * f
            angles[k, d + ch] = col * f
    return angles.cos(), angles.sin()


def doc_rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q' = q cos + rotate_half(q) sin, rotate_half: each adjacent pair (a, b) -> (-b, a)."""
    rotated = torch.empty_like(q)
    rotated[..., 0::2] = -q[..., 1::2]
    rotated[..., 1::2] = q[..., 0::2]
    return q * cos + rotated * sin


@pytest.mark.parametrize("input_size,patch_size", [(4, 1), (10, 2), (32, 1)])
def test_position_tables_match_the_doc(input_size, patch_size):
    model = build_model(tiny(input_size=input_size, patch_size=patch_size))
    G = input_size // patch_size
    torch.testing.assert_close(model.pos_embed[0].double(), doc_pos_embed(32, G), rtol=0, atol=1e-6)
    for rope, head_dim in ((model.enc_feat_rope, 16), (model.dec_feat_rope, 24)):
        cos, sin = doc_rope(head_dim, G)
        assert rope.freqs_cos.dtype == torch.float32
        torch.testing.assert_close(rope.freqs_cos.double(), cos, rtol=0, atol=1e-5)
        torch.testing.assert_close(rope.freqs_sin.double(), sin, rtol=0, atol=1e-5)


def test_real_size_tables_match_the_doc():
    from trainer.models.dit import axial_rope_tables
    from trainer.models.position import sincos_pos_embed_2d

    torch.testing.assert_close(sincos_pos_embed_2d(1152, 16), doc_pos_embed(1152, 16), rtol=0, atol=1e-12)
    for head_dim in (72, 128):  # XL backbone and DDT head
        cos, sin = axial_rope_tables(head_dim, 16)
        doc_cos, doc_sin = doc_rope(head_dim, 16)
        torch.testing.assert_close(cos.double(), doc_cos, rtol=0, atol=1e-5)
        torch.testing.assert_close(sin.double(), doc_sin, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the forward, from the doc


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _rms(x, w):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _silu(x):
    return x * torch.sigmoid(x)


def _embed_patches(x, sd, name, p):
    """Conv p x p stride p == a linear map of each patch (c, pr, pc); tokens row-major over (i, j)."""
    B, C, Hh, Ww = x.shape
    G = Hh // p
    patches = x.reshape(B, C, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, C * p * p)
    weight = sd[f"{name}.proj.weight"].reshape(sd[f"{name}.proj.weight"].shape[0], -1)
    return patches @ weight.T + sd[f"{name}.proj.bias"]


def _block(h, cond, sd, prefix, heads, rope_tables):
    """Format doc section 2, "Block"; cond (B, 1 or T, Dc)."""
    B, T, D = h.shape
    hd = D // heads
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _lin(
        _silu(cond), sd, f"{prefix}.adaLN_modulation.1").chunk(6, dim=-1)
    qkv = _lin(_rms(h, sd[f"{prefix}.norm1.weight"]) * (1 + scale_msa) + shift_msa, sd, f"{prefix}.attn.qkv")
    q, k, v = (qkv[..., i * D : (i + 1) * D].reshape(B, T, heads, hd).transpose(1, 2) for i in range(3))
    q, k = doc_rotate(q, *rope_tables), doc_rotate(k, *rope_tables)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    h = h + gate_msa * _lin(att.transpose(1, 2).reshape(B, T, D), sd, f"{prefix}.attn.proj")
    ab = _lin(_rms(h, sd[f"{prefix}.norm2.weight"]) * (1 + scale_mlp) + shift_mlp, sd, f"{prefix}.mlp.w12")
    a, b = ab.chunk(2, dim=-1)  # first H = gate (SiLU), second H = value
    return h + gate_mlp * _lin(_silu(a) * b, sd, f"{prefix}.mlp.w3")


def _final(h, cond, sd, C, p, G):
    shift, scale = _lin(_silu(cond), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    out = _lin(_rms(h, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift, sd, "final_layer.linear")
    # token n = i*G + j, value (pr*p + pc)*C + ch -> [ch, i*p + pr, j*p + pc]
    B = out.shape[0]
    return out.reshape(B, G, G, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, G * p, G * p)


def _time_embed(t, sd):
    angles = 2 * math.pi * sd["t_embedder.W"][None, :] * t[:, None]
    feats = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # sin first
    return _lin(_silu(_lin(feats, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")


def doc_forward_dh(sd, cfg: DiTConfig, x, t, y):
    """Format doc section 2, DiT^DH, in float64 from a state dict."""
    G, p, C = cfg.input_size // cfg.patch_size, cfg.patch_size, cfg.in_channels
    t_emb = _time_embed(t, sd)
    c = _silu(t_emb + sd["y_embedder.embedding_table.weight"][y])  # (B, D0)
    s = _embed_patches(x, sd, "s_embedder", p) + sd["pos_embed"]
    enc_rope = doc_rope(cfg.hidden_size // cfg.num_heads, G)
    for i in range(cfg.depth):
        s = _block(s, c[:, None], sd, f"blocks.{i}", cfg.num_heads, enc_rope)
    s = _lin(_silu(t_emb[:, None] + s), sd, "s_projector")  # label not added again
    h = _embed_patches(x, sd, "x_embedder", p)  # the same noisy x, no position embedding
    dec_rope = doc_rope(cfg.head_hidden_size // cfg.head_num_heads, G)
    for i in range(cfg.depth, cfg.depth + cfg.head_depth):
        h = _block(h, s, sd, f"blocks.{i}", cfg.head_num_heads, dec_rope)  # per-token condition
    return _final(h, s, sd, C, p, G)


def doc_forward_plain(sd, cfg: DiTConfig, x, t, y):
    """Reference LightningDiT: c = t_emb + y_emb (no outer SiLU), final layer conditioned on c."""
    G, p, C = cfg.input_size // cfg.patch_size, cfg.patch_size, cfg.in_channels
    c = _time_embed(t, sd) + sd["y_embedder.embedding_table.weight"][y]
    h = _embed_patches(x, sd, "x_embedder", p) + sd["pos_embed"]
    rope = doc_rope(cfg.hidden_size // cfg.num_heads, G)
    for i in range(cfg.depth):
        h = _block(h, c[:, None], sd, f"blocks.{i}", cfg.num_heads, rope)
    return _final(h, c[:, None], sd, C, p, G)


@pytest.mark.parametrize("head,patch_size,input_size", [(48, 1, 4), (48, 2, 8), (None, 1, 4), (None, 2, 8)])
def test_forward_is_the_doc_function(head, patch_size, input_size):
    cfg = tiny(head_hidden_size=head, patch_size=patch_size, input_size=input_size)
    model = build_model(cfg).eval()
    randomize_(model, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, input_size, input_size, generator=g)
    t = torch.tensor([0.0, 0.37, 0.96])
    y = torch.tensor([3, 10, 7])  # 10 = null label
    with torch.no_grad():
        out = model(x, t, y)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    oracle = (doc_forward_dh if head else doc_forward_plain)(sd, cfg, x.double(), t.double(), y)
    assert out.shape == x.shape
    assert oracle.abs().mean() > 0.1  # a non-trivial function
    # fp32 against float64: agreement to fp32 rounding, relative to the output's scale.
    assert (out.double() - oracle).abs().max() <= 2e-5 * oracle.abs().max()


def test_patch_size_2_and_32_grid_run_and_train():
    for cfg in (tiny(patch_size=2, input_size=8), tiny(input_size=32)):
        model = build_model(cfg).train()
        x = torch.randn(2, 8, cfg.input_size, cfg.input_size)
        out = model(x, torch.rand(2), torch.tensor([1, 2]))
        assert out.shape == x.shape
        (out - torch.randn_like(out)).square().sum().backward()  # zero-init output still trains the final layer
        assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert build_model(tiny(input_size=32)).pos_embed.shape == (1, 1024, 32)
    with pytest.raises(ValueError, match="does not match"):
        build_model(tiny()).eval()(torch.randn(1, 8, 8, 8), torch.rand(1), torch.tensor([0]))


def test_state_dict_round_trips_into_a_fresh_model():
    model = build_model(tiny()).eval()
    randomize_(model, seed=3)
    fresh = build_model(tiny()).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(fresh(x, t, y), model(x, t, y))
