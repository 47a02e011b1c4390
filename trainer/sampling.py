"""The pieces of sampling that the ``sample`` stage and train-dit's preview grids share: label plans,
per-sample noise, integrating the flow ODE with guidance, decoding to images.

Sample i depends on (seed, i, label_i) and the models only: labels and noise are pure functions of
(policy, seed, index), never of a rank-local RNG, the batch or the device.
"""
from __future__ import annotations

import copy
import re
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import uri as uri_lib
from schemas.errors import UserError
from trainer.flow import euler_sample, guided_velocity_fn, heun_sample, reference_grid
from trainer.images import image_grid, png_bytes, to_uint8_hwc
from trainer.loading import LoadedDecoder, load_decoder
from trainer.normalize import LatentNormalizer

SAMPLERS = ("euler", "heun")
_NOISE_TAG = 0x53414D50  # mixed into every noise seed ("SAMP"), so they differ from train-dit's
_LABEL_TAG = 0x4C41424C  # "LABL"
_INT_LIST = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*,?\s*$")


class SampleError(UserError, ValueError):
    """Inputs sampling refuses (checkpoints, settings, labels, output folder); says which and why."""


def _seed64(*parts: int) -> int:
    """A 63-bit seed from integers; nearby inputs give unrelated seeds (SeedSequence hashing)."""
    hi, lo = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


def sample_labels(policy: str, num: int, num_classes: int, seed: int = 0,
                  storage_options: dict | None = None, *, class_order: bool = False) -> np.ndarray:
    """int64 [num] class labels of samples 0..num-1.

    - ``equal``: num / num_classes per class (the multiset {i * K // N : i < N}; with N = 50 000
      and K = 1000: exactly 50 per class, the ADM convention; N need not be a multiple of K), in
      the order of a uniformly random permutation seeded by ``seed`` alone: a pure function of
      (seed, N, K), independent of ranks and batches. The construction is the reference
      sampler's ``--label-sampling equal`` (``torch.randperm`` of the class-ordered pool under
      ``manual_seed(seed)``). The ADM evaluator splits the file into consecutive 5 000-sample chunks for the
      Inception Score: a class-ordered file would show each chunk ~100 classes and cap the score
      near 100; permuted, a chunk holds about 5 of each class (on average 995 of the 1 000
      classes at N = 50 000) and its score is that of a random split.
      ``class_order=True``: the same labels in class order (sample i gets i * K // N), for
      grids that people look at (train-dit's previews).
    - ``random``: uniform over the classes from a generator seeded by ``seed`` alone.
    - a comma list ``"207,360,387"`` or the path/URI of a text file of labels (commas or
      whitespace): L labels; sample i gets list[i * L // N], i.e. each listed label N / L times in
      order, exactly the list when L = N. L > N is refused.
    """
    if num < 1 or num_classes < 1:
        raise SampleError(f"need num >= 1 and num_classes >= 1, got {num}, {num_classes}")
    index = np.arange(num, dtype=np.int64)
    if policy == "equal":
        in_order = index * num_classes // num
        if class_order:
            return in_order
        order = torch.randperm(num, generator=torch.Generator().manual_seed(int(seed))).numpy()
        return in_order[order]
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


@torch.no_grad()
def latents_to_images(decoder: nn.Module, latents: torch.Tensor, normalizer: LatentNormalizer | None) -> np.ndarray:
    """Normalized latents (B, C, H, W) -> uint8 [B, H, W, 3]: denormalize, decode (fp32), convert."""
    raw = normalizer.denormalize(latents) if normalizer is not None else latents
    return to_uint8_hwc(decoder.decode_to_pixels(raw.float()))


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
            images.append(latents_to_images(dec, z, normalizer))
    finally:
        model.train(was_training)
        dec.train(dec_was_training).to(dec_device)
    out = np.concatenate(images)
    uri_lib.atomic_write_bytes(out_png, png_bytes(image_grid(out)), storage_options)
    return out
