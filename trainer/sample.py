"""``rae-pipeline sample``: class-conditional samples of a trained DiT^DH / DiT, decoded to pixels.

From checkpoints alone: the DiT checkpoint rebuilds the model, the shift alpha and the latent
statistics it was trained with; the decoder checkpoint rebuilds the decoder. Output folder::

    <out>/samples.npz     arr_0 uint8 [N, H, W, 3] (RGB), arr_1 int64 [N] class labels: what the
                          ADM evaluation suite reads (np.savez layout, uncompressed: memory-maps)
    <out>/grid.png        up to 64 samples spread evenly over the indices (in sample order)
    <out>/sample.json     the plan (checkpoints, settings, label policy) and the run's numbers
    <out>/parts/          while running: part-<start>-<stop>.npz per block of sample indices and
                          plan.json; removed once samples.npz is written

Pipeline of one sample i (its pieces are in ``trainer/sampling.py``):
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

import io
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline import uri as uri_lib
from trainer import distributed
from trainer.flow import reference_grid
from trainer.images import GRID_MAX, grid_indices, image_grid, png_bytes
from trainer.loading import WEIGHTS, LoadedDecoder, LoadedDiT, check_compatible, load_decoder, load_dit
from trainer.loop import float32_matmul_precision
from trainer.sampling import SAMPLERS, SampleError, generate_latents, latents_to_images, sample_labels, sample_noise

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
PLAN_FILE = "sample.json"
PARTS_DIR = "parts"
PARTS_PLAN_FILE = "plan.json"
SAMPLES_FORMAT = "rae-samples"
SAMPLES_VERSION = 1
PRECISIONS = ("fp32", "bf16")
_PART_NAME = re.compile(r"^part-(\d{8,})-(\d{8,})\.npz$")


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
    seed: int = 0  # noise of sample i from (seed, i); the equal policy's permutation, the random policy's seed
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
        return latents_to_images(self.decoder.model, z, self.dit.normalizer)

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
        job = _build_job(cfg, dit_ckpt, decoder_ckpt, autoguidance_ckpt, stats, dev, storage_options,
                         log if info.is_main else (lambda _m: None))
        return _run(job, uri_lib.normalize(out) if uri_lib.is_local(out) else out.rstrip("/"), info,
                    storage_options, log if info.is_main else (lambda _m: None))
    finally:
        if joined:
            distributed.cleanup()


def _build_job(cfg, dit_ckpt, decoder_ckpt, autoguidance_ckpt, stats, device, so,
               log: Callable[[str], None] = _log) -> SamplingJob:
    dit = load_dit(dit_ckpt, weights=cfg.weights, stats=stats, device=device, storage_options=so)
    decoder = load_decoder(decoder_ckpt, weights=cfg.weights, device=device, storage_options=so)
    weak = None
    if autoguidance_ckpt is not None:
        weak = load_dit(autoguidance_ckpt, weights=cfg.weights, device=device, storage_options=so)
    note = check_compatible(dit, decoder, weak)
    if note:  # a model without an encoder identity (import-rae --encoder none): shapes checked only
        log(f"WARNING: {note}")
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
    "SampleConfig", "SampleError", "SampleInterrupted", "SampleResult", "SamplingJob", "check_config",
    "parse_interval", "plan_blocks", "sample",
]
