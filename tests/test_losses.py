"""Decoder losses, LPIPS, the DINO discriminator and DiffAug (real architectures, random weights,
small inputs; weight files written by the tests)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    DecoderLoss,
    DecoderLossConfig,
    adaptive_weight,
    build_lpips,
    generator_loss,
    hinge_d_loss,
    lpips_loss,
    quantize_8bit,
)
from trainer.models.decoder import RAEDecoder, decoder_config, state_dict_sha256
from trainer.models.discriminator import (
    DINO_BACKBONE,
    build_discriminator,
    diff_augment,
    translate,
)


@pytest.fixture(scope="module")
def lpips_random():
    return build_lpips("random", seed=0)


@pytest.fixture(scope="module")
def disc64():
    return build_discriminator("random", input_size=64, seed=0)


# ---- GAN terms -------------------------------------------------------------------------------
def test_hinge_and_generator_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2 -> mean 1
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    assert torch.isclose(generator_loss(fake), torch.tensor(1 / 3))


def test_adaptive_weight_equals_hand_computation():
    torch.manual_seed(0)
    B, H, O = 5, 6, 4
    x, target = torch.randn(B, 3), torch.randn(B, O)
    first = torch.nn.Linear(3, H)
    last = torch.nn.Linear(H, O)
    h = torch.tanh(first(x))
    y = last(h)
    rec = (y - target).pow(2).mean()
    g = -(y * torch.linspace(-1, 2, O)).mean()
    # dL/dW = (dL/dy)^T h for y = W h + b, written out by hand.
    h_ = h.detach()
    grad_rec = (2 * (y.detach() - target) / (B * O)).T @ h_
    grad_g = (-torch.linspace(-1, 2, O).expand(B, O) / (B * O)).T @ h_
    expect = grad_rec.norm() / (grad_g.norm() + 1e-6)
    w = adaptive_weight(rec, g, last.weight)
    assert torch.isclose(w, expect, rtol=1e-5)
    assert not w.requires_grad
    (rec + w * g).backward()  # graphs were retained for the real backward
    assert first.weight.grad is not None
    y = last(torch.tanh(first(x)))  # fresh graph: the backward above freed the first one
    assert adaptive_weight((y - target).pow(2).mean(), 1e-9 * y.mean(), last.weight, max_weight=1e4) == 1e4


def test_quantize_8bit():
    x = torch.tensor([-1.7, -1.0, -0.3, 0.0, 0.5, 1.0, 3.0])
    q = quantize_8bit(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and q.min() == -1 and q.max() == 1


# ---- LPIPS -----------------------------------------------------------------------------------
def test_lpips_random_is_finite_zero_on_identical_and_frozen(lpips_random):
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    d = lpips_loss(lpips_random, a, b, reduction="none")
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(lpips_loss(lpips_random, a, a, reduction="none"), torch.zeros(2))
    assert torch.isclose(lpips_loss(lpips_random, a, b), d.mean())
    lpips_random.train()
    assert not any(m.training for m in lpips_random.modules())  # heads' dropout never active
    assert not any(p.requires_grad for p in lpips_random.parameters())
    info = lpips_random.weights_info
    assert info["source"] == "random" and info["ref"] == "seed=0" and len(info["sha256"]) == 64
    x = a.clone().requires_grad_(True)
    lpips_loss(lpips_random, x, b).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.timeout(120)
def test_lpips_loads_vgg_file_and_hub_cache_offline(tmp_path, monkeypatch, lpips_random):
    from torchvision.models import vgg

    torch.manual_seed(3)
    features = vgg.make_layers(vgg.cfgs["D"])  # VGG16 conv stack, torchvision indices
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # ignored, as in the real file
    # Offline and not cached: fails at once, before building anything.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="not cached"):
        build_lpips("hub")
    assert time.monotonic() - start < 5
    # The file in the hub cache is used as is (no download attempt: the cache hit comes first).
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(sd, cache / "vgg16-397923af.pth")
    from_hub = build_lpips("hub")
    assert from_hub.weights_info["source"] == "hub"
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    assert from_hub.weights_info["sha256"] == state_dict_sha256(feats)
    assert torch.equal(getattr(from_hub.net.net.slice5, "28").weight, features[28].weight)
    assert from_hub.weights_info["heads_sha256"] == lpips_random.weights_info["heads_sha256"]
    # A plain path goes through the same reader; a file of the wrong layout is named in the error.
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        build_lpips(str(tmp_path / "bad.pth"))


# ---- discriminator ---------------------------------------------------------------------------
def reference_head_keys(num_heads: int = 5) -> set[str]:
    """The reference discriminator's state dict (heads only), from its module layout."""
    keys = set()
    for i in range(num_heads):
        for conv in (f"heads.{i}.0.0", f"heads.{i}.1.fn.0", f"heads.{i}.2"):
            keys |= {f"{conv}.bias", f"{conv}.weight_orig", f"{conv}.weight_u", f"{conv}.weight_v"}
        for norm in (f"heads.{i}.0.1", f"heads.{i}.1.fn.1"):
            keys |= {f"{norm}.weight", f"{norm}.bias"}
    return keys


def test_discriminator_64px_frozen_backbone_trainable_heads(disc64):
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)  # resized to 64 inside
    disc64.train()
    logits = disc64(x)
    assert logits.shape == (2, 5 * (64 // 8) ** 2) and torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in disc64.backbone.parameters())
    assert all(p.grad is not None for p in disc64.parameters() if p.requires_grad)
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's GAN term needs this
    assert set(disc64.state_dict()) == reference_head_keys()
    assert {n for n, _ in disc64.named_parameters()} <= reference_head_keys()
    assert not disc64.backbone.training
    heads = disc64.heads[0]
    assert heads[1].fn[0].kernel_size == (9,) and heads[1].fn[0].padding_mode == "circular"
    disc64.zero_grad(set_to_none=True)


def test_discriminator_is_seeded_and_follows_dtype_moves(disc64):
    again = build_discriminator("random", input_size=64, seed=0)
    assert again.weights_info == disc64.weights_info == {"source": "random", "ref": "seed=0",
                                                        "sha256": disc64.weights_info["sha256"]}
    # Parameters only: earlier train-mode forwards moved disc64's spectral-norm u/v buffers.
    for (na, a), (nb, b) in zip(disc64.named_parameters(), again.named_parameters()):
        assert na == nb and torch.equal(a, b)
    again.to(torch.float64)
    assert again.backbone.pos_embed.dtype == torch.float64 and again.heads[0][2].bias.dtype == torch.float64
    with torch.no_grad():
        assert again(torch.zeros(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_discriminator_loads_a_dino_file_the_test_writes(tmp_path, disc64):
    torch.manual_seed(7)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in disc64.backbone.state_dict().items()}
    sd = {f"module.backbone.{k}": v for k, v in weights.items()}  # DINO training-checkpoint prefixes
    torch.save(sd, tmp_path / "dino_deitsmall8_pretrain.pth")
    disc = build_discriminator(str(tmp_path / "dino_deitsmall8_pretrain.pth"), input_size=16)
    assert disc.weights_info["source"] == "file"
    assert disc.weights_info["sha256"] == state_dict_sha256(weights)
    assert torch.equal(disc.backbone.blocks[11].mlp.fc2.weight, weights["blocks.11.mlp.fc2.weight"])
    del sd["module.backbone.blocks.3.attn.qkv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="broken.pth.*blocks.3.attn.qkv.weight"):
        build_discriminator(str(tmp_path / "broken.pth"), input_size=16)


def test_discriminator_hub_offline_fails_at_once(monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time
    if isinstance(try_to_load_from_cache(f"timm/{DINO_BACKBONE}", "model.safetensors"), str):
        pytest.skip("the hub weights are cached on this machine")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="weights="):
        build_discriminator("hub", input_size=16)
    assert time.monotonic() - start < 30


# ---- DiffAug ---------------------------------------------------------------------------------
def test_translate_matches_shift_with_zero_fill():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = translate(x, torch.tensor([1, -2]), torch.tensor([0, 3]))
    # sample 0: out[i, j] = x[i + 1, j]; sample 1: out[i, j] = x[i - 2, j + 3]
    assert torch.equal(out[0, :, :7], x[0, :, 1:]) and (out[0, :, 7] == 0).all()
    assert torch.equal(out[1, :, 2:, :5], x[1, :, :6, 3:])
    assert (out[1, :, :2] == 0).all() and (out[1, :, :, 5:] == 0).all()


def test_diff_augment_policy_draws_and_gradients():
    torch.manual_seed(0)
    x = (torch.rand(64, 3, 16, 16) * 2 - 1).requires_grad_(True)
    assert torch.equal(diff_augment(x, policy=""), x)
    a = diff_augment(x, generator=torch.Generator().manual_seed(1))
    b = diff_augment(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, diff_augment(x, generator=torch.Generator().manual_seed(2)))
    a.sum().backward()
    assert x.grad is not None
    # Translation only: every sample is its input shifted by at most 16/8 = 2 pixels.
    moved = diff_augment(x.detach(), policy="translation", generator=torch.Generator().manual_seed(3))
    for s in range(8):
        assert any(torch.equal(moved[s], translate(x[s:s + 1].detach(), torch.tensor([dh]), torch.tensor([dw]))[0])
                   for dh in range(-2, 3) for dw in range(-2, 3))
    # Color only: brightness in [-0.5, 0.5] shows up as the per-sample mean shift (saturation and
    # contrast scale about means, which keeps the mean).
    colored = diff_augment(x.detach(), policy="color", generator=torch.Generator().manual_seed(4))
    shift = colored.mean(dim=(1, 2, 3)) - x.detach().mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.5 + 1e-5 and shift.std() > 0.1
    with pytest.raises(ValueError, match="cutout"):
        diff_augment(x, policy="color,cutout")


# ---- the decoder's objective -----------------------------------------------------------------
def test_loss_terms_switch_on_at_the_configured_epochs(lpips_random, disc64):
    torch.manual_seed(0)
    decoder = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=4))  # 2x2 tokens -> 32 px
    cfg = DecoderLossConfig()
    assert (cfg.disc_start_epoch, cfg.gan_start_epoch, cfg.gan_weight, cfg.lpips_weight) == (6, 8, 0.75, 1.0)
    loss = DecoderLoss(cfg, lpips_random, disc64)
    z, target = torch.randn(2, 8, 2, 2), torch.rand(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)

    def gen_step(epoch):
        recon = decoder.unnormalize(decoder(loss.augment_latent(z, gen)))
        return recon, loss.generator_objective(recon, target, epoch, decoder.last_layer_weight, gen)

    for epoch in (0, 5.99):
        recon, (total, logs) = gen_step(epoch)
        assert logs["gan"] == 0 and logs["adaptive_weight"] == 0 and logs["lpips"] > 0
        assert torch.isclose(total, logs["rec"] + logs["lpips"])
        assert torch.isclose(logs["rec"], (recon - target).abs().mean())
        assert loss.discriminator_objective(recon, target, epoch, gen) == (None, {})
    recon, (total, logs) = gen_step(6)
    assert logs["gan"] == 0
    d_loss, d_logs = loss.discriminator_objective(recon, target, 6, gen)
    assert torch.isfinite(d_loss) and set(d_logs) == {"disc_loss", "logits_real", "logits_fake", "disc_accuracy"}
    d_loss.backward()
    assert all(p.grad is not None for p in disc64.heads.parameters())
    assert recon.grad_fn is not None and decoder.decoder_pred.weight.grad is None  # fake was detached
    disc64.zero_grad(set_to_none=True)
    disc64.eval()
    recon, (total, logs) = gen_step(8)
    assert not disc64.training  # the caller's mode is restored
    assert logs["gan"] != 0 and logs["adaptive_weight"] > 0
    assert torch.isclose(total, logs["rec"] + logs["lpips"] + 0.75 * logs["adaptive_weight"] * logs["gan"])
    total.backward()
    assert decoder.decoder_pred.weight.grad is not None and decoder.decoder_embed.weight.grad is not None
    disc64.zero_grad(set_to_none=True)


def test_loss_switches_and_config_checks(lpips_random):
    decoder = RAEDecoder(decoder_config("decoder_tiny", in_channels=8, num_tokens=4))
    l1_only = DecoderLoss(DecoderLossConfig(use_lpips=False, use_gan=False), None, None)
    recon = decoder.unnormalize(decoder(torch.randn(2, 8, 2, 2)))
    target = torch.rand(2, 3, 32, 32)
    total, logs = l1_only.generator_objective(recon, target, 20, decoder.last_layer_weight)
    assert torch.isclose(total, F.l1_loss(recon, target)) and logs["lpips"] == 0 and logs["gan"] == 0
    assert l1_only.discriminator_objective(recon, target, 20) == (None, {})
    lpips_late = DecoderLoss(DecoderLossConfig(use_gan=False, lpips_start_epoch=2), lpips_random, None)
    assert lpips_late.generator_objective(recon, target, 1, decoder.last_layer_weight)[1]["lpips"] == 0
    assert lpips_late.generator_objective(recon, target, 2, decoder.last_layer_weight)[1]["lpips"] > 0
    with pytest.raises(ValueError, match="use_l1"):
        DecoderLoss(DecoderLossConfig(use_l1=False, use_lpips=False), None, None)
    with pytest.raises(ValueError, match="discriminator"):
        DecoderLoss(DecoderLossConfig(use_lpips=False), None, None)
