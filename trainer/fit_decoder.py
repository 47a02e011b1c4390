"""``rae-pipeline fit-decoder``: train the RAE pixel decoder on a latent store.

One typed config tree (:class:`FitDecoderConfig`), named presets (:data:`PRESETS`) and ``--set``
overrides, and a trainer of short named steps on the shared loop (``trainer/loop.py``: run
directory, resume, logging, checkpoint writing, SIGTERM, DDP through torchrun)::

    fit_decoder()  -> DecoderTrainer(...)     setup: store, decoder, LPIPS, discriminator, EMA, DDP,
                                              optimizers and LR schedules, loader; resume
                   -> DecoderTrainer.train()  the shared loop; after each checkpoint a
                                              reconstruction grid (EMA weights) into the run directory
                      train_step()            inputs -> generator step -> discriminator step
                      generator_step()        noisy latents -> decoder -> L1 + LPIPS + adaptive GAN
                                              (trainer/losses.py) -> finite guard -> AdamW, LR, EMA
                      discriminator_step()    fresh no-grad eval-mode reconstruction (no latent noise)
                                              -> hinge loss -> averaged head gradients -> AdamW, LR

Facts of the run come from the store: the token grid and width (decoder ``num_tokens`` and
``in_channels``), the crop resolution R and the encoder's mean/std (the decoder's output space).
Output resolution follows the grid: ``patch = R / grid`` (16 x 16 tokens -> 256 px, 32 x 32 ->
512 px). ``model.patch_size`` may make the output smaller (the ``debug`` preset decodes 64 px so
LPIPS-VGG and the discriminator are cheap on a CPU); targets are then the R-pixel crops resized
down (bicubic, antialiased). Epochs count the store's valid samples.

Data (``trainer/decoder_data.py``): the store's unflipped, unnormalized latents paired with their
source images (same ADM crop; a missing or changed file is an error naming the sample), or
``data.mode=encode_on_the_fly`` with the frozen encoder in the loop and the reference's random
crops (the paper's data; see that module for what each costs).

Losses (``trainer/losses.py``, the reference's): L1 + LPIPS-VGG + 0.75 x adaptive weight x GAN with
the frozen DINO ViT-S/8 discriminator (trainable heads), DiffAug on real and fake, D updates from
epoch 6, the GAN term from epoch 8. Epoch of a step = samples seen before it / N (fractional).
Latent noise: ``z + sigma * eps``, tau 0.8; the default rule is the paper's sigma ~ |N(0, tau^2)|, the
``decoder_*`` presets use the released code's tau * U(0, 1) (``loss.noise_rule=uniform``).

Optimizers (the reference's): decoder AdamW 2e-4, betas (0.9, 0.95), wd 0, 1 warm-up epoch then
cosine to 2e-5 at the last epoch, EMA 0.9978, no clipping. Discriminator heads: AdamW with the same
settings; their schedule (same shape) counts discriminator updates only, so its warm-up is the first
epoch of D updates, as in the reference trainer.

Decisions where the reference leaves a choice:
- DDP. The decoder is wrapped in DDP (gradients averaged by its reducer). The discriminator is not:
  it is called in two graphs per step (the generator's GAN term, whose head gradients are thrown
  away, and its own hinge loss), which a DDP wrapper would have to reconcile. The reference's D step
  bypasses DDP and leaves each rank's heads to drift apart; here the head gradients of the D step
  are averaged over ranks explicitly (one all-reduce), so every rank holds the same discriminator,
  and the checkpoint's discriminator is everyone's.
- The adaptive weight is measured on each rank's local batch (gradient norms at ``decoder_pred``,
  before DDP averages anything), as the reference does; it is a detached scalar per rank.
- Randomness of step k: each sample's latent noise comes from a generator keyed by (seed, the
  sample's global position), so it does not depend on the world size; DiffAug draws come from
  generators keyed by (seed, k, rank), so a resume on the same world size repeats them exactly and
  another world size draws others. Nothing else is random (the loader's order is seeded).

Checkpoints (``trainer/checkpoint.py``, kind ``decoder``): decoder and EMA weights, the
discriminator's heads (``disc.safetensors``), the decoder's and discriminator's optimizers and
schedules and the loader position (``state.pt``), meta with the resolved config, the store (id,
URI, latent shape), the encoder identity (``reconstruct`` and sampling compare it with their store's)
and the weights of LPIPS and the discriminator backbone. The same run directory resumes exactly.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import uri as uri_lib
from pipeline.config import ConfigError, resolve_preset, to_dict
from pipeline.store import LatentStore
from schemas import store_v1
from trainer import distributed
from trainer.decoder_data import DecoderBatch, DecoderDataConfig, DecoderLoader, build_store_encoder, \
    check_data_config, store_resolution
from trainer.loop import TrainError, TrainLoop, check_steps, mix_seed, read_run_config, store_meta, total_steps
from trainer.losses import DecoderLoss, DecoderLossConfig, build_lpips
from trainer.models import model_meta
from trainer.models.decoder import DECODER_SIZES, IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, RAEDecoder, \
    decoder_config
from trainer.models.discriminator import build_discriminator
from trainer.optim import EMA, DecoderLRSchedule, build_adamw, build_lr_scheduler, check_finite, clip_grad_norm

CHECKPOINT_KIND = "decoder"
RECONSTRUCTIONS_DIR = "reconstructions"
PRECISIONS = ("auto", "bf16", "fp32")
WEIGHT_CHOICES = "'hub', a weights file (path or URI), or 'random'"
_SEED_TAG = 0x44454331  # mixed into every step seed so they differ from other users of train.seed
_NOISE, _AUG_G, _AUG_D = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# config tree
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    size: str = "decoder_xl"  # a name of trainer.models.decoder.DECODER_SIZES: decoder_{b,l,xl} (decoder_tiny: tests)
    hidden_size: int | None = None  # width (None: the size's)
    depth: int | None = None  # transformer layers
    num_heads: int | None = None  # attention heads
    mlp_dim: int | None = None  # MLP width
    patch_size: int | None = None  # output pixels per token side; None: the store's resolution / token grid (16)
    train_pos_embed: bool = True  # the reference trainer updates decoder_pos_embed (the paper calls it fixed)


@dataclass
class WeightsSection:
    lpips: str = "hub"  # LPIPS-VGG16 trunk: 'hub', a torchvision VGG16 file, or 'random' (recorded in checkpoints)
    discriminator: str = "hub"  # DINO ViT-S/8 backbone: 'hub', a weights file, or 'random' (recorded)
    seed: int = 0  # seed of 'random' weights and of the discriminator heads' init


@dataclass
class OptimSection:
    lr: float = 2e-4  # decoder AdamW base learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # decoder AdamW betas
    weight_decay: float = 0.0  # decoder AdamW weight decay
    eps: float = 1e-8  # AdamW epsilon (both optimizers)
    final_lr: float = 2e-5  # decoder LR at the end of the cosine
    warmup_epochs: float = 1.0  # linear warm-up (epochs of N = the store's valid samples), then cosine
    grad_clip: float = 0.0  # global gradient-norm clip of the decoder (<= 0: measure only; the reference does not clip)
    ema_decay: float = 0.9978  # EMA of the decoder weights after every optimizer step
    disc_lr: float = 2e-4  # discriminator-heads AdamW base learning rate
    disc_betas: tuple[float, float] = (0.9, 0.95)  # discriminator AdamW betas
    disc_weight_decay: float = 0.0  # discriminator AdamW weight decay
    disc_final_lr: float = 2e-5  # discriminator LR at the end of its cosine (its clock counts D updates)


@dataclass
class TrainSection:
    max_steps: int | None = None  # steps to train to (with epochs: whichever comes first; the schedule still ends at epochs)
    epochs: float | None = 16.0  # epochs of N samples (ceil to whole steps); the LR schedules end there
    precision: str = "auto"  # auto | bf16 | fp32; auto: bf16 autocast on CUDA, fp32 on the CPU
    tf32: bool = True  # TF32 float32 matmuls on CUDA while training (restored afterwards)
    log_every: int = 100  # steps between metric records (JSON lines, TensorBoard)
    ckpt_every: int = 2500  # steps between checkpoints (also at the end and on SIGTERM); ~1 epoch at batch 512
    keep_last: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    seed: int = 0  # decoder init and per-step randomness (latent noise, DiffAug)
    grid_samples: int = 8  # store rows in the reconstruction grid written at each checkpoint (0: none)
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = True  # TensorBoard scalars under <run_dir>/logs/tensorboard
    debug_nan_at_step: int | None = None  # test hook: make the loss of this step NaN


@dataclass
class FitDecoderConfig:
    model: ModelSection = field(default_factory=ModelSection)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    weights: WeightsSection = field(default_factory=WeightsSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DecoderDataConfig = field(default_factory=DecoderDataConfig)
    train: TrainSection = field(default_factory=TrainSection)


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------


def _reference_run(size: str, data_mode: str = "cached") -> FitDecoderConfig:
    """The reference's ImageNet decoder run (stage-1 config ``DINOv2-B_decXL.yaml``, the released
    code and the paper): 16 epochs at global batch 512, AdamW 2e-4 (0.9, 0.95) wd 0, 1 warm-up epoch
    then cosine to 2e-5, EMA 0.9978, no clipping; L1 + 1.0 LPIPS + 0.75 adaptive GAN, D updates from
    epoch 6, the GAN term from epoch 8, discriminator at 224 px.

    Where the paper and the released code differ, the code that made the released decoders wins:
    latent noise sigma = tau * U(0, 1) with tau 0.8 (``src/stage1/rae.py`` ``noising``; the paper
    writes |N(0, tau^2)|: ``--set loss.noise_rule=half_normal``), and fp32 (the released trainer's
    default precision; bf16 decoders are reported worse: ``--set train.precision=bf16`` opts in),
    with TF32 matmuls on CUDA. The same preset serves 512 px stores (32 x 32 tokens -> 512 px).

    ``data_mode``: our default trains on the store's cached center-crop latents (the point of the
    cache); ``encode_on_the_fly`` is the released recipe's data, Resize(384) + RandomCrop(256) images
    through the frozen encoder every step (the ``*_reference`` preset; ``bench --only decoder_data``
    measures what the cached data cost)."""
    return FitDecoderConfig(
        model=ModelSection(size=size),
        loss=DecoderLossConfig(noise_rule="uniform"),
        data=DecoderDataConfig(mode=data_mode, global_batch=512, num_workers=8),
        train=TrainSection(precision="fp32"),
    )


def debug_preset() -> FitDecoderConfig:
    """A tiny decoder (width 64, 2 layers) decoding 64 px (patch 4) that trains on a CPU in a minute:
    every term is switched on early (LPIPS from epoch 1, D updates from 2, GAN from 3; the sample
    store's 16 images make 2 steps an epoch, 32 steps in all), LPIPS and the discriminator with
    explicit random weights, the discriminator at 64 px."""
    return FitDecoderConfig(
        model=ModelSection(size="decoder_tiny", patch_size=4),
        loss=DecoderLossConfig(lpips_start_epoch=1, disc_start_epoch=2, gan_start_epoch=3, disc_input_size=64),
        weights=WeightsSection(lpips="random", discriminator="random"),
        optim=OptimSection(lr=1e-3, final_lr=1e-4, warmup_epochs=0.5, ema_decay=0.9, disc_lr=1e-4, disc_final_lr=1e-5),
        data=DecoderDataConfig(global_batch=8, num_workers=0, block_chunks=2),
        train=TrainSection(epochs=16.0, max_steps=64, log_every=2, ckpt_every=16, keep_last=2, grid_samples=4),
    )


PRESETS: dict[str, Callable[[], FitDecoderConfig]] = {
    "decoder_b_dinov2": lambda: _reference_run("decoder_b"),
    # The released recipe exactly: the frozen encoder in the loop on Resize(384) + RandomCrop(256) images.
    "decoder_b_dinov2_reference": lambda: _reference_run("decoder_b", data_mode="encode_on_the_fly"),
    "decoder_l_dinov2": lambda: _reference_run("decoder_l"),
    "decoder_xl_dinov2": lambda: _reference_run("decoder_xl"),
    "debug": debug_preset,
}


def resolve_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> FitDecoderConfig:
    """A preset with ``key.path=value`` overrides applied, checked (ConfigError naming the key)."""
    return resolve_preset(PRESETS, preset, overrides, check_config)


def check_config(cfg: FitDecoderConfig) -> None:
    """Values no dataclass type can rule out; each error names its key."""
    m, lo, o, t = cfg.model, cfg.loss, cfg.optim, cfg.train
    if m.size not in DECODER_SIZES:
        raise ConfigError(f"model.size {m.size!r} is not one of {sorted(DECODER_SIZES)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision {t.precision!r} is not one of {list(PRECISIONS)}")
    if lo.noise_rule not in ("half_normal", "uniform"):
        raise ConfigError(f"loss.noise_rule {lo.noise_rule!r} is not one of ['half_normal', 'uniform']")
    if not (lo.use_l1 or lo.use_lpips):
        raise ConfigError("loss.use_l1 and loss.use_lpips are both off: the adaptive GAN weight needs a "
                          "reconstruction term")
    if lo.disc_input_size % 8:
        raise ConfigError(f"loss.disc_input_size must be a multiple of 8 (the discriminator's patch), "
                          f"got {lo.disc_input_size}")
    problems = check_data_config(cfg.data)
    if problems:
        raise ConfigError(problems[0])
    check_steps(cfg)
    positive = {"train.max_steps": t.max_steps, "train.epochs": t.epochs, "train.log_every": t.log_every,
                "train.ckpt_every": t.ckpt_every, "train.keep_last": t.keep_last, "optim.lr": o.lr,
                "optim.final_lr": o.final_lr, "optim.disc_lr": o.disc_lr, "optim.disc_final_lr": o.disc_final_lr,
                "model.patch_size": m.patch_size}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {"train.keep_every": t.keep_every, "train.grid_samples": t.grid_samples,
                    "optim.warmup_epochs": o.warmup_epochs, "loss.noise_tau": lo.noise_tau,
                    "loss.lpips_start_epoch": lo.lpips_start_epoch, "loss.disc_start_epoch": lo.disc_start_epoch,
                    "loss.gan_start_epoch": lo.gan_start_epoch}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0.0 <= o.ema_decay <= 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1], got {o.ema_decay}")


def decoder_config_for(cfg: FitDecoderConfig, store: LatentStore) -> DecoderConfig:
    """The architecture: the named size and the section's overrides; channels, token grid, output
    resolution and the output's mean/std from the store."""
    c, h, w = store.latent_shape
    if h != w:
        raise TrainError(f"store {store.uri} holds {c}x{h}x{w} latents; the decoder needs a square token grid")
    resolution = store_resolution(store)
    if resolution % h:
        raise TrainError(f"store {store.uri}: its {resolution} px crops are not a whole number of pixels per token "
                         f"of its {h}x{w} grid")
    patch = cfg.model.patch_size or resolution // h
    if patch * h > resolution:
        raise ConfigError(f"model.patch_size {patch} decodes {patch * h} px, more than the store's {resolution} px "
                          "crops: targets are never upsampled")
    enc = store.spec.get("encoder") or {}
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("hidden_size", "depth", "num_heads", "mlp_dim") if getattr(m, k) is not None}
    try:
        return decoder_config(m.size, in_channels=c, num_tokens=h * w, patch_size=patch,
                              train_pos_embed=m.train_pos_embed,
                              image_mean=tuple(enc.get("mean", IMAGENET_MEAN)),
                              image_std=tuple(enc.get("std", IMAGENET_STD)), **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


_mix_seed = functools.partial(mix_seed, _SEED_TAG)  # step seeds of this stage


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks in place (one all-reduce); no-op single-process."""
    grads = [p.grad for p in params if p.grad is not None]
    dist = torch.distributed
    if not grads or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = distributed.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------


@dataclass
class FitDecoderResult:
    step: int  # optimizer steps taken in total (resumed ones included)
    samples_seen: int  # over all ranks
    checkpoint: str | None  # the newest checkpoint written (None off rank 0 or when nothing was written)
    resumed_from: str | None  # the checkpoint this run continued, if any
    stopped_by: str  # "end" (total steps reached) or "sigterm"
    total_steps: int


class DecoderTrainer(TrainLoop):
    """One decoder training run on a latent store. Build it, then call :meth:`train`."""

    KIND = CHECKPOINT_KIND
    STAGE = "fit-decoder"
    CURVE_TERMS = ("rec", "lpips", "gan", "disc_loss")  # L1, LPIPS, the generator's GAN term, D's hinge loss

    def __init__(self, cfg: FitDecoderConfig, store: str, run_dir: str, *, storage_options: dict | None = None,
                 dist_info: distributed.DistInfo | None = None):
        check_config(cfg)
        self._init_run(cfg, run_dir, storage_options, dist_info)
        self.store = LatentStore.open(store, storage_options)
        self.resolution = store_resolution(self.store)
        self.model_cfg = decoder_config_for(cfg, self.store)
        self.out_size = self.model_cfg.patch_size * math.isqrt(self.model_cfg.num_tokens)
        torch.manual_seed(cfg.train.seed)
        self.model = RAEDecoder(self.model_cfg).to(self.device)
        self._build_losses()
        ckpt = self._starting_checkpoint()
        self._load_weights(ckpt)
        self.train_model = self._wrap_model()
        self.loader = DecoderLoader(self.store, cfg.data, rank=self.dist.rank, world_size=self.dist.world_size,
                                    resolution=self.resolution, storage_options=storage_options,
                                    pin_memory=self.device.type == "cuda")
        self.encoder = self._build_encoder()
        self.total_steps = total_steps(cfg, self.loader.num_valid)
        self._build_optimizers(ckpt)
        self.autocast_dtype = self._autocast_dtype()
        self._grid_inputs = None
        self._start_logging()

    # -- setup steps
    def _build_losses(self) -> None:
        """LPIPS and the discriminator when their terms are on (weights recorded), and the objective."""
        lo, w = self.cfg.loss, self.cfg.weights
        self.lpips, self.disc = None, None
        try:
            if lo.use_lpips:
                self.lpips = build_lpips(w.lpips, seed=w.seed).to(self.device)
            if lo.use_gan:
                self.disc = build_discriminator(w.discriminator, input_size=lo.disc_input_size,
                                                seed=w.seed).to(self.device)
        except RuntimeError as e:  # hub weights unreachable: the builders say where else to get them
            raise TrainError(f"weights.{'discriminator' if self.lpips or not lo.use_lpips else 'lpips'}: {e}") from e
        self.objective = DecoderLoss(lo, self.lpips, self.disc)

    def _starting_checkpoint(self):
        """The run directory's newest complete checkpoint (same stage and store), else None."""
        self.step, self.resumed_from = 0, None
        ckpt = self.load_resume_checkpoint(self.store)  # a corrupt newest one is set aside, with a warning
        if ckpt is None:
            return None
        uri = ckpt.uri
        need = {"optimizer", "scheduler", "data"} | ({"disc_optimizer", "disc_scheduler"} if self.disc else set())
        if not ckpt.train_state or not need <= set(ckpt.train_state):
            raise TrainError(f"checkpoint {uri} lacks {sorted(need - set(ckpt.train_state or {}))} to resume from")
        if self.disc is not None:
            saved = (ckpt.meta.extra or {}).get("discriminator") or {}
            if "disc" not in ckpt.extra_weights or saved.get("sha256") != self.disc.weights_info["sha256"]:
                raise TrainError(
                    f"checkpoint {uri} has no discriminator heads trained on this backbone ({self.disc.weights_info}); "
                    f"it recorded {saved or 'none'}: resume with the same weights.discriminator")
        self.resumed_from, self.step = uri, ckpt.step
        return ckpt

    def _load_weights(self, ckpt) -> None:
        """Decoder (and discriminator heads) from the checkpoint if any; the EMA from its EMA weights."""
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model_state)
            if self.disc is not None:
                self.disc.load_state_dict(ckpt.extra_weights["disc"])
        self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        if ckpt is not None:
            self.ema.load_state_dict(ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state)

    def _wrap_model(self) -> nn.Module:
        if self.dist.world_size == 1:
            return self.model
        return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   broadcast_buffers=False)  # mean/std buffers: equal everywhere

    def _build_encoder(self) -> nn.Module | None:
        if self.cfg.data.mode != "encode_on_the_fly":
            return None
        encoder, self.encoder_weights_info = build_store_encoder(self.store, self.cfg.data.encoder_weights)
        return encoder.to(self.device)

    def _build_optimizers(self, ckpt) -> None:
        """AdamW and the LR schedule of the decoder, and of the discriminator's heads; on resume their
        saved states (optimizer before scheduler: the optimizer state carries the LR) and the loader's."""
        o, B, N = self.cfg.optim, self.cfg.data.global_batch, self.loader.num_valid
        # The cosine ends at train.epochs; train.max_steps only stops a run early (without train.epochs
        # the schedule spans max_steps). So a run cut short and resumed keeps its schedule.
        run_epochs = self.cfg.train.epochs if self.cfg.train.epochs is not None else self.total_steps * B / N
        if o.warmup_epochs >= run_epochs:
            raise ConfigError(f"optim.warmup_epochs {o.warmup_epochs} must be below the schedule's {run_epochs:.3f} epochs")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.scheduler = build_lr_scheduler(self.optimizer, DecoderLRSchedule(
            samples_per_epoch=N, global_batch_size=B, base_lr=o.lr, final_lr=o.final_lr,
            warmup_epochs=o.warmup_epochs, total_epochs=run_epochs))
        self.disc_params, self.disc_optimizer, self.disc_scheduler = [], None, None
        if self.disc is not None:
            self.disc_params = [p for p in self.disc.parameters() if p.requires_grad]
            self.disc_optimizer = build_adamw(self.disc_params, lr=o.disc_lr, betas=o.disc_betas,
                                              weight_decay=o.disc_weight_decay, eps=o.eps)
            self.disc_scheduler = build_lr_scheduler(self.disc_optimizer, DecoderLRSchedule(
                samples_per_epoch=N, global_batch_size=B, base_lr=o.disc_lr, final_lr=o.disc_final_lr,
                warmup_epochs=o.warmup_epochs, total_epochs=run_epochs))
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt.train_state["optimizer"])
            self.scheduler.load_state_dict(ckpt.train_state["scheduler"])
            if self.disc is not None:
                self.disc_optimizer.load_state_dict(ckpt.train_state["disc_optimizer"])
                self.disc_scheduler.load_state_dict(ckpt.train_state["disc_scheduler"])
            self.loader.load_state_dict(ckpt.train_state["data"])

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.train.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def describe_run(self) -> str:
        c, h, w = self.store.latent_shape
        B, W, lo = self.cfg.data.global_batch, self.dist.world_size, self.cfg.loss
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        terms = ["L1"] if lo.use_l1 else []
        if self.lpips is not None:
            terms.append(f"LPIPS from epoch {lo.lpips_start_epoch} ({self.lpips.weights_info['source']})")
        if self.disc is not None:
            terms.append(f"D from epoch {lo.disc_start_epoch}, GAN from epoch {lo.gan_start_epoch} "
                         f"({self.disc.weights_info['source']}, {lo.disc_input_size} px)")
        return (
            f"fit-decoder: store {self.store.store_id} ({c}x{h}x{w}, {self.loader.num_valid} valid samples, "
            f"{self.resolution} px, data {self.cfg.data.mode}), RAEDecoder {params:.2f}M parameters -> "
            f"{self.out_size} px, world size {W}, global batch {B} = {W} x {B // W}, {self.total_steps} steps "
            f"({self.total_steps * B / self.loader.num_valid:.2f} epochs), losses: {', '.join(terms)}, "
            f"device {self.device}, autocast {self.autocast_dtype or 'off'}"
        )

    # -- what the shared loop asks for
    def run_step(self, batch: DecoderBatch) -> dict[str, float]:
        return self.train_step(batch)

    def result(self, stopped_by: str) -> FitDecoderResult:
        return FitDecoderResult(self.step, self.loader.samples_seen, self.checkpoint_uri(), self.resumed_from,
                                stopped_by, self.total_steps)

    # -- one step
    def train_step(self, batch: DecoderBatch) -> dict[str, float]:
        """One generator step and (from ``loss.disc_start_epoch``) one discriminator step on this
        rank's part of the global batch. ``self.step`` is the step being taken (1-based)."""
        epoch = (self.step - 1) * self.cfg.data.global_batch / self.loader.num_valid  # samples seen before it
        z, target = self.inputs(batch)
        logs = self.generator_step(z, target, batch.positions, epoch)
        logs.update(self.discriminator_step(z, target, epoch))
        return logs

    def inputs(self, batch: DecoderBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(unnormalized latents (b, C, g, g), targets (b, 3, S, S) in [0, 1] at the decoder's output size)."""
        pixels = batch.pixels.to(self.device, non_blocking=True).float().div_(255.0)  # (b, 3, R, R)
        if self.encoder is not None:
            with torch.no_grad():
                z = self.encoder(pixels)  # fp32, outside autocast: the store's latents are fp32 computations
        else:
            z = batch.latents.to(self.device, non_blocking=True)
        if self.out_size != pixels.shape[-1]:
            pixels = F.interpolate(pixels, size=(self.out_size, self.out_size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp_(0.0, 1.0)
        return z, pixels

    def noisy(self, z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The training noise on each latent, drawn from a generator keyed by the sample's position."""
        seed, out = self.cfg.train.seed, []
        for i, p in enumerate(positions.tolist()):
            g = torch.Generator(device=self.device).manual_seed(_mix_seed(seed, _NOISE, p))
            out.append(self.objective.augment_latent(z[i:i + 1], generator=g))
        return torch.cat(out)

    def _diffaug_generator(self, which: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix_seed(self.cfg.train.seed, which, self.step, self.dist.rank))

    def generator_step(self, z: torch.Tensor, target: torch.Tensor, positions: torch.Tensor,
                       epoch: float) -> dict[str, float]:
        """Decoder update: reconstruction of the noisy latents, the objective, DDP-averaged gradients,
        the finite guard (before any state changes), AdamW, the LR schedule, the EMA."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)  # the GAN term leaves grads on the heads
        with self._autocast():
            recon = self.train_model(self.noisy(z, positions))  # (b, 3, S, S) encoder-normalized
            recon01 = self.model.unnormalize(recon.float())  # [0, 1] scale, unclamped
            total, terms = self.objective.generator_objective(recon01, target, epoch, self.model.last_layer_weight,
                                                              generator=self._diffaug_generator(_AUG_G))
        if self.step == self.cfg.train.debug_nan_at_step:
            total = total * float("nan")
        total.backward()
        shown = ["rec"] + ["lpips"] * self.objective.lpips_active(epoch) \
            + ["gan", "adaptive_weight"] * self.objective.gan_active(epoch)
        values = distributed.all_reduce_mean(torch.stack([total.detach().float()] + [terms[k].float() for k in shown]))
        grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)  # DDP has averaged the gradients
        values = torch.cat([values, grad_norm.float().reshape(1).to(values.device)]).tolist()  # one host sync
        check_finite(values[0], self.step, "loss")  # raises before any state changes: nothing is saved after it
        check_finite(values[-1], self.step, "gradient norm")
        logs = {"loss": values[0], **dict(zip(shown, values[1:-1])), "grad_norm": values[-1],
                "lr": self.optimizer.param_groups[0]["lr"]}
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        return logs

    def discriminator_step(self, z: torch.Tensor, target: torch.Tensor, epoch: float) -> dict[str, float]:
        """Discriminator-heads update from ``loss.disc_start_epoch``: a fresh reconstruction by the
        just-updated decoder (no grad, eval mode, no latent noise, as the reference), the hinge loss,
        head gradients averaged over ranks, the finite guard, AdamW, its LR schedule."""
        if not self.objective.disc_active(epoch):
            return {}
        self.model.eval()
        with torch.no_grad(), self._autocast():
            fake01 = self.model.unnormalize(self.model(z).float())
        self.model.train()
        self.disc_optimizer.zero_grad(set_to_none=True)  # drop the generator step's head gradients
        with self._autocast():
            d_loss, terms = self.objective.discriminator_objective(fake01, target, epoch,
                                                                   generator=self._diffaug_generator(_AUG_D))
        d_loss.backward()
        average_gradients(self.disc_params)
        keys = ["disc_loss", "logits_real", "logits_fake", "disc_accuracy"]
        values = distributed.all_reduce_mean(torch.stack([terms[k].float() for k in keys])).tolist()
        check_finite(values[0], self.step, "discriminator loss")
        logs = dict(zip(keys, values), disc_lr=self.disc_optimizer.param_groups[0]["lr"])
        self.disc_optimizer.step()
        self.disc_scheduler.step()
        return logs

    # -- checkpoints
    def checkpoint_meta(self) -> dict:
        extra = {"world_size": self.dist.world_size, "total_steps": self.total_steps, "output_size": self.out_size,
                 "resolution": self.resolution, "data_mode": self.cfg.data.mode,
                 "lpips": self.lpips.weights_info if self.lpips is not None else None,
                 "discriminator": self.disc.weights_info if self.disc is not None else None}
        if self.encoder is not None:
            extra["encoder_weights"] = self.encoder_weights_info
        return {
            "kind": CHECKPOINT_KIND,
            "epoch": self.loader.epoch,
            "samples_seen": self.loader.samples_seen,
            "config": json.loads(json.dumps(to_dict(self.cfg))),
            "model": model_meta(self.model),
            "store": store_meta(self.store),
            "encoder": store_v1.encoder_identity(self.store.spec),
            "data_state": self.loader.state_dict(),
            "extra": extra,
        }

    def checkpoint_payload(self) -> dict:
        train_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "data": self.loader.state_dict()}
        extra_weights = None
        if self.disc is not None:
            train_state.update(disc_optimizer=self.disc_optimizer.state_dict(),
                               disc_scheduler=self.disc_scheduler.state_dict())
            extra_weights = {"disc": self.disc.state_dict()}
        return dict(model_state=self.model, ema_state=self.ema.state_dict(), train_state=train_state,
                    meta=self.checkpoint_meta(), extra_weights=extra_weights)

    def after_save(self, uri: str) -> None:
        """The reconstruction grid of the EMA decoder on the store's first valid rows."""
        if self.cfg.train.grid_samples:
            out = uri_lib.join(self.run_dir, RECONSTRUCTIONS_DIR, f"step-{self.step:07d}.png")
            self.write_reconstruction_grid(out)

    def write_reconstruction_grid(self, out: str) -> str:
        from trainer.images import decode_uint8, grid_png, store_samples

        if self._grid_inputs is None:
            self._grid_inputs = store_samples(self.store, self.cfg.train.grid_samples, self.out_size, self.so)
        latents, originals, _ = self._grid_inputs
        ema_model = copy.deepcopy(self.model)
        self.ema.copy_to(ema_model)
        recons = decode_uint8(ema_model.eval(), latents, self.device)
        uri_lib.atomic_write_bytes(out, grid_png(originals, recons), self.so)
        return out


def fit_decoder(cfg: FitDecoderConfig, store: str, run_dir: str, *,
                storage_options: dict | None = None) -> FitDecoderResult:
    """Train (or resume) in this process: joins the torchrun process group when launched by torchrun
    (gloo on CPU, NCCL on CUDA) and leaves it at the end if it joined it."""
    joined = not torch.distributed.is_initialized()
    info = distributed.init_distributed()
    try:
        return DecoderTrainer(cfg, store, run_dir, storage_options=storage_options, dist_info=info).train()
    finally:
        if joined:
            distributed.cleanup()


def config_from_run_dir(run_dir: str, storage_options: dict | None = None) -> FitDecoderConfig:
    """The resolved config a run directory was trained with (its config.json)."""
    return read_run_config(FitDecoderConfig, run_dir, storage_options)


__all__ = [
    "PRESETS", "FitDecoderConfig", "ModelSection", "WeightsSection", "OptimSection", "TrainSection",
    "FitDecoderResult", "DecoderTrainer", "resolve_config", "check_config", "decoder_config_for", "total_steps",
    "fit_decoder", "config_from_run_dir", "average_gradients",
]
