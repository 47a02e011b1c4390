"""Store layout: the facts fixed before a store is written.

Constants, the store's errors, the stored-dtype codec (:func:`to_stored` / :func:`from_stored`),
:class:`StoreLayout` (how latents lie at rest), :class:`StorePlan` (everything that determines a
store's content and id) and the Zarr definitions of every array of the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline import uri as U
from schemas import store_v1 as S
from schemas.errors import UserError

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_SAMPLES_PER_SHARD = 256


class StoreError(UserError, RuntimeError):
    """A store that cannot be written or read as asked; the message names the store and key."""


class IncompleteStoreError(StoreError):
    """The store has no COMPLETE marker (still being written, or the job died): not readable as data."""


# --------------------------------------------------------------------------------------------
# dtypes


def to_stored(x: np.ndarray, logical_dtype: str) -> np.ndarray:
    """float32 latents -> the storage dtype (bfloat16 as uint16 bit patterns, round to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if logical_dtype == "float32":
        return x
    if logical_dtype == "float16":
        return x.astype(np.float16)
    if logical_dtype == "bfloat16":
        bits = x.view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    raise ValueError(f"unknown latent dtype {logical_dtype!r}; expected one of {S.LOGICAL_DTYPES}")


def from_stored(x: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Stored latents -> float32."""
    if logical_dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# the plan: everything known before encoding


# The latents' codec, chosen by `make bench` item `codecs` (docs/store-format.md, "Codecs"): blosc
# zstd with byte shuffle at level 1 in 1 MiB blocks keeps fewer bytes than zstd-3 at less decode and
# about the same encode cost.
DEFAULT_COMPRESSOR = "blosc-zstd"
# Blosc level and block size (bytes; 0: blosc's choice per level) when a layout names none.
DEFAULT_BLOSC = {"blosc-zstd": (1, 1 << 20), "blosc-lz4": (5, 0)}


@dataclass(frozen=True)
class StoreLayout:
    """How latents are laid out at rest (part of the store id: :meth:`id_dict`).

    compressor: the latent arrays' codec, one of ``schemas.store_v1.COMPRESSORS``. zstd_level: the
    level of ``zstd`` and, whatever the compressor, of the small 1-D arrays. blosc_level (0-9) and
    blosc_blocksize (bytes, 0: blosc's choice): ``blosc-*`` only (None otherwise; :meth:`resolved`
    fills in :data:`DEFAULT_BLOSC`).
    """

    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    compressor: Literal["blosc-zstd", "blosc-lz4", "zstd", "none"] = DEFAULT_COMPRESSOR
    zstd_level: int = 3
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    samples_per_chunk: int | None = None  # None: about DEFAULT_CHUNK_BYTES per chunk
    flips: bool = True
    blosc_level: int | None = None
    blosc_blocksize: int | None = None

    @property
    def is_blosc(self) -> bool:
        return self.compressor in S.BLOSC_CNAME

    def id_dict(self) -> dict:
        """The layout as it enters the store id: every field, except the blosc ones while they are
        None (a store of another codec), so that stores written before blosc keep their ids."""
        d = dataclasses.asdict(self)
        for key in ("blosc_level", "blosc_blocksize"):
            if d[key] is None:
                del d[key]
        return d

    def compressor_spec(self) -> dict:
        """The spec's ``layout.compressor``: name and zstd level; for blosc also clevel, shuffle and
        block size."""
        out = {"name": self.compressor, "level": self.zstd_level}
        if self.is_blosc:
            out.update(clevel=self.blosc_level, shuffle=S.BLOSC_SHUFFLE, blocksize=self.blosc_blocksize)
        return out

    def resolved(self, latent_shape: tuple[int, int, int]) -> "StoreLayout":
        """Fill in ``samples_per_chunk`` (and a blosc compressor's level and block size) and check the
        combination."""
        if self.dtype not in S.LOGICAL_DTYPES:
            raise ValueError(f"layout.dtype {self.dtype!r} is not one of {S.LOGICAL_DTYPES}")
        if self.compressor not in S.COMPRESSORS:
            raise ValueError(f"layout.compressor {self.compressor!r} is not one of {S.COMPRESSORS}")
        blosc_level, blosc_blocksize = self.blosc_level, self.blosc_blocksize
        if self.is_blosc:
            default_level, default_blocksize = DEFAULT_BLOSC[self.compressor]
            blosc_level = default_level if blosc_level is None else blosc_level
            blosc_blocksize = default_blocksize if blosc_blocksize is None else blosc_blocksize
            if not 0 <= blosc_level <= 9:
                raise ValueError(f"layout.blosc_level must be in [0, 9], got {blosc_level}")
            if blosc_blocksize < 0:
                raise ValueError(f"layout.blosc_blocksize must be >= 0 (0: blosc's choice), got {blosc_blocksize}")
        elif (blosc_level, blosc_blocksize) != (None, None):
            raise ValueError(f"layout.blosc_level and layout.blosc_blocksize apply to the blosc compressors "
                             f"only, not to {self.compressor!r}")
        if self.samples_per_shard < 1:
            raise ValueError("layout.samples_per_shard must be >= 1")
        k = self.samples_per_chunk
        if k is None:
            per_sample = math.prod(latent_shape) * np.dtype(S.STORAGE_DTYPE[self.dtype]).itemsize
            target = max(1, DEFAULT_CHUNK_BYTES // per_sample)
            k = max(d for d in range(1, self.samples_per_shard + 1) if self.samples_per_shard % d == 0 and d <= target)
        if k < 1 or self.samples_per_shard % k:
            raise ValueError(
                f"layout.samples_per_chunk ({k}) must divide layout.samples_per_shard ({self.samples_per_shard})"
            )
        return dataclasses.replace(self, samples_per_chunk=k, blosc_level=blosc_level,
                                   blosc_blocksize=blosc_blocksize)


@dataclass(frozen=True)
class StorePlan:
    """Everything that determines a store's content, known before any latent is computed.

    ``encoder``, ``preprocessing``, ``source`` and ``classes`` follow the spec's sections of the
    same names. The store id is a hash of :meth:`id_inputs`.
    """

    kind: Literal["encoded", "synthetic"]
    num_samples: int
    latent_shape: tuple[int, int, int]
    layout: StoreLayout
    source: dict
    classes: dict
    encoder: dict | None = None
    preprocessing: dict | None = None
    content_hash: str | None = None  # synthetic stores: hash of the input arrays

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(int(d) for d in self.latent_shape))
        object.__setattr__(self, "layout", self.layout.resolved(self.latent_shape))
        if self.num_samples < 1:
            raise ValueError("a store needs at least one sample")

    def id_inputs(self) -> dict:
        return {
            "format": S.FORMAT,
            "version": S.VERSION,
            "kind": self.kind,
            "encoder": self.encoder,
            "preprocessing": self.preprocessing,
            "source": {k: self.source[k] for k in ("kind", "split", "fingerprint", "num_items", "order")},
            "classes": self.classes,
            "latent_shape": list(self.latent_shape),
            "layout": self.layout.id_dict(),
            "num_samples": self.num_samples,
            "content_hash": self.content_hash,
        }

    @property
    def store_id(self) -> str:
        return hashlib.sha256(U.canonical_json(self.id_inputs())).hexdigest()[:20]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.layout.samples_per_shard)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        s = self.layout.samples_per_shard
        return shard * s, min((shard + 1) * s, self.num_samples)

    def default_name(self) -> str:
        """Folder name of the store under an output root: readable, and unique by id."""
        if self.kind == "synthetic":
            return f"synthetic_{self.store_id}"
        enc = self.encoder["name"] if self.encoder else "none"
        res = (self.preprocessing or {}).get("resolution", "x")
        return f"{enc}_{self.source['split']}_{res}px_{self.store_id}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StorePlan":
        d = dict(d)
        d["layout"] = StoreLayout(**d["layout"])
        d["latent_shape"] = tuple(d["latent_shape"])
        return cls(**d)


def _array_definitions(plan: StorePlan) -> dict[str, dict]:
    """Zarr array arguments for every array of the store (identical for metadata and shard writes)."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    lay = plan.layout
    n, (c, h, w) = plan.num_samples, plan.latent_shape
    s, k = lay.samples_per_shard, lay.samples_per_chunk
    # crc32c on every inner chunk as well as on each shard's index: a flipped bit is an error on read.
    compressors: list = []
    if lay.compressor == "zstd":
        compressors = [ZstdCodec(level=lay.zstd_level, checksum=False)]
    elif lay.is_blosc:
        # typesize and shuffle given, not left to zarr to fill in: the metadata states them.
        compressors = [BloscCodec(cname=S.BLOSC_CNAME[lay.compressor], clevel=lay.blosc_level,
                                  shuffle=S.BLOSC_SHUFFLE, blocksize=lay.blosc_blocksize,
                                  typesize=np.dtype(S.STORAGE_DTYPE[lay.dtype]).itemsize)]
    latent = dict(
        shape=(n, c, h, w),
        dtype=S.STORAGE_DTYPE[lay.dtype],
        chunks=(k, c, h, w),
        shards=(s, c, h, w),
        compressors=compressors + [Crc32cCodec()],
        fill_value=0,
    )
    small = dict(chunks=(s,), compressors=[ZstdCodec(level=lay.zstd_level, checksum=False), Crc32cCodec()])
    defs = {S.LATENTS: latent}
    if lay.flips:
        defs[S.LATENTS_FLIP] = dict(latent)
    defs[S.LABELS] = dict(shape=(n,), dtype="int32", fill_value=-1, **small)
    defs[S.VALID] = dict(shape=(n,), dtype="uint8", fill_value=0, **small)
    defs[S.SAMPLE_IDS] = dict(shape=(n,), dtype="int64", fill_value=-1, **small)
    stat_chunk = dict(dtype="float64", fill_value=0.0, compressors=[Crc32cCodec()])
    defs[S.PARTIAL_MEAN] = dict(shape=(plan.num_shards, c, h, w), chunks=(1, c, h, w), **stat_chunk)
    defs[S.PARTIAL_M2] = dict(shape=(plan.num_shards, c, h, w), chunks=(1, c, h, w), **stat_chunk)
    defs[S.STATS_MEAN] = dict(shape=(c, h, w), chunks=(c, h, w), **stat_chunk)
    defs[S.STATS_VAR] = dict(shape=(c, h, w), chunks=(c, h, w), **stat_chunk)
    return defs
