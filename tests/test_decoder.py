"""The RAE decoder against section 3 of docs/checkpoint-format.md, and its noise augmentation.

Expected key sets, unpatchify order and the position table are written here from the format
doc's text, independently of the module; the layer math is checked against the Hugging Face
ViT-MAE decoder (the code the reference copied) with the same weights.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models.decoder import (
    DECODER_SIZES,
    RAEDecoder,
    decoder_config,
    decoder_config_from_state_dict,
    load_decoder_weights,
    noise_augment,
    state_dict_sha256,
)

SIZES = {  # name: (width, layers, MLP, parameters) from the format doc
    "decoder_b": (768, 12, 3072, 86_435_328),
    "decoder_l": (1024, 24, 4096, 304_150_272),
    "decoder_xl": (1152, 28, 4096, 415_352_704),
}


def doc_manifest(D: int, depth: int, mlp: int, C: int = 768, N: int = 256, p: int = 16) -> dict[str, tuple]:
    """Key -> shape, transcribed from the format doc's table."""
    m = {
        "decoder_pos_embed": (1, N + 1, D),
        "trainable_cls_token": (1, 1, D),
        "decoder_embed.weight": (D, C), "decoder_embed.bias": (D,),
        "decoder_norm.weight": (D,), "decoder_norm.bias": (D,),
        "decoder_pred.weight": (p * p * 3, D), "decoder_pred.bias": (p * p * 3,),
    }
    for i in range(depth):
        pre = f"decoder_layers.{i}."
        for name in ("query", "key", "value"):
            m[pre + f"attention.attention.{name}.weight"] = (D, D)
            m[pre + f"attention.attention.{name}.bias"] = (D,)
        m[pre + "attention.output.dense.weight"] = (D, D)
        m[pre + "attention.output.dense.bias"] = (D,)
        m[pre + "intermediate.dense.weight"] = (mlp, D)
        m[pre + "intermediate.dense.bias"] = (mlp,)
        m[pre + "output.dense.weight"] = (D, mlp)
        m[pre + "output.dense.bias"] = (D,)
        for ln in ("layernorm_before", "layernorm_after"):
            m[pre + f"{ln}.weight"] = (D,)
            m[pre + f"{ln}.bias"] = (D,)
    return m


@pytest.mark.parametrize("size", sorted(SIZES))
def test_state_dict_and_parameter_count_match_the_doc(size):
    D, depth, mlp, count = SIZES[size]
    with torch.device("meta"):
        model = RAEDecoder(decoder_config(size))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == doc_manifest(D, depth, mlp)
    assert sum(p.numel() for p in model.parameters()) == count
    assert DECODER_SIZES[size]["num_heads"] == {768: 12, 1024: 16, 1152: 16}[D]


def test_pos_embed_is_the_doc_sincos_table():
    D, G = 64, 4
    model = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=G * G))
    table = model.decoder_pos_embed[0].detach().double()
    assert torch.equal(table[0], torch.zeros(D, dtype=torch.float64))
    w = [10000.0 ** (-i / (D // 4)) for i in range(D // 4)]
    for k in range(G * G):
        row, col = k // G, k % G
        expect = ([math.sin(col * wi) for wi in w] + [math.cos(col * wi) for wi in w]
                  + [math.sin(row * wi) for wi in w] + [math.cos(row * wi) for wi in w])
        assert torch.allclose(table[1 + k], torch.tensor(expect, dtype=torch.float64), atol=1e-7)


def doc_unpatchify(values: torch.Tensor, G: int, p: int = 16, c: int = 3) -> torch.Tensor:
    """The doc's sentence, literally: token n = i*G + j; value index (pr*p + pc)*c + ch goes to
    pixel [ch, i*p + pr, j*p + pc]."""
    B, N, V = values.shape
    out = torch.empty(B, c, G * p, G * p, dtype=values.dtype)
    n = torch.arange(N)
    i, j = n // G, n % G
    for v in range(V):
        pr, pc, ch = (v // c) // p, (v // c) % p, v % c
        out[:, ch, i * p + pr, j * p + pc] = values[:, n, v]
    return out


@pytest.mark.parametrize("grid", [16, 32])
def test_unpatchify_order_and_output_size(grid):
    model = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=grid * grid))
    values = torch.randn(2, grid * grid, 16 * 16 * 3)
    assert torch.equal(model.unpatchify(values), doc_unpatchify(values, grid))
    with torch.no_grad():
        out = model(torch.randn(1, 8, grid, grid))
    assert out.shape == (1, 3, grid * 16, grid * 16)  # 16x16 tokens -> 256 px, 32x32 -> 512 px


def test_layers_match_hf_vit_mae_decoder():
    """Same weights in transformers' ViTMAEDecoder (5.x names q_proj/o_proj/mlp.fc1...): its class
    position is decoder_embed(input class token), so our trainable class token is set to that."""
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder

    torch.manual_seed(0)
    G, C = 4, 8
    model = RAEDecoder(decoder_config("decoder_tiny", in_channels=C, num_tokens=G * G, patch_size=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "decoder_pos_embed":
                p.normal_(0, 0.2)  # non-trivial LayerNorm affines and biases
        cls_input = torch.randn(C)
        model.trainable_cls_token.copy_(model.decoder_embed(cls_input))
    hf_cfg = ViTMAEConfig(hidden_size=C, decoder_hidden_size=64, decoder_num_hidden_layers=2,
                          decoder_num_attention_heads=4, decoder_intermediate_size=128, patch_size=4,
                          num_channels=3, layer_norm_eps=1e-12, hidden_act="gelu", qkv_bias=True,
                          attn_implementation="eager")
    hf = ViTMAEDecoder(hf_cfg, num_patches=G * G).eval()
    assert torch.equal(hf.decoder_pos_embed, model.decoder_pos_embed)  # same sin-cos layout
    rename = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
              "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
              "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    sd = {"mask_token": torch.zeros(1, 1, 64)}
    for k, v in model.state_dict().items():
        if k != "trainable_cls_token":
            for a, b in rename.items():
                k = k.replace(a, b)
            sd[k] = v
    hf.load_state_dict(sd, strict=True)
    z = torch.randn(2, C, G, G)
    hf_in = torch.cat([cls_input.expand(2, 1, C), z.flatten(2).transpose(1, 2)], dim=1)
    with torch.no_grad():
        ref = hf(hf_in, ids_restore=torch.arange(G * G).expand(2, -1)).logits
        ours = model.predict(model.forward_blocks(model.embed(z)))
        assert torch.allclose(ours, ref, atol=1e-5)
        assert torch.allclose(model(z), model.unpatchify(ref), atol=1e-5)


def test_token_resize_refused_by_default_and_bilinear_when_allowed():
    torch.manual_seed(0)
    cfg = decoder_config("decoder_tiny", in_channels=8, num_tokens=16 * 16)
    strict = RAEDecoder(cfg).eval()
    z_small = torch.randn(1, 8, 8, 8)
    with pytest.raises(ValueError, match="allow_token_resize"):
        strict(z_small)
    resizing = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=256, allow_token_resize=True)).eval()
    resizing.load_state_dict(strict.state_dict())
    with torch.no_grad():
        out = resizing(z_small)
        # decoder_embed is affine and bilinear weights sum to 1, so resizing embedded tokens equals
        # embedding bilinearly resized tokens.
        expect = strict(F.interpolate(z_small, size=(16, 16), mode="bilinear", align_corners=False))
    assert out.shape == (1, 3, 256, 256)
    assert torch.allclose(out, expect, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        strict(torch.randn(1, 4, 16, 16))


def test_decode_to_pixels_unnormalizes_and_clamps():
    cfg = decoder_config("decoder_tiny", in_channels=8, num_tokens=4, image_mean=(0.5, 0.5, 0.5), image_std=(2.0, 2.0, 2.0))
    model = RAEDecoder(cfg).eval()
    z = torch.randn(2, 8, 2, 2) * 10
    with torch.no_grad():
        raw = model(z)
        pixels = model.decode_to_pixels(z)
    assert torch.allclose(pixels, (raw * 2.0 + 0.5).clamp(0, 1))
    assert pixels.min() >= 0 and pixels.max() <= 1


def test_pos_embed_trainable_switch():
    assert RAEDecoder(decoder_config("decoder_tiny", num_tokens=4)).decoder_pos_embed.requires_grad
    assert not RAEDecoder(decoder_config("decoder_tiny", num_tokens=4, train_pos_embed=False)).decoder_pos_embed.requires_grad


def test_load_released_file_the_test_writes(tmp_path):
    torch.manual_seed(1)
    cfg = decoder_config("decoder_tiny", in_channels=8, num_tokens=16)
    source = RAEDecoder(cfg)
    path = tmp_path / "decoder.pt"
    torch.save(source.state_dict(), path)
    inferred = decoder_config_from_state_dict(torch.load(path, weights_only=True))
    assert (inferred.in_channels, inferred.num_tokens, inferred.hidden_size, inferred.depth, inferred.num_heads,
            inferred.mlp_dim, inferred.patch_size) == (8, 16, 64, 2, 4, 128, 16)
    target = RAEDecoder(inferred)
    info = load_decoder_weights(target, str(path))
    assert info == {"source": "file", "ref": str(path), "sha256": state_dict_sha256(source.state_dict())}
    z = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(target(z), source(z))
    wrong = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=64))
    with pytest.raises(ValueError, match="decoder.pt.*decoder_pos_embed"):
        load_decoder_weights(wrong, str(path))


@pytest.mark.parametrize("rule, mean_sigma, mean_sigma_sq", [
    ("half_normal", math.sqrt(2 / math.pi), 1.0),  # |N(0, tau^2)|: E = tau sqrt(2/pi), E[s^2] = tau^2
    ("uniform", 0.5, 1 / 3),  # tau U(0, 1): E = tau/2, E[s^2] = tau^2/3
])
def test_noise_augment_statistics(rule, mean_sigma, mean_sigma_sq):
    tau, B, n = 0.8, 2000, 4096
    z = torch.full((B, 4, 32, 32), 3.0)
    g = torch.Generator().manual_seed(0)
    noise = noise_augment(z, tau=tau, rule=rule, generator=g) - 3.0
    sigma = noise.flatten(1).pow(2).mean(1).sqrt()  # per-sample RMS ~ sigma (1% error at 4096 values)
    assert abs(sigma.mean().item() - tau * mean_sigma) < 0.04
    assert abs(sigma.pow(2).mean().item() - tau ** 2 * mean_sigma_sq) < 0.05
    standardized_mean = noise.flatten(1).mean(1) / sigma * math.sqrt(n)  # ~ N(0, 1) per sample
    assert standardized_mean.abs().max() < 5
    if rule == "uniform":
        assert sigma.max() < tau * 1.05
    else:
        assert abs((sigma > tau).float().mean().item() - 0.3173) < 0.04  # P(|N| > 1)
    assert torch.equal(noise_augment(z, tau=tau, rule=rule, generator=torch.Generator().manual_seed(0)) - 3.0, noise)


def test_noise_augment_arguments():
    z = torch.randn(3, 8, 2, 2)
    assert torch.equal(noise_augment(z, tau=0.0), z)
    with pytest.raises(ValueError, match="rule"):
        noise_augment(z, rule="gaussian")
    with pytest.raises(ValueError, match="tau"):
        noise_augment(z, tau=-1.0)
