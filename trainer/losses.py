"""Losses of the RAE decoder ("fit-decoder"): L1 + LPIPS + adaptive-weighted GAN, and the
discriminator's hinge loss.

Reference (RAE stage-1 trainer and its config ``DINOv2-B_decXL.yaml``, read in copies of it):
- ``rec = mean|x_rec - x|`` on the [0, 1] scale with the *unclamped* reconstruction;
  ``lpips = LPIPS(x*2-1, x_rec*2-1)`` (VGG, taming's ``vgg_lpips`` heads, byte-identical to the
  ``lpips`` package's ``weights/v0.1/vgg.pth``: md5 d507d7349b931f0638a25a48a722f98a).
- ``recon_total = rec + 1.0 * lpips`` (LPIPS from epoch 0).
- From epoch 8 (``disc_start``): ``g = -mean(D(DiffAug(x_rec*2-1)))`` with D in eval mode,
  ``w = ||grad recon_total|| / (||grad g|| + 1e-6)`` at ``decoder_pred.weight``, clamped to
  [0, 1e4] and detached; ``total = recon_total + 0.75 * w * g``.
- From epoch 6 (``disc_upd_start``): D (train mode) sees a fresh no-grad reconstruction, clamped
  to [-1, 1] and quantized to 8-bit levels, and the real batch, each through its own DiffAug call;
  ``d_loss = 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))``. One D update per G step.
The reference compares ``global_step >= start_epoch * steps_per_epoch``, which is ``epoch >= start``
for a fractional epoch ``step / steps_per_epoch``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.weights import read_state_dict
from trainer.models.decoder import check_state_dict, noise_augment, state_dict_sha256
from trainer.models.discriminator import diff_augment

# torchvision VGG16 feature index -> LPIPS slice (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_LPIPS_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS-VGG (the ``lpips`` package, v0.1 heads), frozen and always in eval mode (its heads'
    dropout must never switch on). ``weights_info`` records the trunk's source."""

    def __init__(self, net: nn.Module, weights_info: dict[str, str]):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.weights_info = weights_info

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two image batches (B, 3, H, W) in [-1, 1] -> per-sample distance (B,)."""
        return self.net(a, b).flatten()


def _vgg_features(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The 26 conv tensors ``features.{i}.{weight,bias}`` of a torchvision VGG16 state dict."""
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    if not feats:
        raise ValueError(f"{source}: no 'features.*' keys; expected a torchvision VGG16 state dict "
                         f"(e.g. vgg16-397923af.pth), found keys like {sorted(sd)[:3]}")
    return feats


def _vgg_slice(i: int) -> int:
    """The LPIPS slice (1..5) holding torchvision VGG16 feature index i."""
    return next(s for s, idx in _LPIPS_SLICES if i in idx)


def _vgg_as_lpips_trunk(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``features.{i}.w`` -> ``slice{s}.{i}.w`` (the lpips package keeps torchvision's indices)."""
    out = {}
    for k, v in feats.items():
        _, i, w = k.split(".")
        out[f"slice{_vgg_slice(int(i))}.{i}.{w}"] = v
    return out


def _lpips_trunk_as_vgg(net: nn.Module) -> dict[str, torch.Tensor]:
    """The lpips trunk's tensors under torchvision names ``features.{i}.w``."""
    return {f"features.{k.split('.', 1)[1]}": v.detach().clone() for k, v in net.net.state_dict().items()}


def _vgg_hub_file() -> str:
    """Where torchvision's hub keeps the ImageNet VGG16 weights ($TORCH_HOME/hub/checkpoints)."""
    from torchvision.models import VGG16_Weights

    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def _load_vgg_hub() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 state dict from the hub cache, downloading it only when it is
    missing and hubs are not switched off."""
    from torchvision.models import VGG16_Weights

    path = _vgg_hub_file()
    if not os.path.exists(path):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise RuntimeError(
                f"LPIPS VGG16 weights are not cached at {path} and model hubs are offline "
                "(HF_HUB_OFFLINE). Put vgg16-397923af.pth there, or pass weights=<path> or weights='random'."
            )
        try:
            VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)  # downloads into `path`
        except (OSError, RuntimeError) as e:
            raise RuntimeError(
                f"could not download the LPIPS VGG16 weights to {path} ({type(e).__name__}: {str(e)[:200]}); "
                "pass weights=<path to vgg16-397923af.pth> or weights='random'."
            ) from e
    return read_state_dict(path)


def build_lpips(weights: str = "hub", seed: int = 0) -> LPIPS:
    """LPIPS-VGG whose linear heads are the ``lpips`` package's ``weights/v0.1/vgg.pth`` (shipped
    with the package) and whose VGG16 trunk comes from ``weights``:

    - ``"hub"``: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``), read from the torch hub
      cache ($TORCH_HOME/hub/checkpoints) or downloaded there; fails at once when it is not cached
      and ``HF_HUB_OFFLINE=1`` (the project's "no model hubs" switch).
    - a local path or fsspec URI of a torchvision VGG16 state dict (``features.*`` keys; the
      classifier is ignored).
    - ``"random"``: an explicit random trunk drawn from ``seed`` (tests).

    ``weights_info`` = {"source", "ref", "sha256" (of the trunk), "heads_sha256"}.
    """
    import lpips

    # Resolve the trunk first, so a missing hub file fails before anything is built.
    if weights == "random":
        feats, info = None, {"source": "random", "ref": f"seed={seed}"}
    elif weights == "hub":
        feats, info = _vgg_features(_load_vgg_hub(), _vgg_hub_file()), {"source": "hub", "ref": _vgg_hub_file()}
    else:
        feats, info = _vgg_features(read_state_dict(weights), weights), {"source": "file", "ref": os.fspath(weights)}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # lpips calls torchvision's deprecated `pretrained=` argument; the trunk is random here
        # (pnet_rand: the package downloads nothing) and filled below.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if feats is not None:
        check_state_dict(_lpips_trunk_as_vgg(net), feats, info["ref"])
        net.net.load_state_dict(_vgg_as_lpips_trunk(feats), strict=True)
    heads = {k: v for k, v in net.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}
    info.update(sha256=state_dict_sha256(_lpips_trunk_as_vgg(net)), heads_sha256=state_dict_sha256(heads))
    return LPIPS(net, info)


def lpips_loss(lpips_model: LPIPS, x01_a: torch.Tensor, x01_b: torch.Tensor,
               reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """LPIPS between two image batches on the [0, 1] scale (mapped to [-1, 1] as the metric
    expects). ``reduction="none"`` gives (B,), ``"mean"`` a scalar."""
    d = lpips_model(x01_a * 2 - 1, x01_b * 2 - 1)
    if reduction == "none":
        return d
    if reduction == "mean":
        return d.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


# --------------------------------------------------------------------------------------------
# GAN terms
# --------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(fake))."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-6) -> torch.Tensor:
    """``||d rec/d W|| / (||d g/d W|| + eps)`` at the decoder's last layer W, clamped to
    [0, max_weight] and detached (reference: W = decoder_pred.weight, rec = L1 + LPIPS term).
    Both graphs are retained for the backward of the total loss."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def quantize_8bit(x_pm1: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and round to the 256 levels of an 8-bit image (the reference's fakes)."""
    return torch.round((x_pm1.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# The decoder's objective
# --------------------------------------------------------------------------------------------
@dataclass
class DecoderLossConfig:
    """Weights and schedule of the decoder's losses (defaults: the reference's ImageNet run)."""

    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.75
    """times the adaptive weight"""
    lpips_start_epoch: int = 0
    disc_start_epoch: int = 6
    """discriminator updates start (reference ``disc_upd_start``)"""
    gan_start_epoch: int = 8
    """the GAN term enters the decoder's loss (reference ``disc_start``)"""
    use_l1: bool = True
    use_lpips: bool = True
    use_gan: bool = True
    max_adaptive_weight: float = 1e4
    adaptive_eps: float = 1e-6
    disc_input_size: int = 224
    diffaug_policy: str = "color,translation"
    quantize_fake: bool = True
    """the discriminator sees 8-bit-quantized fakes, as the reference"""
    noise_tau: float = 0.8
    noise_rule: Literal["half_normal", "uniform"] = "half_normal"
    """latent noise: half_normal = paper |N(0, tau^2)|; uniform = reference code tau*U(0,1)"""


class DecoderLoss:
    """Generator-side and discriminator-side objectives of decoder training.

    Holds the LPIPS model and the discriminator (not a Module: the trainer moves, wraps and
    checkpoints the discriminator itself). Images are on the [0, 1] scale; reconstructions are
    ``decoder.unnormalize(decoder(z))``, unclamped. Epochs may be fractional (step / steps per epoch).
    The generator's backward also leaves gradients on the discriminator's heads: zero them
    (``set_to_none``) before the discriminator step, as the reference does.
    """

    def __init__(self, config: DecoderLossConfig, lpips_model: LPIPS | None, discriminator: nn.Module | None):
        if not (config.use_l1 or config.use_lpips):
            raise ValueError("DecoderLossConfig: at least one of use_l1 / use_lpips is needed (the adaptive "
                             "GAN weight is measured against the reconstruction term)")
        if config.use_lpips and lpips_model is None:
            raise ValueError("DecoderLossConfig.use_lpips is set but no LPIPS model was given")
        if config.use_gan and discriminator is None:
            raise ValueError("DecoderLossConfig.use_gan is set but no discriminator was given")
        self.config = config
        self.lpips = lpips_model
        self.discriminator = discriminator

    # ---- schedule ---------------------------------------------------------------------------
    def lpips_active(self, epoch: float) -> bool:
        return self.config.use_lpips and epoch >= self.config.lpips_start_epoch

    def gan_active(self, epoch: float) -> bool:
        return self.config.use_gan and epoch >= self.config.gan_start_epoch

    def disc_active(self, epoch: float) -> bool:
        return self.config.use_gan and epoch >= self.config.disc_start_epoch

    def augment_latent(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time noise on unnormalized latents (config.noise_tau / noise_rule)."""
        return noise_augment(z, self.config.noise_tau, self.config.noise_rule, generator)

    # ---- objectives -------------------------------------------------------------------------
    def generator_objective(self, recon01: torch.Tensor, target01: torch.Tensor, epoch: float,
                            last_layer_weight: torch.Tensor, generator: torch.Generator | None = None,
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 3, H, W) reconstruction (with grad) and target on the [0, 1] scale -> (total loss,
        detached logs {rec, lpips, gan, adaptive_weight, total})."""
        cfg = self.config
        zero = recon01.new_zeros(())
        rec = (recon01 - target01).abs().mean() if cfg.use_l1 else zero
        perc = lpips_loss(self.lpips, target01, recon01) if self.lpips_active(epoch) else zero
        recon_total = cfg.l1_weight * rec + cfg.lpips_weight * perc
        gan, weight = zero, zero
        total = recon_total
        if self.gan_active(epoch):
            disc = self.discriminator
            was_training = disc.training
            disc.eval()  # no spectral-norm power iteration on the generator's pass
            try:
                logits = disc(diff_augment(recon01 * 2 - 1, cfg.diffaug_policy, generator))
            finally:
                disc.train(was_training)
            gan = generator_loss(logits)
            weight = adaptive_weight(recon_total, gan, last_layer_weight, cfg.max_adaptive_weight, cfg.adaptive_eps)
            total = recon_total + cfg.gan_weight * weight * gan
        logs = {"rec": rec, "lpips": perc, "gan": gan, "adaptive_weight": weight, "total": total}
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_objective(self, recon01: torch.Tensor, target01: torch.Tensor, epoch: float,
                                generator: torch.Generator | None = None,
                                ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator (in train mode for the call) on a detached reconstruction
        and the target, both (B, 3, H, W) on the [0, 1] scale; (None, {}) before
        ``disc_start_epoch``. The reference draws the reconstruction afresh, without grad, with the
        just-updated decoder in eval mode (so without latent noise).
        Logs: disc_loss, logits_real, logits_fake (means), disc_accuracy (real > fake)."""
        if not self.disc_active(epoch):
            return None, {}
        cfg = self.config
        fake = recon01.detach() * 2 - 1
        fake = quantize_8bit(fake) if cfg.quantize_fake else fake
        real = target01 * 2 - 1
        disc = self.discriminator
        was_training = disc.training
        disc.train()  # one spectral-norm power iteration per call, fake first as the reference
        try:
            logits_fake = disc(diff_augment(fake, cfg.diffaug_policy, generator))
            logits_real = disc(diff_augment(real, cfg.diffaug_policy, generator))
        finally:
            disc.train(was_training)
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "disc_accuracy": (logits_real > logits_fake).float().mean(),
        }
        return loss, {k: v.detach() for k, v in logs.items()}
