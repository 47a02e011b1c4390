"""The per-shard steps of the encode job (:mod:`pipeline.encode`), as plain functions: Ray runs them
(they travel to the workers by reference to this module), tests may call them directly.

    read    :func:`read_shard`: fetch a shard's image bytes (one grouped read, per item only when it
            fails), sha256 them, decode and ADM-crop each one; a file that fails becomes a hole with
            its reason.
    encode  :func:`encode_pixels`: uint8 images -> float32 latents in fixed micro-batches, image and
            horizontal flip; :func:`rows_with_holes` puts them in the storage dtype, zeros for holes.
    write   :func:`write_shard_row`: one shard through :meth:`StoreWriter.write_shard`.
"""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from typing import Iterator

import numpy as np

from pipeline import uri as U
from pipeline.preprocess import ImageDecodeError, preprocess_image_bytes
from pipeline.sources import Source, SourceChangedError, SourceItem
from pipeline.store import StoreError, StoreWriter, from_stored, to_stored

# Attempts per read before a sample becomes a hole (transient object-store errors).
READ_ATTEMPTS = 3


def _read_with_retries(fn, *args):
    """fn(*args), retried on errors that may be transient; permanent ones are raised at once."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return fn(*args)
        except (SourceChangedError, FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def _read_error_reason(e: BaseException) -> str:
    # Short and deterministic (no paths, addresses or server messages): it goes into the store.
    if isinstance(e, SourceChangedError):
        return "read error: file changed since it was listed"
    if isinstance(e, FileNotFoundError):
        return "read error: file not found"
    return f"read error: {type(e).__name__}"


def read_shard_images(items: list[SourceItem], source: Source) -> list[tuple[bytes | None, str | None]]:
    """(bytes, None) or (None, reason) per item: one grouped read, per item only when it fails."""
    try:
        return [(data, None) for data in _read_with_retries(source.read_group, items)]
    except (OSError, ValueError):
        pass  # find out which items fail, one at a time
    out: list[tuple[bytes | None, str | None]] = []
    for it in items:
        try:
            out.append((_read_with_retries(source.read_bytes, it), None))
        except (OSError, ValueError) as e:
            out.append((None, _read_error_reason(e)))
    return out


def read_shard(desc: dict, *, source: Source, resolution: int, max_pixels: int) -> dict:
    """Read and preprocess one shard's images.

    Returns ``{"shard", "pixels": uint8 [n, 3, R, R] (zeros for holes), "ok": bool [n],
    "meta": JSON}``; meta holds, per row, the label, the stable id, the source reference
    ``{index, id, key, uri, row, size, sha256, label}`` and, for each hole, a failure
    ``{index, id, key, reason}``.
    """
    items = [SourceItem(*fields_) for fields_ in json.loads(desc["items"])]
    start = int(desc["start"])
    n = len(items)
    pixels = np.zeros((n, 3, resolution, resolution), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    samples, failures = [], []
    for i, (it, (data, reason)) in enumerate(zip(items, read_shard_images(items, source))):
        row = start + i
        if data is not None:
            try:
                pixels[i] = preprocess_image_bytes(data, resolution, max_pixels=max_pixels)
                ok[i] = True
            except ImageDecodeError as e:
                reason = e.reason
        samples.append(
            {
                "index": row,
                "id": it.index,
                "key": it.key,
                "uri": it.uri,
                "row": it.row,
                "size": len(data) if data is not None else it.size,
                "sha256": U.sha256_bytes(data) if data is not None else None,
                "label": it.label,
            }
        )
        if not ok[i]:
            failures.append({"index": row, "id": it.index, "key": it.key, "reason": reason})
    meta = {
        "labels": [it.label for it in items],
        "ids": [it.index for it in items],
        "samples": samples,
        "failures": failures,
    }
    return {"shard": int(desc["shard"]), "pixels": pixels, "ok": ok, "meta": json.dumps(meta)}


@contextlib.contextmanager
def _true_float32(device) -> Iterator[None]:
    """On CUDA, compute in real float32 (no TF32 in matmuls or the patch-embedding conv), restoring
    the caller's settings after: latents are computed once and kept, so they get full precision."""
    import torch

    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def encode_pixels(encoder, pixels, batch_size: int, flips: bool, device=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode uint8 images [n, 3, R, R] in micro-batches of ``batch_size`` (the last may be smaller).

    Returns float32 latents [n, C, g, g] and, when ``flips``, those of the horizontally flipped
    images (each flip is its own forward, with the same micro-batch partition); (None, None) when
    n == 0. Results depend on the images and ``batch_size`` only, never on what else an actor has
    seen. float32 throughout, on CPU and GPU.
    """
    import torch

    from pipeline.preprocess import to_unit_float

    device = device or torch.device("cpu")
    if len(pixels) == 0:
        return None, None
    outs: list[list[np.ndarray]] = [[], []]
    with torch.inference_mode(), _true_float32(device):
        for a in range(0, len(pixels), batch_size):
            x = to_unit_float(np.ascontiguousarray(pixels[a : a + batch_size])).to(device)
            outs[0].append(encoder(x).float().cpu().numpy())
            if flips:
                outs[1].append(encoder(torch.flip(x, dims=[3])).float().cpu().numpy())
    return np.concatenate(outs[0]), (np.concatenate(outs[1]) if flips else None)


def rows_with_holes(x: np.ndarray | None, ok: np.ndarray, encoder, logical_dtype: str) -> np.ndarray:
    """[n, C, g, g] in the storage dtype (lossless for the writer), zeros for holes: half the
    bytes through the object store for float16/bfloat16 stores."""
    c, g = encoder.spec.hidden_size, encoder.grid_size
    stored = to_stored(np.zeros((1, c, g, g), np.float32), logical_dtype)
    full = np.zeros((len(ok), c, g, g), dtype=stored.dtype)
    if x is not None:
        full[ok] = to_stored(x, logical_dtype)
    return full


WRITE_FAILED = "writing shard"  # how a failed shard write starts its message (Ray Data retries those)


def this_node() -> dict | None:
    """The Ray node this process runs on, ``{"node_id", "node_ip", "hostname"}`` (the node id tells
    apart nodes that share a host); None outside Ray (nothing imported or initialized it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname()}


def write_shard_row(row: dict, *, writer: StoreWriter) -> dict:
    """Write one encoded shard through the store writer; returns its counts for the driver. The
    shard's record names the Ray node that wrote it (``written_by``)."""
    meta = json.loads(row["meta"])
    dtype = writer.plan.layout.dtype
    ok = np.asarray(row["ok"], dtype=bool)
    flip = from_stored(row["latents_flip"], dtype) if writer.plan.layout.flips else None
    shard = int(row["shard"])
    node = this_node()
    try:
        record = writer.write_shard(
            shard,
            latents=from_stored(row["latents"], dtype),
            latents_flip=flip,
            labels=np.asarray(meta["labels"], dtype=np.int64),
            valid=ok,
            sample_ids=np.asarray(meta["ids"], dtype=np.int64),
            samples=meta["samples"],
            failures=meta["failures"],
            written_by=node,
        )
    except StoreError:
        raise
    except Exception as e:  # storage clients raise many types (OSError, botocore, aiohttp...)
        raise StoreError(f"{WRITE_FAILED} {shard} of {writer.uri} failed: {type(e).__name__}: {e}") from e
    # The wall time the record landed: Ray Data hands results to the driver in batches, so the
    # driver's arrival times understate the first shard and overstate the steady-state rate.
    return {"shard": shard, "images": len(ok), "num_valid": record["num_valid"],
            "num_failed": record["num_failed"], "written_at": time.time(), "node": node["node_id"] if node else ""}


__all__ = [
    "READ_ATTEMPTS",
    "WRITE_FAILED",
    "encode_pixels",
    "read_shard",
    "read_shard_images",
    "rows_with_holes",
    "this_node",
    "write_shard_row",
]
