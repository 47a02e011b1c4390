"""Streaming cached latents from a latent store (``schemas/store_v1.py``) into the trainer.

The order of samples is a pure function of (seed, epoch, the store's valid mask, block size):

- **Epoch sequence.** :func:`epoch_sequence`: permute the chunks that hold at least one valid
  sample, group consecutive chunks of that permutation into blocks of ``block_chunks``, shuffle the
  valid samples inside each block, concatenate: V positions (V = number of valid samples). Each
  chunk gets one orientation per epoch (a seeded coin; ``latents`` or ``latents_flip``), so a chunk
  is read from one array only and every image still gets a fair random orientation each epoch.
- **Streams.** The epoch sequence is cut into P = ``num_streams`` contiguous segments (the first
  V % P get one more position). Stream p is the endless concatenation of its segment over epochs
  0, 1, 2... Global step k's batch (global batch B, B % P == 0) is stream p's positions
  [k B/P, (k+1) B/P) for p = 0..P-1, concatenated. Rank r of W (P % W == 0) serves the streams with
  p % W == r, so the global batch does not depend on W for a fixed P.
- **Remainder.** Nothing is dropped or padded: a batch that reaches the end of a stream's segment
  continues with the start of that stream's next epoch. Each stream serves each sample of its
  segment once per stream epoch; the global ``epoch`` (samples_seen / V) is fractional.
- **Position.** The whole position is ``samples_seen`` (= steps * B): every stream's epoch and
  offset follow from it, so resuming with the same P and B gives exactly the batches of an
  uninterrupted run, and with another W (dividing P) too. A W that does not divide the saved P
  starts a new partition P' = W at the same samples_seen (see :meth:`LatentLoader.load_state_dict`).

Reading: a map-style dataset whose items are groups of whole chunk reads ``(chunk, orientation,
slot)``, consecutive pieces of one unit; a DataLoader with workers (each opens its own store client)
reads the groups in the order this rank will consume them, each chunk into a slot of a buffer
shared with the main process (allocated once: a unit per stream, at most one block each, plus the
read-ahead), so only small tuples cross processes. From an object store a worker keeps all the range
GETs of its group in flight at once, decodes each chunk as its bytes arrive, and starts the GETs of
the next group it will be given as soon as these are under way (``LatentStore.read_chunks_stored``),
so the rate does not hang on the request latency; the groups are sized from ``read_ahead_bytes`` and
the DataLoader hands them back in order, so the batches do not depend on which GET came first. Slots
and assembled batches keep the stored dtype (float16: half the bytes of float32); the device converts
and normalizes (the CPU too: into reused float32 batches, with torch's intra-op threads, in the
consumer's thread). The main process assembles local batches (in a background thread,
``prefetch_batches`` ahead) by copying rows from the slots straight into the batch (pinned on CUDA):
one copy per sample, no concatenation of blocks, and no torch intra-op threads (numpy, without the
GIL). Batch memory is reused once nothing holds it (:class:`_HostBatches`), so no batch pays for
fresh pages.
"""
from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.config import ConfigError
from pipeline import uri as U
from pipeline.store import ChunkCache, LatentStore, StoreError
from schemas import store_v1 as S
from trainer.data_reads import _STORED_TORCH_DTYPE, ChunkReads, _numpy_view, _ReadOrder, _Slots
from trainer.normalize import LatentNormalizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
_RNG_TAG = 0x4C4F4144  # mixed into every seed so the loader's stream differs from other users of `seed`
_EPOCH_CACHE = 4  # epoch plans kept (streams and the read-ahead can be an epoch apart)


@dataclass
class LoaderConfig:
    """Streaming loader settings.

    global_batch: samples per optimizer step over all ranks (must divide by num_streams and world size).
    num_workers: DataLoader worker processes per rank reading chunks (0: read in-process).
    block_chunks: chunks whose samples are shuffled together; the per-stream memory bound.
    prefetch_factor: groups of chunk reads queued per worker (one being read, the next ready).
    read_ahead_bytes: chunk bytes (decoded, at the stored dtype) a rank reads ahead of the batches it
        assembles, in flight or waiting to be served: split into num_workers * prefetch_factor groups
        (at most a block each). From an object store a worker has the range GETs of its group in
        flight at once, and those of its next group as soon as these are under way. Memory: one
        chunk slot (stored dtype) per chunk of it, and per worker the compressed bytes of its next
        group. 0: one chunk per item, one GET at a time
        per worker (the read path before read-ahead).
    num_streams: P, the fixed partition of each epoch (None: the world size of the first run).
        Runs with the same P and global batch see the same global batches whatever the world size.
    seed: seeds the chunk permutation, block shuffles and orientations of every epoch.
    prefetch_batches: local batches assembled ahead in a background thread (0: in the consumer).
    chunk_cache: a local folder (e.g. on NVMe) keeping the chunk bytes read from the store, so
        later epochs from an object store read them from the disk (``pipeline.store.cache``: checked
        with their crc32c like any read, a corrupt entry is read from the store again; shared by
        every worker and rank of a node). None: no cache.
    chunk_cache_bytes: the cache folder's size bound; least recently used chunks are deleted.
    """

    global_batch: int = 1024
    num_workers: int = 2
    block_chunks: int = 16
    prefetch_factor: int = 2
    # Sized for DiT^DH-XL at 256 px on an H100 with the default layout (8 samples, 3.15 MB decoded /
    # 2.89 MB at rest per chunk GET): ~0.97 TFLOP per sample fwd+bwd at 40% of 989 TFLOP/s bf16 is
    # ~410 samples/s = ~51 chunk GETs/s per rank; at 50 ms per request plus ~32 ms to move and decode
    # a chunk (issue 11's measurement) 51 * 0.082 = ~4.2 GETs must be in flight. 64 MiB = 20 chunks =
    # groups of 5 for 2 workers x prefetch_factor 2; a worker has its group's GETs and its next
    # group's in flight: up to 20 per rank, 2-4x the need (latency tails, ragged group ends, one
    # worker decoding while the other waits). Slots: 5 groups of 5 beside the blocks served, ~80 MB
    # (float16).
    read_ahead_bytes: int = 64 * 2**20
    num_streams: int | None = None
    seed: int = 0
    prefetch_batches: int = 1
    chunk_cache: str | None = None
    chunk_cache_bytes: int = 256 * 2**30


class LoaderConfigError(ConfigError):
    """Loader settings that cannot work (with this world size or store); names the ``data.*`` key."""


def check_loader_config(cfg: LoaderConfig, prefix: str = "data.", world_size: int = 1) -> list[str]:
    """Problems with the values (each names its key as ``prefix`` + field) for ``world_size``
    ranks; empty when fine. What also needs the store is checked when the loader is built."""
    problems = []
    for key, low in (("global_batch", 1), ("block_chunks", 1), ("num_workers", 0), ("prefetch_factor", 1),
                     ("prefetch_batches", 0), ("seed", 0), ("read_ahead_bytes", 0), ("chunk_cache_bytes", 1)):
        if getattr(cfg, key) < low:
            problems.append(f"{prefix}{key} must be >= {low}, got {getattr(cfg, key)}")
    if cfg.global_batch >= 1 and cfg.global_batch % world_size:
        problems.append(f"{prefix}global_batch {cfg.global_batch} is not divisible by the world size {world_size}")
    if cfg.num_streams is not None:
        if cfg.num_streams < 1:
            problems.append(f"{prefix}num_streams must be >= 1 (or null: the world size), got {cfg.num_streams}")
        elif cfg.global_batch >= 1 and cfg.global_batch % cfg.num_streams:
            problems.append(f"{prefix}global_batch {cfg.global_batch} is not divisible by "
                            f"{prefix}num_streams {cfg.num_streams}")
    return problems


# --------------------------------------------------------------------------------------------
# the order: epoch plans, streams, units


@dataclass(frozen=True)
class _EpochPlan:
    seq: np.ndarray  # int64 [V] sample indices in epoch order
    flip: np.ndarray  # bool [num_chunks] read latents_flip for this chunk this epoch
    block_ends: np.ndarray  # int64 [num_blocks] end position of each block in seq


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([_RNG_TAG, int(seed), int(epoch)])


def _plan_epoch(valid: np.ndarray, samples_per_chunk: int, block_chunks: int, seed: int, epoch: int,
                flips: bool = True) -> _EpochPlan:
    valid = np.asarray(valid, dtype=bool)
    n = len(valid)
    num_chunks = -(-n // samples_per_chunk)
    chunk_of = np.arange(n) // samples_per_chunk
    per_chunk = np.bincount(chunk_of[valid], minlength=num_chunks)
    rng = _rng(seed, epoch)
    order = rng.permutation(np.flatnonzero(per_chunk))  # chunks with >= 1 valid sample
    flip = rng.random(num_chunks) < 0.5
    if not flips:
        flip[:] = False
    block_of_chunk = np.full(num_chunks, -1, dtype=np.int64)
    block_of_chunk[order] = np.arange(len(order)) // block_chunks
    samples = np.flatnonzero(valid)
    # Sort by (block, random rank): a uniform shuffle inside every block, blocks in permuted order.
    # The keys are unique, so every sort algorithm (numpy picks one per CPU) gives the same order.
    keys = block_of_chunk[chunk_of[samples]] * len(samples) + rng.permutation(len(samples))
    seq = samples[np.argsort(keys)]
    block_sizes = np.bincount(block_of_chunk[order], weights=per_chunk[order]).astype(np.int64)
    return _EpochPlan(seq.astype(np.int64), flip, np.cumsum(block_sizes))


def epoch_sequence(valid, samples_per_chunk: int, block_chunks: int, seed: int, epoch: int, *,
                   flips: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The global order of epoch ``epoch``: (sample indices int64 [V], orientation bool [num_chunks]).

    valid: bool [N] (the store's mask). Orientation True = read ``latents_flip`` for every sample of
    that chunk this epoch (all False when ``flips`` is False: stores without flipped latents).
    """
    p = _plan_epoch(valid, samples_per_chunk, block_chunks, seed, epoch, flips)
    return p.seq, p.flip


@dataclass(frozen=True)
class _Unit:
    """Consecutive positions [lo, hi) of one stream inside one block of one epoch: one load."""

    stream: int
    epoch: int
    lo: int
    hi: int
    samples: np.ndarray  # int64 [hi - lo] in serving order
    chunks: np.ndarray  # int64, ascending: the chunks holding them
    flips: np.ndarray  # bool, per chunk


class _Order:
    """The stream partition of every epoch and each rank's load schedule. Pure; thread-safe."""

    def __init__(self, valid, samples_per_chunk, block_chunks, seed, flips, num_streams, origin):
        self.valid = np.asarray(valid, dtype=bool)
        self.spc, self.block_chunks, self.seed, self.flips = samples_per_chunk, block_chunks, seed, flips
        self.V = int(self.valid.sum())
        self.P = num_streams
        self.origin = origin  # samples_seen at which this partition began
        base, extra = divmod(self.V, self.P)
        self.starts = [p * base + min(p, extra) for p in range(self.P)]
        self.lengths = [base + (p < extra) for p in range(self.P)]
        e0, o0 = divmod(origin, self.V)
        self.epoch0 = e0
        # A partition begun mid-epoch starts every stream at the same fraction of its segment.
        self.first = [(o0 * length) // self.V for length in self.lengths]
        self._plans: collections.OrderedDict[int, _EpochPlan] = collections.OrderedDict()
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> _EpochPlan:
        with self._lock:
            if epoch in self._plans:
                self._plans.move_to_end(epoch)
                return self._plans[epoch]
        plan = _plan_epoch(self.valid, self.spc, self.block_chunks, self.seed, epoch, self.flips)
        with self._lock:
            self._plans[epoch] = plan
            while len(self._plans) > _EPOCH_CACHE:
                self._plans.popitem(last=False)
        return plan

    def stream_position(self, samples_seen: int) -> int:
        """Positions every stream has served at ``samples_seen`` (counted from this partition's origin)."""
        return (samples_seen - self.origin) // self.P

    def units(self, p: int, j: int) -> Iterator[_Unit]:
        """Stream p's loads from its position j on, forever."""
        start, length = self.starts[p], self.lengths[p]
        t = self.first[p] + j
        while True:
            epoch, r = self.epoch0 + t // length, t % length
            plan = self.plan(epoch)
            lo = start + r
            block = int(np.searchsorted(plan.block_ends, lo, side="right"))
            hi = min(int(plan.block_ends[block]), start + length)
            samples = plan.seq[lo:hi]
            chunks = np.unique(samples // self.spc)
            yield _Unit(p, epoch, lo, hi, samples, chunks, plan.flip[chunks])
            t += hi - lo

    def schedule(self, streams: list[int], j0: int, per_stream: int) -> Iterator[_Unit]:
        """The loads of a rank serving ``streams`` from position j0, in the order it consumes them:
        step by step, stream by stream, a unit as soon as the step needs its first position."""
        its = {p: self.units(p, j0) for p in streams}
        nxt = dict.fromkeys(streams, j0)
        end = j0
        while True:
            end += per_stream
            for p in streams:
                while nxt[p] < end:
                    u = next(its[p])
                    nxt[p] += u.hi - u.lo
                    yield u


# --------------------------------------------------------------------------------------------
# reading chunks (in DataLoader workers) into slots shared with the main process: trainer.data_reads;
# how the workers start


def worker_start_method(num_workers: int) -> str | None:
    """How DataLoader workers start: the platform default (fork on Linux), except in a process
    connected to Ray (a driver or a Ray worker), whose gRPC threads can leave a forked child
    deadlocked: there workers come from a fork server (a clean single-threaded process), which
    re-imports the main module: a script of one's own needs the usual ``if __name__ == "__main__":``
    guard (the ``rae-pipeline`` commands have it)."""
    if num_workers == 0 or "ray" not in sys.modules:
        return None
    return "forkserver" if sys.modules["ray"].is_initialized() else None


# --------------------------------------------------------------------------------------------
# assembling batches (main process)


class _Cursor:
    """The unit one stream is serving: the slot row of each of its samples, in serving order."""

    def __init__(self):
        self.rows = self.labels = None
        self.slots: list[int] = []
        self.pos = 0

    @property
    def num_chunks(self) -> int:
        return len(self.slots)

    @property
    def remaining(self) -> int:
        return 0 if self.rows is None else len(self.rows) - self.pos

    def load(self, unit: _Unit, items: list, samples_per_chunk: int, labels: np.ndarray) -> None:
        """items: the reads of ``unit.chunks`` in order, (chunk, flip, slot, rows); labels: int64 [N]."""
        for (chunk, flip, *_), want, want_flip in zip(items, unit.chunks.tolist(), unit.flips.tolist()):
            if chunk != want or flip != want_flip:
                raise RuntimeError(f"chunk reads out of order: got {(chunk, flip)}, expected {(want, want_flip)}")
        slot_of = np.array([it[2] for it in items], dtype=np.int64)
        got = np.array([it[3] for it in items], dtype=np.int64)
        which = np.searchsorted(unit.chunks, unit.samples // samples_per_chunk)
        offset = unit.samples % samples_per_chunk
        if (offset >= got[which]).any():
            raise StoreError(f"chunks {unit.chunks.tolist()} returned fewer rows than the samples they hold")
        self.rows = slot_of[which] * samples_per_chunk + offset
        self.labels = labels[unit.samples]
        self.slots, self.pos = slot_of.tolist(), 0

    def take(self, n: int, source: np.ndarray, x_out: np.ndarray, y_out: np.ndarray) -> None:
        """Copy the next n samples from ``source`` (the slots' rows) into x_out, their labels into y_out."""
        rows = self.rows[self.pos:self.pos + n]
        # One row copy per sample, single-threaded and without the GIL; mode="clip" writes into
        # x_out directly (the default "raise" buffers the output).
        np.take(source, rows, axis=0, out=x_out, mode="clip")
        y_out[:] = self.labels[self.pos:self.pos + n]
        self.pos += n

    def release(self) -> list[int]:
        """The slots of the served unit, now free."""
        slots, self.slots = self.slots, []
        self.rows = self.labels = None
        self.pos = 0
        return slots


class _HostBatches:
    """Batch arrays for CPU batches, reused once nothing holds them any more (their reference count:
    the tensors and views handed out hold a reference to the array they were made from). Fresh
    memory for every batch costs a page fault and the zeroing of every page written (in the
    assembling thread, whose malloc arena returns large blocks to the system); a reused array is
    written in place. At most ``keep`` arrays are kept; beyond them (a consumer holding many
    batches) batches are allocated fresh."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, keep: int):
        self.shape, self.dtype, self.keep = shape, dtype, keep
        self._arrays: list[np.ndarray] = []

    def get(self) -> np.ndarray:
        for i in range(len(self._arrays)):
            # 2: the list's reference and the argument's; any tensor or view handed out adds one.
            if sys.getrefcount(self._arrays[i]) <= 2:
                return self._arrays[i]
        a = np.empty(self.shape, dtype=self.dtype)
        if len(self._arrays) < self.keep:
            self._arrays.append(a)
        return a


class _Prefetcher:
    """Runs a batch generator in a daemon thread, ``depth`` batches ahead; re-raises its errors."""

    _DONE = object()

    def __init__(self, batches: Iterator, depth: int, device: torch.device):
        self._batches, self._queue, self._device = batches, queue.Queue(maxsize=depth), device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latent-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._device.type == "cuda":
                # Pinned buffers are allocated in this thread: on the rank's GPU, not a context on GPU 0.
                torch.cuda.set_device(self._device)
            for item in self._batches:
                if not self._put(("ok", item)):
                    return
        except BaseException as e:  # forwarded to the consumer, which re-raises it
            self._put(("error", e))
        finally:
            self._batches.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        while True:
            if self._stop.is_set():
                raise RuntimeError("this loader iterator was closed (a newer iteration or close() replaced it)")
            try:
                kind, item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the latent loader thread stopped without a batch") from None
                continue
            if kind == "error":
                raise item
            return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            log.warning("latent loader thread did not stop within 60 s")


class _Inline:
    def __init__(self, batches: Iterator):
        self._batches = batches

    def get(self):
        return next(self._batches)

    def stop(self) -> None:
        self._batches.close()


# --------------------------------------------------------------------------------------------
# the loader


class LatentLoader:
    """Endless (x float32 [B/W, C, H, W] normalized, y int64 [B/W]) batches of one rank, on ``device``.

    ``samples_seen`` counts samples over all ranks (steps * global batch) and is the whole position:
    ``state_dict()`` / ``load_state_dict()`` carry it through checkpoints. ``last_wait_s`` is how long
    the consumer waited for the last batch (``total_wait_s`` the sum), for the data-wait fraction.
    ``max_chunks_held`` is the most chunks the assembler held at once (<= block_chunks per stream).
    """

    def __init__(self, store: LatentStore | str, cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1,
                 device="cpu", normalizer: LatentNormalizer | None = None, storage_options: dict | None = None):
        self.store = store if isinstance(store, LatentStore) else LatentStore.open(store, storage_options)
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._check_config()
        if cfg.chunk_cache:
            if not U.is_local(cfg.chunk_cache):
                raise LoaderConfigError(f"data.chunk_cache must be a local folder, got {cfg.chunk_cache}")
            self.store.use_chunk_cache(ChunkCache(U.normalize(cfg.chunk_cache), cfg.chunk_cache_bytes))
        self.num_valid = int(self.store.valid().sum())
        if self.num_valid == 0:
            raise StoreError(f"store {self.store.uri} has no valid samples")
        self.normalizer = normalizer if normalizer is not None else LatentNormalizer.from_store(self.store)
        self.normalizer.check_shape(self.store.latent_shape)
        num_streams = cfg.num_streams if cfg.num_streams is not None else self.world_size
        self._check_streams(num_streams, "data.num_streams" if cfg.num_streams is not None else "the world size")
        self.seed, self.block_chunks = cfg.seed, cfg.block_chunks
        self._order = self._make_order(num_streams, origin=0)
        self.samples_seen = 0
        self.last_wait_s = self.total_wait_s = 0.0
        self.chunks_held = self.max_chunks_held = 0
        self._labels = self.store.labels()
        # Batches travel in the stored dtype and are converted and normalized on the device.
        self._pin = self.device.type == "cuda"
        self._outputs: _HostBatches | None = None  # float32 CPU batches handed out
        self._dataloader: DataLoader | None = None
        self._slots: _Slots | None = None
        self._active = None
        self._iter_start = 0

    # -- checks and facts
    def _check_config(self) -> None:
        """LoaderConfigError (a UserError naming the ``data.*`` key) for settings that cannot work."""
        c, w = self.cfg, self.world_size
        if w < 1 or not 0 <= self.rank < w:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={w})")  # the caller's bug
        problems = check_loader_config(c, world_size=w)
        if problems:
            raise LoaderConfigError(problems[0])

    def _check_streams(self, p: int, what: str) -> None:
        if p < 1:
            raise LoaderConfigError(f"{what} must be >= 1, got {p}")
        if p % self.world_size:
            raise LoaderConfigError(f"{what} {p} is not a multiple of the world size {self.world_size}")
        if self.cfg.global_batch % p:
            raise LoaderConfigError(f"data.global_batch {self.cfg.global_batch} is not divisible by {what} {p}")
        if p > self.num_valid:
            raise LoaderConfigError(f"{what} {p} exceeds the store's {self.num_valid} valid samples")

    def _make_order(self, num_streams: int, origin: int) -> _Order:
        return _Order(self.store.valid(), self.store.samples_per_chunk, self.block_chunks, self.seed,
                      self.store.has_flips, num_streams, origin)

    @property
    def num_streams(self) -> int:
        return self._order.P

    @property
    def streams(self) -> list[int]:
        """The streams this rank serves, in batch order."""
        return list(range(self.rank, self.num_streams, self.world_size))

    @property
    def global_rows(self) -> torch.Tensor:
        """int64 [B/W]: the rows of the global batch (its world-size-1 order) this rank serves, e.g. to
        draw per-sample noise for the whole global batch from one generator and keep these rows."""
        b = self.cfg.global_batch // self.num_streams
        return torch.cat([torch.arange(p * b, (p + 1) * b) for p in self.streams])

    @property
    def local_batch(self) -> int:
        return self.cfg.global_batch // self.world_size

    @property
    def steps_per_epoch(self) -> float:
        return self.num_valid / self.cfg.global_batch

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.num_valid

    # -- position
    def state_dict(self) -> dict:
        """JSON-safe position: every value an int or str."""
        return {
            "version": STATE_VERSION,
            "samples_seen": int(self.samples_seen),
            "num_streams": int(self.num_streams),
            "global_batch": int(self.cfg.global_batch),
            "seed": int(self.seed),
            "block_chunks": int(self.block_chunks),
            "num_valid": int(self.num_valid),
            "store_id": self.store.store_id,
            "partition_origin": int(self._order.origin),
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved position. The saved seed, block size and streams win over the config.

        Same streams P, world size dividing P and global batch divisible by P: the next batches are
        exactly those of an uninterrupted run (with another global batch: the same sample sequence,
        cut differently). A world size that does not divide P: a new partition P' = W begins at the
        same samples_seen, each new stream starting at the same fraction of its segment of that
        epoch; that epoch may then serve some samples twice and others not at all; whole epochs
        after it serve each sample once again.
        """
        missing = {"samples_seen", "num_streams", "global_batch", "seed", "num_valid", "store_id"} - set(d)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        if d["store_id"] != self.store.store_id:
            raise ValueError(f"loader state belongs to store {d['store_id']}, this store is {self.store.store_id}")
        if int(d["num_valid"]) != self.num_valid:
            raise ValueError(f"loader state counts {d['num_valid']} valid samples, the store has {self.num_valid}")
        samples, p, origin = int(d["samples_seen"]), int(d["num_streams"]), int(d.get("partition_origin", 0))
        if samples < origin or (samples - origin) % p:
            raise ValueError(f"loader state: samples_seen {samples} is not a position of {p} streams from {origin}")
        seed, block = int(d["seed"]), int(d.get("block_chunks", self.cfg.block_chunks))
        B = self.cfg.global_batch
        if p % self.world_size or B % p:
            log.warning(
                "loader: %d streams do not fit world size %d and global batch %d: repartitioning into %d streams "
                "at sample %d (epoch %.3f); batches differ from an uninterrupted run",
                p, self.world_size, B, self.world_size, samples, samples / self.num_valid,
            )
            p, origin = self.world_size, samples
            self._check_streams(p, "the new stream count (world size)")
        else:
            if int(d["global_batch"]) != B:
                log.warning("loader: global batch %d (saved %d): same sample sequence, batches cut differently",
                            B, d["global_batch"])
            if self.cfg.num_streams is not None and self.cfg.num_streams != p:
                log.warning("loader.num_streams=%d ignored: the saved position uses %d streams", self.cfg.num_streams, p)
        if seed != self.cfg.seed or block != self.cfg.block_chunks:
            log.warning("loader: continuing with the saved seed %d and block_chunks %d", seed, block)
        self._stop_active()
        self.seed, self.block_chunks = seed, block
        self._order = self._make_order(p, origin)
        self.samples_seen = samples

    # -- iteration
    def _schedule(self) -> Iterator[_Unit]:
        o = self._order
        return o.schedule(self.streams, o.stream_position(self._iter_start), self.cfg.global_batch // o.P)

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one whole chunk as stored, decoded (what ``read_ahead_bytes`` counts)."""
        itemsize = np.dtype(S.STORAGE_DTYPE[self.store.logical_dtype]).itemsize
        return self.store.samples_per_chunk * int(np.prod(self.store.latent_shape)) * itemsize

    @property
    def reads_per_group(self) -> int:
        """Chunk reads per DataLoader item, at most: ``read_ahead_bytes`` over the groups queued
        (num_workers * prefetch_factor; one group in-process), between 1 and a block."""
        ahead = self.cfg.read_ahead_bytes // self.chunk_bytes
        groups = self.cfg.num_workers * self.cfg.prefetch_factor or 1
        return int(min(max(1, ahead // groups), self.block_chunks))

    def _slots_needed(self) -> int:
        """Chunks read but not yet served, at most: a unit per stream (<= one block), the groups
        queued to the workers and the group just handed over."""
        per_unit = min(self.block_chunks, self.store.num_chunks)
        queued = self.cfg.num_workers * self.cfg.prefetch_factor + 1
        return len(self.streams) * per_unit + queued * self.reads_per_group

    def _reads(self) -> Iterator:
        if self._dataloader is not None and self._slots.count < self._slots_needed():
            self._close_reads()  # a restored position with larger blocks or more streams
        if self._dataloader is None:
            w = self.cfg.num_workers
            chunk_shape = (self.store.samples_per_chunk,) + tuple(self.store.latent_shape)
            dtype = _STORED_TORCH_DTYPE[self.store.logical_dtype]
            self._slots = _Slots(self._slots_needed(), chunk_shape, dtype, shared=w > 0)
            self._dataloader = DataLoader(
                ChunkReads(self.store, self._slots.buffers),
                batch_size=None,
                sampler=_ReadOrder(self, self._slots, self.reads_per_group,
                                   max(1, w) if self.cfg.read_ahead_bytes else 0),
                num_workers=w,
                prefetch_factor=self.cfg.prefetch_factor if w > 0 else None,
                persistent_workers=w > 0,
                multiprocessing_context=worker_start_method(w),
            )
        return iter(self._dataloader)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Host batches from ``_iter_start`` on, in the stored dtype (in pinned memory on CUDA)."""
        schedule, reads = self._schedule(), self._reads()
        slots = self._slots
        pending: collections.deque = collections.deque()  # reads handed over, not yet in a cursor
        cursors = {p: _Cursor() for p in self.streams}
        per_stream, spc = self.cfg.global_batch // self.num_streams, self.store.samples_per_chunk
        shape = (self.local_batch,) + tuple(self.store.latent_shape)
        batches = None if self._pin else _HostBatches(shape, slots.rows.dtype, self.cfg.prefetch_batches + 3)
        while True:
            if self._pin:
                x = torch.empty(shape, dtype=slots.buffers.dtype, pin_memory=True)  # cached by torch
                y = torch.empty(self.local_batch, dtype=torch.int64, pin_memory=True)
                xs, ys = _numpy_view(x), y.numpy()
            else:
                # A batch array nobody holds any more, or a new one (fresh memory costs page faults).
                x = xs = None  # this frame's hold on the batch handed out last
                xs, ys = batches.get(), np.empty(self.local_batch, dtype=np.int64)
                x = torch.from_numpy(xs) if slots.buffers.dtype != torch.bfloat16 else \
                    torch.from_numpy(xs.view(np.int16)).view(torch.bfloat16)
                y = torch.from_numpy(ys)
            dst = 0
            for p, cur in cursors.items():
                need = per_stream
                while need:
                    if cur.remaining == 0:
                        unit = next(schedule)
                        if unit.stream != p:
                            raise RuntimeError(f"load schedule out of step: stream {unit.stream}, expected {p}")
                        while len(pending) < len(unit.chunks):
                            pending.extend(next(reads))  # a group: part of this unit
                        cur.load(unit, [pending.popleft() for _ in range(len(unit.chunks))], spc, self._labels)
                        self.chunks_held += cur.num_chunks
                        self.max_chunks_held = max(self.max_chunks_held, self.chunks_held)
                    m = min(need, cur.remaining)
                    cur.take(m, slots.rows, xs[dst:dst + m], ys[dst:dst + m])
                    dst, need = dst + m, need - m
                    if cur.remaining == 0:
                        released = cur.release()
                        slots.give(released)
                        self.chunks_held -= len(released)
            yield x, y

    def _stop_active(self) -> None:
        if self._active is not None:
            self._active.stop()
            self._active = None
        self.chunks_held = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._stop_active()
        self._iter_start = self.samples_seen
        batches = self._batches()
        depth = self.cfg.prefetch_batches
        source = _Prefetcher(batches, depth, self.device) if depth else _Inline(batches)
        self._active = source
        return self._serve(source)

    def _serve(self, source) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            while True:
                t0 = time.perf_counter()
                x, y = source.get()
                self.last_wait_s = time.perf_counter() - t0
                self.total_wait_s += self.last_wait_s
                if self.device.type == "cpu":
                    x = self.normalizer.normalize_(self._float32_output(x))
                else:
                    x = x.to(self.device, non_blocking=self._pin)
                    if x.dtype != torch.float32:
                        x = x.float()  # exact from float16/bfloat16
                    x = self.normalizer.normalize_(x)
                    y = y.to(self.device, non_blocking=self._pin)
                self.samples_seen += self.cfg.global_batch
                yield x, y
        finally:
            if self._active is source:
                self._stop_active()

    def _float32_output(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a CPU batch in the stored dtype) converted into a float32 batch: exact; a reused
        array when one is free (a fresh 25 MB tensor per batch would pay for its pages every time)."""
        if x.dtype == torch.float32:
            return x
        if self._outputs is None or self._outputs.shape != tuple(x.shape):
            self._outputs = _HostBatches(tuple(x.shape), np.float32, self.cfg.prefetch_batches + 3)
        out = torch.from_numpy(self._outputs.get())
        return out.copy_(x)  # float16/bfloat16 -> float32 is exact

    def close(self) -> None:
        """Stop the assembling thread and the DataLoader workers."""
        self._stop_active()
        self._close_reads()

    def _close_reads(self) -> None:
        dl, self._dataloader, self._slots = self._dataloader, None, None
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> "LatentLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
