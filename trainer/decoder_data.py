"""Training data of the RAE decoder (``fit-decoder``): latents paired with the images they encode.

Two modes (``DecoderDataConfig.mode``):

``cached`` (default)
    The store's **unflipped** latents, **unnormalized** (the reference trains the decoder on raw
    encoder tokens), each paired with its source image, fetched through the per-row source reference
    the store recorded (ImageFolder: the file; Parquet: file + row) and ADM-center-cropped to the
    store's resolution exactly as the encode job did, so pixels and latent describe the same crop.
    Every fetched file is checked against the record (size and sha256): a missing or changed source
    file is a :class:`SourceMismatchError` naming the sample (store row and key). No augmentation is
    possible: a cached latent fixes the crop (and ``latents_flip`` would need flipped targets, which
    this mode does not make; the flipped latents are not used).
    Cost per sample: one latent read (a store chunk is read once per worker and serves the rows of
    its block; 393 KB of float16 at 768x16x16) and one image decode + crop (~5-10 ms of CPU for an
    ImageNet JPEG).

``encode_on_the_fly``
    What the paper and the reference code do: the frozen encoder sits in the training loop and sees a
    fresh augmentation of each image every epoch: bicubic resize of the short side to
    ``augment_resize`` (384 at 256 px; default 1.5 x the store's resolution) and a random R x R crop
    (R = the store's resolution), no flip; the crop is both the encoder's input and the decoder's
    target. The encoder is rebuilt from the store's recorded identity (name, architecture,
    resolution) with ``encoder_weights`` ("hub", a file, or "random"), and weights whose checksum
    differs from the store's are refused (:func:`build_store_encoder`).
    Cost per sample and epoch: the image decode + resize + crop, plus one encoder forward on the
    training device (DINOv2-B at 224 px: ~22 GFLOPs, about a fifth of the decoder-XL's 107-GFLOP
    forward and a few percent of a whole decoder step with LPIPS and the discriminator); no latent
    reads.

Order. Epoch e visits every valid row once in a block-shuffled order (:func:`epoch_order`): the
chunks holding valid rows are permuted, grouped ``block_chunks`` at a time, and rows are shuffled
inside each block, so a worker reads each chunk about once per block instead of once per sample.
Global step k takes positions [kB, (k+1)B) of the endless concatenation of epochs (nothing is
dropped; a batch that crosses an epoch boundary continues with the next epoch), and rank r of W
takes the contiguous slice [kB + r B/W, kB + (r+1) B/W). The position is ``samples_seen`` alone,
so a resume continues exactly, and the global batch does not depend on the world size. Per-sample
randomness (the random crop; the trainer's latent noise) is keyed by the sample's global position.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import uri as uri_lib
from pipeline.store import LatentStore
from schemas import store_v1
from schemas.errors import UserError
from trainer.data import worker_start_method

DATA_MODES = ("cached", "encode_on_the_fly")
STATE_VERSION = 1
_ORDER_TAG = 0x44454344  # mixed into the order's seeds so they differ from other users of `seed`
_CROP_TAG = 0x43524F50
_RECORDS_KEPT = 64  # shard completion records kept per worker (each lists its rows' source references)


class SourceMismatchError(UserError, ValueError):
    """A source image that is missing or differs from the one the store encoded; names the sample."""


class DecoderDataError(UserError, ValueError):
    """A store or option the decoder's data cannot work with (synthetic store, wrong batch split...)."""


@dataclass
class DecoderDataConfig:
    """Where the decoder's training pairs come from and how they are batched."""

    mode: str = "cached"  # cached | encode_on_the_fly (the reference's: frozen encoder in the loop, random crops)
    global_batch: int = 512  # samples per optimizer step over all ranks (divisible by the world size)
    num_workers: int = 4  # DataLoader workers per rank (read, decode, crop); 0: in the training process
    prefetch_factor: int = 2  # batches each worker prepares ahead
    block_chunks: int = 16  # store chunks whose rows are shuffled together (also the chunk cache per worker)
    seed: int = 0  # seeds the epoch orders and the random crops
    encoder_weights: str = "hub"  # encode_on_the_fly: hub | weights file | random (checked against the store's checksum)
    augment_resize: int | None = None  # encode_on_the_fly: short side before the random crop (None: 1.5 x resolution)


def check_data_config(cfg: DecoderDataConfig, prefix: str = "data.") -> list[str]:
    """Problems with the values (each names its key); empty when fine."""
    problems = []
    if cfg.mode not in DATA_MODES:
        problems.append(f"{prefix}mode {cfg.mode!r} is not one of {list(DATA_MODES)}")
    for key in ("global_batch", "block_chunks", "prefetch_factor"):
        if getattr(cfg, key) < 1:
            problems.append(f"{prefix}{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_workers < 0:
        problems.append(f"{prefix}num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.augment_resize is not None and cfg.augment_resize < 1:
        problems.append(f"{prefix}augment_resize must be >= 1, got {cfg.augment_resize}")
    return problems


def store_resolution(store: LatentStore) -> int:
    """Pixel side of the crops the store encoded (its preprocessing); 16 px per token when unrecorded."""
    res = (store.spec.get("preprocessing") or {}).get("resolution")
    return int(res) if res else 16 * store.latent_shape[-1]


# --------------------------------------------------------------------------------------------
# order
# --------------------------------------------------------------------------------------------
def epoch_order(valid: np.ndarray, samples_per_chunk: int, block_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """Rows of epoch ``epoch``, int64 [V] (every valid row once): chunks with valid rows permuted and
    grouped ``block_chunks`` at a time, rows shuffled inside each group. A pure function of its inputs."""
    valid = np.asarray(valid, dtype=bool)
    rows = np.flatnonzero(valid)
    chunk_of = rows // samples_per_chunk
    rng = np.random.default_rng([_ORDER_TAG, int(seed), int(epoch)])
    chunks = rng.permutation(np.unique(chunk_of))
    block_of_chunk = np.empty(int(chunk_of.max(initial=-1)) + 1, dtype=np.int64)
    block_of_chunk[chunks] = np.arange(len(chunks)) // block_chunks
    # (block, random rank) keys are unique: the same order whatever sort numpy picks.
    keys = block_of_chunk[chunk_of] * len(rows) + rng.permutation(len(rows))
    return rows[np.argsort(keys)].astype(np.int64)


class _Orders:
    """Epoch orders on demand (the newest few kept) and positions -> rows."""

    def __init__(self, valid: np.ndarray, samples_per_chunk: int, block_chunks: int, seed: int):
        self.valid, self.samples_per_chunk, self.block_chunks, self.seed = valid, samples_per_chunk, block_chunks, seed
        self.num_valid = int(valid.sum())
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            self._cache[e] = epoch_order(self.valid, self.samples_per_chunk, self.block_chunks, self.seed, e)
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[e]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Store rows at global positions (int64 [n]) of the endless epoch sequence."""
        epochs, offsets = np.divmod(positions, self.num_valid)
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch(int(e))[offsets[sel]]
        return out


# --------------------------------------------------------------------------------------------
# source images
# --------------------------------------------------------------------------------------------
class SourceFetcher:
    """Encoded bytes of store rows, fetched through their recorded source references and checked
    (size, sha256) against them. Picklable; each worker keeps its own small Parquet row-group cache.
    The one reader of store rows' source bytes: fit-decoder's batches, ``reconstruct`` and the
    metrics' ``store_image_set`` all fetch through it."""

    def __init__(self, store: LatentStore, storage_options: dict | None = None, parquet_cache_groups: int = 2):
        source = store.spec["source"]
        self.store_uri, self.kind, self.so = store.uri, source["kind"], storage_options
        if self.kind not in ("imagefolder", "parquet"):
            raise DecoderDataError(
                f"store {store.uri} was not encoded from images (source kind {self.kind!r}): the decoder needs the "
                "source images its latents were made from")
        self.row_groups: dict[str, tuple[int, ...]] = {}
        self.image_column: str | None = None
        if self.kind == "parquet":
            from pipeline.sources import open_source

            # The listing gives the image column the encode job used and each file's row groups.
            listing = open_source(source["uri"], source["split"], kind="parquet", storage_options=storage_options)
            self.row_groups = {f.uri: f.row_group_rows for f in listing.files}
            self.image_column = listing.image_column
        self.cache_groups = parquet_cache_groups
        self._groups: collections.OrderedDict[tuple[str, int], list] = collections.OrderedDict()

    def _where(self, row: int, ref: dict) -> str:
        at = ref["uri"] + (f" row {ref['row']}" if ref.get("row") is not None else "")
        return f"store {self.store_uri}: sample {row} ({ref['key']}): source {at}"

    def fetch(self, rows: list[int], refs: list[dict]) -> list[bytes]:
        """Bytes of each row's source image, in order; SourceMismatchError names the first bad one."""
        blobs = self._read_files(rows, refs) if self.kind == "imagefolder" else self._read_parquet(rows, refs)
        for row, ref, data in zip(rows, refs, blobs):
            if ref.get("size") is not None and len(data) != ref["size"]:
                raise SourceMismatchError(f"{self._where(row, ref)} changed since it was encoded: "
                                          f"{len(data)} bytes, the store recorded {ref['size']}")
            if ref.get("sha256") and uri_lib.sha256_bytes(data) != ref["sha256"]:
                raise SourceMismatchError(f"{self._where(row, ref)} changed since it was encoded: its sha256 "
                                          "differs from the one the store recorded")
        return blobs

    def _read_files(self, rows: list[int], refs: list[dict]) -> list[bytes]:
        fs, _ = uri_lib.get_fs(refs[0]["uri"], self.so)
        paths = [uri_lib.get_fs(r["uri"], self.so)[1] for r in refs]
        # cat_ranges, not cat: cat expands glob characters, and "img[1].jpg" is a valid name.
        fetched = fs.cat_ranges(paths, None, None, on_error="return")
        for row, ref, data in zip(rows, refs, fetched):
            if isinstance(data, FileNotFoundError):
                raise SourceMismatchError(f"{self._where(row, ref)} is missing") from None
            if isinstance(data, BaseException):
                raise SourceMismatchError(f"{self._where(row, ref)} cannot be read: {type(data).__name__}: {data}")
        return list(fetched)

    def _read_parquet(self, rows: list[int], refs: list[dict]) -> list[bytes]:
        places = []  # per row: ((file, row group), row inside the group)
        for row, ref in zip(rows, refs):
            sizes = self.row_groups.get(ref["uri"])
            if sizes is None:
                raise SourceMismatchError(f"{self._where(row, ref)} is missing (not a file of the source any more)")
            starts = np.cumsum((0,) + tuple(sizes))
            group = int(np.searchsorted(starts, ref["row"], side="right")) - 1
            if not 0 <= group < len(sizes):
                raise SourceMismatchError(f"{self._where(row, ref)} is missing (the file has {starts[-1]} rows)")
            places.append(((ref["uri"], group), ref["row"] - starts[group]))
        # Each row group touched is read once per call, in the order the rows first need it: store
        # rows are a shuffle of the source, so consecutive rows seldom share a group.
        by_group: dict[tuple[str, int], list[int]] = {}
        for i, (key, _) in enumerate(places):
            by_group.setdefault(key, []).append(i)
        out: list[bytes] = [b""] * len(refs)
        for (uri, group), positions in by_group.items():
            cells = self._row_group(uri, group, rows[positions[0]], refs[positions[0]])
            for i in positions:
                value = cells[places[i][1]]
                out[i] = b"" if value is None else bytes(value)
        return out

    def _row_group(self, uri: str, group: int, row: int, ref: dict) -> list:
        key = (uri, group)
        if key not in self._groups:
            import pyarrow as pa
            import pyarrow.parquet as pq

            fs, path = uri_lib.get_fs(uri, self.so)
            try:
                with fs.open(path, "rb") as f:
                    table = pq.ParquetFile(f).read_row_group(group, columns=[self.image_column])
            except FileNotFoundError:
                raise SourceMismatchError(f"{self._where(row, ref)} is missing") from None
            column = table.column(0).combine_chunks()
            cells = column.field("bytes") if pa.types.is_struct(column.type) else column
            self._groups[key] = cells.to_pylist()
            while len(self._groups) > self.cache_groups:
                self._groups.popitem(last=False)
        return self._groups[key]


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------
def random_resized_crop(data: bytes, resize: int, crop: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's training augmentation: decode, bicubic resize of the short side to ``resize``
    (the long side ``int(resize * long / short)``, as torchvision's ``Resize(int)``), then a uniform
    random ``crop`` x ``crop`` window (torchvision's ``RandomCrop``). Returns uint8 [3, crop, crop]."""
    from PIL import Image

    from pipeline.preprocess import decode_image

    img = decode_image(data)
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize(size, resample=Image.Resampling.BICUBIC)
    if min(size) < crop:
        raise ValueError(f"augment_resize {resize} is smaller than the crop {crop}")
    top = int(rng.integers(0, size[1] - crop + 1))
    left = int(rng.integers(0, size[0] - crop + 1))
    img = img.crop((left, top, left + crop, top + crop))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


@dataclass
class DecoderBatch:
    """One rank's part of a global batch."""

    rows: torch.Tensor  # int64 [b] store rows
    positions: torch.Tensor  # int64 [b] global positions in the epoch sequence (keys of per-sample randomness)
    pixels: torch.Tensor  # uint8 [b, 3, R, R] targets (ADM crop, or the random crop when encoding on the fly)
    latents: torch.Tensor | None  # float32 [b, C, H, W] unnormalized unflipped latents (cached mode), else None

    def pin_memory(self) -> "DecoderBatch":
        return DecoderBatch(self.rows, self.positions, self.pixels.pin_memory(),
                            None if self.latents is None else self.latents.pin_memory())


class DecoderBatches(Dataset):
    """Map-style dataset whose item ``k`` is this rank's part of global step k (0-based)."""

    def __init__(self, store: LatentStore, cfg: DecoderDataConfig, fetcher: SourceFetcher, *, rank: int,
                 world_size: int, resolution: int):
        self.store, self.cfg, self.fetcher = store, cfg, fetcher
        self.rank, self.world_size, self.resolution = rank, world_size, resolution
        self.local_batch = cfg.global_batch // world_size
        self.orders = _Orders(store.valid(), store.samples_per_chunk, cfg.block_chunks, cfg.seed)
        self.resize = cfg.augment_resize or (3 * resolution) // 2
        self._chunks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._records: collections.OrderedDict[int, dict] = collections.OrderedDict()

    def _source_ref(self, row: int) -> dict:
        """The row's source reference from its shard's completion record; a few records are kept per
        worker (``LatentStore.source_ref`` keeps every record it reads: the whole store's for a long run)."""
        shard = self.store.shard_of(row)
        if shard in self._records:
            self._records.move_to_end(shard)
        else:
            self._records[shard] = uri_lib.read_json(uri_lib.join(self.store.uri, store_v1.record_name(shard)),
                                                     self.store.storage_options)
            while len(self._records) > _RECORDS_KEPT:
                self._records.popitem(last=False)
        rec = self._records[shard]
        return rec["samples"][row - rec["start"]]

    def positions(self, step: int) -> np.ndarray:
        """Global positions of this rank's rows at (0-based) step ``step``, int64 [b]."""
        start = step * self.cfg.global_batch + self.rank * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def __getitem__(self, step: int) -> DecoderBatch:
        positions = self.positions(int(step))
        rows = self.orders.rows(positions)
        refs = [self._source_ref(int(r)) for r in rows]
        blobs = self.fetcher.fetch(rows.tolist(), refs)
        pixels = np.stack([self._pixels(int(r), ref, data, int(p))
                           for r, ref, data, p in zip(rows, refs, blobs, positions)])
        latents = self._latents(rows) if self.cfg.mode == "cached" else None
        return DecoderBatch(torch.from_numpy(rows), torch.from_numpy(positions), torch.from_numpy(pixels),
                            None if latents is None else torch.from_numpy(latents))

    def _pixels(self, row: int, ref: dict, data: bytes, position: int) -> np.ndarray:
        from pipeline.preprocess import ImageDecodeError, preprocess_image_bytes

        try:
            if self.cfg.mode == "cached":
                max_pixels = (self.store.spec.get("preprocessing") or {}).get("max_pixels")
                kw = {"max_pixels": int(max_pixels)} if max_pixels else {}
                return preprocess_image_bytes(data, self.resolution, **kw)
            rng = np.random.default_rng([_CROP_TAG, self.cfg.seed, position])
            return random_resized_crop(data, self.resize, self.resolution, rng)
        except ImageDecodeError as e:
            raise SourceMismatchError(f"{self.fetcher._where(row, ref)} no longer decodes: {e}") from e

    def _latents(self, rows: np.ndarray) -> np.ndarray:
        k = self.store.samples_per_chunk
        out = np.empty((len(rows),) + tuple(self.store.latent_shape), dtype=np.float32)
        for i, row in enumerate(rows.tolist()):
            out[i] = self._chunk(row // k)[row % k]
        return out

    def _chunk(self, chunk: int) -> np.ndarray:
        if chunk in self._chunks:
            self._chunks.move_to_end(chunk)
        else:
            self._chunks[chunk] = self.store.read_chunk(chunk)  # float32 [k, C, H, W], unflipped
            while len(self._chunks) > self.cfg.block_chunks:
                self._chunks.popitem(last=False)
        return self._chunks[chunk]


class _Steps(Sampler):
    """0-based step indices from ``start`` on, forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class DecoderLoader:
    """Endless iterator of this rank's :class:`DecoderBatch` es, resumable from ``samples_seen``."""

    def __init__(self, store: LatentStore, cfg: DecoderDataConfig, *, rank: int = 0, world_size: int = 1,
                 resolution: int | None = None, storage_options: dict | None = None, pin_memory: bool = False):
        problems = check_data_config(cfg)
        if problems:
            raise DecoderDataError("; ".join(problems))
        if cfg.global_batch % world_size:
            raise DecoderDataError(f"data.global_batch {cfg.global_batch} must be divisible by the world size {world_size}")
        self.store, self.cfg, self.pin_memory = store, cfg, pin_memory
        self.resolution = resolution or store_resolution(store)
        self.dataset = DecoderBatches(store, cfg, SourceFetcher(store, storage_options), rank=rank,
                                      world_size=world_size, resolution=self.resolution)
        self.num_valid = self.dataset.orders.num_valid
        if self.num_valid == 0:
            raise DecoderDataError(f"store {store.uri} has no valid samples")
        self.step = 0  # batches handed out (global steps)
        self._iterator = None

    @property
    def samples_seen(self) -> int:
        return self.step * self.cfg.global_batch

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.num_valid

    def state_dict(self) -> dict:
        c = self.cfg
        return {"version": STATE_VERSION, "samples_seen": self.samples_seen, "global_batch": c.global_batch,
                "seed": c.seed, "block_chunks": c.block_chunks, "mode": c.mode, "num_valid": self.num_valid}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped; the order's settings must be the saved ones."""
        for key in ("global_batch", "seed", "block_chunks", "mode"):
            if state.get(key) != getattr(self.cfg, key):
                raise DecoderDataError(
                    f"the checkpoint's data order used data.{key}={state.get(key)!r}, this run data.{key}="
                    f"{getattr(self.cfg, key)!r}: resume with the same value (or start a new run directory)")
        self.close()
        self.step = int(state["samples_seen"]) // self.cfg.global_batch

    def __iter__(self) -> Iterator[DecoderBatch]:
        self.close()
        c = self.cfg
        kw = dict(num_workers=c.num_workers, prefetch_factor=c.prefetch_factor,
                  multiprocessing_context=worker_start_method(c.num_workers)) if c.num_workers > 0 else {}
        loader = DataLoader(self.dataset, batch_size=None, sampler=_Steps(self.step), pin_memory=self.pin_memory,
                            collate_fn=_identity, **kw)
        self._iterator = iter(loader)
        for batch in self._iterator:
            self.step += 1
            yield batch

    def close(self) -> None:
        """Stop the workers (a later iteration starts new ones at the current position)."""
        it, self._iterator = self._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def _identity(batch):
    return batch


# --------------------------------------------------------------------------------------------
# the frozen encoder of encode_on_the_fly
# --------------------------------------------------------------------------------------------
def _arch_depth(arch: str, timm_arch: str, where: str) -> int | None:
    """The block count of a test-shortened encoder recorded as ``<timm arch>[depth=N]``; None for the
    full architecture. Other architectures or overrides are refused."""
    import json
    import re

    m = re.fullmatch(r"(?P<base>[^\[]+)(?:\[(?P<over>[^\]]*)\])?", arch)
    if m is None or m.group("base") != timm_arch:
        raise DecoderDataError(f"{where}: encoder architecture {arch!r} is not {timm_arch!r}; cannot rebuild it")
    if not m.group("over"):
        return None
    overrides = dict(part.split("=", 1) for part in m.group("over").split(","))
    if set(overrides) != {"depth"}:
        raise DecoderDataError(f"{where}: encoder overrides {sorted(overrides)} cannot be rebuilt (only depth)")
    return int(json.loads(overrides["depth"]))


def build_store_encoder(store: LatentStore, weights: str):
    """The frozen encoder that made ``store``'s latents (eval, no grads, CPU), rebuilt from the store's
    recorded identity and ``weights`` ("hub", a weights file, or "random" with the recorded seed).
    Weights whose checksum differs from the store's are refused. Returns (encoder, weights_info)."""
    from pipeline.encoders import ENCODERS, build_encoder

    enc = store.spec.get("encoder")
    if not enc:
        raise DecoderDataError(f"store {store.uri} records no encoder: data.mode=encode_on_the_fly needs one")
    name = enc["name"]
    depth = _arch_depth(enc["arch"], ENCODERS[name].timm_arch, f"store {store.uri}")
    recorded = enc["weights"]
    seed = 0
    if weights == "random":
        ref = str(recorded.get("ref", ""))
        seed = int(ref.split("=", 1)[1]) if ref.startswith("seed=") else 0
    encoder, info = build_encoder(name, store_resolution(store), weights=weights, seed=seed, depth=depth)
    if info["sha256"] != recorded["sha256"]:
        raise DecoderDataError(
            f"encoder weights {weights!r} ({info['source']} {info['ref']}) have sha256 {info['sha256'][:16]}..., "
            f"store {store.uri} was encoded with sha256 {recorded['sha256'][:16]}... ({recorded['source']} "
            f"{recorded['ref']}): pass the weights the store was encoded with (data.encoder_weights)")
    return encoder, info


__all__ = [
    "DATA_MODES", "DecoderBatch", "DecoderBatches", "DecoderDataConfig", "DecoderDataError", "DecoderLoader",
    "SourceFetcher", "SourceMismatchError", "build_store_encoder", "check_data_config", "epoch_order",
    "random_resized_crop", "store_resolution",
]
