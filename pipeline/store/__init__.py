"""The latent store library: Zarr v3 writer and reader for store spec v1 (``schemas/store_v1.py``).

Writing: a :class:`StorePlan` holds everything known before encoding (it determines the store id);
:class:`StoreWriter` creates the metadata, writes one shard at a time (each object atomically, its
completion record after it), and :meth:`StoreWriter.finalize` merges the statistics and writes
the spec and then the ``COMPLETE`` marker. :func:`write_array_store` writes a whole store from
in-memory arrays (source "synthetic"), which the trainer's tests use.

Reading: :class:`LatentStore` opens a complete store at any fsspec URI and reads whole chunks,
labels, the valid mask, statistics and per-sample source references; :func:`verify_store`
re-checks every object, count and statistic.

Modules, bottom to top: ``layout`` (constants, errors, the stored-dtype codec, plan and array
definitions), ``chunks`` (direct whole-chunk reads), ``checks`` (the spec against itself and the
arrays' metadata), ``reader`` (:class:`LatentStore`), ``writer`` (:class:`StoreWriter`, statistics,
:func:`write_array_store`), ``admin`` (which prefix is a store, status, listing, removal,
verification).
"""
from __future__ import annotations

from pipeline.store.admin import (
    StoreIdentity,
    StoreStatus,
    VerifyReport,
    identify_store,
    list_stores,
    remove_store,
    store_status,
    verify_store,
)
from pipeline.store.cache import ChunkCache
from pipeline.store.layout import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SAMPLES_PER_SHARD,
    IncompleteStoreError,
    StoreError,
    StoreLayout,
    StorePlan,
    from_stored,
    to_stored,
)
from pipeline.store.reader import LatentStore
from pipeline.store.writer import StoreWriter, merge_partial_stats, shard_partial_stats, write_array_store

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_SAMPLES_PER_SHARD",
    "ChunkCache",
    "IncompleteStoreError",
    "LatentStore",
    "StoreError",
    "StoreIdentity",
    "StoreLayout",
    "StorePlan",
    "StoreStatus",
    "StoreWriter",
    "VerifyReport",
    "from_stored",
    "identify_store",
    "list_stores",
    "merge_partial_stats",
    "remove_store",
    "shard_partial_stats",
    "store_status",
    "to_stored",
    "verify_store",
    "write_array_store",
]
