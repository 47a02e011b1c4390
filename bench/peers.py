"""The same latents laid out as two peer codebases lay them out, read the way they read them.

- **fast-DiT** (chuanyangjin/fast-DiT, ``train.py`` ``CustomDataset``): one ``.npy`` file per
  sample, ``np.load`` per item behind a shuffled sampler. fast-DiT bakes one random flip into each
  file at extraction time; to do the same flip work as our loader, each sample here has a file per
  orientation (``features/`` and ``features_flip/``) and an item reads one of them by a coin.
  fast-DiT also loads a separate label ``.npy`` per item; here the labels are one array read once
  (one GET less per item, in its favour).
- **LightningDiT** (hustvl/LightningDiT, ``datasets/img_latent_dataset.py`` ``ImgLatentDataset``):
  safetensors files each holding ``latents`` and ``latents_flip`` [n, C, H, W] and ``labels`` [n];
  the index of (file, row) is built once by reading every file's header; every item opens its file
  with ``safe_open``, picks ``latents`` or ``latents_flip`` by a coin and slices one row and one
  label. LightningDiT keeps no open handles between items, so neither does this. ``safe_open``
  needs a local file: on S3 an item is one ranged GET of its row, with each file's header and
  labels read once per process (the closest S3 port, and the cheapest one).

Both store float16 (the dtype of our store; the peers keep the encoder's float32, twice the bytes)
and normalize every item as our loader does: (z - mean) / sqrt(var + eps) per element, float32.
Items are (latent float32 [C, H, W], label int64 []).
"""
from __future__ import annotations

import io
import json
import os
import random
import struct

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.common import ObjectReader, S3Access

NPY_FEATURES = "features"
NPY_FEATURES_FLIP = "features_flip"
NPY_LABELS = "labels.npy"
SAFETENSORS_KEYS = ("latents", "latents_flip", "labels")
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "I32": np.int32}
_HEADER_PROBE = 64 * 1024  # first read of a safetensors header: usually the whole header


def _npy_name(index: int) -> str:
    return f"{index:08d}.npy"


class _Normalize:
    """(z - shift) / scale in float32, the statistics as given (None: identity)."""

    def __init__(self, shift: np.ndarray | None, scale: np.ndarray | None):
        self.shift = None if shift is None else torch.as_tensor(np.asarray(shift, dtype=np.float32))
        self.scale = None if scale is None else torch.as_tensor(np.asarray(scale, dtype=np.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x.sub_(self.shift)
        if self.scale is not None:
            x = x.div_(self.scale)
        return x


# --------------------------------------------------------------------------------------------
# fast-DiT: one .npy file per sample


def write_npy_per_sample(folder: str, latents: np.ndarray, latents_flip: np.ndarray, labels: np.ndarray) -> int:
    """Write ``features/{i:08d}.npy`` and ``features_flip/{i:08d}.npy`` (each [1, C, H, W] as fast-DiT
    saves them, in the arrays' dtype) and ``labels.npy`` (int64 [N]); returns the files written."""
    if latents.shape != latents_flip.shape or len(latents) != len(labels):
        raise ValueError(f"latents {latents.shape}, latents_flip {latents_flip.shape} and labels {labels.shape} differ")
    for sub, arr in ((NPY_FEATURES, latents), (NPY_FEATURES_FLIP, latents_flip)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for i in range(len(arr)):
            np.save(os.path.join(folder, sub, _npy_name(i)), arr[i:i + 1])
    np.save(os.path.join(folder, NPY_LABELS), np.asarray(labels, dtype=np.int64))
    return 2 * len(latents) + 1


class NpyPerSample(Dataset):
    """fast-DiT's access pattern: item i = ``np.load`` of one sample file (one GET on S3).

    root: a local folder or ``s3://bucket/prefix`` written by :func:`write_npy_per_sample`.
    shift, scale: float32 [C, H, W] normalization (None: none). flip_prob: chance of reading the
    flipped latent (a coin per item from Python's ``random``, which DataLoader seeds per worker).
    """

    def __init__(self, root: str, *, shift=None, scale=None, flip_prob: float = 0.5, s3: S3Access | None = None):
        self.reader = ObjectReader(root, s3)
        self.normalize = _Normalize(shift, scale)
        self.flip_prob = float(flip_prob)
        self.labels = np.load(io.BytesIO(self.reader.read(NPY_LABELS)))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        sub = NPY_FEATURES_FLIP if random.random() < self.flip_prob else NPY_FEATURES
        rel = f"{sub}/{_npy_name(index)}"
        if self.reader.is_s3:
            arr = np.load(io.BytesIO(self.reader.read(rel)))
        else:
            arr = np.load(os.path.join(self.reader.root, rel))
        x = self.normalize(torch.from_numpy(arr).squeeze(0).float())
        return x, torch.tensor(int(self.labels[index]), dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# LightningDiT: safetensors files opened per item


def write_safetensors_shards(folder: str, latents: np.ndarray, latents_flip: np.ndarray, labels: np.ndarray,
                             samples_per_file: int) -> list[str]:
    """Write ``latents_shard{k:03d}.safetensors`` files of ``samples_per_file`` rows each (``latents``,
    ``latents_flip`` in the arrays' dtype, ``labels`` int64), as LightningDiT's extraction does;
    returns the file names."""
    from safetensors.numpy import save_file

    if latents.shape != latents_flip.shape or len(latents) != len(labels):
        raise ValueError(f"latents {latents.shape}, latents_flip {latents_flip.shape} and labels {labels.shape} differ")
    if samples_per_file < 1:
        raise ValueError("samples_per_file must be >= 1")
    os.makedirs(folder, exist_ok=True)
    names = []
    for k, a in enumerate(range(0, len(latents), samples_per_file)):
        b = min(a + samples_per_file, len(latents))
        name = f"latents_shard{k:03d}.safetensors"
        tensors = {"latents": np.ascontiguousarray(latents[a:b]),
                   "latents_flip": np.ascontiguousarray(latents_flip[a:b]),
                   "labels": np.asarray(labels[a:b], dtype=np.int64)}
        save_file(tensors, os.path.join(folder, name), metadata={"total_size": str(b - a)})
        names.append(name)
    return names


def read_safetensors_header(reader: ObjectReader, rel: str) -> tuple[int, dict]:
    """(offset of the data section, {tensor: {"dtype", "shape", "data_offsets"}}) of one file."""
    head = reader.read_range(rel, 0, _HEADER_PROBE)
    if len(head) < 8:
        raise ValueError(f"{reader.root}/{rel} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if len(head) < 8 + n:
        head += reader.read_range(rel, len(head), 8 + n)
    try:
        header = json.loads(head[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{reader.root}/{rel}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    missing = [k for k in SAFETENSORS_KEYS if k not in header]
    if missing:
        raise ValueError(f"{reader.root}/{rel} lacks tensors {missing}")
    return 8 + n, header


class SafetensorsPerItem(Dataset):
    """LightningDiT's access pattern: item i opens its file with ``safe_open`` and slices one row of
    ``latents`` or ``latents_flip`` (a coin per item) and one label; on S3 one ranged GET of the row.

    root: a local folder or ``s3://bucket/prefix`` of ``*.safetensors`` files (sorted by name; the
    rows of each file in order make the index, as LightningDiT's map does). shift, scale, flip_prob:
    as in :class:`NpyPerSample`.
    """

    def __init__(self, root: str, *, shift=None, scale=None, flip_prob: float = 0.5, s3: S3Access | None = None):
        self.reader = ObjectReader(root, s3)
        self.normalize = _Normalize(shift, scale)
        self.flip_prob = float(flip_prob)
        self.files = [rel for rel, _ in self.reader.list() if rel.endswith(".safetensors")]
        if not self.files:
            raise ValueError(f"no .safetensors files in {self.reader.root}")
        # Headers are read once here to build the index (LightningDiT opens every file for it too).
        self.headers = [read_safetensors_header(self.reader, rel) for rel in self.files]
        counts = [h["labels"]["shape"][0] for _, h in self.headers]
        self.file_of = np.repeat(np.arange(len(self.files)), counts)
        self.row_of = np.concatenate([np.arange(c) for c in counts])
        self._labels: dict[int, np.ndarray] = {}  # S3 only: per file, read once per process

    def __len__(self) -> int:
        return len(self.file_of)

    def __getitem__(self, index: int):
        f, row = int(self.file_of[index]), int(self.row_of[index])
        key = "latents_flip" if random.random() < self.flip_prob else "latents"
        if self.reader.is_s3:
            x, y = self._s3_item(f, row, key)
        else:
            from safetensors import safe_open

            with safe_open(os.path.join(self.reader.root, self.files[f]), framework="pt", device="cpu") as st:
                x = st.get_slice(key)[row:row + 1]
                y = st.get_slice("labels")[row:row + 1]
            x, y = x.squeeze(0).float(), y.squeeze(0)
        return self.normalize(x), y

    def _tensor(self, f: int, name: str) -> tuple[int, np.dtype, list[int]]:
        """(absolute byte offset, dtype, shape) of tensor ``name`` in file f."""
        data_start, header = self.headers[f]
        info = header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.reader.root}/{self.files[f]}: tensor {name} has unsupported dtype {info['dtype']}")
        return data_start + info["data_offsets"][0], np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), info["shape"]

    def _s3_item(self, f: int, row: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        start, dtype, shape = self._tensor(f, key)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        data = self.reader.read_range(self.files[f], start + row * row_bytes, start + (row + 1) * row_bytes)
        x = np.frombuffer(data, dtype=dtype).reshape(shape[1:]).astype(np.float32)
        if f not in self._labels:
            lstart, ldtype, lshape = self._tensor(f, "labels")
            raw = self.reader.read_range(self.files[f], lstart, lstart + int(np.prod(lshape)) * ldtype.itemsize)
            self._labels[f] = np.frombuffer(raw, dtype=ldtype).astype(np.int64)
        return torch.from_numpy(x), torch.tensor(int(self._labels[f][row]), dtype=torch.int64)
