"""Range GETs of whole inner chunks in flight at once, on the event loop of the store's asynchronous
fsspec filesystem (s3fs, gcsfs, adlfs...): what makes the loader's throughput independent of an
object store's request latency (20-60 ms per GET on S3 and GCS).

A chunk read is one coroutine: the shard's index (one GET per shard and reader, shared by every
chunk that waits for it), then the chunk's byte range. :func:`start` launches it and returns a
future at once; :func:`read_concurrently` decodes a list of reads into their buffers in the order
their bytes arrive. Same bytes and checks as ``_ShardedChunkReader.read`` (crc32c of the index and
of every chunk, the codec's declared size).
"""
from __future__ import annotations

import asyncio
import weakref
from concurrent.futures import Future, as_completed
from typing import Callable, Iterator

import numpy as np

from pipeline.store.chunks import _ShardedChunkReader

# Index GETs under way, per reader and shard; touched only on the event loop's thread.
_index_loads: "weakref.WeakKeyDictionary[_ShardedChunkReader, dict[int, asyncio.Future]]" = weakref.WeakKeyDictionary()


class ChunkReadError(Exception):
    """Read ``position`` of :func:`read_concurrently` failed with ``cause``."""

    def __init__(self, position: int, cause: BaseException):
        super().__init__(f"read {position}: {type(cause).__name__}: {cause}")
        self.position, self.cause = position, cause


async def _get(reader: _ShardedChunkReader, key: str, start: int, stop: int | None) -> bytes | None:
    """Bytes [start, stop) of an object (start < 0, stop None: its last -start bytes); None when the
    object does not exist."""
    try:
        return await reader._filesystem()._cat_file(reader._object_path(key), start=start, end=stop)
    except FileNotFoundError:
        return None


async def _ensure_index(reader: _ShardedChunkReader, shard: int) -> None:
    if shard in reader._index:
        return
    loads = _index_loads.setdefault(reader, {})
    load = loads.get(shard)
    if load is None:
        load = loads[shard] = asyncio.ensure_future(_get(reader, reader.object_key(shard), -reader.index_bytes, None))
        load.add_done_callback(lambda _, s=shard: loads.pop(s, None))
    raw = await asyncio.shield(load)  # a cancelled waiter leaves the GET to the others
    if shard not in reader._index:
        reader._set_index(shard, raw)


async def _fetch(reader: _ShardedChunkReader, chunk: int) -> tuple[tuple[int, int, int] | None, bytes | None, bool]:
    """(where, bytes, False) of one chunk as read; (None, None, False) for a chunk the shard does not hold."""
    await _ensure_index(reader, chunk // reader.chunks_per_shard)
    where = reader.locate(chunk)  # the index is cached: no I/O
    if where is None:
        return None, None, False
    shard, offset, length = where
    return where, await _get(reader, reader.object_key(shard), offset, offset + length), False


def start(reader: _ShardedChunkReader, chunk: int) -> Future:
    """Start reading ``chunk`` (a reader whose ``concurrent`` is True): a future of its
    (location, bytes, from the local chunk cache), for :func:`read_concurrently`; cancelling it
    cancels the GETs. A chunk in the reader's local cache is read at once, no GET."""
    cached = reader.cached(chunk)
    if cached is not None:
        done: Future = Future()
        done.set_result(cached + (True,))
        return done
    return asyncio.run_coroutine_threadsafe(_fetch(reader, chunk), reader._filesystem().loop)


def read_concurrently(requests: list[tuple[_ShardedChunkReader, int, np.ndarray]],
                      started: list[Future | None] | None = None,
                      then: Callable[[], None] | None = None) -> Iterator[int]:
    """Whole inner chunks ``(reader, chunk, out)`` with all their GETs in flight at once (those in
    ``started``, from :func:`start`, already are; ``then`` is called once all are under way).
    Yields the position of each request once its
    chunk is checked and decoded into its ``out``, in the order the bytes arrive; each ``out`` is
    written just before its position is yielded, so requests may share a scratch buffer when the
    caller is done with it before asking for the next.

    A failed request raises :class:`ChunkReadError` with its position, and the reads still in
    flight are cancelled (also when the caller stops early). The requests' count is the
    concurrency (the caller sizes it), within the client's connection pool (botocore's
    ``max_pool_connections``: 10 by default).
    """
    started = started or [None] * len(requests)
    futures: dict[Future, int] = {}
    try:
        for pos, ((reader, chunk, _), f) in enumerate(zip(requests, started)):
            futures[f if f is not None else start(reader, chunk)] = pos
        if then is not None:
            then()
        for f in as_completed(futures):
            pos = futures[f]
            reader, chunk, out = requests[pos]
            try:
                where, data, cached = f.result()
                if where is None:
                    out[...] = reader.fill_value  # zarr does not write a chunk of fill values only
                else:
                    reader._finish(chunk, data, where, out)
                    if not cached:
                        reader.keep(chunk, data)
            except Exception as e:  # I/O (s3fs raises several types), crc32c, codec
                raise ChunkReadError(pos, e) from e
            yield pos
    finally:
        for f in futures:
            f.cancel()  # no-op for a finished read
