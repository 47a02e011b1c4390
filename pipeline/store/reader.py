"""Reading stores: :class:`LatentStore` opens a complete store at any fsspec URI and reads whole
chunks, labels, the valid mask, statistics and per-sample source references."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline import uri as U
from pipeline.store.chunks import _ShardedChunkReader
from pipeline.store.layout import IncompleteStoreError, StoreError, from_stored
from schemas import store_v1 as S


class _RawArrays:
    """Lazily opened zarr arrays of a store (no completeness check)."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = U.normalize(uri)
        self.storage_options = storage_options or {}
        self._zstore = None
        self._arrays: dict[str, Any] = {}

    def zarr_store(self):
        if self._zstore is None:
            from zarr.storage import FsspecStore, LocalStore

            if U.is_local(self.uri):
                self._zstore = LocalStore(U.normalize(self.uri), read_only=True)
            else:
                # zarr runs its own event loop: it needs an fsspec filesystem created asynchronous.
                self._zstore = FsspecStore.from_url(self.uri, storage_options=dict(self.storage_options), read_only=True)
        return self._zstore

    def array(self, name: str):
        if name not in self._arrays:
            import zarr

            try:
                self._arrays[name] = zarr.open_array(self.zarr_store(), path=name, mode="r")
            except FileNotFoundError as e:
                raise StoreError(f"{self.uri}: array {name!r} is missing") from e
        return self._arrays[name]

    def read(self, name: str, sel) -> np.ndarray:
        return np.asarray(self.array(name)[sel])

    def __getstate__(self):
        # Each process (DataLoader worker, Ray task) opens its own clients.
        return {"uri": self.uri, "storage_options": self.storage_options, "_zstore": None, "_arrays": {}}


class LatentStore:
    """A complete latent store, read through zarr over fsspec.

    Picklable: a copy sent to another process (a DataLoader worker) opens its own store client.
    """

    def __init__(self, uri: str, spec: dict, storage_options: dict | None = None):
        self.uri = U.normalize(uri)
        self.spec = spec
        self.storage_options = storage_options or {}
        self._raw = _RawArrays(self.uri, self.storage_options)
        self._small: dict[str, np.ndarray] = {}
        self._records: dict[int, dict] = {}
        self._chunk_readers: dict[str, _ShardedChunkReader | None] = {}

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, *, require_complete: bool = True) -> "LatentStore":
        """Open a store; without ``COMPLETE`` (or its spec) raise :class:`IncompleteStoreError`."""
        uri = U.normalize(uri)
        so = storage_options or {}
        marker = U.join(uri, S.COMPLETE_MARKER)
        if require_complete and not U.exists(marker, so):
            if not U.exists(U.join(uri, "zarr.json"), so):
                raise StoreError(f"{uri} is not a latent store (no zarr.json)")
            raise IncompleteStoreError(
                f"store {uri} is incomplete (no {S.COMPLETE_MARKER} marker): an encode job is still running or "
                "died; rerun the same encode command to finish it"
            )
        try:
            spec_bytes = U.read_bytes(U.join(uri, S.SPEC_FILE), so)
        except FileNotFoundError:
            raise IncompleteStoreError(f"store {uri} has no {S.SPEC_FILE}") from None
        if require_complete:
            done = json.loads(U.read_bytes(marker, so))
            if done.get("spec_sha256") != U.sha256_bytes(spec_bytes):
                raise StoreError(f"{uri}/{S.SPEC_FILE} does not match the checksum in {S.COMPLETE_MARKER}")
        spec = S.validate_spec(json.loads(spec_bytes))
        return cls(uri, spec, so)

    # -- shape facts, all from the spec
    @property
    def store_id(self) -> str:
        return self.spec["store_id"]

    @property
    def num_samples(self) -> int:
        return self.spec["layout"]["num_samples"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return S.latent_shape(self.spec)

    @property
    def logical_dtype(self) -> str:
        return self.spec["latent"]["logical_dtype"]

    @property
    def samples_per_chunk(self) -> int:
        return self.spec["layout"]["samples_per_chunk"]

    @property
    def samples_per_shard(self) -> int:
        return self.spec["layout"]["samples_per_shard"]

    @property
    def num_shards(self) -> int:
        return self.spec["layout"]["num_shards"]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.samples_per_chunk)

    @property
    def has_flips(self) -> bool:
        return bool(self.spec["layout"]["flips"])

    @property
    def num_classes(self) -> int:
        return self.spec["classes"]["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.spec["classes"]["names"]

    @property
    def encoder(self) -> dict | None:
        return self.spec["encoder"]

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        k = self.samples_per_chunk
        return chunk * k, min((chunk + 1) * k, self.num_samples)

    def shard_of(self, index: int) -> int:
        return index // self.samples_per_shard

    def shard_name(self, shard: int) -> str:
        return f"{self.uri}/{S.LATENTS}/c/{shard}/0/0/0 (shard {shard})"

    # -- data
    def read_rows(self, start: int, stop: int, array: str = S.LATENTS) -> np.ndarray:
        """float32 [stop - start, C, H, W] of ``latents`` or ``latents_flip``."""
        if array == S.LATENTS_FLIP and not self.has_flips:
            raise StoreError(f"store {self.uri} keeps no flipped latents")
        try:
            raw = self._raw.read(array, slice(start, stop))
        except StoreError:
            raise
        except Exception as e:  # zarr raises codec errors (crc32c, zstd) of several types
            shards = sorted({self.shard_of(start), self.shard_of(max(start, stop - 1))})
            raise StoreError(
                f"store {self.uri}: reading {array}[{start}:{stop}] failed in shard(s) {shards} "
                f"(object {array}/c/{shards[0]}/0/0/0): {type(e).__name__}: {e}"
            ) from e
        return from_stored(raw, self.logical_dtype)

    def read_chunk(self, chunk: int, array: str = S.LATENTS) -> np.ndarray:
        """One whole inner chunk (the read unit): float32 [k, C, H, W]."""
        return from_stored(self.read_chunk_stored(chunk, array), self.logical_dtype)

    def read_chunk_stored(self, chunk: int, array: str = S.LATENTS, out: np.ndarray | None = None) -> np.ndarray:
        """One whole inner chunk as stored, no conversion: [k, C, H, W] of the storage dtype (float16,
        float32, or uint16 bfloat16 bit patterns; k < samples_per_chunk for a short last chunk).

        out: optional C-contiguous [samples_per_chunk, C, H, W] buffer of the storage dtype's item size
        to decode into (the whole inner chunk, also for a short last one); the result is then a view
        of it. Reads the shard index once per shard and this object, then one byte range per chunk,
        crc32c-checked (see ``_ShardedChunkReader``); arrays of another layout go through zarr.
        """
        if array == S.LATENTS_FLIP and not self.has_flips:
            raise StoreError(f"store {self.uri} keeps no flipped latents")
        if out is not None:
            shape = (self.samples_per_chunk,) + tuple(self.latent_shape)
            itemsize = np.dtype(S.STORAGE_DTYPE[self.logical_dtype]).itemsize
            if tuple(out.shape) != shape or out.dtype.itemsize != itemsize or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous {list(shape)} array of {itemsize}-byte items, "
                                 f"got {list(out.shape)} {out.dtype}")
        start, stop = self.chunk_bounds(chunk)
        try:
            reader = self._chunk_reader(array)
            if reader is None:
                raw = self._raw.read(array, slice(start, stop))
                if out is None:
                    return raw
                dest = out.reshape(-1)[:raw.size].reshape(raw.shape)
                dest.view(raw.dtype)[...] = raw
                return dest
            return reader.read(chunk, out)[:stop - start]
        except StoreError:
            raise
        except Exception as e:  # crc32c, zstd, I/O: several types
            shard = self.shard_of(start)
            raise StoreError(
                f"store {self.uri}: reading {array}[{start}:{stop}] failed in shard(s) [{shard}] "
                f"(object {array}/c/{shard}/0/0/0): {type(e).__name__}: {e}"
            ) from e

    def _chunk_reader(self, array: str) -> "_ShardedChunkReader | None":
        if array not in self._chunk_readers:
            try:
                meta = U.read_json(U.join(self.uri, array, "zarr.json"), self.storage_options)
            except FileNotFoundError:
                raise StoreError(f"{self.uri}: array {array!r} is missing") from None
            reader = _ShardedChunkReader.create(self.uri, array, self.storage_options, meta)
            if reader is not None and (reader.rows, reader.shard_rows) != (self.samples_per_chunk,
                                                                            self.samples_per_shard):
                reader = None
            self._chunk_readers[array] = reader
        return self._chunk_readers[array]

    def _small_array(self, name: str) -> np.ndarray:
        if name not in self._small:
            self._small[name] = self._raw.read(name, slice(None))
        return self._small[name]

    def labels(self) -> np.ndarray:
        return self._small_array(S.LABELS).astype(np.int64)

    def valid(self) -> np.ndarray:
        return self._small_array(S.VALID).astype(bool)

    def sample_ids(self) -> np.ndarray:
        return self._small_array(S.SAMPLE_IDS)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, var) float64 [C, H, W], population variance over both orientations."""
        return self._raw.read(S.STATS_MEAN, slice(None)), self._raw.read(S.STATS_VAR, slice(None))

    def record(self, shard: int) -> dict:
        if shard not in self._records:
            self._records[shard] = U.read_json(U.join(self.uri, S.record_name(shard)), self.storage_options)
        return self._records[shard]

    def source_ref(self, index: int) -> dict:
        """The source reference of row ``index``: key, URI (or Parquet file + row), size, sha256, label."""
        rec = self.record(self.shard_of(index))
        return rec["samples"][index - rec["start"]]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_raw"] = _RawArrays(self.uri, self.storage_options)
        d["_chunk_readers"] = {}
        return d
