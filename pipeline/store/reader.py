"""Reading stores: :class:`LatentStore` opens a complete store at any fsspec URI and reads whole
chunks, labels, the valid mask, statistics and per-sample source references."""
from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from pipeline import uri as U
from pipeline.store import ranges
from pipeline.store.chunks import _ShardedChunkReader, warn_slow_path
from pipeline.store.checks import layout_problems
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
        self._ahead: dict[tuple[int, str], Any] = {}  # (chunk, array) -> read started by prefetch_chunks
        self._cache = None  # pipeline.store.cache.ChunkCache: see use_chunk_cache

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, *, require_complete: bool = True,
             check_arrays: bool = True) -> "LatentStore":
        """Open a store; without ``COMPLETE`` raise :class:`IncompleteStoreError`.

        The spec must be valid (:class:`~schemas.store_v1.StoreSpecError` names the key) and, unless
        ``check_arrays`` is False, agree with itself and with the arrays' Zarr metadata (shapes,
        dtypes, shard and chunk shapes, codecs, the store id: ``checks.layout_problems``, metadata
        reads only); a store whose spec does not is refused with a :class:`StoreError` naming the
        first disagreement (``stores verify`` lists them all).
        """
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
            if require_complete:
                raise StoreError(f"store {uri} has a {S.COMPLETE_MARKER} marker but no {S.SPEC_FILE}") from None
            raise IncompleteStoreError(f"store {uri} has no {S.SPEC_FILE}") from None
        if require_complete:
            try:
                done = json.loads(U.read_bytes(marker, so))
            except ValueError as e:
                raise StoreError(f"{marker} is not valid JSON ({e})") from None
            if not isinstance(done, dict) or done.get("spec_sha256") != U.sha256_bytes(spec_bytes):
                raise StoreError(f"{uri}/{S.SPEC_FILE} does not match the checksum in {S.COMPLETE_MARKER}")
        try:
            spec = S.validate_spec(json.loads(spec_bytes))
        except ValueError as e:  # StoreSpecError, or JSON that does not parse
            raise S.StoreSpecError(f"{uri}/{S.SPEC_FILE}: {e}") from None
        if require_complete and done.get("store_id") != spec["store_id"]:
            raise StoreError(f"{marker} names store {done.get('store_id')}, {S.SPEC_FILE} store {spec['store_id']}")
        if check_arrays:
            problems = layout_problems(uri, spec, so)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"store {uri}: {S.SPEC_FILE} does not match the store: {problems[0]}{more}; "
                                 "`rae-pipeline stores verify` lists every problem")
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
        self._check_read(array, out)
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
            raise self._chunk_error(chunk, array, e) from e

    def read_chunks_stored(self, reads: list[tuple[int, str, np.ndarray]],
                           ahead: list[tuple[int, str]] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Several whole inner chunks as stored, each ``(chunk, array, out)`` as in
        :meth:`read_chunk_stored` (``out`` required); yields ``(position in reads, the chunk's rows:
        a view of its out)`` as each chunk is decoded. ``ahead``: chunks ``(chunk, array)`` to
        :meth:`prefetch_chunks` once these reads are under way.

        From an object store with an asynchronous client (s3fs, gcsfs...) every read's range GET is
        in flight at once (after its shard's index, read once) and chunks are decoded in the order
        their bytes arrive, so a batch of reads costs about one request latency, not one each
        (``pipeline.store.ranges``); reads started by :meth:`prefetch_chunks` are taken over. Local
        files and arrays read through zarr: one after another, in order. Each ``out`` is written
        just before its position is yielded. Errors as :meth:`read_chunk_stored` (a StoreError
        naming the shard).
        """
        for _, array, out in reads:
            if out is None:
                raise ValueError("read_chunks_stored: every read needs its out buffer")
            self._check_read(array, out)
        readers = {array: self._chunk_reader(array) for array in {array for _, array, _ in reads}}
        if not all(r is not None and r.concurrent for r in readers.values()):
            for pos, (chunk, array, out) in enumerate(reads):
                yield pos, self.read_chunk_stored(chunk, array, out)
            return
        requests = [(readers[array], chunk, out) for chunk, array, out in reads]
        started = [self._ahead.pop((chunk, array), None) for chunk, array, _ in reads]
        try:
            for pos in ranges.read_concurrently(requests, started,
                                                then=(lambda: self.prefetch_chunks(ahead)) if ahead else None):
                chunk, _, out = reads[pos]
                start, stop = self.chunk_bounds(chunk)
                yield pos, out[:stop - start]
        except ranges.ChunkReadError as e:
            chunk, array, _ = reads[e.position]
            raise self._chunk_error(chunk, array, e.cause) from e.cause

    def prefetch_chunks(self, reads: list[tuple[int, str]]) -> None:
        """Start the range GETs of chunks ``(chunk, array)`` about to be read, so that a later
        :meth:`read_chunks_stored` of them finds their bytes in flight or arrived (object stores
        with an asynchronous client; elsewhere nothing happens). Replaces the previous prefetch:
        reads started then and not taken over since are cancelled, so this holds the compressed
        bytes of at most the chunks named in the last call."""
        ahead = {}
        for chunk, array in reads:
            key = (chunk, array)
            if key in self._ahead:
                ahead[key] = self._ahead.pop(key)
                continue
            reader = self._chunk_reader(array) if array != S.LATENTS_FLIP or self.has_flips else None
            if reader is not None and reader.concurrent:
                ahead[key] = ranges.start(reader, chunk)
        for stale in self._ahead.values():
            stale.cancel()
        self._ahead = ahead

    def _check_read(self, array: str, out: np.ndarray | None) -> None:
        if array == S.LATENTS_FLIP and not self.has_flips:
            raise StoreError(f"store {self.uri} keeps no flipped latents")
        if out is not None:
            shape = (self.samples_per_chunk,) + tuple(self.latent_shape)
            itemsize = np.dtype(S.STORAGE_DTYPE[self.logical_dtype]).itemsize
            if tuple(out.shape) != shape or out.dtype.itemsize != itemsize or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous {list(shape)} array of {itemsize}-byte items, "
                                 f"got {list(out.shape)} {out.dtype}")

    def _chunk_error(self, chunk: int, array: str, e: BaseException) -> StoreError:
        start, stop = self.chunk_bounds(chunk)
        shard = self.shard_of(start)
        return StoreError(f"store {self.uri}: reading {array}[{start}:{stop}] failed in shard(s) [{shard}] "
                          f"(object {array}/c/{shard}/0/0/0): {type(e).__name__}: {e}")

    def _chunk_reader(self, array: str) -> "_ShardedChunkReader | None":
        if array not in self._chunk_readers:
            try:
                meta = U.read_json(U.join(self.uri, array, "zarr.json"), self.storage_options)
            except FileNotFoundError:
                raise StoreError(f"{self.uri}: array {array!r} is missing") from None
            reader = _ShardedChunkReader.create(self.uri, array, self.storage_options, meta)
            if reader is None:
                warn_slow_path(self.uri, array, meta, "a layout or codec it does not decode")
            elif (reader.rows, reader.shard_rows) != (self.samples_per_chunk, self.samples_per_shard):
                warn_slow_path(self.uri, array, meta, f"chunks of {reader.rows} rows in shards of {reader.shard_rows}, "
                               f"the spec says {self.samples_per_chunk} in {self.samples_per_shard}")
                reader = None
            if reader is not None and self._cache is not None:
                reader.cache = (self._cache, self.store_id)
            self._chunk_readers[array] = reader
        return self._chunk_readers[array]

    def use_chunk_cache(self, cache) -> None:
        """Keep the chunk bytes this object reads in ``cache`` (a :class:`~pipeline.store.cache.ChunkCache`
        on local disk) and read them from there when present (checked like any read: a corrupt entry
        is deleted and read from the store). Whole-chunk reads only (the loader's path); None: stop."""
        self._cache = cache
        for reader in self._chunk_readers.values():
            if reader is not None:
                reader.cache = None if cache is None else (cache, self.store_id)

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
        d["_ahead"] = {}
        return d
