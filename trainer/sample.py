"""``rae-pipeline sample``: class-conditional samples of a trained DiT^DH / DiT, decoded to pixels.

From checkpoints alone: the DiT checkpoint rebuilds the model, the shift alpha and the latent
statistics it was trained with; the decoder checkpoint rebuilds the decoder. Output folder::

    <out>/samples.npz     arr_0 uint8 [N, H, W, 3] (RGB), arr_1 int64 [N] class labels: what the
                          ADM evaluation suite reads (np.savez layout, uncompressed: memory-maps)
    <out>/grid.png        up to 64 samples spread evenly over the indices (labels in order)
    <out>/sample.json     the plan (checkpoints, settings, label policy) and the run's numbers
    <out>/parts/          while running: part-<start>-<stop>.npz per block of sample indices and
                          plan.json; removed once samples.npz is written

Pipeline of one sample i (reads top to bottom in this file):
    label_i  = the label policy's i-th label (:func:`sample_labels`; never a rank-local RNG)
    noise_i  = N(0, I) from a CPU generator seeded by (seed, i) (:func:`sample_noise`)
    x_i      = ODE over ``reference_grid(steps, alpha)`` (Euler or Heun), velocity from
               ``flow.guided_velocity_fn`` (CFG: one forward of the doubled batch inside the interval;
               AutoGuidance: weak + s (main - weak))
    image_i  = round(255 * clamp(decoder(denormalize(x_i)), 0, 1)) as uint8 [H, W, 3]

Determinism. Sample i depends on (seed, i, label_i) and the models only. The N indices are split into
fixed blocks of ``block_size`` (the unit of work, of resume and of the part files); a block is
always sampled in the same micro-batches (``batch_size`` rows from the block's start), whichever
rank takes it. Hence:
- the number of ranks, and which rank takes a block, change nothing (bitwise, on one kind of
  device with the same thread settings);
- ``batch_size`` changes only the floating-point rounding of batched matrix products: on the CPU
  about 1e-6 (fp32) in the latents, which after the ODE and decoding moves a uint8 pixel by at most
  one level, in a small fraction of pixels (tests check |diff| <= 1 and < 1% of pixels);
- a resumed run reuses the blocks already written; they are exactly what a fresh run would write.
Runs must use the same ``block_size`` to reuse each other's parts (it is part of the plan).

Pixel conversion: round to nearest (DiT's and torchvision's ``save_image``). The reference RAE
sampler truncates (``mul(255).to(uint8)``), half a level darker on average.
"""
from __future__ import annotations

import copy
import io
import math
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import uri as uri_lib
from trainer import distributed
from trainer.data import LatentNormalizer
from trainer.flow import euler_sample, guided_velocity_fn, heun_sample, reference_grid, shift_alpha
from trainer.loop import float32_matmul_precision

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
PLAN_FILE = "sample.json"
PARTS_DIR = "parts"
PARTS_PLAN_FILE = "plan.json"
SAMPLES_FORMAT = "rae-samples"
SAMPLES_VERSION = 1
GRID_MAX = 64
SAMPLERS = ("euler", "heun")
WEIGHTS = ("ema", "model")
PRECISIONS = ("fp32", "bf16")
DIT_CLASSES = ("DiTDH", "DiT")
DECODER_CLASS = "RAEDecoder"
_NOISE_TAG = 0x53414D50  # mixed into every noise seed ("SAMP"), so they differ from train-dit's
_LABEL_TAG = 0x4C41424C  # "LABL"
_PART_NAME = re.compile(r"^part-(\d{8,})-(\d{8,})\.npz$")
_INT_LIST = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*,?\s*$")


class SampleError(ValueError):
    """Inputs sampling refuses (checkpoints, settings, output folder); says which and why."""


class SampleInterrupted(RuntimeError):
    """Raised by the ``debug_exit_after_blocks`` test hook: the run stops as if killed."""


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    num: int = 50_000  # samples N (the ADM convention: 50 per class of ImageNet)
    steps: int = 50  # time points of the reference grid (50: 49 Euler steps ending at shift(0.001))
    sampler: str = "euler"  # euler | heun (Heun: 2 velocity calls per step)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1: none)
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance only for t in [lo, hi], ends inclusive
    ag_scale: float | None = None  # AutoGuidance scale (needs the weak checkpoint)
    labels: str = "equal"  # equal | random | comma list | file of labels (see sample_labels)
    seed: int = 0  # noise of sample i from (seed, i); the random label policy's seed
    batch_size: int = 64  # samples per model call (results independent of it up to float rounding)
    block_size: int = 1000  # samples per part file: the unit of distribution and of resume
    weights: str = "ema"  # ema | model: which weights of every checkpoint (ema falls back to model)
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast of the DiT forwards, CUDA only)
    tf32: bool = True  # TF32 matmuls on CUDA while sampling (as the reference sampler; restored after)
    grid_max: int = GRID_MAX  # images in grid.png (0: no grid)
    progress: bool = True  # progress bar (images/s) on rank 0
    overwrite: bool = False  # replace an output folder that holds samples of other settings
    debug_exit_after_blocks: int | None = None  # test hook: each rank stops after writing this many blocks


def check_config(cfg: SampleConfig) -> None:
    """SampleError naming the setting for values no type can rule out."""
    positive = {"num": cfg.num, "steps": cfg.steps, "batch_size": cfg.batch_size, "block_size": cfg.block_size}
    for name, value in positive.items():
        if value < 1:
            raise SampleError(f"{name} must be >= 1, got {value}")
    if cfg.steps < 2:
        raise SampleError(f"steps counts the time points of the grid and must be >= 2, got {cfg.steps}")
    choices = {"sampler": (cfg.sampler, SAMPLERS), "weights": (cfg.weights, WEIGHTS),
               "precision": (cfg.precision, PRECISIONS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise SampleError(f"{name} {value!r} is not one of {list(allowed)}")
    lo, hi = cfg.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise SampleError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    if cfg.cfg_scale < 0:
        raise SampleError(f"cfg_scale must be >= 0, got {cfg.cfg_scale}")
    if cfg.ag_scale is not None and cfg.cfg_scale != 1.0:
        raise SampleError("use either CFG (cfg_scale) or AutoGuidance (ag_scale with a weak checkpoint), not both")
    if cfg.grid_max < 0:
        raise SampleError(f"grid_max must be >= 0, got {cfg.grid_max}")


def parse_interval(text: str) -> tuple[float, float]:
    """``"LO,HI"`` -> (lo, hi) floats (SampleError otherwise)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise SampleError(f"interval {text!r} is not of the form LO,HI (e.g. 0.0,0.7)") from None


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


@dataclass
class LoadedDiT:
    """A DiT checkpoint ready to sample: the model (eval mode) and what it was trained with."""

    model: nn.Module
    uri: str  # the checkpoint folder
    weights: str  # "ema" or "model": the weights loaded
    weights_sha256: str  # of the loaded safetensors file (from meta.json)
    latent_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # labels 0..num_classes-1; num_classes is the null label
    shift_alpha: float
    shift_alpha_source: str  # "meta.extra.shift_alpha" | "config.flow" | "latent shape (base 4096)"
    normalizer: LatentNormalizer | None  # None: the model was trained on raw latents
    encoder: dict | None  # encoder identity of the latents it was trained on
    step: int


@dataclass
class LoadedDecoder:
    """A decoder checkpoint: the model (eval mode) and the latents and pixels it maps between."""

    model: nn.Module
    uri: str
    weights: str
    weights_sha256: str
    in_channels: int
    grid: int  # token grid side g (num_tokens = g * g)
    image_size: int  # output side in pixels
    encoder: dict | None
    allow_token_resize: bool
    step: int = 0  # the checkpoint's step


def _load(uri: str, weights: str, classes: Sequence[str], what: str, storage_options: dict | None):
    """(model in eval mode, Checkpoint, weights used, sha256 of their file)."""
    from trainer.checkpoint import load_checkpoint
    from trainer.models import build_model_from_meta

    if weights not in WEIGHTS:
        raise SampleError(f"weights {weights!r} is not one of {list(WEIGHTS)}")
    ck = load_checkpoint(uri, load_train_state=False, storage_options=storage_options)
    cls = ck.meta.model.get("class")
    if cls not in classes:
        raise SampleError(f"{what} {ck.uri} holds a {cls!r} model ({ck.meta.kind!r} checkpoint); "
                          f"expected one of {list(classes)}")
    used = "ema" if weights == "ema" and ck.ema_state is not None else "model"
    model = build_model_from_meta(ck.meta.model)
    model.load_state_dict(ck.ema_state if used == "ema" else ck.model_state, strict=True)
    sha = ck.meta.files.get("ema.safetensors" if used == "ema" else "model.safetensors", "")
    return model.eval().requires_grad_(False), ck, used, sha


def checkpoint_latent_shape(meta) -> tuple[int, int, int]:
    """(C, H, W) a DiT checkpoint generates: its store's latent shape, else its model config's."""
    if meta.store and meta.store.get("latent_shape"):
        c, h, w = (int(v) for v in meta.store["latent_shape"])
        return c, h, w
    conf = meta.model["config"]
    return int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"])


def checkpoint_shift_alpha(meta) -> tuple[float, str]:
    """(alpha, where it came from): meta.extra.shift_alpha (train-dit records it), else the config's
    flow section (explicit flow.shift_alpha, else sqrt(C*H*W / flow.shift_base)), else
    sqrt(C*H*W / 4096) (imported checkpoints: the reference's base)."""
    extra = meta.extra or {}
    if extra.get("shift_alpha") is not None:
        return float(extra["shift_alpha"]), "meta.extra.shift_alpha"
    shape = checkpoint_latent_shape(meta)
    flow = (meta.config or {}).get("flow") if isinstance(meta.config, dict) else None
    if isinstance(flow, dict):
        if flow.get("shift_alpha") is not None:
            return float(flow["shift_alpha"]), "config.flow.shift_alpha"
        base = int(flow.get("shift_base", 4096))
        return shift_alpha(shape, base), f"latent shape {list(shape)}, config.flow.shift_base {base}"
    return shift_alpha(shape, 4096), f"latent shape {list(shape)}, base 4096"


def load_dit(uri: str, *, weights: str = "ema", stats: str | None = None, device: str | torch.device = "cpu",
             storage_options: dict | None = None) -> LoadedDiT:
    """A DiT^DH / DiT checkpoint (checkpoint or run directory) with its shift and statistics.

    stats: a statistics file (``--stats``: .safetensors, .npz or stat.pt) replacing the checkpoint's.
    The checkpoint's own statistics are ``stats.safetensors`` (absent mean = 0, absent var = 1); a
    checkpoint without any samples raw latents (no denormalization).
    """
    model, ck, used, sha = _load(uri, weights, DIT_CLASSES, "DiT checkpoint", storage_options)
    shape = checkpoint_latent_shape(ck.meta)
    conf = ck.meta.model["config"]
    if (int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"])) != tuple(shape):
        raise SampleError(f"DiT checkpoint {ck.uri}: its store's latents are {list(shape)} but the model reads "
                          f"{conf['in_channels']} x {conf['input_size']} x {conf['input_size']}")
    alpha, alpha_source = checkpoint_shift_alpha(ck.meta)
    if stats is not None:
        try:
            normalizer = LatentNormalizer.from_file(stats, storage_options)
        except ValueError as e:
            raise SampleError(str(e)) from None
    elif ck.stats:
        normalizer = LatentNormalizer(ck.stats.get("mean"), ck.stats.get("var"), source=f"checkpoint:{ck.uri}")
    else:
        normalizer = None
    if normalizer is not None:
        try:
            normalizer.check_shape(shape)
        except ValueError as e:
            raise SampleError(f"{e} (DiT checkpoint {ck.uri})") from None
        normalizer.to(device)
    return LoadedDiT(model.to(device), ck.uri, used, sha, shape, int(conf["num_classes"]), alpha, alpha_source,
                     normalizer, ck.meta.encoder, ck.step)


def load_decoder(uri: str, *, weights: str = "ema", device: str | torch.device = "cpu",
                 storage_options: dict | None = None) -> LoadedDecoder:
    """An RAE decoder checkpoint (fit-decoder's or an import) in eval mode on ``device``."""
    model, ck, used, sha = _load(uri, weights, (DECODER_CLASS,), "decoder checkpoint", storage_options)
    conf = model.config
    grid = math.isqrt(conf.num_tokens)
    return LoadedDecoder(model.to(device), ck.uri, used, sha, conf.in_channels, grid, grid * conf.patch_size,
                         ck.meta.encoder, bool(conf.allow_token_resize), ck.step)


def check_decoder_reads(decoder: LoadedDecoder, latent_shape: tuple[int, int, int], what: str,
                        encoder: dict | None) -> None:
    """SampleError unless ``decoder`` decodes latents of ``latent_shape`` made by ``encoder``
    (identities compared with ``interop.encoder_mismatch``: name, arch, input size; weight hashes
    when both are known)."""
    from trainer.interop import encoder_mismatch

    why = encoder_mismatch(encoder, decoder.encoder)
    if why:
        raise SampleError(f"decoder {decoder.uri} and {what} come from different encoders ({why}): the decoder "
                          f"would decode latents it was not trained on. {what}: {encoder}; decoder: {decoder.encoder}")
    c, h, w = latent_shape
    if c != decoder.in_channels or ((h, w) != (decoder.grid, decoder.grid) and not decoder.allow_token_resize):
        raise SampleError(f"decoder {decoder.uri} reads {decoder.in_channels} x {decoder.grid} x {decoder.grid} "
                          f"latents; {what} has {c} x {h} x {w}")


def check_compatible(dit: LoadedDiT, decoder: LoadedDecoder, weak: LoadedDiT | None = None) -> None:
    """The decoder must decode the DiT's latents; an AutoGuidance model must generate the same
    latents (encoder, shape) for the same classes."""
    from trainer.interop import encoder_mismatch

    check_decoder_reads(decoder, dit.latent_shape, f"DiT {dit.uri}", dit.encoder)
    if weak is None:
        return
    why = encoder_mismatch(dit.encoder, weak.encoder)
    if why:
        raise SampleError(f"AutoGuidance model {weak.uri} and DiT {dit.uri} come from different encoders ({why})")
    if weak.latent_shape != dit.latent_shape or weak.num_classes != dit.num_classes:
        raise SampleError(
            f"AutoGuidance model {weak.uri} generates {list(weak.latent_shape)} latents for {weak.num_classes} "
            f"classes; DiT {dit.uri}: {list(dit.latent_shape)} for {dit.num_classes}: they must agree"
        )


# ------------------------------------------------------------------------------------------------
# labels and noise: pure functions of (policy, seed, index)
# ------------------------------------------------------------------------------------------------


def _seed64(*parts: int) -> int:
    """A 63-bit seed from integers; nearby inputs give unrelated seeds (SeedSequence hashing)."""
    hi, lo = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


def sample_labels(policy: str, num: int, num_classes: int, seed: int = 0,
                  storage_options: dict | None = None) -> np.ndarray:
    """int64 [num] class labels of samples 0..num-1.

    - ``equal``: num / num_classes per class, in class order (sample i gets i * K // N; with
      N = 50 000 and K = 1000: 50 per class, the ADM convention). N need not be a multiple of K.
    - ``random``: uniform over the classes from a generator seeded by ``seed`` alone.
    - a comma list ``"207,360,387"`` or the path/URI of a text file of labels (commas or
      whitespace): L labels; sample i gets list[i * L // N], i.e. each listed label N / L times in
      order, exactly the list when L = N. L > N is refused.
    """
    if num < 1 or num_classes < 1:
        raise SampleError(f"need num >= 1 and num_classes >= 1, got {num}, {num_classes}")
    index = np.arange(num, dtype=np.int64)
    if policy == "equal":
        return index * num_classes // num
    if policy == "random":
        return np.random.default_rng([_LABEL_TAG, int(seed)]).integers(0, num_classes, num, dtype=np.int64)
    listed = _label_list(policy, storage_options)
    bad = [v for v in listed if not 0 <= v < num_classes]
    if bad:
        raise SampleError(f"labels {policy!r}: {bad[:5]} outside 0..{num_classes - 1} (the model's classes)")
    if len(listed) > num:
        raise SampleError(f"labels {policy!r}: {len(listed)} labels for {num} samples; give at most --num labels")
    return np.asarray(listed, dtype=np.int64)[index * len(listed) // num]


def _label_list(policy: str, storage_options: dict | None) -> list[int]:
    if _INT_LIST.match(policy):
        text, where = policy, "list"
    else:
        try:
            text, where = uri_lib.read_bytes(policy, storage_options).decode(), f"file {policy}"
        except (FileNotFoundError, IsADirectoryError):
            raise SampleError(f"labels {policy!r}: not 'equal', 'random', a comma list of integers, or an existing "
                              "file of labels") from None
        except UnicodeDecodeError:
            raise SampleError(f"labels file {policy} is not text") from None
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        raise SampleError(f"labels {where}: {', '.join(t for t in tokens if not t.lstrip('-').isdigit())[:80]} "
                          "are not integers") from None
    if not values:
        raise SampleError(f"labels {where} holds no labels")
    return values


def sample_noise(seed: int, indices: Sequence[int], latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """float32 [n, C, H, W] on the CPU: row k is N(0, I) from a generator seeded by (seed, indices[k]),
    so a sample's noise does not depend on the batch, the rank or the device that samples it."""
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(_seed64(_NOISE_TAG, seed, int(i)))
        rows.append(torch.randn(tuple(latent_shape), generator=g))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------
# one batch: ODE -> denormalize -> decode -> uint8
# ------------------------------------------------------------------------------------------------


def _float_output(model: Callable, device: torch.device, autocast_dtype: torch.dtype | None) -> Callable:
    """model(x, t, y) in fp32, or under autocast with the output cast back to fp32 (the ODE state stays fp32)."""
    if autocast_dtype is None:
        return model

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype):
            return model(x, t, y).float()

    return call


@torch.no_grad()
def generate_latents(model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, grid: torch.Tensor, *,
                     sampler: str = "euler", cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                     weak_model: nn.Module | None = None, ag_scale: float | None = None,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalized latents float32 [B, C, H, W] at grid[-1], from ``noise`` (B, C, H, W) at grid[0].

    labels: int64 (B,) on the model's device. Models must be in eval mode. Guidance as
    ``flow.guided_velocity_fn`` (null label = the model's ``num_classes``).
    """
    if sampler not in SAMPLERS:
        raise SampleError(f"sampler {sampler!r} is not one of {list(SAMPLERS)}")
    for m in (model, weak_model):
        if m is not None and m.training:
            raise SampleError(f"{type(m).__name__} is in train mode; call .eval() before sampling")
    device = noise.device
    null_label = int(model.cfg.num_classes)  # the DiT label table's last row
    velocity = guided_velocity_fn(
        _float_output(model, device, autocast_dtype), labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
        null_label=null_label, ag_scale=ag_scale if weak_model is not None else None,
        weak_model=_float_output(weak_model, device, autocast_dtype) if weak_model is not None else None,
    )
    integrate = euler_sample if sampler == "euler" else heun_sample
    return integrate(velocity, noise, grid.to(device))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> uint8 [B, H, W, 3] numpy (clamped, rounded to nearest)."""
    return pixels.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_latents(decoder: nn.Module, latents: torch.Tensor, normalizer: LatentNormalizer | None) -> np.ndarray:
    """Normalized latents (B, C, H, W) -> uint8 [B, H, W, 3]: denormalize, decode (fp32), convert."""
    raw = normalizer.denormalize(latents) if normalizer is not None else latents
    return to_uint8(decoder.decode_to_pixels(raw.float()))


# ------------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------------


def grid_indices(num: int, grid_max: int = GRID_MAX) -> np.ndarray:
    """Up to ``grid_max`` sample indices spread evenly over 0..num-1, increasing (all when num <= grid_max)."""
    if grid_max <= 0:
        return np.zeros(0, dtype=np.int64)
    if num <= grid_max:
        return np.arange(num, dtype=np.int64)
    return np.unique(np.linspace(0, num - 1, grid_max).round().astype(np.int64))


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, 3] -> one uint8 image [rows * (H + pad) + pad, cols * (W + pad) + pad, 3],
    row-major, white padding; cols defaults to ceil(sqrt(n))."""
    n, h, w, c = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return out


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# the trainer's preview
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def write_preview_grid(dit_model: nn.Module, decoder: "str | nn.Module | LoadedDecoder",
                       normalizer: LatentNormalizer | None, shift_alpha: float, labels: Sequence[int], out_png: str,
                       *, steps: int = 50, seed: int = 0, sampler: str = "euler", cfg_scale: float = 1.0,
                       cfg_interval: tuple[float, float] = (0.0, 1.0), ema_state: dict | None = None,
                       batch_size: int = 64, autocast_dtype: torch.dtype | None = None,
                       storage_options: dict | None = None) -> np.ndarray:
    """Sample one image per label with a model being trained and write them as a PNG grid.

    Contract (for ``train-dit``, called on rank 0 only; no collectives):
    - dit_model: the live model (DDP / torch.compile wrappers are looked through). Its train/eval
      mode is restored on return and its weights are not touched. ``ema_state``: sample with these
      weights instead (e.g. ``EMA.state_dict()``) on a temporary copy of the model.
    - decoder: an ``RAEDecoder`` module (load it once with :func:`load_decoder` and pass
      ``.model``), a :class:`LoadedDecoder`, or a checkpoint URI (loaded on every call: slow).
      It is moved to the DiT's device. Encoder compatibility is the caller's check
      (:func:`check_decoder_reads` with the store's identity).
    - normalizer: the statistics the model trains with (None: raw latents); shift_alpha: the run's.
    - Sample k has label ``labels[k]`` and the noise of index k under ``seed`` (:func:`sample_noise`):
      the same seed shows the same noise at every call, so grids of successive steps compare.
    - Global RNG state is not used or changed. Returns the images, uint8 [len(labels), H, W, 3];
      writes ``out_png`` (any fsspec URI) atomically.
    """
    from trainer.checkpoint import unwrap_model

    model = unwrap_model(dit_model)
    device = next(model.parameters()).device
    if ema_state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(ema_state)
    if isinstance(decoder, str):
        decoder = load_decoder(decoder, device=device, storage_options=storage_options)
    dec = decoder.model if isinstance(decoder, LoadedDecoder) else decoder
    dec_was_training, was_training = dec.training, model.training
    dec_device = next(dec.parameters()).device
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    grid = reference_grid(steps, alpha=shift_alpha)
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    images = []
    try:
        model.eval()
        dec.eval().to(device)
        for start in range(0, len(labels_t), batch_size):
            idx = range(start, min(start + batch_size, len(labels_t)))
            noise = sample_noise(seed, idx, shape).to(device)
            z = generate_latents(model, labels_t[start:idx.stop].to(device), noise, grid, sampler=sampler,
                                 cfg_scale=cfg_scale, cfg_interval=cfg_interval, autocast_dtype=autocast_dtype)
            images.append(decode_latents(dec, z, normalizer))
    finally:
        model.train(was_training)
        dec.train(dec_was_training).to(dec_device)
    out = np.concatenate(images)
    uri_lib.atomic_write_bytes(out_png, png_bytes(image_grid(out)), storage_options)
    return out


# ------------------------------------------------------------------------------------------------
# the sampling job: blocks, parts, resume, merge
# ------------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    out: str  # the output folder
    samples: str  # URI of samples.npz
    grid: str | None  # URI of grid.png (None with grid_max 0)
    num: int
    image_shape: tuple[int, int, int]  # (H, W, 3)
    blocks_sampled: int  # blocks sampled by this run (all ranks)
    blocks_reused: int  # blocks found written by an earlier run
    images_per_s: float | None  # images sampled by this run / its sampling wall time
    already_complete: bool = False


def plan_blocks(num: int, block_size: int) -> list[tuple[int, int]]:
    """The fixed partition of 0..num-1 into [start, stop) blocks of ``block_size`` (the last may be short)."""
    return [(s, min(s + block_size, num)) for s in range(0, num, block_size)]


def part_name(start: int, stop: int) -> str:
    return f"part-{start:08d}-{stop:08d}.npz"


def _autocast_dtype(cfg: SampleConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16":
        if device.type != "cuda":
            raise SampleError("precision bf16 (autocast) is for CUDA devices; sample in fp32 on the CPU")
        return torch.bfloat16
    return None


class SamplingJob:
    """Loaded models, the label array and the settings of one ``sample`` run; samples blocks."""

    def __init__(self, cfg: SampleConfig, dit: LoadedDiT, decoder: LoadedDecoder, weak: LoadedDiT | None,
                 labels: np.ndarray, device: torch.device):
        self.cfg, self.dit, self.decoder, self.weak = cfg, dit, decoder, weak
        self.labels, self.device = labels, device
        self.grid = reference_grid(cfg.steps, alpha=dit.shift_alpha)
        self.autocast_dtype = _autocast_dtype(cfg, device)

    def sample_indices(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 [n, H, W, 3] of the given sample indices, in ONE batch of the models."""
        cfg = self.cfg
        noise = sample_noise(cfg.seed, indices, self.dit.latent_shape).to(self.device)
        y = torch.as_tensor(self.labels[np.asarray(indices, dtype=np.int64)], device=self.device)
        z = generate_latents(self.dit.model, y, noise, self.grid, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale,
                             cfg_interval=cfg.cfg_interval, weak_model=self.weak.model if self.weak else None,
                             ag_scale=cfg.ag_scale, autocast_dtype=self.autocast_dtype)
        return decode_latents(self.decoder.model, z, self.dit.normalizer)

    def sample_block(self, start: int, stop: int, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """uint8 [stop - start, H, W, 3]: micro-batches of batch_size rows counted from ``start``,
        the same whichever rank samples the block."""
        out = []
        for s in range(start, stop, self.cfg.batch_size):
            out.append(self.sample_indices(range(s, min(s + self.cfg.batch_size, stop))))
            if on_batch is not None:
                on_batch(len(out[-1]))
        return np.concatenate(out)

    def plan(self, num_image: tuple[int, int, int]) -> dict:
        """Everything that decides the samples (not batch size, device or the number of ranks):
        parts written under one plan are reused only by runs with the same plan."""
        cfg, dit, dec, weak = self.cfg, self.dit, self.decoder, self.weak

        def ckpt(m) -> dict | None:
            return None if m is None else {"uri": m.uri, "weights": m.weights, "weights_sha256": m.weights_sha256}

        norm = dit.normalizer
        stats = None
        if norm is not None:
            blob = b"".join(t.numpy().tobytes() for _, t in sorted(norm.as_tensors().items()))
            stats = {"source": norm.source, "mean": norm.mean is not None, "var": norm.var is not None,
                     "eps": norm.eps, "sha256": uri_lib.sha256_bytes(blob)}
        return {
            "format": SAMPLES_FORMAT, "version": SAMPLES_VERSION,
            "dit": {**ckpt(dit), "step": dit.step, "latent_shape": list(dit.latent_shape),
                    "num_classes": dit.num_classes, "encoder": dit.encoder},
            "decoder": ckpt(dec), "autoguidance": ckpt(weak),
            "statistics": stats,
            "shift_alpha": dit.shift_alpha, "shift_alpha_source": dit.shift_alpha_source,
            "num": cfg.num, "steps": cfg.steps, "sampler": cfg.sampler,
            "grid": [float(t) for t in self.grid],
            "cfg_scale": cfg.cfg_scale, "cfg_interval": list(cfg.cfg_interval), "ag_scale": cfg.ag_scale,
            "labels": {"policy": cfg.labels, "sha256": uri_lib.sha256_bytes(self.labels.astype("<i8").tobytes())},
            "seed": cfg.seed, "block_size": cfg.block_size,
            "precision": cfg.precision, "tf32": cfg.tf32 and self.device.type == "cuda",
            "image_shape": list(num_image), "pixel_conversion": "round(255 * clamp(x, 0, 1))",
        }


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _list_parts(parts_uri: str, storage_options: dict | None) -> dict[tuple[int, int], str]:
    """(start, stop) -> URI of every finished part file (temporary files of writes in flight are hidden)."""
    fs, path = uri_lib.get_fs(parts_uri, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    found = {}
    for name in fs.ls(path, detail=False):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        m = _PART_NAME.match(base)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = uri_lib.join(parts_uri, base)
    return found


def _read_part(uri: str, n: int, labels: np.ndarray, storage_options: dict | None) -> np.ndarray:
    """The images of a part, checked against its expected length and labels."""
    with np.load(io.BytesIO(uri_lib.read_bytes(uri, storage_options)), allow_pickle=False) as z:
        images, part_labels = z["arr_0"], z["arr_1"]
    if images.dtype != np.uint8 or images.shape[0] != n or images.ndim != 4 or not np.array_equal(part_labels, labels):
        raise SampleError(f"part {uri} does not hold the {n} samples of its block (shape {list(images.shape)}, "
                          f"labels {'match' if np.array_equal(part_labels, labels) else 'differ'}); delete it to "
                          "resample that block")
    return images


def _write_npz_streaming(f, arr_0_shape: tuple[int, ...], arr_0_chunks: Iterator[np.ndarray],
                         arr_1: np.ndarray) -> None:
    """An uncompressed .npz (np.savez's layout: arr_0.npy, arr_1.npy) written chunk by chunk into
    the binary file ``f``: the whole image array is never in memory."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": tuple(int(s) for s in arr_0_shape)}
            np.lib.format.write_array_header_1_0(member, header)
            written = 0
            for chunk in arr_0_chunks:
                member.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
                written += len(chunk)
            if written != arr_0_shape[0]:
                raise SampleError(f"merge wrote {written} images, expected {arr_0_shape[0]}")
        with zf.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(arr_1), allow_pickle=False)


def _read_plan(uri: str, storage_options: dict | None) -> dict | None:
    return uri_lib.read_json(uri, storage_options) if uri_lib.exists(uri, storage_options) else None


def _plan_differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in ("result",) and old.get(k) != new.get(k))


class _Progress:
    """A tqdm bar of images on rank 0 (images/s), silent elsewhere or when disabled."""

    def __init__(self, total: int, enabled: bool, world_size: int):
        self.bar = None
        if enabled and total > 0:
            from tqdm import tqdm

            desc = "sampling" if world_size == 1 else f"sampling (rank 0 of {world_size})"
            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sample(dit_ckpt: str, decoder_ckpt: str, out: str, cfg: SampleConfig | None = None, *,
           autoguidance_ckpt: str | None = None, stats: str | None = None, device: str | None = None,
           storage_options: dict | None = None, log: Callable[[str], None] = _log) -> SampleResult | None:
    """Sample ``cfg.num`` images into ``out`` (module docstring); returns the result on rank 0, None elsewhere.

    Runs in this process, or as one rank of a torchrun group (joined here when launched by
    torchrun, left at the end if joined here). device: "cpu", "cuda" or None/"auto" (the rank's
    device: cuda:LOCAL_RANK when CUDA is available).
    """
    cfg = cfg or SampleConfig()
    check_config(cfg)
    if (autoguidance_ckpt is None) != (cfg.ag_scale is None):
        raise SampleError("AutoGuidance needs both the weak checkpoint (--autoguidance-ckpt) and --ag-scale")
    joined = not torch.distributed.is_initialized()
    info = distributed.init_distributed()
    try:
        dev = info.device if device in (None, "auto") else torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SampleError("device cuda was asked for, but CUDA is not available here")
        job = _build_job(cfg, dit_ckpt, decoder_ckpt, autoguidance_ckpt, stats, dev, storage_options)
        return _run(job, uri_lib.normalize(out) if uri_lib.is_local(out) else out.rstrip("/"), info,
                    storage_options, log if info.is_main else (lambda _m: None))
    finally:
        if joined:
            distributed.cleanup()


def _build_job(cfg, dit_ckpt, decoder_ckpt, autoguidance_ckpt, stats, device, so) -> SamplingJob:
    dit = load_dit(dit_ckpt, weights=cfg.weights, stats=stats, device=device, storage_options=so)
    decoder = load_decoder(decoder_ckpt, weights=cfg.weights, device=device, storage_options=so)
    weak = None
    if autoguidance_ckpt is not None:
        weak = load_dit(autoguidance_ckpt, weights=cfg.weights, device=device, storage_options=so)
    check_compatible(dit, decoder, weak)
    labels = sample_labels(cfg.labels, cfg.num, dit.num_classes, cfg.seed, so)
    return SamplingJob(cfg, dit, decoder, weak, labels, device)


def _run(job: SamplingJob, out: str, info: distributed.DistInfo, so: dict | None,
         log: Callable[[str], None]) -> SampleResult | None:
    cfg = job.cfg
    image_shape = (job.decoder.image_size, job.decoder.image_size, 3)
    plan = job.plan(image_shape)
    blocks = plan_blocks(cfg.num, cfg.block_size)
    # Rank 0 decides what is left to do and everyone follows its answer (no listing races).
    decision = _prepare_output(out, plan, blocks, cfg.overwrite, so) if info.is_main else None
    decision = distributed.broadcast_object(decision)
    if decision["error"]:
        raise SampleError(decision["error"])
    if decision["complete"]:
        log(f"{out}: already holds the {cfg.num} samples of these settings; nothing to do")
        return _result(out, cfg, image_shape, 0, len(blocks), None, True) if info.is_main else None
    pending = [tuple(b) for b in decision["pending"]]
    mine = pending[info.rank::info.world_size]
    dit = job.dit
    log(f"sample: {type(dit.model).__name__} {dit.uri} ({dit.weights} weights), decoder {job.decoder.uri}, "
        f"{cfg.num} samples in {len(blocks)} blocks ({len(blocks) - len(pending)} done before), "
        f"{cfg.steps}-point grid, {cfg.sampler}, shift alpha {dit.shift_alpha:.4f}, labels {cfg.labels}, "
        f"statistics {dit.normalizer.source if dit.normalizer else 'none (raw latents)'}, world size "
        f"{info.world_size}, device {job.device}")
    parts_uri = uri_lib.join(out, PARTS_DIR)
    progress = _Progress(sum(b - a for a, b in mine), cfg.progress and info.is_main, info.world_size)
    started = time.perf_counter()
    try:
        with float32_matmul_precision(job.device, cfg.tf32):
            for k, (start, stop) in enumerate(mine):
                images = job.sample_block(start, stop, progress.update)
                uri_lib.atomic_write_bytes(uri_lib.join(parts_uri, part_name(start, stop)),
                                           _npz_bytes(arr_0=images, arr_1=job.labels[start:stop]), so)
                if cfg.debug_exit_after_blocks is not None and k + 1 >= cfg.debug_exit_after_blocks:
                    raise SampleInterrupted(f"debug_exit_after_blocks={cfg.debug_exit_after_blocks}: stopping "
                                            f"after block [{start}, {stop})")
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    done = sum(b - a for a, b in pending)
    distributed.barrier()
    elapsed = max(distributed.all_gather_object(elapsed))
    if not info.is_main:
        return None
    rate = done / elapsed if elapsed > 0 and done else None
    if rate is not None:
        log(f"sampled {done} images in {elapsed:.1f} s: {rate:.2f} images/s over {info.world_size} rank(s)")
    _merge(out, plan, job.labels, blocks, image_shape, cfg, so)
    result = _result(out, cfg, image_shape, len(pending), len(blocks) - len(pending), rate, False)
    uri_lib.write_json(uri_lib.join(out, PLAN_FILE), {**plan, "result": {
        "blocks_sampled": result.blocks_sampled, "blocks_reused": result.blocks_reused,
        "images_per_s": rate, "world_size": info.world_size, "batch_size": cfg.batch_size,
        "device": str(job.device)}}, so)
    uri_lib.rm(parts_uri, so)
    log(f"wrote {result.samples} ({cfg.num} x {image_shape[0]} x {image_shape[1]} x 3)"
        + (f" and {result.grid}" if result.grid else ""))
    return result


def _result(out, cfg, image_shape, sampled, reused, rate, complete) -> SampleResult:
    return SampleResult(out, uri_lib.join(out, SAMPLES_FILE), uri_lib.join(out, GRID_FILE) if cfg.grid_max else None,
                        cfg.num, image_shape, sampled, reused, rate, complete)


def _prepare_output(out: str, plan: dict, blocks: list[tuple[int, int]], overwrite: bool, so) -> dict:
    """Rank 0: {"error", "complete", "pending"}. A folder of other settings is refused (or cleared
    with overwrite); parts of the same plan are kept."""
    final_plan = _read_plan(uri_lib.join(out, PLAN_FILE), so)
    parts_uri = uri_lib.join(out, PARTS_DIR)
    parts_plan = _read_plan(uri_lib.join(parts_uri, PARTS_PLAN_FILE), so)
    for old, what in ((final_plan, PLAN_FILE), (parts_plan, f"{PARTS_DIR}/{PARTS_PLAN_FILE}")):
        if old is None:
            continue
        diff = _plan_differences(old, plan)
        if diff and not overwrite:
            return {"error": f"{out} holds samples of other settings ({what} differs in: {', '.join(diff)}); "
                             "choose another --out or pass --overwrite", "complete": False, "pending": []}
    if overwrite and ((final_plan and _plan_differences(final_plan, plan))
                      or (parts_plan and _plan_differences(parts_plan, plan))):
        for name in (PARTS_DIR, SAMPLES_FILE, GRID_FILE, PLAN_FILE):
            uri_lib.rm(uri_lib.join(out, name), so)
        final_plan = None
    if final_plan is not None and uri_lib.exists(uri_lib.join(out, SAMPLES_FILE), so):
        return {"error": None, "complete": True, "pending": []}
    uri_lib.write_json(uri_lib.join(parts_uri, PARTS_PLAN_FILE), plan, so)
    written = _list_parts(parts_uri, so)
    pending = [list(b) for b in blocks if tuple(b) not in written]
    return {"error": None, "complete": False, "pending": pending}


def _merge(out: str, plan: dict, labels: np.ndarray, blocks: list[tuple[int, int]],
           image_shape: tuple[int, int, int], cfg: SampleConfig, so) -> None:
    """Parts -> samples.npz (streamed, atomic) and grid.png (the evenly spread indices)."""
    parts = _list_parts(uri_lib.join(out, PARTS_DIR), so)
    missing = [b for b in blocks if b not in parts]
    if missing:
        raise SampleError(f"{out}: parts of blocks {missing[:5]} are missing after sampling; rerun to resume")
    picks = grid_indices(cfg.num, cfg.grid_max)
    chosen: list[np.ndarray] = []

    def chunks() -> Iterator[np.ndarray]:
        for start, stop in blocks:
            images = _read_part(parts[(start, stop)], stop - start, labels[start:stop], so)
            if tuple(images.shape[1:]) != tuple(image_shape):
                raise SampleError(f"part {parts[(start, stop)]} holds images {list(images.shape[1:])}, "
                                  f"expected {list(image_shape)}")
            sel = picks[(picks >= start) & (picks < stop)]
            if len(sel):
                chosen.append(images[sel - start])
            yield images

    shape = (cfg.num, *image_shape)
    uri_lib.atomic_write_with(uri_lib.join(out, SAMPLES_FILE), lambda f: _write_npz_streaming(f, shape, chunks(), labels),
                       so)
    if chosen:
        uri_lib.atomic_write_bytes(uri_lib.join(out, GRID_FILE), png_bytes(image_grid(np.concatenate(chosen))), so)


__all__ = [
    "SampleConfig", "SampleError", "SampleInterrupted", "SampleResult", "LoadedDiT", "LoadedDecoder",
    "SamplingJob", "check_config", "check_compatible", "check_decoder_reads", "checkpoint_shift_alpha",
    "checkpoint_latent_shape", "decode_latents", "generate_latents", "grid_indices", "image_grid", "load_decoder",
    "load_dit", "parse_interval", "plan_blocks", "sample", "sample_labels", "sample_noise", "to_uint8",
    "write_preview_grid",
]
