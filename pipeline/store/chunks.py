"""Direct reads of whole inner chunks of a sharded latent array (the trainer loader's read path)."""
from __future__ import annotations

import math
import os
import threading

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


class _ShardedChunkReader:
    """Whole inner chunks of one sharded array of a store, read without zarr's per-call machinery.

    Each shard's index (the object's last 16 * chunks_per_shard + 4 bytes) is read once per reader
    and cached, its crc32c checked; a chunk is then one byte-range read, its crc32c checked, and
    decompressed (zstd) or copied straight into the caller's buffer. Same bytes, same checks as
    zarr's read. Only the layout this library writes is handled: :meth:`create` returns None for any
    other array metadata (the caller then reads through zarr). Errors are ValueError/OSError with
    the detail; :meth:`LatentStore.read_chunk_stored` names the shard and object.
    """

    def __init__(self, uri: str, name: str, storage_options: dict, dtype: np.dtype, chunk_shape: tuple,
                 shard_rows: int, zstd: bool, fill_value):
        self.uri, self.name, self.storage_options = uri, name, storage_options
        self.dtype, self.chunk_shape, self.shard_rows = dtype, tuple(chunk_shape), shard_rows
        self.rows = self.chunk_shape[0]
        self.chunks_per_shard = shard_rows // self.rows
        self.chunk_bytes = math.prod(self.chunk_shape) * dtype.itemsize
        self.zstd, self.fill_value = zstd, fill_value
        self._local = U.is_local(uri)
        self._fs = self._root = self._zstd = None
        self._thread = threading.local()  # the last read's bytes, valid until this thread's next read
        self._index: dict[int, np.ndarray | None] = {}

    @classmethod
    def create(cls, uri: str, name: str, storage_options: dict, meta: dict) -> "_ShardedChunkReader | None":
        """A reader for the array whose ``zarr.json`` is ``meta``, or None when its layout is not
        exactly: one sharding codec (index at the end, bytes + crc32c), inner chunks of whole rows
        along axis 0, inner codecs bytes (little endian) + optional zstd + crc32c."""
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
                and inner in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"])
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
        return cls(uri, name, storage_options, dtype, chunk_shape, shard_shape[0], "zstd" in inner,
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
            if self._fs is None:
                self._fs, self._root = U.get_fs(self.uri, self.storage_options)
            return self._fs.cat_file(f"{self._root.rstrip('/')}/{key}", start=start, end=stop)
        except FileNotFoundError:
            return None

    def _shard_index(self, shard: int) -> np.ndarray | None:
        """uint64 [chunks_per_shard, 2] (offset, length) of every chunk; None: no shard object."""
        if shard not in self._index:
            size = 16 * self.chunks_per_shard + 4
            raw = self._read(self.object_key(shard), -size, None)
            if raw is not None:
                if len(raw) != size:
                    raise ValueError(f"shard index is {len(raw)} bytes, expected {size}")
                _check_crc32c(raw, "shard index")
                raw = np.frombuffer(raw, dtype="<u8", count=2 * self.chunks_per_shard).reshape(-1, 2).copy()
            self._index[shard] = raw
        return self._index[shard]

    def read(self, chunk: int, out: np.ndarray | None = None) -> np.ndarray:
        """Inner chunk ``chunk`` (rows [chunk * k, (chunk + 1) * k)), whole: [k, ...] of the stored dtype,
        decoded into ``out`` when given (C-contiguous, that shape, the dtype's item size: checked by
        the caller)."""
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype.newbyteorder("="))
        shard, local = divmod(chunk, self.chunks_per_shard)
        index = self._shard_index(shard)
        offset, length = (_EMPTY_CHUNK, _EMPTY_CHUNK) if index is None else (int(v) for v in index[local])
        if offset == _EMPTY_CHUNK and length == _EMPTY_CHUNK:
            out[...] = self.fill_value  # a chunk of fill values only is not written (zarr's rule)
            return out
        data = self._read(self.object_key(shard), offset, offset + length)
        if data is None or len(data) != length:
            raise ValueError(f"chunk bytes [{offset}, {offset + length}) lie outside the shard object")
        _check_crc32c(data, f"chunk {local} of the shard")
        payload = memoryview(data)[:-4]
        dest = out.reshape(-1).view(np.uint8)
        if self.zstd:
            declared = _zstd_content_size(payload)
            if declared != self.chunk_bytes:
                raise ValueError(f"chunk {local} decompresses to {declared} bytes, expected {self.chunk_bytes}")
            if self._zstd is None:
                from numcodecs.zstd import Zstd

                self._zstd = Zstd()
            self._zstd.decode(payload, out=dest)
        else:
            if len(payload) != self.chunk_bytes:
                raise ValueError(f"chunk {local} holds {len(payload)} bytes, expected {self.chunk_bytes}")
            dest[:] = np.frombuffer(payload, dtype=np.uint8)
        if not self.dtype.isnative:
            out.byteswap(inplace=True)  # the stored little-endian values on a big-endian machine
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_root": None, "_zstd": None, "_index": {}, "_thread": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _thread=threading.local())


def _check_crc32c(data: bytes, what: str) -> None:
    import google_crc32c

    body = np.frombuffer(data, dtype=np.uint8)
    if google_crc32c.value(body[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{what}: stored and computed crc32c differ (corrupt bytes)")
