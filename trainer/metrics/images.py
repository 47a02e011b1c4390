"""Image sets the metrics read: ADM ``.npz`` files, image folders and the source images of latent stores.

Images are uint8 [N, H, W, 3] (RGB, 0..255), as the ADM evaluation suite's ``.npz`` files hold them
in ``arr_0``. Folders and stores are decoded and ADM center-cropped (``pipeline.preprocess``) and
read in chunks (:class:`ImageSet`), so a 50k-image set never sits in memory at once.
"""
from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from pipeline import uri as U
from trainer.metrics.errors import EvaluationError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def check_images(images: Any, where: str) -> np.ndarray:
    """``images`` as a uint8 [N, H, W, 3] numpy array (memory maps stay memory maps); torch
    tensors are moved to the CPU. Raises EvaluationError naming ``where``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise EvaluationError(f"{where}: expected a uint8 array [N, H, W, 3], got {type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EvaluationError(
            f"{where}: expected uint8 [N, H, W, 3] images (the ADM suite's arr_0), got {images.dtype} {list(images.shape)}"
        )
    if len(images) == 0:
        raise EvaluationError(f"{where}: no images")
    return images


def _npz_member_memmap(path: str, name: str) -> np.ndarray | None:
    """A read-only memory map of ``name`` inside an uncompressed local ``.npz`` (what np.savez
    writes), so 50k x 256 x 256 x 3 samples are not read into memory at once; None when the member
    is compressed or has a layout a memory map cannot express."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject or math.prod(shape) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def open_npz(uri: str) -> Mapping[str, np.ndarray]:
    """The arrays of an ``.npz`` (local path or fsspec URI), without pickles. Local uncompressed
    members are memory-mapped; others are read on access."""
    location = U.normalize(uri)
    try:
        if U.is_local(location):
            npz = np.load(location, allow_pickle=False)
        else:
            npz = np.load(io.BytesIO(U.read_bytes(location)), allow_pickle=False)
    except FileNotFoundError:
        raise EvaluationError(f"file not found: {uri}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"{uri}: not a readable .npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{uri}: a single .npy array, not an .npz file")
    return _NpzArrays(location, npz)


def _npz_member_dtype(npz, key: str) -> np.dtype | None:
    """The dtype in the ``.npy`` header of the member ``key`` (header only: no data read, nothing
    unpickled); None for a header version without a public reader (numpy's own check then applies)."""
    name = key + ".npy" if key + ".npy" in npz.zip.namelist() else key
    with npz.zip.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)[2]
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)[2]
    return None


class _NpzArrays(Mapping):
    """Arrays of an ``.npz`` by name. A member holding Python objects (dtype object: only a pickle
    can rebuild it, and unpickling can run code) is refused with an EvaluationError, as is an
    unreadable one; neither is ever unpickled (``allow_pickle=False``)."""

    def __init__(self, location: str, npz):
        self.location, self.npz = location, npz

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.npz.files:
            raise KeyError(key)
        where = f"{self.location}: array {key!r}"
        try:
            dtype = _npz_member_dtype(self.npz, key)
            if dtype is not None and dtype.hasobject:
                raise EvaluationError(
                    f"{where} holds Python objects (dtype object), refused: reading it would unpickle "
                    "(which can run code). Save plain numeric arrays, e.g. uint8 [N, H, W, 3] images in arr_0"
                )
            if U.is_local(self.location):
                mapped = _npz_member_memmap(self.location, key + ".npy")
                if mapped is not None:
                    return mapped
            return self.npz[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, EvaluationError):
                raise
            raise EvaluationError(f"{where} is unreadable ({type(e).__name__}: {e})") from e

    def __iter__(self):
        return iter(self.npz.files)

    def __len__(self) -> int:
        return len(self.npz.files)


def read_npz_images(uri: str, key: str = "arr_0") -> np.ndarray:
    """uint8 [N, H, W, 3] images of an ADM-format ``.npz`` (memory-mapped when possible)."""
    arrays = open_npz(uri)
    if key not in arrays:
        raise EvaluationError(f"{uri}: no '{key}' array (the ADM suite's images); arrays: {sorted(arrays)}")
    return check_images(arrays[key], f"{uri}:{key}")


def _choose(total: int, num: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted indices: all of range(total), or a seeded random subset of ``num`` of them (the
    first N of a listing sorted by class would cover only a few classes)."""
    if num is None or num == total:
        return np.arange(total)
    if num < 1 or num > total:
        raise EvaluationError(f"--num {num}: {what} has {total} image(s)")
    return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))


def _decode_all(blobs: list[tuple[str, bytes]], resolution: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """Encoded images -> uint8 [n, R, R, 3] through the ADM center crop (pipeline.preprocess)."""
    from pipeline.preprocess import ImageDecodeError, preprocess_image_bytes

    def one(item: tuple[str, bytes]) -> np.ndarray:
        name, data = item
        try:
            return preprocess_image_bytes(data, resolution).transpose(1, 2, 0)
        except ImageDecodeError as e:
            raise EvaluationError(f"{name}: cannot decode image ({e})") from e

    return np.stack(list(pool.map(one, blobs)))


@dataclass
class ImageSet:
    """Images to evaluate or summarise, read in chunks: ``count`` images, uint8 [n, H, W, 3]
    chunks from ``chunks()``, and ``description`` (JSON: where they came from)."""

    count: int
    chunks: Callable[[], Iterator[np.ndarray]]
    description: dict


def npz_image_set(uri: str, *, num: int | None = None, seed: int = 0, chunk: int = 1024) -> ImageSet:
    images = read_npz_images(uri)
    index = _choose(len(images), num, seed, uri)

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(index), chunk):
            yield np.asarray(images[index[start : start + chunk]])

    desc = {"kind": "npz", "uri": U.normalize(uri), "num": int(len(index)), "seed": seed if num else None,
            "image_size": list(images.shape[1:3])}
    return ImageSet(int(len(index)), chunks, desc)


def folder_image_set(
    uri: str, *, resolution: int = 256, num: int | None = None, seed: int = 0, chunk: int = 256, threads: int | None = None
) -> ImageSet:
    """Every image file under ``uri`` (recursive, sorted, hidden files skipped; extensions as
    pipeline.sources), ADM center-cropped to ``resolution`` (a no-op on images of that size)."""
    fs, root = U.get_fs(uri)
    if not fs.isdir(root):
        raise EvaluationError(f"not a folder: {uri}")
    root = root.rstrip("/")
    paths = []
    for path in sorted(fs.find(root)):
        rel = path[len(root) + 1 :]
        if path.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in rel.split("/")):
            paths.append(path)
    if not paths:
        raise EvaluationError(f"no image files under {uri}")
    chosen = [paths[i] for i in _choose(len(paths), num, seed, uri)]

    def chunks() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(chosen), chunk):
                part = chosen[start : start + chunk]
                blobs = fs.cat_ranges(part, None, None, on_error="return")
                for path, data in zip(part, blobs):
                    if isinstance(data, BaseException):
                        raise EvaluationError(f"cannot read {path}: {data}")
                yield _decode_all(list(zip(part, blobs)), resolution, pool)

    desc = {"kind": "folder", "uri": U.normalize(uri), "num": len(chosen), "seed": seed if num else None,
            "resolution": resolution, "crop": "adm_center_crop"}
    return ImageSet(len(chosen), chunks, desc)


def store_image_set(
    uri: str, *, resolution: int | None = None, num: int | None = None, seed: int = 0, chunk: int = 256,
    threads: int | None = None,
) -> ImageSet:
    """The source images of a latent store's valid rows, read through the per-row source
    references the store recorded (``trainer.decoder_data.SourceFetcher``: ImageFolder: the file;
    Parquet: file + row, each row group read once per chunk), checked against their recorded size
    and sha256, and ADM center-cropped to ``resolution`` (default: the store's own)."""
    from pipeline.store import LatentStore
    from trainer.decoder_data import SourceFetcher, SourceMismatchError

    store = LatentStore.open(uri)
    source = store.spec["source"]
    if source["kind"] not in ("imagefolder", "parquet"):
        raise EvaluationError(f"store {store.uri} was not encoded from images (source kind {source['kind']!r})")
    if resolution is None:
        resolution = int((store.spec.get("preprocessing") or {}).get("resolution") or 256)
    rows = np.flatnonzero(store.valid())
    if len(rows) == 0:
        raise EvaluationError(f"store {store.uri} has no valid rows")
    chosen = rows[_choose(len(rows), num, seed, f"store {store.uri} (valid rows)")]
    fetcher = SourceFetcher(store)

    def chunks() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(chosen), chunk):
                part = [int(i) for i in chosen[start : start + chunk]]
                refs = [store.source_ref(i) for i in part]
                try:
                    blobs = fetcher.fetch(part, refs)
                except SourceMismatchError as e:  # a missing or changed source image, named
                    raise EvaluationError(str(e)) from e
                except (OSError, ValueError) as e:
                    raise EvaluationError(f"store {store.uri}: reading its source images failed: {e}") from e
                named = [(ref["uri"] + (f" row {ref['row']}" if ref.get("row") is not None else ""), data)
                         for ref, data in zip(refs, blobs)]
                yield _decode_all(named, resolution, pool)

    desc = {"kind": "store", "uri": store.uri, "store_id": store.store_id, "source": source["uri"],
            "split": source["split"], "num": int(len(chosen)), "seed": seed if num else None,
            "resolution": resolution, "crop": "adm_center_crop"}
    return ImageSet(int(len(chosen)), chunks, desc)


__all__ = [
    "IMAGE_EXTENSIONS", "ImageSet", "check_images", "folder_image_set", "npz_image_set", "open_npz", "read_npz_images",
    "store_image_set",
]
