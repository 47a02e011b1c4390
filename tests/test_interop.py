"""Import/export of the published RAE checkpoints (trainer/interop.py, `import-rae`, `export-rae`).

Everything "expected" in this file is written from ``docs/checkpoint-format.md`` (the doc), not from
our model code: the key manifests, the position and RoPE tables, and a float64 re-implementation of
the doc's DiT^DH and decoder forward passes that runs on a published-layout state dict.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.store_v1 import encoder_mismatch
from trainer.checkpoint import load_checkpoint, read_meta, save_checkpoint
from trainer.interop import export_rae, import_decoder_weights, import_dit_weights, model_from_checkpoint
from trainer.models import model_meta
from trainer.published import InteropError, LayoutMismatchError, published_layout

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread

# =============================================================================================
# The doc, written out: manifests (section 1, 3), tables and forward passes (section 2, 3)
# =============================================================================================


def swiglu_hidden(d: int) -> int:
    return int(2 / 3 * 4 * d)  # doc: H = int(2/3 * 4 * D)


def dit_dh_manifest(*, C, G, D0, depth0, heads0, D1, depth1, heads1, classes, freqs=256):
    """Doc section 1: key -> shape of a published DiT^DH (patch size 1)."""
    T = G * G
    m = {
        "pos_embed": (1, T, D0),
        "x_embedder.proj.weight": (D1, C, 1, 1), "x_embedder.proj.bias": (D1,),
        "s_embedder.proj.weight": (D0, C, 1, 1), "s_embedder.proj.bias": (D0,),
        "t_embedder.W": (freqs,),
        "t_embedder.mlp.0.weight": (D0, 2 * freqs), "t_embedder.mlp.0.bias": (D0,),
        "t_embedder.mlp.2.weight": (D0, D0), "t_embedder.mlp.2.bias": (D0,),
        "y_embedder.embedding_table.weight": (classes + 1, D0),
        "final_layer.norm_final.weight": (D1,),
        "final_layer.linear.weight": (C, D1), "final_layer.linear.bias": (C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D1, D1), "final_layer.adaLN_modulation.1.bias": (2 * D1,),
        "enc_feat_rope.freqs_cos": (T, D0 // heads0), "enc_feat_rope.freqs_sin": (T, D0 // heads0),
        "dec_feat_rope.freqs_cos": (T, D1 // heads1), "dec_feat_rope.freqs_sin": (T, D1 // heads1),
    }  # fmt: skip
    if D0 != D1:
        m.update({"s_projector.weight": (D1, D0), "s_projector.bias": (D1,)})
    for i in range(depth0 + depth1):
        D = D0 if i < depth0 else D1
        H = swiglu_hidden(D)
        b = f"blocks.{i}."
        m.update({
            b + "norm1.weight": (D,), b + "norm2.weight": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.w12.weight": (2 * H, D), b + "mlp.w12.bias": (2 * H,),
            b + "mlp.w3.weight": (D, H), b + "mlp.w3.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })  # fmt: skip
    return m


def decoder_manifest(*, C, T, D, depth, mlp, patch):
    """Doc section 3: key -> shape of a published decoder."""
    m = {
        "decoder_pos_embed": (1, T + 1, D), "trainable_cls_token": (1, 1, D),
        "decoder_embed.weight": (D, C), "decoder_embed.bias": (D,),
        "decoder_norm.weight": (D,), "decoder_norm.bias": (D,),
        "decoder_pred.weight": (patch * patch * 3, D), "decoder_pred.bias": (patch * patch * 3,),
    }  # fmt: skip
    for i in range(depth):
        b = f"decoder_layers.{i}."
        for name in ("query", "key", "value"):
            m[b + f"attention.attention.{name}.weight"], m[b + f"attention.attention.{name}.bias"] = (D, D), (D,)
        m[b + "attention.output.dense.weight"], m[b + "attention.output.dense.bias"] = (D, D), (D,)
        m[b + "intermediate.dense.weight"], m[b + "intermediate.dense.bias"] = (mlp, D), (mlp,)
        m[b + "output.dense.weight"], m[b + "output.dense.bias"] = (D, mlp), (D,)
        for ln in ("layernorm_before", "layernorm_after"):
            m[b + ln + ".weight"], m[b + ln + ".bias"] = (D,), (D,)
    return m


def doc_pos_embed(D: int, G: int) -> torch.Tensor:
    """Doc: token k at (r, c) = (k // G, k % G); first D/2 channels encode the column, the second
    D/2 the row; each half [sin(pos w_i)]_{i<D/4} then [cos(pos w_i)], w_i = 10000^(-i/(D/4))."""
    q = D // 4
    out = torch.zeros(G * G, D, dtype=torch.float64)
    for k in range(G * G):
        r, c = k // G, k % G
        for i in range(q):
            w = 10000.0 ** (-i / q)
            out[k, i], out[k, q + i] = math.sin(c * w), math.cos(c * w)
            out[k, 2 * q + i], out[k, 3 * q + i] = math.sin(r * w), math.cos(r * w)
    return out


def doc_rope(head_dim: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doc: d = head_dim/2, f_j = 10000^(-2j/d) for j < d/2, each filling an adjacent channel pair;
    channels [0, d) rotate by row * f, [d, 2d) by column * f."""
    d = head_dim // 2
    angle = torch.zeros(G * G, head_dim, dtype=torch.float64)
    for k in range(G * G):
        r, c = k // G, k % G
        for m in range(d):
            f = 10000.0 ** (-2 * (m // 2) / d)
            angle[k, m], angle[k, d + m] = r * f, c * f
    return angle.cos(), angle.sin()


def doc_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Each adjacent pair (a, b) -> (-b, a)."""
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


ADALN_ORDER = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def ref_block(sd, prefix, h, cond, heads, rope, *, adaln_order=ADALN_ORDER, swap_swiglu=False):
    """Doc block: h += gate_msa * Attn(RMSNorm(h)(1+scale)+shift); h += gate_mlp * W3(SiLU(a) b)."""
    mod = linear(F.silu(cond), sd, prefix + "adaLN_modulation.1")
    parts = dict(zip(adaln_order, mod.chunk(6, dim=-1)))
    B, T, D = h.shape
    hd = D // heads
    x = rms_norm(h, sd[prefix + "norm1.weight"]) * (1 + parts["scale_msa"]) + parts["shift_msa"]
    qkv = linear(x, sd, prefix + "attn.qkv")  # rows: all q heads, then k, then v
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, heads, hd).transpose(1, 2) for i in range(3))
    cos, sin = rope
    q, k = q * cos + doc_rotate_half(q) * sin, k * cos + doc_rotate_half(k) * sin
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    h = h + parts["gate_msa"] * linear(att.transpose(1, 2).reshape(B, T, D), sd, prefix + "attn.proj")
    x = rms_norm(h, sd[prefix + "norm2.weight"]) * (1 + parts["scale_mlp"]) + parts["shift_mlp"]
    a, b = linear(x, sd, prefix + "mlp.w12").chunk(2, dim=-1)  # first H rows: the gate
    if swap_swiglu:
        a, b = b, a
    return h + parts["gate_mlp"] * linear(F.silu(a) * b, sd, prefix + "mlp.w3")


def ref_dit_dh(sd, x, t, y, *, depth0, heads0, heads1):
    """Doc section 2 in float64 on a published state dict: (x [B,C,G,G], t [B], y [B]) -> velocity."""
    sd = {k: v.double() for k, v in sd.items()}
    x, t = x.double(), t.double()
    B, C, G, _ = x.shape
    ang = 2 * math.pi * sd["t_embedder.W"][None, :] * t[:, None]
    t_emb = linear(F.silu(linear(torch.cat([ang.sin(), ang.cos()], -1), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = F.silu(t_emb + sd["y_embedder.embedding_table.weight"][y])  # (B, D0)
    tokens = torch.stack([x[:, :, k // G, k % G] for k in range(G * G)], dim=1)  # (B, T, C), token k at (k//G, k%G)
    s = tokens @ sd["s_embedder.proj.weight"][:, :, 0, 0].T + sd["s_embedder.proj.bias"] + sd["pos_embed"]
    D0, D1 = s.shape[-1], sd["x_embedder.proj.weight"].shape[0]
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth0):
        s = ref_block(sd, f"blocks.{i}.", s, c[:, None], heads0, doc_rope(D0 // heads0, G))
    s = F.silu(t_emb[:, None] + s)
    if "s_projector.weight" in sd:
        s = linear(s, sd, "s_projector")
    h = tokens @ sd["x_embedder.proj.weight"][:, :, 0, 0].T + sd["x_embedder.proj.bias"]
    for i in range(depth0, n_blocks):
        h = ref_block(sd, f"blocks.{i}.", h, s, heads1, doc_rope(D1 // heads1, G))
    shift, scale = linear(F.silu(s), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    out = linear(rms_norm(h, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift, sd, "final_layer.linear")
    v = torch.empty(B, C, G, G, dtype=torch.float64)
    for k in range(G * G):
        v[:, :, k // G, k % G] = out[:, k]
    return v


def doc_unpatchify(values: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Doc: token n = i*G + j, value (pr*p + pc)*ch_count + ch -> pixel [ch, i*p + pr, j*p + pc]."""
    B, N, _ = values.shape
    G = math.isqrt(N)
    img = torch.empty(B, channels, G * patch, G * patch, dtype=values.dtype)
    for n in range(N):
        i, j = n // G, n % G
        for pr in range(patch):
            for pc in range(patch):
                for ch in range(channels):
                    img[:, ch, i * patch + pr, j * patch + pc] = values[:, n, (pr * patch + pc) * channels + ch]
    return img


def ref_decoder(sd, z, *, heads, patch):
    """Doc section 3 in float64: tokens [B,C,g,g] -> normalized pixels [B,3,g*p,g*p] (no resize)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, C, g, _ = z.shape
    tokens = torch.stack([z.double()[:, :, k // g, k % g] for k in range(g * g)], dim=1)
    h = linear(tokens, sd, "decoder_embed")
    h = torch.cat([sd["trainable_cls_token"].expand(B, -1, -1), h], dim=1) + sd["decoder_pos_embed"]
    D = h.shape[-1]
    hd = D // heads

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)

    for i in range(len({k.split(".")[1] for k in sd if k.startswith("decoder_layers.")})):
        b = f"decoder_layers.{i}."
        x = ln(h, b + "layernorm_before")
        q, k, v = (linear(x, sd, b + f"attention.attention.{n}").reshape(B, -1, heads, hd).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v).transpose(1, 2).reshape(B, -1, D)
        h = h + linear(att, sd, b + "attention.output.dense")
        h = h + linear(F.gelu(linear(ln(h, b + "layernorm_after"), sd, b + "intermediate.dense")), sd, b + "output.dense")
    pred = linear(ln(h, "decoder_norm"), sd, "decoder_pred")[:, 1:]  # drop the class token's position
    return doc_unpatchify(pred, patch, 3)


def random_published(manifest, *, seed, grid=None, rope_heads=None, pos_width=None):
    """Random tensors with the manifest's names and shapes, at scales that keep activations O(1);
    RoPE tables are the doc's (persistent buffers), position tables the doc's plus noise."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in manifest.items():
        if key.endswith("freqs_cos") or key.endswith("freqs_sin"):
            cos, sin = doc_rope(shape[1], math.isqrt(shape[0]))
            sd[key] = (cos if key.endswith("cos") else sin).float()
        elif len(shape) == 1 and key.endswith("weight"):  # norm gains
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # biases, Fourier frequencies
            sd[key] = (1.0 if key == "t_embedder.W" else 0.1) * torch.randn(shape, generator=g)
        elif key in ("pos_embed", "decoder_pos_embed"):
            sd[key] = 0.5 * torch.randn(shape, generator=g)
        elif key == "trainable_cls_token":
            sd[key] = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            scale = 0.5 if "adaLN" in key or "embedding_table" in key else 1.0
            sd[key] = scale * torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    err = (ours.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 1e-3, "reference output is degenerate"
    assert err <= tol * max(scale, 1.0), f"max |ours - doc| = {err:.3g} (output scale {scale:.3g})"


# Small published models used by several tests (channels and grid small: library API, no encoder).
TINY = dict(C=8, G=4, D0=32, depth0=2, heads0=2, D1=48, depth1=2, heads1=3, classes=10, freqs=32)


@pytest.fixture(scope="module")
def tiny_published(tmp_path_factory):
    """(state dict, .pt path, imported model in eval mode) of a tiny published DiT^DH."""
    sd = random_published(dit_dh_manifest(**TINY), seed=1)
    path = str(tmp_path_factory.mktemp("pub") / "dit_tiny.pt")
    torch.save(sd, path)
    imported = import_dit_weights(path)
    from trainer.models import build_model_from_meta

    model = build_model_from_meta(imported.model_meta)
    model.load_state_dict(imported.state_dict, strict=True)
    return sd, path, model.eval()


def tiny_inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TINY["C"], TINY["G"], TINY["G"], generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, TINY["classes"], (n,), generator=g)
    return x, t, y


# =============================================================================================
# Manifests: exported keys and shapes equal the doc's tables
# =============================================================================================


def test_xl_and_s_manifests_match_the_doc_counts_and_our_export_layout():
    xl = dit_dh_manifest(C=768, G=16, D0=1152, depth0=28, heads0=16, D1=2048, depth1=2, heads1=16, classes=1000)
    s = dit_dh_manifest(C=768, G=16, D0=384, depth0=12, heads0=6, D1=2048, depth1=2, heads1=16, classes=1000)
    assert xl["dec_feat_rope.freqs_cos"] == (256, 128) and xl["blocks.0.mlp.w12.weight"] == (2 * 3072, 1152)
    assert xl["blocks.28.mlp.w3.weight"] == (2048, 5461) and s["blocks.0.mlp.w3.weight"] == (384, 1024)
    # The doc's parameter counts count pos_embed and t_embedder.W, not the RoPE buffers.
    count = lambda m: sum(math.prod(v) for k, v in m.items() if "feat_rope" not in k)  # noqa: E731
    assert count(xl) == 838_675_796 and count(s) == 196_455_764
    from trainer.models.dit import dit_config

    for size, manifest in (("dit_dh_xl", xl), ("dit_dh_s", s)):
        cfg = dit_config(size, 768, 16)
        layout = published_layout({"class": "DiTDH", "config": cfg.__dict__})
        assert layout == manifest, sorted(set(layout.items()) ^ set(manifest.items()))[:10]


def test_decoder_manifests_match_the_doc_counts_and_our_export_layout():
    from trainer.models.decoder import decoder_config

    sizes = {"decoder_xl": (1152, 28, 4096, 415_352_704), "decoder_l": (1024, 24, 4096, 304_150_272),
             "decoder_b": (768, 12, 3072, 86_435_328)}
    for name, (D, depth, mlp, params) in sizes.items():
        manifest = decoder_manifest(C=768, T=256, D=D, depth=depth, mlp=mlp, patch=16)
        assert sum(math.prod(v) for v in manifest.values()) == params
        layout = published_layout({"class": "RAEDecoder", "config": decoder_config(name).__dict__})
        assert layout == manifest


# =============================================================================================
# Round trip: our checkpoint -> export-rae -> import-rae
# =============================================================================================


def _randomized(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of random values (init zeros would hide layout errors); RoPE tables kept."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if "feat_rope" in k else v + 0.05 * torch.randn(v.shape, generator=g)
            for k, v in model.state_dict().items()}


def _our_checkpoint(run_dir, model, *, kind, stats=None, ema_seed=None):
    meta = {"kind": kind, "epoch": 1.5, "samples_seen": 96, "config": {"test": True}, "model": model_meta(model),
            "statistics": None if stats is None else {"mean": "mean" in stats, "var": "var" in stats, "source": "store"}}
    ema = _randomized(model, ema_seed) if ema_seed is not None else None
    return save_checkpoint(str(run_dir), 12, model_state=_randomized(model, 7), ema_state=ema, meta=meta, stats=stats)


def _cli(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["dit_dh", "dit", "dit_learn_sigma", "decoder"])
def test_round_trip_our_checkpoint_export_import(tmp_path, variant):
    from trainer.models.decoder import RAEDecoder, decoder_config
    from trainer.models.dit import build_model, dit_config

    g = torch.Generator().manual_seed(3)
    if variant == "decoder":
        model = RAEDecoder(decoder_config("decoder_tiny"))
        stats = None
    else:
        size = dict(hidden_size=32, depth=2, num_heads=2, num_classes=10)
        head = dict(head_hidden_size=64, head_depth=2, head_num_heads=4) if variant == "dit_dh" else {}
        model = build_model(dit_config("dit_dh_s" if variant == "dit_dh" else "dit_s", 768, 16, **size, **head))
        stats = {"mean": torch.randn(768, 16, 16, generator=g), "var": torch.rand(768, 16, 16, generator=g) + 0.5}
    kind = "decoder" if variant == "decoder" else "dit"
    ckpt = _our_checkpoint(tmp_path / "ours", model, kind=kind, stats=stats, ema_seed=11)
    export_args = ["export-rae", "--ckpt", ckpt, "--out", str(tmp_path / "pub")]
    files = _cli(export_args + (["--learn-sigma"] if variant == "dit_learn_sigma" else []))
    published = torch.load(files[kind], weights_only=True)
    if variant == "dit_learn_sigma":
        assert published["final_layer.linear.weight"].shape == (2 * 768, 32)
        assert not published["final_layer.linear.weight"][768:].any()
    import_args = ["import-rae", f"--{kind}", files[kind], "--encoder", "dinov2", "--out", str(tmp_path / "imp")]
    if stats is not None:
        import_args += ["--stats", files["stats"]]
    imported = _cli(import_args)[kind]

    ours, theirs = load_checkpoint(ckpt), load_checkpoint(imported)
    assert theirs.meta.model == ours.meta.model  # every config field recovered from the shapes
    assert theirs.meta.encoder == {"name": "dinov2", "arch": "vit_base_patch14_reg4_dinov2", "input_size": 224,
                                   "weights_sha256": None, "weights_source": "imported"}
    assert theirs.model_state.keys() == ours.ema_state.keys()
    for key, value in ours.ema_state.items():  # --which ema is the default
        assert torch.equal(theirs.model_state[key], value), key
    if stats is not None:
        assert theirs.meta.statistics == {"mean": True, "var": True, "source": "imported"}
        for key in ("mean", "var"):
            assert torch.equal(theirs.stats[key], stats[key])
    a, _ = model_from_checkpoint(ckpt)
    b, _ = model_from_checkpoint(imported)
    if kind == "dit":
        x, t, y = torch.randn(2, 768, 16, 16, generator=g), torch.tensor([0.3, 0.9]), torch.tensor([1, 10])
        assert torch.equal(a(x, t, y), b(x, t, y))
    else:
        z = torch.randn(2, 768, 16, 16, generator=g)
        assert torch.equal(a(z), b(z))


@pytest.mark.timeout(60)
def test_export_which_model_and_tiny_export_file_equals_the_doc_manifest(tmp_path):
    from trainer.models.decoder import RAEDecoder, decoder_config
    from trainer.models.dit import build_model, dit_config

    model = build_model(dit_config("dit_dh_s", 8, 4, hidden_size=32, depth=2, num_heads=2, head_hidden_size=48,
                                   head_depth=2, head_num_heads=3, num_classes=10, num_time_freqs=32))
    ckpt = _our_checkpoint(tmp_path / "ours", model, kind="dit", ema_seed=5)
    result = export_rae(ckpt, str(tmp_path / "pub_model"), which="model")
    assert result.weights == "model" and set(result.files) == {"dit"}
    sd = torch.load(result.files["dit"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == dit_dh_manifest(**TINY)
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], load_checkpoint(ckpt).model_state["blocks.0.attn.qkv.weight"])
    # A checkpoint without EMA exports its model weights for --which ema, and says so.
    dec = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=16, patch_size=4))
    ckpt = _our_checkpoint(tmp_path / "dec", dec, kind="decoder")
    result = export_rae(ckpt, str(tmp_path / "pub_dec"))
    assert result.weights == "model"
    sd = torch.load(result.files["decoder"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == decoder_manifest(C=8, T=16, D=64, depth=2, mlp=128, patch=4)


# =============================================================================================
# Conventions, each checked against the doc on small random models
# =============================================================================================


def test_pos_embed_and_rope_tables_follow_the_doc(tiny_published, tmp_path):
    from trainer.models.decoder import RAEDecoder, decoder_config
    from trainer.models.dit import build_model, dit_config

    fresh = build_model(dit_config("dit_dh_s", 8, 4, hidden_size=32, depth=1, num_heads=2, head_hidden_size=48,
                                   head_depth=1, head_num_heads=3))
    ckpt = _our_checkpoint(tmp_path / "fresh", fresh, kind="dit")
    exported = torch.load(export_rae(ckpt, str(tmp_path / "pub")).files["dit"], weights_only=True)
    torch.testing.assert_close(fresh.pos_embed[0].double(), doc_pos_embed(32, 4), atol=1e-6, rtol=0)
    for prefix, head_dim in (("enc_feat_rope", 16), ("dec_feat_rope", 16)):
        cos, sin = doc_rope(head_dim, 4)
        torch.testing.assert_close(exported[f"{prefix}.freqs_cos"].double(), cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(exported[f"{prefix}.freqs_sin"].double(), sin, atol=1e-6, rtol=0)
    # The axis orders are not interchangeable (the checks above would catch a swap).
    swapped = torch.cat([doc_pos_embed(32, 4)[:, 16:], doc_pos_embed(32, 4)[:, :16]], dim=1)
    assert (swapped - doc_pos_embed(32, 4)).abs().max() > 0.5
    cos, _ = doc_rope(16, 4)
    assert (torch.cat([cos[:, 8:], cos[:, :8]], 1) - cos).abs().max() > 0.5
    # Decoder: class-token row zero, then the same 2-D table.
    dec = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=16, patch_size=4))
    table = dec.decoder_pos_embed[0].double()
    assert not table[0].any()
    torch.testing.assert_close(table[1:], doc_pos_embed(64, 4), atol=1e-6, rtol=0)


def test_swiglu_split_and_adaln_chunk_order_follow_the_doc(tiny_published):
    sd, _, model = tiny_published
    sd64 = {k: v.double() for k, v in sd.items()}
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 16, 48, generator=g)
    cond = torch.randn(2, 16, 48, generator=g)  # per-token condition, as in the head
    rope = doc_rope(16, 4)
    with torch.no_grad():
        ours = model.blocks[2](h, cond, model.dec_feat_rope)  # first head block
    ref = ref_block(sd64, "blocks.2.", h.double(), cond.double(), 3, rope)
    assert_close_to_ref(ours, ref)
    # Each alternative reading of the layout gives a clearly different block output.
    swapped = ref_block(sd64, "blocks.2.", h.double(), cond.double(), 3, rope, swap_swiglu=True)
    reordered = ref_block(sd64, "blocks.2.", h.double(), cond.double(), 3, rope,
                          adaln_order=("scale_msa", "shift_msa", "gate_msa", "scale_mlp", "shift_mlp", "gate_mlp"))
    for wrong in (swapped, reordered):
        assert (wrong - ref).abs().max() > 100 * (ours.double() - ref).abs().max()


def test_unpatchify_order_follows_the_doc(tiny_published):
    from trainer.models.decoder import RAEDecoder, decoder_config

    _, _, model = tiny_published
    g = torch.Generator().manual_seed(5)
    values = torch.randn(2, 16, 8, generator=g)
    assert torch.equal(model.unpatchify(values).double(), doc_unpatchify(values.double(), 1, 8))
    dec = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=16, patch_size=4))
    patches = torch.randn(2, 16, 4 * 4 * 3, generator=g)
    assert torch.equal(dec.unpatchify(patches).double(), doc_unpatchify(patches.double(), 4, 3))


def test_imported_dit_dh_computes_the_doc_forward(tiny_published):
    sd, _, model = tiny_published
    x, t, y = tiny_inputs(4)
    t[0], t[1] = 0.0, 1.0  # both ends of the time range (0 = data, 1 = noise)
    with torch.no_grad():
        ours = model(x, t, y)
    assert_close_to_ref(ours, ref_dit_dh(sd, x, t, y, depth0=2, heads0=2, heads1=3))


def test_label_1000_is_the_null_label(tiny_published):
    sd, _, model = tiny_published
    x, t, y = tiny_inputs(3)
    null = torch.full_like(y, TINY["classes"])  # 1000 on ImageNet; num_classes here
    ref = ref_dit_dh(sd, x, t, null, depth0=2, heads0=2, heads1=3)
    with torch.no_grad():
        assert_close_to_ref(model(x, t, null), ref)
        assert torch.equal(model(x, t, None), model(x, t, null))
        model.train()
        try:
            assert torch.equal(model(x, t, y, force_drop_ids=torch.ones_like(y)), model.eval()(x, t, null))
            # Train mode drops each label to the null label with probability 0.1.
            n = 200
            xs, ts, ys = tiny_inputs(n, seed=9)
            cond, uncond = model.eval()(xs, ts, ys), model(xs, ts, torch.full_like(ys, TINY["classes"]))
            torch.manual_seed(0)
            dropped = model.train()(xs, ts, ys)
        finally:
            model.eval()
    is_null = (dropped - uncond).flatten(1).abs().amax(1) < 1e-6
    is_cond = (dropped - cond).flatten(1).abs().amax(1) < 1e-6
    assert bool((is_null ^ is_cond).all())
    assert 5 <= int(is_null.sum()) <= 40


def test_cfg_applies_only_inside_the_interval_ends_inclusive(tiny_published):
    from trainer.flow import guided_velocity_fn

    sd, _, model = tiny_published
    t_min, t_max, scale = 0.3, 0.6, 3.0
    x, _, y = tiny_inputs(5, seed=2)
    t = torch.tensor([t_min, t_max, 0.2999, 0.6001, 0.45])
    inside = torch.tensor([True, True, False, False, True])
    velocity = guided_velocity_fn(model, y, cfg_scale=scale, cfg_interval=(t_min, t_max), null_label=TINY["classes"])
    ours = velocity(x, t)
    cond = ref_dit_dh(sd, x, t, y, depth0=2, heads0=2, heads1=3)
    uncond = ref_dit_dh(sd, x, t, torch.full_like(y, TINY["classes"]), depth0=2, heads0=2, heads1=3)
    expected = torch.where(inside[:, None, None, None], uncond + scale * (cond - uncond), cond)
    assert_close_to_ref(ours, expected)
    assert (cond - uncond).abs().max() > 1e-2  # guidance visibly changes the inside samples


def test_imported_decoder_computes_the_doc_forward(tmp_path):
    manifest = decoder_manifest(C=8, T=16, D=32, depth=2, mlp=64, patch=4)
    sd = random_published(manifest, seed=6)
    path = str(tmp_path / "decoder.pt")
    torch.save(sd, path)
    with pytest.raises(InteropError, match="pass the number of heads"):
        import_decoder_weights(path)  # width 32 / depth 2 / MLP 64 is no published size
    imported = import_decoder_weights(path, num_heads=4)
    from trainer.models import build_model_from_meta

    dec = build_model_from_meta(imported.model_meta).eval()
    dec.load_state_dict(imported.state_dict, strict=True)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = dec(z)
    assert ours.shape == (2, 3, 16, 16)
    assert_close_to_ref(ours, ref_decoder(sd, z, heads=4, patch=4))


def test_plain_dit_learn_sigma_file_keeps_the_velocity_channels(tmp_path):
    from trainer.models.dit import build_model, dit_config

    ours = build_model(dit_config("dit_s", 8, 4, hidden_size=32, depth=2, num_heads=2, num_classes=10))
    sd = _randomized(ours, 3)
    doubled = dict(sd)  # LightningDiT(learn_sigma=True): per pixel C velocity values then C sigma values
    doubled["final_layer.linear.weight"] = torch.cat([sd["final_layer.linear.weight"], torch.randn(8, 32)])
    doubled["final_layer.linear.bias"] = torch.cat([sd["final_layer.linear.bias"], torch.randn(8)])
    path = str(tmp_path / "dit.pt")
    torch.save(doubled, path)
    imported = import_dit_weights(path)
    assert imported.learn_sigma and imported.model_meta["class"] == "DiT"
    for key, value in sd.items():
        assert torch.equal(imported.state_dict[key], value), key


# =============================================================================================
# A tiny published DiT^DH and decoder: import, sample, decode
# =============================================================================================

CLI_DIT = dict(C=768, G=16, D0=32, depth0=2, heads0=2, D1=64, depth1=2, heads1=4, classes=10)


@pytest.mark.timeout(120)
def test_published_files_import_sample_and_decode(tmp_path):
    from trainer.flow import euler_sample, guided_velocity_fn, reference_grid, shift_alpha
    from trainer.normalize import LatentNormalizer

    manifest = dit_dh_manifest(**CLI_DIT)
    model_sd, ema_sd = random_published(manifest, seed=20), random_published(manifest, seed=21)
    bare = str(tmp_path / "dit_bare.pt")
    torch.save(ema_sd, bare)
    training = str(tmp_path / "dit_train.pt")
    torch.save({"step": 4000, "epoch": 8, "model": {"module." + k: v for k, v in model_sd.items()}, "ema": ema_sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 4000}}, training)
    dec_manifest = decoder_manifest(C=768, T=256, D=64, depth=2, mlp=128, patch=16)  # decoder_tiny: heads from the size table
    dec_sd = random_published(dec_manifest, seed=22)
    autoencoder = {**{"decoder." + k: v for k, v in dec_sd.items()}, "encoder.encoder.layer.0.weight": torch.randn(4, 4)}
    dec_path = str(tmp_path / "decoder_train.pt")
    torch.save({"step": 10, "epoch": 1, "model": autoencoder, "ema": autoencoder, "disc": {"w": torch.ones(1)},
                "optimizer": {}, "scheduler": {}, "disc_optimizer": {}, "disc_scheduler": {}}, dec_path)
    var = torch.rand(768, 16, 16, generator=torch.Generator().manual_seed(3)) + 0.5
    stat_path = str(tmp_path / "stat.pt")
    torch.save({"var": var}, stat_path)  # mean absent: 0, as the reference

    out = str(tmp_path / "imported")
    result = runner.invoke(app, ["import-rae", "--dit", training, "--decoder", dec_path, "--stats", stat_path,
                                 "--encoder", "dinov2", "--out", out])
    assert result.exit_code == 0, result.output
    assert "RoPE table enc_feat_rope.freqs_cos width 16" in result.stderr and "mean absent (0)" in result.stderr
    printed = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    dit_ck, dec_ck = load_checkpoint(printed["dit"]), load_checkpoint(printed["decoder"])
    assert dit_ck.step == 4000 and dit_ck.meta.extra["imported"]["weights"] == "ema"
    cfg = dit_ck.meta.model["config"]
    assert (cfg["hidden_size"], cfg["depth"], cfg["num_heads"], cfg["head_hidden_size"], cfg["head_depth"],
            cfg["head_num_heads"], cfg["num_classes"], cfg["input_size"], cfg["in_channels"]) == (
            32, 2, 2, 64, 2, 4, 10, 16, 768)
    for key, value in ema_sd.items():
        assert torch.equal(dit_ck.model_state[key], value), key
    assert dit_ck.meta.statistics == {"mean": False, "var": True, "source": "imported"}
    assert set(dit_ck.stats) == {"var"} and torch.equal(dit_ck.stats["var"], var)
    assert dec_ck.meta.model["config"]["num_heads"] == 4 and dec_ck.meta.extra["imported"]["autoencoder_checkpoint"]
    for key, value in dec_sd.items():
        assert torch.equal(dec_ck.model_state[key], value), key

    # --use model picks the other weights; the bare file gives the same DiT as the ema entry.
    model_out = _cli(["import-rae", "--dit", training, "--use", "model", "--encoder", "dinov2", "--out",
                      str(tmp_path / "model_weights")])
    assert torch.equal(load_checkpoint(model_out["dit"]).model_state["blocks.0.attn.qkv.weight"],
                       model_sd["blocks.0.attn.qkv.weight"])
    bare_out = _cli(["import-rae", "--dit", bare, "--encoder", "dinov2", "--out", str(tmp_path / "bare")])
    assert read_meta(bare_out["dit"]).extra["imported"]["container"] == "state_dict"

    # Sample on the reference grid with CFG, denormalize with the imported statistics, decode.
    dit, _ = model_from_checkpoint(printed["dit"])
    decoder, _ = model_from_checkpoint(printed["decoder"])
    grid = reference_grid(50, alpha=shift_alpha((768, 16, 16)))
    assert len(grid) == 50 and grid[0] == 1.0 and abs(float(grid[-1]) - 0.0069) < 1e-3
    y = torch.tensor([3, 7])
    velocity = guided_velocity_fn(dit, y, cfg_scale=1.5, cfg_interval=(0.0, 0.7), null_label=10)
    noise = torch.randn(2, 768, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = euler_sample(velocity, noise, grid)
    normalizer = LatentNormalizer(None, dit_ck.stats["var"].numpy())
    with torch.no_grad():
        images = decoder(normalizer.denormalize(latents))
    assert latents.shape == (2, 768, 16, 16) and images.shape == (2, 3, 256, 256)
    assert torch.isfinite(latents).all() and torch.isfinite(images).all()
    assert (latents - noise).abs().mean() > 1e-2  # the sampler moved the state

    # Statistics round trip: only var comes back out.
    files = _cli(["export-rae", "--ckpt", printed["dit"], "--out", str(tmp_path / "back")])
    back = torch.load(files["stats"], weights_only=True)
    assert set(back) == {"var"} and torch.equal(back["var"], var)


def test_store_statistics_export_as_stat_pt(tmp_path):
    import numpy as np

    from pipeline.store import write_array_store

    rng = np.random.default_rng(0)
    store = write_array_store(str(tmp_path / "store"), rng.normal(size=(6, 4, 2, 2)).astype(np.float32),
                              np.arange(6) % 2, num_classes=2)
    files = _cli(["export-rae", "--store", store.uri, "--out", str(tmp_path / "out")])
    stat = torch.load(files["stats"], weights_only=True)
    mean, var = store.stats()
    assert set(stat) == {"mean", "var"} and stat["mean"].dtype == torch.float32 and stat["mean"].shape == (4, 2, 2)
    torch.testing.assert_close(stat["mean"], torch.as_tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(stat["var"], torch.as_tensor(var, dtype=torch.float32))


# =============================================================================================
# Errors: every bad key listed, unsafe pickles refused, mismatched encoders refused
# =============================================================================================


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tiny_published, tmp_path):
    sd, _, _ = tiny_published
    bad = dict(sd)
    del bad["blocks.1.attn.proj.bias"], bad["final_layer.norm_final.weight"]
    bad["blocks.1.attn.extra_scale"] = torch.ones(3)
    bad["blocks.0.mlp.w3.bias"] = torch.zeros(31)
    path = str(tmp_path / "bad.pt")
    torch.save(bad, path)
    with pytest.raises(LayoutMismatchError) as info:
        import_dit_weights(path)
    err = info.value
    assert err.missing == ["blocks.1.attn.proj.bias", "final_layer.norm_final.weight"]
    assert err.unexpected == ["blocks.1.attn.extra_scale"]
    assert err.mismatched == [("blocks.0.mlp.w3.bias", (31,), (32,))]
    for key in ("blocks.1.attn.proj.bias", "final_layer.norm_final.weight", "blocks.1.attn.extra_scale",
                "blocks.0.mlp.w3.bias (file [31], expected [32])"):
        assert key in str(err)
    # The same through the CLI: exit code 1, every key named, nothing written.
    result = runner.invoke(app, ["import-rae", "--dit", path, "--encoder", "dinov2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "blocks.1.attn.extra_scale" in result.stderr
    assert not os.path.exists(tmp_path / "o")
    # A decoder file with a layer key missing.
    dec = random_published(decoder_manifest(C=8, T=16, D=64, depth=2, mlp=128, patch=4), seed=1)
    del dec["decoder_layers.1.output.dense.bias"]
    torch.save(dec, tmp_path / "dec.pt")
    with pytest.raises(LayoutMismatchError, match=r"missing \(1\): decoder_layers.1.output.dense.bias"):
        import_decoder_weights(str(tmp_path / "dec.pt"))
    # A DiT file given as a decoder: the keys needed to infer a decoder are listed as missing.
    with pytest.raises(LayoutMismatchError, match="decoder_embed.weight"):
        import_decoder_weights(path)


class _RunsCodeOnLoad:
    """An object whose unpickling would create a marker file (as a malicious pickle could do worse)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_non_weights_only_pickle_is_refused(tiny_published, tmp_path):
    sd, _, _ = tiny_published
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "unsafe.pt")
    torch.save({"model": sd, "ema": sd, "args": _RunsCodeOnLoad(marker)}, path)
    with pytest.raises(InteropError, match="weights_only=True"):
        import_dit_weights(path)
    assert not os.path.exists(marker)


def test_import_checks_the_encoder_statistics_and_output(tiny_published, tmp_path):
    _, path, _ = tiny_published
    with pytest.raises(InteropError, match="dinov2 at 256px gives 768 x 16 x 16"):
        from trainer.interop import import_rae

        import_rae(str(tmp_path / "o"), dit=path, encoder="dinov2")
    from trainer.interop import import_rae

    torch.save({"mean": torch.zeros(8, 3, 3)}, tmp_path / "stat.pt")
    with pytest.raises(InteropError, match=r"'mean' has shape \[8, 3, 3\]"):
        import_rae(str(tmp_path / "o"), dit=path, stats=str(tmp_path / "stat.pt"), encoder=None)
    dec = str(tmp_path / "dec.pt")
    torch.save(random_published(decoder_manifest(C=8, T=64, D=64, depth=2, mlp=128, patch=2), seed=2), dec)
    with pytest.raises(InteropError, match="generates 8 x 4 x 4 latents but .* reads 64 tokens of width 8"):
        import_rae(str(tmp_path / "o"), dit=path, decoder=dec, encoder=None)
    with pytest.raises(InteropError, match="give the DiT file too"):
        import_rae(str(tmp_path / "o"), stats=str(tmp_path / "stat.pt"), encoder=None)
    written = import_rae(str(tmp_path / "o"), dit=path, encoder=None)
    assert read_meta(written["dit"]).encoder is None
    with pytest.raises(InteropError, match="exists"):
        import_rae(str(tmp_path / "o"), dit=path, encoder=None)
    assert import_rae(str(tmp_path / "o"), dit=path, encoder=None, overwrite=True)["dit"] == written["dit"]


def test_encoder_identity_compatibility_rule():
    from trainer.interop import imported_encoder_identity

    imported = imported_encoder_identity("dinov2", 256)
    store = dict(imported, weights_sha256="ab" * 32, weights_source="hub")
    assert encoder_mismatch(imported, store) is None  # unknown hash: name/arch/input size decide
    assert encoder_mismatch(store, dict(store, weights_sha256="cd" * 32)).startswith("encoder weights differ")
    assert "input_size" in encoder_mismatch(imported, imported_encoder_identity("dinov2", 512))
    assert "name" in encoder_mismatch(imported, imported_encoder_identity("siglip", 256))
    assert encoder_mismatch(None, imported) is None


def test_fsspec_uris_in_and_out(tiny_published):
    """Published files read from, and checkpoints and exports written to, a non-local filesystem."""
    import fsspec

    sd, _, _ = tiny_published
    with fsspec.open("memory://interop/pub/dit.pt", "wb") as f:
        torch.save(sd, f)
    from trainer.interop import import_rae

    ckpt = import_rae("memory://interop/imported", dit="memory://interop/pub/dit.pt", encoder=None)["dit"]
    assert ckpt.startswith("memory://interop/imported/dit/checkpoints/step-")
    files = export_rae(ckpt, "memory://interop/back").files
    with fsspec.open(files["dit"], "rb") as f:
        back = torch.load(f, weights_only=True)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
