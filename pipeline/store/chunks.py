"""Direct reads of whole inner chunks of a sharded latent array (the trainer loader's read path)."""
from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np

from pipeline import uri as U

_EMPTY_CHUNK = 2**64 - 1  # offset and length of a chunk the shard does not hold (all fill value)


def _zstd_content_size(frame) -> int | None:
    """The decompressed size a zstd frame header declares (None: not declared)."""
    b = bytes(frame[:18])
    if len(b) < 6 or b[:4] != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame (bad magic number)")
    desc = b[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0:
        return None
    if len(b) < pos + width:
        raise ValueError("truncated zstd frame header")
    size = int.from_bytes(b[pos:pos + width], "little")
    return size + 256 if width == 2 else size


_BLOSC_HEADER = 16  # c-blosc 1 frame header: version, versionlz, flags, typesize, nbytes, blocksize, cbytes


def _blosc_sizes(frame) -> tuple[int, int]:
    """(decompressed, compressed) bytes a blosc frame header declares."""
    b = bytes(frame[:_BLOSC_HEADER])
    if len(b) < _BLOSC_HEADER:
        raise ValueError("truncated blosc frame header")
    return int.from_bytes(b[4:8], "little"), int.from_bytes(b[12:16], "little")


# Inner codec chains (between the bytes serializer and crc32c) the fast reader decodes.
_DECODED = {(): "none", ("zstd",): "zstd", ("blosc",): "blosc"}
_warned: set[tuple[str, str]] = set()


def warn_slow_path(uri: str, name: str, meta: dict | None, why: str) -> None:
    """Warn once per process and array that ``name`` of store ``uri`` is read through zarr's slower
    path (a few times the CPU per chunk), naming its codecs and ``why``."""
    if (uri, name) in _warned:
        return
    _warned.add((uri, name))
    warnings.warn(f"store {uri}: array {name!r} (codecs {describe_codecs(meta)}) is read through zarr's slower "
                  f"path, not the fast chunk reader: {why}", RuntimeWarning, stacklevel=3)


def describe_codecs(meta: dict | None) -> str:
    """The codec chain of an array's ``zarr.json`` as one line ("sharding_indexed[bytes, blosc(cname=lz4), crc32c]")."""
    def one(c: dict) -> str:
        conf = c.get("configuration") or {}
        if c.get("name") == "sharding_indexed":
            return "sharding_indexed[" + ", ".join(one(i) for i in conf.get("codecs", [])) + "]"
        if c.get("name") == "blosc":
            return f"blosc(cname={conf.get('cname')}, shuffle={conf.get('shuffle')})"
        return str(c.get("name"))

    try:
        return "[" + ", ".join(one(c) for c in meta["codecs"]) + "]"
    except (KeyError, TypeError, AttributeError):
        return "unknown (no codecs in zarr.json)"


class _ShardedChunkReader:
    """Whole inner chunks of one sharded array of a store, read without zarr's per-call machinery.

    Each shard's index (the object's last 16 * chunks_per_shard + 4 bytes) is read once per reader
    and cached, its crc32c checked; a chunk is then one byte-range read, its crc32c checked, and
    decompressed (zstd, blosc) or copied straight into the caller's buffer. Same bytes, same checks
    as zarr's read. Only the layouts this library writes are handled: :meth:`create` returns None for
    any other array metadata (the caller then reads through zarr, and says so:
    :func:`warn_slow_path`). Errors are ValueError/OSError with the detail;
    :meth:`LatentStore.read_chunk_stored` names the shard and object.
    """

    def __init__(self, uri: str, name: str, storage_options: dict, dtype: np.dtype, chunk_shape: tuple,
                 shard_rows: int, codec: str, fill_value):
        self.uri, self.name, self.storage_options = uri, name, storage_options
        self.dtype, self.chunk_shape, self.shard_rows = dtype, tuple(chunk_shape), shard_rows
        self.rows = self.chunk_shape[0]
        self.chunks_per_shard = shard_rows // self.rows
        self.chunk_bytes = math.prod(self.chunk_shape) * dtype.itemsize
        self.codec, self.fill_value = codec, fill_value  # codec: "none", "zstd" or "blosc"
        self._local = U.is_local(uri)
        self._fs = self._root = self._zstd = self._blosc = None
        self._thread = threading.local()  # the last read's bytes, valid until this thread's next read
        self._index: dict[int, np.ndarray | None] = {}
        self.cache = None  # (ChunkCache, store id): chunk bytes kept on local disk (pipeline.store.cache)

    @classmethod
    def create(cls, uri: str, name: str, storage_options: dict, meta: dict) -> "_ShardedChunkReader | None":
        """A reader for the array whose ``zarr.json`` is ``meta``, or None when its layout is not
        exactly: one sharding codec (index at the end, bytes + crc32c), inner chunks of whole rows
        along axis 0, inner codecs bytes (little endian) + optional zstd or blosc + crc32c."""
        try:
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            chunk_shape = tuple(conf["chunk_shape"])
            inner = [c["name"] for c in conf["codecs"]]
            ok = (
                codec["name"] == "sharding_indexed"
                and meta["chunk_grid"]["name"] == "regular"
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and conf.get("index_location", "end") == "end"
                and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
                and conf["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and inner[:1] == ["bytes"] and inner[-1:] == ["crc32c"] and tuple(inner[1:-1]) in _DECODED
                and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and chunk_shape[1:] == shard_shape[1:] == tuple(meta["shape"][1:])
                and shard_shape[0] % chunk_shape[0] == 0
                and meta["data_type"] in ("float16", "float32", "uint16")
                and isinstance(meta["fill_value"], (int, float))
                and not meta.get("storage_transformers")
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not ok:
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        return cls(uri, name, storage_options, dtype, chunk_shape, shard_shape[0], _DECODED[tuple(inner[1:-1])],
                   meta["fill_value"])

    def object_key(self, shard: int) -> str:
        return f"{self.name}/c/{shard}" + "/0" * (len(self.chunk_shape) - 1)

    def _read(self, key: str, start: int, stop: int | None) -> bytes | None:
        """Bytes [start, stop) of an object (start < 0 and stop None: the last -start bytes);
        None when the object does not exist."""
        try:
            if self._local:
                with open(U.join(self.uri, key), "rb", buffering=0) as f:
                    f.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                    size = -start if stop is None else stop - start
                    buffer = getattr(self._thread, "buffer", None)
                    if buffer is None or len(buffer) < size:
                        buffer = self._thread.buffer = bytearray(size)
                    view = memoryview(buffer)[:size]
                    return view[:f.readinto(view)]  # into this thread's buffer: no fresh pages per read
            return self._filesystem().cat_file(self._object_path(key), start=start, end=stop)
        except FileNotFoundError:
            return None

    @property
    def index_bytes(self) -> int:
        """Bytes of a shard's index: (offset, length) uint64 per inner chunk, then its crc32c."""
        return 16 * self.chunks_per_shard + 4

    def _shard_index(self, shard: int) -> np.ndarray | None:
        """uint64 [chunks_per_shard, 2] (offset, length) of every chunk; None: no shard object."""
        if shard not in self._index:
            self._set_index(shard, self._read(self.object_key(shard), -self.index_bytes, None))
        return self._index[shard]

    def _set_index(self, shard: int, raw: bytes | None) -> None:
        """Check and cache a shard's index as read (None: the shard object does not exist)."""
        if raw is not None:
            if len(raw) != self.index_bytes:
                raise ValueError(f"shard index is {len(raw)} bytes, expected {self.index_bytes}")
            _check_crc32c(raw, "shard index")
            raw = np.frombuffer(raw, dtype="<u8", count=2 * self.chunks_per_shard).reshape(-1, 2).copy()
        self._index[shard] = raw

    def locate(self, chunk: int) -> tuple[int, int, int] | None:
        """(shard, offset, length) of inner chunk ``chunk``'s bytes in its shard object, reading the
        shard's index on first use; None for a chunk the shard does not hold (all fill value: zarr
        does not write such chunks)."""
        shard, local = divmod(chunk, self.chunks_per_shard)
        index = self._shard_index(shard)
        offset, length = (_EMPTY_CHUNK, _EMPTY_CHUNK) if index is None else (int(v) for v in index[local])
        if offset == _EMPTY_CHUNK and length == _EMPTY_CHUNK:
            return None
        return shard, offset, length

    def _finish(self, chunk: int, data, where: tuple[int, int, int], out: np.ndarray) -> None:
        """Check a chunk's bytes as read (length, crc32c) and decode them into ``out``."""
        _, offset, length = where
        local = chunk % self.chunks_per_shard
        if data is None or len(data) != length:
            raise ValueError(f"chunk bytes [{offset}, {offset + length}) lie outside the shard object")
        _check_crc32c(data, f"chunk {local} of the shard")
        self.decode(memoryview(data)[:-4], out, f"chunk {local}")

    @property
    def concurrent(self) -> bool:
        """Whether ``pipeline.store.ranges`` can keep this array's range GETs in flight at once: its
        store is on an asynchronous fsspec filesystem (s3fs, gcsfs, adlfs...). Local files: no (a
        read is a copy from the page cache or the disk's queue; the loader's workers overlap them)."""
        if self._local:
            return False
        from fsspec.asyn import AsyncFileSystem

        return isinstance(self._filesystem(), AsyncFileSystem)

    def _filesystem(self):
        if self._fs is None:
            self._fs, self._root = U.get_fs(self.uri, self.storage_options)
        return self._fs

    def _object_path(self, key: str) -> str:
        self._filesystem()
        return f"{self._root.rstrip('/')}/{key}"

    def read(self, chunk: int, out: np.ndarray | None = None) -> np.ndarray:
        """Inner chunk ``chunk`` (rows [chunk * k, (chunk + 1) * k)), whole: [k, ...] of the stored dtype,
        decoded into ``out`` when given (C-contiguous, that shape, the dtype's item size: checked by
        the caller)."""
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype.newbyteorder("="))
        cached = self.cached(chunk)
        if cached is not None:
            self._finish(chunk, cached[1], cached[0], out)
            return out
        where = self.locate(chunk)
        if where is None:
            out[...] = self.fill_value
            return out
        shard, offset, length = where
        data = self._read(self.object_key(shard), offset, offset + length)
        self._finish(chunk, data, where, out)
        self.keep(chunk, data)
        return out

    def cached(self, chunk: int) -> tuple[tuple[int, int, int], bytes] | None:
        """(where, bytes) of ``chunk`` from the local chunk cache (crc32c checked), or None."""
        if self.cache is None:
            return None
        cache, store_id = self.cache
        data = cache.get(store_id, self.name, chunk)
        return None if data is None else ((chunk // self.chunks_per_shard, 0, len(data)), data)

    def keep(self, chunk: int, data) -> None:
        """Put a chunk's bytes, read from the store and checked, into the local chunk cache."""
        if self.cache is not None:
            cache, store_id = self.cache
            cache.put(store_id, self.name, chunk, data)

    def decode_shard(self, data, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """The first ``rows`` rows of a whole shard object held in memory (``data``: its bytes, as
        read for its checksum), decoded chunk by chunk with the same checks as :meth:`read` (index
        and chunk crc32c, sizes); chunks the shard does not hold are the fill value. Runs without
        the GIL for all but the bookkeeping (crc32c, zstd/blosc and the copies release it), so
        threads decode shards in parallel; ``out`` (C-contiguous, the stored dtype, at least
        ``rows`` rounded up to whole chunks) spares the fresh pages of a new array, whose faults
        threads of one process take one at a time. ValueError names the chunk."""
        view = memoryview(data)
        if len(view) < self.index_bytes:
            raise ValueError(f"shard object is {len(view)} bytes, shorter than its index ({self.index_bytes})")
        raw = view[len(view) - self.index_bytes:]
        _check_crc32c(raw, "shard index")
        index = np.frombuffer(raw, dtype="<u8", count=2 * self.chunks_per_shard).reshape(-1, 2)
        count = -(-rows // self.rows)
        if out is None:
            out = np.empty((count * self.rows,) + self.chunk_shape[1:], dtype=self.dtype.newbyteorder("="))
        for j in range(count):
            offset, length = (int(v) for v in index[j])
            piece = out[j * self.rows:(j + 1) * self.rows]
            if offset == _EMPTY_CHUNK and length == _EMPTY_CHUNK:
                piece[...] = self.fill_value
                continue
            if offset + length > len(view) - self.index_bytes:
                raise ValueError(f"chunk {j}: bytes [{offset}, {offset + length}) lie outside the shard object")
            chunk = view[offset:offset + length]
            _check_crc32c(chunk, f"chunk {j} of the shard")
            self.decode(chunk[:-4], piece, f"chunk {j}")
        return out[:rows]

    def decode(self, payload, out: np.ndarray, what: str = "chunk") -> None:
        """Decode one inner chunk's bytes (crc32c already checked and cut off) into ``out`` (the whole
        chunk, C-contiguous), checking the size the codec's header declares first."""
        dest = out.reshape(-1).view(np.uint8)
        if self.codec == "zstd":
            declared = _zstd_content_size(payload)
            if declared != self.chunk_bytes:
                raise ValueError(f"{what} decompresses to {declared} bytes, expected {self.chunk_bytes}")
            if self._zstd is None:
                from numcodecs.zstd import Zstd

                self._zstd = Zstd()
            self._zstd.decode(payload, out=dest)
        elif self.codec == "blosc":
            declared, compressed = _blosc_sizes(payload)
            if declared != self.chunk_bytes or compressed != len(payload):
                raise ValueError(f"{what}: blosc header declares {declared} bytes from {compressed}, expected "
                                 f"{self.chunk_bytes} from {len(payload)}")
            if self._blosc is None:
                import importlib

                import numcodecs.blosc

                # zarr's blosc module, imported by every store read anyway, sets numcodecs' blosc to
                # decode in the calling thread: the loader's parallelism is its workers.
                importlib.import_module("zarr.codecs.blosc")
                self._blosc = numcodecs.blosc.decompress
            self._blosc(payload, dest)
        else:
            if len(payload) != self.chunk_bytes:
                raise ValueError(f"{what} holds {len(payload)} bytes, expected {self.chunk_bytes}")
            dest[:] = np.frombuffer(payload, dtype=np.uint8)
        if not self.dtype.isnative:
            out.byteswap(inplace=True)  # the stored little-endian values on a big-endian machine

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_root": None, "_zstd": None, "_blosc": None, "_index": {},
                "_thread": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _thread=threading.local())


def _check_crc32c(data: bytes, what: str) -> None:
    import google_crc32c

    body = np.frombuffer(data, dtype=np.uint8)
    if google_crc32c.value(body[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{what}: stored and computed crc32c differ (corrupt bytes)")
