"""``rae-pipeline train-dit``: DiT^DH (or plain DiT) flow matching on the normalized latents of a store.

One typed config tree (:class:`TrainDiTConfig`), named presets (:data:`PRESETS`) and ``--set``
overrides; a trainer made of short named steps (torchtitan style)::

    train_dit()  -> DiTTrainer(...)          setup: store, statistics, model, EMA, DDP, optimizer,
                                             LR schedule, loader; resume or --init-from
                 -> DiTTrainer.train()       the loop: batch -> train_step -> log -> checkpoint
                    train_step()             step randomness, forward_backward, reduce, finite
                                             guard, clip, optimizer/scheduler/EMA step
                    forward_backward()       micro-batches (no_sync on all but the last), loss/A

Facts of the run come from the store's spec, never from constants: latent shape [C, H, W] (model
``in_channels``/``input_size``), class count, the shift ``alpha = sqrt(C*H*W / flow.shift_base)``
and the epoch size N (= the store's valid samples; LR schedule and ``train.epochs`` count in it).

Determinism. Step k's randomness is a pure function of (``train.seed``, k) and the sample's row in
the global batch: times and the class-dropout mask are drawn for the whole global batch from one
CPU generator seeded by (seed, k); each row's noise from its own generator seeded by
(seed, k, row) on the compute device (no rank ever draws the noise of the whole global batch).
Each rank takes the rows its loader serves (``LatentLoader.global_rows``), and the dropout mask goes
to the model as ``force_drop_ids``. Hence a W-process run equals the 1-process run with the same
global batch and ``data.num_streams``, and a resume continues exactly without saved RNG streams.

The run directory, resume, logging, the loop itself, checkpoint writing and SIGTERM are the shared
``trainer/loop.py`` (:class:`~trainer.loop.TrainLoop`), which ``fit-decoder`` uses as well.

Checkpoints (``trainer/checkpoint.py``, format ``schemas/checkpoint_v1.py``): model and EMA weights,
optimizer, LR scheduler and loader position, and meta with the resolved config, the store (id, URI,
latent shape), the encoder identity, the statistics used (tensors in ``stats.safetensors``), step,
samples seen and the loader state. The same run directory resumes from its newest complete
checkpoint (same store id required); ``--init-from`` starts any checkpoint's weights with a fresh
optimizer on a store with the same latent shape and encoder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import uri as uri_lib
from pipeline.config import ConfigError, resolve_preset, to_dict
from pipeline.store import LatentStore
from schemas import store_v1
from trainer import distributed
from trainer.checkpoint import load_checkpoint, read_meta
from trainer.data import LatentLoader, LoaderConfig, check_loader_config
from trainer.flow import interpolate, sample_train_times, shift_alpha, velocity_target
from trainer.loop import TrainError, TrainLoop, check_steps, mix_seed, read_run_config, store_meta, total_steps
from trainer.models import model_meta
from trainer.models.dit import MODEL_SIZES, DiTConfig, build_model, count_parameters, dit_config
from trainer.normalize import STATS_MODES, LatentNormalizer
from trainer.optim import EMA, DiTLRSchedule, build_adamw, build_lr_scheduler, check_finite, clip_grad_norm

CHECKPOINT_KIND = "dit"
PREVIEW_DIR = "previews"  # preview grids (--preview-decoder): previews/step-NNNNNNN.png
DEBUG_DIR = "debug"  # per-rank batch records (train.debug_record_batches)
TIME_DISTS = ("logit_normal", "uniform")
PRECISIONS = ("auto", "bf16", "fp32")
_SEED_TAG = 0x44695454  # mixed into every step seed so they differ from other users of train.seed


# ------------------------------------------------------------------------------------------------
# config tree
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    size: str = "dit_dh_xl"  # a name of trainer.models.dit.MODEL_SIZES: dit_dh_{s,b,l,xl} or dit_{s,b,l,xl}
    hidden_size: int | None = None  # backbone width D0 (None: the size's)
    depth: int | None = None  # backbone blocks
    num_heads: int | None = None  # backbone attention heads
    head_hidden_size: int | None = None  # DDT head width D1 (DiT^DH sizes only)
    head_depth: int | None = None  # DDT head blocks
    head_num_heads: int | None = None  # DDT head attention heads
    patch_size: int | None = None  # latent patch side p (None: 1, also for 32x32 latents)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (the null label)
    num_classes: int | None = None  # None: the store's classes.num_classes
    train_pos_embed: bool = False  # update the sin-cos pos_embed (the reference trainer does; the paper does not)


@dataclass
class FlowSection:
    time_dist: str = "logit_normal"  # logit_normal | uniform: training times before the shift (paper and released configs: logit-normal)
    loc: float = 0.0  # logit-normal location
    scale: float = 1.0  # logit-normal scale
    shift_base: int = 4096  # n of the shift alpha = sqrt(C*H*W / n); C, H, W from the store
    shift_alpha: float | None = None  # explicit alpha instead of the computed one


@dataclass
class OptimSection:
    lr: float = 2e-4  # AdamW base learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip (<= 0: measure only)
    ema_decay: float = 0.9995  # EMA of the weights after every optimizer step
    final_lr: float = 2e-5  # LR at the end of the linear decay
    constant_epochs: float = 40.0  # epochs (of N = the store's valid samples) at the base LR
    end_epoch: float = 800.0  # epoch at which the linear decay reaches final_lr (constant after)


@dataclass
class TrainSection:
    max_steps: int | None = None  # optimizer steps to train to (with epochs: whichever comes first)
    epochs: float | None = 800.0  # epochs of N samples to train (ceil to whole steps)
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each rank (loss / A, no_sync but the last)
    precision: str = "auto"  # auto | bf16 | fp32; auto: bf16 autocast on CUDA, fp32 on the CPU (official-run presets: fp32)
    compile: bool = False  # torch.compile the model (the DDP wrapper goes around the compiled module)
    tf32: bool = True  # TF32 float32 matmuls on CUDA while training (restored afterwards)
    log_every: int = 100  # steps between metric records (JSON lines, TensorBoard)
    ckpt_every: int = 5000  # steps between checkpoints (a checkpoint is also written at the end and on SIGTERM)
    keep_last: int = 3  # newest checkpoints kept
    keep_every: int = 50000  # also keep every checkpoint whose step is a multiple of this (0: none)
    keep_epochs: list[int] = field(default_factory=list)  # save, and never prune, the checkpoint at the step ending each of these epochs (e.g. [14]: AutoGuidance's guide)
    seed: int = 0  # model init and per-step randomness (noise, times, class dropout)
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = True  # TensorBoard scalars under <run_dir>/logs/tensorboard
    preview_every: int = 0  # with a preview decoder: steps between preview grids (0: at each checkpoint; also at the end)
    preview_num: int = 16  # images in a preview grid (classes spread evenly, in class order; the same noise every time)
    preview_steps: int = 50  # time points of the preview's Euler sampler (the reference grid)
    debug_nan_at_step: int | None = None  # test hook: make the loss of this step NaN
    debug_record_batches: bool = False  # test hook: each rank appends its batches to <run_dir>/debug/batches-rank<r>.jsonl


@dataclass
class DataSection(LoaderConfig):
    """The loader's settings (:class:`~trainer.data.LoaderConfig`) and how the latents are normalized."""

    stats_mode: str = "mean_var"  # mean_var: (z - mean) / sqrt(var + eps); var: z / sqrt(var + eps), mean zero (the released DiT^DH-XL's)


@dataclass
class TrainDiTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    flow: FlowSection = field(default_factory=FlowSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------


def _reference_run(size: str, epochs: float = 800.0, **train) -> TrainDiTConfig:
    """The released ImageNet training configs (bytetriper/RAE configs/training/ImageNet256/
    DiTDH-{S,XL}_DINOv2-B.yaml): global batch 1024 in 4 accumulation steps, AdamW 2e-4, EMA 0.9995,
    LR constant to epoch 40 then linear to 2e-5 at epoch 800, 4 loader workers, log every 100,
    checkpoint every 5000 steps, seed 0, logit-normal training times (``time_dist_type:
    logit-normal_0_1``, as the paper; an early version of those files said uniform: ``--set
    flow.time_dist=uniform``). Those files run 1400 epochs; we train the paper's 800.

    Where the paper and the code that made the released models differ, these presets follow the code:
    - fp32 training (with TF32 matmuls, ``train.tf32``): the official README says "bf16 is
      supported, we recommend fp32 for more stable training"; ``--set train.precision=bf16`` opts
      in to bf16 autocast;
    - variance-only latent statistics (``data.stats_mode=var``: mean zero), as the released
      DiT^DH-XL was trained (the released DINOv2-B ``stat.pt`` holds ``var`` only);
      ``--set data.stats_mode=mean_var`` normalizes with the mean as well."""
    return TrainDiTConfig(
        model=ModelSection(size=size),
        data=DataSection(global_batch=1024, num_workers=4, stats_mode="var"),
        train=TrainSection(epochs=epochs, grad_accum_steps=4, log_every=100, ckpt_every=5000, precision="fp32",
                           **train),
    )


def autoguidance_guide_preset() -> TrainDiTConfig:
    """The paper's AutoGuidance guide model: DiT^DH-S trained for 14 epochs at 256 px (the S recipe,
    whose LR is still constant at epoch 14, so these are the first 14 epochs of the full S run),
    its epoch-14 checkpoint kept. Sample with it as the weak model: ``sample --autoguidance-ckpt
    <run-dir> --ag-scale 1.42`` (paper: 1.42 at 256 px, 1.5 at 512 px). A full S run with
    ``--set train.keep_epochs=[14]`` leaves the same checkpoint."""
    return _reference_run("dit_dh_s", epochs=14.0, keep_epochs=[14])


def debug_preset() -> TrainDiTConfig:
    """A tiny DiT^DH (width 64, depth 2, head 128x1) that trains in seconds on a CPU."""
    return TrainDiTConfig(
        model=ModelSection(size="dit_dh_s", hidden_size=64, depth=2, num_heads=4,
                           head_hidden_size=128, head_depth=1, head_num_heads=4),
        optim=OptimSection(lr=1e-3, ema_decay=0.99),
        data=DataSection(global_batch=16, num_workers=0, block_chunks=4),
        train=TrainSection(max_steps=200, epochs=None, log_every=10, ckpt_every=50, keep_last=2, keep_every=0),
    )


PRESETS: dict[str, Callable[[], TrainDiTConfig]] = {
    "dit_dh_s_dinov2_256": lambda: _reference_run("dit_dh_s"),
    "dit_dh_b_dinov2_256": lambda: _reference_run("dit_dh_b"),
    "dit_dh_xl_dinov2_256": lambda: _reference_run("dit_dh_xl"),
    # 512 px: the same model on 768x32x32 latents (patch 1, 1024 tokens); the paper reports 400 epochs.
    "dit_dh_xl_dinov2_512": lambda: _reference_run("dit_dh_xl", epochs=400.0),
    "dit_xl_dinov2_256": lambda: _reference_run("dit_xl"),  # plain DiT-XL (the paper's ablation)
    "dit_dh_s_dinov2_256_ag_guide": autoguidance_guide_preset,  # AutoGuidance's weak model (epoch 14)
    "debug": debug_preset,
}


def resolve_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainDiTConfig:
    """A preset with ``key.path=value`` overrides applied, checked (ConfigError naming the key)."""
    return resolve_preset(PRESETS, preset, overrides, check_config)


def check_config(cfg: TrainDiTConfig) -> None:
    """Values no dataclass type can rule out; each error names its key."""
    m, t, o, f = cfg.model, cfg.train, cfg.optim, cfg.flow
    if m.size not in MODEL_SIZES:
        raise ConfigError(f"model.size {m.size!r} is not one of {sorted(MODEL_SIZES)}")
    if m.size.startswith("dit_") and not m.size.startswith("dit_dh_"):
        head = [k for k in ("head_hidden_size", "head_depth", "head_num_heads") if getattr(m, k) is not None]
        if head:
            raise ConfigError(f"model.{head[0]} is set but model.size {m.size!r} is a plain DiT (no DDT head)")
    choices = {"flow.time_dist": (f.time_dist, TIME_DISTS), "train.precision": (t.precision, PRECISIONS),
               "data.stats_mode": (cfg.data.stats_mode, STATS_MODES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} {value!r} is not one of {list(allowed)}")
    check_steps(cfg)
    problems = check_loader_config(cfg.data)
    if problems:
        raise ConfigError(problems[0])
    if t.grad_accum_steps >= 1 and cfg.data.global_batch % t.grad_accum_steps:
        raise ConfigError(f"data.global_batch {cfg.data.global_batch} is not divisible by "
                          f"train.grad_accum_steps {t.grad_accum_steps}")
    if t.preview_every < 0 or t.preview_num < 1 or t.preview_steps < 2:
        raise ConfigError(f"train.preview_every must be >= 0, train.preview_num >= 1 and train.preview_steps >= 2; "
                          f"got {t.preview_every}, {t.preview_num}, {t.preview_steps}")
    positive = {"train.max_steps": t.max_steps, "train.epochs": t.epochs, "train.grad_accum_steps": t.grad_accum_steps,
                "train.log_every": t.log_every, "train.ckpt_every": t.ckpt_every, "train.keep_last": t.keep_last,
                "optim.lr": o.lr, "optim.final_lr": o.final_lr, "flow.shift_base": f.shift_base,
                "flow.shift_alpha": f.shift_alpha, "flow.scale": f.scale}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if t.keep_every < 0:
        raise ConfigError(f"train.keep_every must be >= 0, got {t.keep_every}")
    if any(e < 1 for e in t.keep_epochs):
        raise ConfigError(f"train.keep_epochs lists epochs >= 1 (e.g. [14]), got {t.keep_epochs}")
    if not 0.0 <= o.ema_decay <= 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1], got {o.ema_decay}")
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ConfigError(f"model.class_dropout_prob must be in [0, 1), got {m.class_dropout_prob}")
    if not 0 <= o.constant_epochs <= o.end_epoch:
        raise ConfigError(f"need 0 <= optim.constant_epochs ({o.constant_epochs}) <= optim.end_epoch ({o.end_epoch})")


def model_config_for(cfg: TrainDiTConfig, store: LatentStore) -> DiTConfig:
    """The architecture: the named size, the section's overrides, C and H from the store's spec."""
    c, h, w = store.latent_shape
    if h != w:
        raise TrainError(f"store {store.uri} holds {c}x{h}x{w} latents; DiT needs a square token grid")
    m = cfg.model
    names = ("hidden_size", "depth", "num_heads", "head_hidden_size", "head_depth", "head_num_heads", "patch_size")
    overrides = {k: getattr(m, k) for k in names if getattr(m, k) is not None}
    overrides.update(class_dropout_prob=m.class_dropout_prob, train_pos_embed=m.train_pos_embed,
                     num_classes=m.num_classes if m.num_classes is not None else store.num_classes)
    try:
        return dit_config(m.size, c, h, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def shift_alpha_for(cfg: TrainDiTConfig, latent_shape: tuple[int, int, int]) -> float:
    """flow.shift_alpha when given, else sqrt(C*H*W / flow.shift_base)."""
    if cfg.flow.shift_alpha is not None:
        return float(cfg.flow.shift_alpha)
    return shift_alpha(latent_shape, cfg.flow.shift_base)


# ------------------------------------------------------------------------------------------------
# per-step randomness
# ------------------------------------------------------------------------------------------------


_mix_seed = functools.partial(mix_seed, _SEED_TAG)  # step seeds of this stage


@dataclass
class StepRandomness:
    """What step k draws for the rows of its global batch that this rank serves (n rows)."""

    t: torch.Tensor  # float32 (n,) shifted times in [0, 1)
    eps: torch.Tensor  # float32 (n, C, H, W) noise
    drop: torch.Tensor  # int64 (n,) 1 = replace the label by the null label

    def chunk(self, parts: int) -> list["StepRandomness"]:
        return [StepRandomness(*c) for c in zip(self.t.chunk(parts), self.eps.chunk(parts), self.drop.chunk(parts))]


def step_randomness(seed: int, step: int, rows: torch.Tensor, global_batch: int, latent_shape: tuple[int, ...], *,
                    flow: FlowSection, alpha: float, drop_prob: float, device: torch.device) -> StepRandomness:
    """Times, noise and dropout of ``rows`` (int64, rows of the global batch) at ``step``.

    Times and the dropout mask come from one CPU generator seeded by (seed, step) drawing the whole
    global batch (cheap scalars); each row's noise from a generator seeded by (seed, step, row) on
    ``device``, so no rank draws noise for rows it does not serve. The result does not depend on the
    world size or on which rank asks.
    """
    g = torch.Generator().manual_seed(_mix_seed(seed, step))
    t_all = sample_train_times(global_batch, dist=flow.time_dist, alpha=alpha, generator=g, device="cpu",
                               loc=flow.loc, scale=flow.scale)
    drop_all = (torch.rand(global_batch, generator=g) < drop_prob).long()
    noise = []
    for row in rows.tolist():
        g_row = torch.Generator(device=device).manual_seed(_mix_seed(seed, step, row))
        noise.append(torch.randn(tuple(latent_shape), generator=g_row, device=device))
    return StepRandomness(t_all[rows].to(device), torch.stack(noise), drop_all[rows].to(device))


# ------------------------------------------------------------------------------------------------
# setup helpers
# ------------------------------------------------------------------------------------------------


def open_store(uri: str, storage_options: dict | None = None) -> LatentStore:
    """The store at ``uri`` (IncompleteStoreError / StoreError for an unfinished or foreign folder)."""
    return LatentStore.open(uri, storage_options)


def requested_normalizer(store: LatentStore, stats: str | None, storage_options: dict | None = None,
                         mode: str = "mean_var") -> LatentNormalizer:
    """The store's statistics, or those of ``--stats FILE`` (mean and var each optional), used as
    ``mode`` says (``data.stats_mode``: "var" drops the mean)."""
    norm = LatentNormalizer.from_file(stats, storage_options) if stats else LatentNormalizer.from_store(store)
    norm.check_shape(store.latent_shape)
    return norm.with_mode(mode)


def keep_epoch_steps(epochs: list[int], num_valid: int, global_batch: int) -> dict[int, int]:
    """{step: epoch}: the step that ends each epoch of ``epochs`` (the first at which the samples seen,
    step * global_batch, reach epoch * num_valid): ceil(epoch * N / B)."""
    return {math.ceil(e * num_valid / global_batch): int(e) for e in sorted(set(epochs))}


def _checkpoint_latent_shape(meta) -> tuple[int, ...] | None:
    """[C, H, W] a checkpoint was trained on: its store's, else its DiT config's; None if unknown."""
    if meta.store and meta.store.get("latent_shape"):
        return tuple(int(v) for v in meta.store["latent_shape"])
    conf = meta.model.get("config", {})
    if "in_channels" in conf and "input_size" in conf:
        return (int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"]))
    return None


def check_init_from(meta, uri: str, store: LatentStore, model_cfg: DiTConfig, model_class: str) -> None:
    """--init-from needs the store's latent shape, its encoder and the configured architecture."""
    shape = _checkpoint_latent_shape(meta)
    if shape is not None and tuple(shape) != tuple(store.latent_shape):
        raise TrainError(
            f"--init-from {uri} was trained on latents of shape {list(shape)} (C, H, W); store {store.uri} "
            f"holds latents of shape {list(store.latent_shape)}: fine-tuning needs the same latent shape"
        )
    ours = store_v1.encoder_identity(store.spec)
    if meta.encoder is not None and ours is not None and meta.encoder != ours:
        raise TrainError(
            f"--init-from {uri} was trained on latents of encoder {meta.encoder}; store {store.uri} was encoded "
            f"by {ours}: fine-tuning needs the same encoder"
        )
    theirs_cfg = dict(meta.model.get("config", {}))
    ours_cfg = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
    ignore = {"class_dropout_prob", "train_pos_embed"}  # training choices, not architecture
    diff = sorted(k for k in set(theirs_cfg) | set(ours_cfg)
                  if k not in ignore and theirs_cfg.get(k) != ours_cfg.get(k))
    if meta.model.get("class") != model_class or diff:
        detail = ", ".join(f"{k}: checkpoint {theirs_cfg.get(k)!r}, config {ours_cfg.get(k)!r}" for k in diff)
        raise TrainError(
            f"--init-from {uri} is a {meta.model.get('class')} that differs from the configured {model_class}"
            f"{' (' + detail + ')' if detail else ''}: pick the preset of that model or set model.* to match"
        )


class _BatchRecorder:
    """Test hook: this rank's batches as JSON lines (rows of the global batch, labels, latent sums)."""

    def __init__(self, run_dir: str, rank: int):
        if not uri_lib.is_local(run_dir):
            raise ConfigError("train.debug_record_batches needs a local run directory")
        folder = os.path.join(uri_lib.normalize(run_dir), DEBUG_DIR)
        os.makedirs(folder, exist_ok=True)
        self._file = open(os.path.join(folder, f"batches-rank{rank}.jsonl"), "a", encoding="utf-8")

    def record(self, step: int, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        sums = x.detach().double().flatten(1).sum(1).cpu().tolist()
        self._file.write(json.dumps({"step": step, "rows": rows.tolist(), "labels": y.cpu().tolist(),
                                     "sums": [round(s, 6) for s in sums]}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int  # optimizer steps taken in total (resumed ones included)
    samples_seen: int  # over all ranks
    checkpoint: str | None  # the newest checkpoint written (None when nothing was written)
    resumed_from: str | None  # the checkpoint this run continued, if any
    stopped_by: str  # "end" (total steps reached) or "sigterm"
    shift_alpha: float
    total_steps: int


class DiTTrainer(TrainLoop):
    """One training run of a DiT^DH / DiT on a latent store. Build it, then call :meth:`train`
    (the loop, logging and checkpoint writing are :class:`~trainer.loop.TrainLoop`'s)."""

    KIND = CHECKPOINT_KIND
    STAGE = "train-dit"

    def __init__(self, cfg: TrainDiTConfig, store: str, run_dir: str, *, init_from: str | None = None,
                 stats: str | None = None, preview_decoder: str | None = None, storage_options: dict | None = None,
                 dist_info: distributed.DistInfo | None = None):
        check_config(cfg)
        self._init_run(cfg, run_dir, storage_options, dist_info)
        self.store = open_store(store, storage_options)
        self.latent_shape = tuple(self.store.latent_shape)
        self._check_batch_split()
        self.normalizer = requested_normalizer(self.store, stats, storage_options, cfg.data.stats_mode)
        self.alpha = shift_alpha_for(cfg, self.latent_shape)
        self.model_cfg = model_config_for(cfg, self.store)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(self.model_cfg).to(self.device)
        ckpt = self._starting_checkpoint(init_from)
        self._load_weights(ckpt)
        self.train_model = self._wrap_model()
        self.loader = LatentLoader(self.store, cfg.data, rank=self.dist.rank, world_size=self.dist.world_size,
                                   device=self.device, normalizer=self.normalizer)
        self.total_steps = total_steps(cfg, self.loader.num_valid)
        self.keep_steps = keep_epoch_steps(cfg.train.keep_epochs, self.loader.num_valid, cfg.data.global_batch)
        self._build_optimizer(ckpt)
        self.rows = self.loader.global_rows  # after the loader state: the saved stream count decides them
        self.autocast_dtype = self._autocast_dtype()
        self.recorder = _BatchRecorder(self.run_dir, self.dist.rank) if cfg.train.debug_record_batches else None
        self.preview_decoder = self._load_preview_decoder(preview_decoder)
        self._start_logging()
        self._announce_init_from(init_from)

    # -- setup steps
    def _check_batch_split(self) -> None:
        B, W, A = self.cfg.data.global_batch, self.dist.world_size, self.cfg.train.grad_accum_steps
        if B % (W * A):
            raise ConfigError(
                f"data.global_batch {B} must be divisible by world size {W} x train.grad_accum_steps {A}"
            )
        P = self.cfg.data.num_streams
        if P is not None and P % W:
            raise ConfigError(f"data.num_streams {P} is not a multiple of the world size {W}")

    def _check_same_statistics(self, ckpt) -> None:
        saved = ckpt.stats or {}
        now = self.normalizer.as_tensors()
        same = set(saved) == set(now) and all(torch.equal(saved[k].cpu(), now[k]) for k in now)
        if not same:
            from trainer.loading import checkpoint_stats_mode

            source = (ckpt.meta.statistics or {}).get("source")
            saved_mode, mode = checkpoint_stats_mode(ckpt.meta, ckpt.uri), self.cfg.data.stats_mode
            raise TrainError(
                f"run directory {self.run_dir} normalized its latents with statistics from {source}; this run "
                f"would use {self.normalizer.source}: resume with the same statistics (the same --stats, or none)"
                + (f" and the same data.stats_mode (the run's: {saved_mode}; now: {mode})" if saved_mode != mode else "")
            )

    def _starting_checkpoint(self, init_from: str | None):
        """The run directory's newest complete checkpoint (resume: same store, with its training
        state), else --init-from's (weights only, checked against the store and the model), else None."""
        self.step, self.resumed_from, self.init_from = 0, None, None
        ckpt = self.load_resume_checkpoint(self.store)  # a corrupt newest one is set aside, with a warning
        if ckpt is None:
            return self._load_init_from(init_from) if init_from else None
        resume_uri = ckpt.uri
        if not ckpt.train_state or not {"optimizer", "scheduler", "data"} <= set(ckpt.train_state):
            raise TrainError(f"checkpoint {resume_uri} has no optimizer/scheduler/data state to resume from; "
                             "start a new --run-dir with --init-from to use its weights")
        self._check_same_statistics(ckpt)
        self.resumed_from, self.step = resume_uri, ckpt.step
        return ckpt

    def _load_init_from(self, uri: str):
        meta = read_meta(uri, self.so)
        check_init_from(meta, uri, self.store, self.model_cfg, type(self.model).__name__)
        ckpt = load_checkpoint(uri, load_train_state=False, map_location=self.device, storage_options=self.so)
        self.init_from = ckpt.uri
        return ckpt

    def _load_weights(self, ckpt) -> None:
        """Model weights from the checkpoint (if any); the EMA from its EMA weights, else from the model."""
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model_state)
        self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        if ckpt is not None:
            self.ema.load_state_dict(ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state)

    def _build_optimizer(self, ckpt) -> None:
        """AdamW and the LR schedule over the trainable parameters; on resume, then their saved states
        (optimizer before scheduler: the optimizer state carries the LR) and the loader position."""
        o = self.cfg.optim
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.scheduler = build_lr_scheduler(self.optimizer, DiTLRSchedule(
            samples_per_epoch=self.loader.num_valid, global_batch_size=self.cfg.data.global_batch, base_lr=o.lr,
            final_lr=o.final_lr, constant_epochs=o.constant_epochs, end_epoch=o.end_epoch))
        if self.resumed_from is not None:
            self.optimizer.load_state_dict(ckpt.train_state["optimizer"])
            self.scheduler.load_state_dict(ckpt.train_state["scheduler"])
            self.loader.load_state_dict(ckpt.train_state["data"])

    def _wrap_model(self) -> nn.Module:
        """The module the loop calls: compiled (optional), inside DDP when there are several ranks."""
        module: nn.Module = self.model
        if self.cfg.train.compile:
            module = torch.compile(module)
        if self.dist.world_size > 1:
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         forward_sync_buffers=False,  # RoPE tables: equal everywhere, synced once at init
                         gradient_as_bucket_view=True)
        return module

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.train.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def describe_run(self) -> str:
        c, h, w = self.latent_shape
        B, W, A = self.cfg.data.global_batch, self.dist.world_size, self.cfg.train.grad_accum_steps
        return (
            f"train-dit: store {self.store.store_id} ({c}x{h}x{w}, {self.loader.num_valid} valid samples), "
            f"{type(self.model).__name__} {count_parameters(self.model) / 1e6:.2f}M parameters, "
            f"world size {W}, global batch {B} = {W} x {A} x {B // (W * A)}, shift alpha {self.alpha:.4f}, "
            f"{self.total_steps} steps ({self.total_steps * B / self.loader.num_valid:.2f} epochs), "
            f"device {self.device}, autocast {self.autocast_dtype or 'off'}, statistics {self.normalizer.source} "
            f"({self.cfg.data.stats_mode})" + self._describe_keep_steps()
        )

    def _describe_keep_steps(self) -> str:
        if not self.keep_steps:
            return ""
        kept = [f"epoch {e} at step {s}" + ("" if s <= self.total_steps else " (after the last step: not reached)")
                for s, e in sorted(self.keep_steps.items())]
        return f"; keeping the checkpoints ending {', '.join(kept)}"

    def _load_preview_decoder(self, uri: str | None):
        """The decoder of the preview grids, checked against the store (every rank checks, so a bad
        one fails the whole group at once; rank 0 keeps it)."""
        if uri is None:
            return None
        from trainer.loading import LoadError, check_decoder_reads, load_decoder

        try:
            decoder = load_decoder(uri, device=self.device, storage_options=self.so)
            check_decoder_reads(decoder, self.latent_shape, f"store {self.store.uri}",
                                store_v1.encoder_identity(self.store.spec))
        except LoadError as e:
            raise TrainError(f"--preview-decoder: {e}") from None
        return decoder if self.dist.is_main else None

    def write_preview(self) -> str:
        """Sample ``train.preview_num`` images with the EMA weights (Euler, reference grid, no
        guidance, the same noise every time), decode them and write ``previews/step-NNNNNNN.png``."""
        from trainer.sampling import sample_labels, write_preview_grid

        t = self.cfg.train
        out = uri_lib.join(self.run_dir, PREVIEW_DIR, f"step-{self.step:07d}.png")
        labels = sample_labels("equal", t.preview_num, self.model_cfg.num_classes, class_order=True)
        write_preview_grid(self.model, self.preview_decoder, self.normalizer, self.alpha, labels.tolist(), out,
                           steps=t.preview_steps, seed=t.seed, ema_state=self.ema.state_dict(),
                           autocast_dtype=self.autocast_dtype, storage_options=self.so)
        return out

    def after_save(self, uri: str) -> None:
        if self.preview_decoder is not None and self.cfg.train.preview_every == 0:
            self.logger.info(f"preview grid {self.write_preview()}")

    def after_step(self) -> None:
        if self.step in self.keep_steps and self.last_saved != self.step:  # train.keep_epochs
            self.save()
        every = self.cfg.train.preview_every
        if self.preview_decoder is None or every == 0 or not self.dist.is_main:
            return
        if self.step % every == 0 or self.step == self.total_steps:
            self.logger.info(f"preview grid {self.write_preview()}")

    def _announce_init_from(self, init_from: str | None) -> None:
        if self.resumed_from:
            if init_from:
                self.logger.info(f"--init-from {init_from} ignored: the run directory already has checkpoints")
        elif self.init_from:
            self.logger.info(f"initialized from {self.init_from} (weights and EMA; fresh optimizer and schedule)")

    # -- what the shared loop asks for
    def run_step(self, batch) -> dict[str, float]:
        x, y = batch
        return self.train_step(x, y)

    def result(self, stopped_by: str) -> TrainResult:
        return TrainResult(self.step, self.loader.samples_seen, self.checkpoint_uri(), self.resumed_from,
                           stopped_by, self.alpha, self.total_steps)

    # -- one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step on this rank's part (x (B/W, C, H, W) normalized, y (B/W,)) of the global batch."""
        rnd = step_randomness(self.cfg.train.seed, self.step, self.rows, self.cfg.data.global_batch,
                              self.latent_shape, flow=self.cfg.flow, alpha=self.alpha,
                              drop_prob=self.model_cfg.class_dropout_prob, device=self.device)
        if self.recorder is not None:
            self.recorder.record(self.step, self.rows, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        local_loss = self.forward_backward(x, y, rnd)
        loss = distributed.all_reduce_mean(local_loss)  # the global-batch mean (equal local batches)
        grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)  # DDP has averaged the gradients
        loss_v, norm_v = torch.stack([loss.float(), grad_norm.float().to(loss.device)]).tolist()  # one host sync
        check_finite(loss_v, self.step, "loss")  # raises before any state changes: nothing is saved after it
        check_finite(norm_v, self.step, "gradient norm")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        return {"loss": loss_v, "grad_norm": norm_v, "lr": lr}

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, rnd: StepRandomness) -> torch.Tensor:
        """Gradients of this rank's mean loss, in ``grad_accum_steps`` equal micro-batches: each loss is
        scaled by 1/A and DDP synchronizes on the last backward only. Returns the (detached) mean loss."""
        A = self.cfg.train.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for i, (xs, ys, rs) in enumerate(zip(x.chunk(A), y.chunk(A), rnd.chunk(A))):
            sync = contextlib.nullcontext() if i == A - 1 or not isinstance(self.train_model, DDP) \
                else self.train_model.no_sync()
            with sync:
                x_t = interpolate(xs, rs.eps, rs.t)                                     # (m, C, H, W)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                    enabled=self.autocast_dtype is not None):
                    v = self.train_model(x_t, rs.t, ys, force_drop_ids=rs.drop)        # (m, C, H, W)
                loss = (v.float() - velocity_target(xs, rs.eps).float()).pow(2).mean()
                if self.step == self.cfg.train.debug_nan_at_step:
                    loss = loss * float("nan")
                (loss / A).backward()
            total += loss.detach()
        return total / A

    # -- checkpoints
    def checkpoint_meta(self) -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "epoch": self.loader.epoch,
            "samples_seen": self.loader.samples_seen,
            "config": json.loads(json.dumps(to_dict(self.cfg))),
            "model": model_meta(self.model),
            "store": store_meta(self.store),
            "encoder": store_v1.encoder_identity(self.store.spec),
            "statistics": self.normalizer.describe(),
            "data_state": self.loader.state_dict(),
            "extra": {"shift_alpha": self.alpha, "world_size": self.dist.world_size,
                      "total_steps": self.total_steps, "init_from": self.init_from,
                      "stats_mode": self.cfg.data.stats_mode,
                      **({"keep": f"the step ending epoch {self.keep_steps[self.step]} (train.keep_epochs)"}
                         if self.step in self.keep_steps else {})},
        }

    def checkpoint_payload(self) -> dict:
        train_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "data": self.loader.state_dict()}
        return dict(model_state=self.model, ema_state=self.ema.state_dict(), train_state=train_state,
                    meta=self.checkpoint_meta(), stats=self.normalizer.as_tensors() or None)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        super().close()


def train_dit(cfg: TrainDiTConfig, store: str, run_dir: str, *, init_from: str | None = None,
              stats: str | None = None, preview_decoder: str | None = None,
              storage_options: dict | None = None) -> TrainResult:
    """Train (or resume) in this process: joins the torchrun process group when launched by torchrun
    (gloo on CPU, NCCL on CUDA) and leaves it at the end if it joined it."""
    joined = not torch.distributed.is_initialized()
    info = distributed.init_distributed()
    try:
        trainer = DiTTrainer(cfg, store, run_dir, init_from=init_from, stats=stats, preview_decoder=preview_decoder,
                             storage_options=storage_options, dist_info=info)
        return trainer.train()
    finally:
        if joined:
            distributed.cleanup()


def config_from_run_dir(run_dir: str, storage_options: dict | None = None) -> TrainDiTConfig:
    """The resolved config a run directory was trained with (its config.json)."""
    return read_run_config(TrainDiTConfig, run_dir, storage_options)


__all__ = [
    "PRESETS", "TrainDiTConfig", "ModelSection", "FlowSection", "OptimSection", "DataSection", "TrainSection",
    "TrainError", "keep_epoch_steps",
    "TrainResult", "DiTTrainer", "resolve_config", "check_config", "model_config_for", "shift_alpha_for",
    "total_steps", "step_randomness", "train_dit", "config_from_run_dir",
]
