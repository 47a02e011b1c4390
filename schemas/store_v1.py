"""Latent store spec, version 1: the contract between the encode stage (writer) and every stage
that reads latents (train-dit, fit-decoder, sample, evaluate).

A store is a Zarr v3 group at any fsspec URI (local path, ``file://``, ``s3://``). Objects under
its prefix::

    zarr.json                      group metadata; attributes {"rae_store": {"format", "version", "store_id"}}
    latents/                       [N, C, H, W] latents, storage dtype (see below), sharded
    latents_flip/                  [N, C, H, W] latents of the horizontally flipped image (when layout.flips)
    labels/                        [N] int32 class index (0..num_classes-1); -1 for a hole
    valid/                         [N] uint8, 1 = a latent was stored, 0 = hole (failed sample)
    sample_ids/                    [N] int64 stable id: the sample's index in the canonical sorted source
                                   listing (synthetic stores: the row of the input arrays)
    partial_stats/mean, /m2        [num_shards, C, H, W] float64 per-shard mean and sum of squared
                                   deviations over the shard's valid stored values (both orientations)
    records/shard-000000.json      one completion record per shard, written after the shard's objects
    stats/mean, stats/var          [C, H, W] float64: exact per-element mean and population variance
                                   over all valid stored values of both orientations
    spec.json                      this spec, written after every record and the statistics
    COMPLETE                       completion marker, written last: {"store_id", "spec_sha256"}

Rules every writer keeps and every reader may rely on:

- **Rows.** Row p of every array describes the same sample. Rows follow a seeded permutation of the
  source at the granularity it reads efficiently (files for ImageFolder, row groups for Parquet), so
  contiguous chunks mix classes. A sample that failed (corrupt file, decode error...) stays a hole:
  ``valid[p] == 0``, label -1, latents zero, and it is listed in ``failures`` with its reason. Shard
  boundaries never move.
- **Shards.** Shard s holds rows ``[s * S, min((s + 1) * S, N))`` of every array, S =
  ``layout.samples_per_shard``. The latent arrays use Zarr's sharding codec with shard shape
  ``[S, C, H, W]`` and inner chunk ``[k, C, H, W]`` (k = ``layout.samples_per_chunk``: a read unit
  of about 1-8 MB); the index of each shard carries crc32c. The 1-D arrays use one plain chunk of S
  rows per shard. One writer task produces one shard of every array, whole, and writes each object
  atomically, so two writers never share an object.
- **Completion records.** ``records/shard-%06d.json`` lists the shard's objects with the sha256 of
  their bytes, a content hash over them, its counts, its failures and the source reference of every
  row (URI, or Parquet file + row; the file's size; sha256 of the image bytes; label). A shard
  without a record is not written, whatever objects exist. A record written by a Ray task also
  names the node that wrote it: ``written_by`` = ``{"node_id", "node_ip", "hostname"}`` (optional;
  stores written before it, and stores written outside Ray, have none).
- **Dtypes.** Latents are stored as float16 (default), float32, or bfloat16 bit patterns in uint16
  (``latent.storage_dtype == "uint16"``, ``latent.logical_dtype == "bfloat16"``; decode by shifting
  the 16 bits into the high half of a float32).
- **Codecs.** The latent arrays' inner chunks are compressed by ``layout.compressor.name``: one of
  :data:`COMPRESSORS`. ``blosc-lz4`` / ``blosc-zstd`` are Zarr v3's ``blosc`` codec (cname lz4 /
  zstd, byte shuffle with typesize = the storage dtype's item size; the spec then also states
  ``compressor.clevel``, ``.shuffle`` and ``.blocksize``); ``zstd`` is Zarr's ``zstd`` codec at
  ``compressor.level``; ``none`` stores the bytes as they are. ``compressor.level`` is also the
  zstd level of the small 1-D arrays, whatever the latents' codec. Specs without ``clevel`` (every
  store written before blosc existed) are zstd or none stores and stay valid.
- **Completeness.** ``spec.json`` is written after all records and the statistics, and ``COMPLETE``
  after it. A store without ``COMPLETE`` is never read as complete. Nothing time- or host-dependent
  goes in the store but the records' ``written_by`` (provenance, outside every object hash and the
  spec), so the same inputs on the same software give byte-identical stores once that field is set
  aside: every object but the records byte for byte, and the records without ``written_by``.
- **Identity.** ``store_id`` is the sha256 (first 20 hex digits) of the canonical JSON of
  ``id_inputs``: everything known before encoding that determines the content (encoder and weights
  checksum, preprocessing, layout options, split, dataset fingerprint from the source listing).

The JSON Schema beside this file (``store_v1.schema.json``) validates ``spec.json``.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from schemas.errors import UserError

FORMAT = "rae-latent-store"
VERSION = 1

SPEC_FILE = "spec.json"
COMPLETE_MARKER = "COMPLETE"
RECORDS_DIR = "records"
RECORD_WRITTEN_BY = "written_by"  # the record's provenance key: which node wrote the shard (not content)
LATENTS = "latents"
LATENTS_FLIP = "latents_flip"
LABELS = "labels"
VALID = "valid"
SAMPLE_IDS = "sample_ids"
PARTIAL_MEAN = "partial_stats/mean"
PARTIAL_M2 = "partial_stats/m2"
STATS_MEAN = "stats/mean"
STATS_VAR = "stats/var"

# The reference's normalization epsilon: z_norm = (z - mean) / sqrt(var + STATS_EPS).
STATS_EPS = 1e-5

LOGICAL_DTYPES = ("float16", "float32", "bfloat16")
STORAGE_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
# Codecs of the latent arrays. blosc-*: Zarr's blosc codec with byte shuffle (the exponent bytes of
# floats grouped together, where an entropy coder finds their redundancy); cname per name below.
COMPRESSORS = ("blosc-zstd", "blosc-lz4", "zstd", "none")
BLOSC_CNAME = {"blosc-zstd": "zstd", "blosc-lz4": "lz4"}
BLOSC_SHUFFLE = "shuffle"


class StoreSpecError(UserError, ValueError):
    """A spec that does not follow store spec v1; the message names the offending key."""


def record_name(shard: int) -> str:
    return f"{RECORDS_DIR}/shard-{shard:06d}.json"


@lru_cache(maxsize=1)
def json_schema() -> dict:
    return json.loads(resources.files("schemas").joinpath("store_v1.schema.json").read_text())


def validate_spec(spec: dict) -> dict:
    """Validate ``spec`` against the JSON Schema and the cross-field rules; return it unchanged."""
    import jsonschema

    try:
        jsonschema.validate(spec, json_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise StoreSpecError(f"store spec invalid at {where}: {e.message}") from None
    lay, lat = spec["layout"], spec["latent"]
    if STORAGE_DTYPE[lat["logical_dtype"]] != lat["storage_dtype"]:
        raise StoreSpecError(
            f"latent.storage_dtype {lat['storage_dtype']!r} does not match logical dtype {lat['logical_dtype']!r}"
        )
    n, s = lay["num_samples"], lay["samples_per_shard"]
    if lay["num_shards"] != -(-n // s):
        raise StoreSpecError(f"layout.num_shards {lay['num_shards']} != ceil({n} / {s})")
    if lay["samples_per_shard"] % lay["samples_per_chunk"]:
        raise StoreSpecError("layout.samples_per_chunk must divide layout.samples_per_shard")
    c = spec["counts"]
    if c["num_valid"] + c["num_failed"] != c["num_samples"] or c["num_samples"] != n:
        raise StoreSpecError("counts.num_valid + counts.num_failed must equal counts.num_samples == layout.num_samples")
    if len(spec["failures"]) != c["num_failed"]:
        raise StoreSpecError(f"failures lists {len(spec['failures'])} samples, counts.num_failed is {c['num_failed']}")
    if [f["index"] for f in spec["failures"]] != sorted(f["index"] for f in spec["failures"]):
        raise StoreSpecError("failures must be sorted by index")
    if len(spec["shards"]) != lay["num_shards"]:
        raise StoreSpecError(f"shards lists {len(spec['shards'])} entries, layout.num_shards is {lay['num_shards']}")
    if len(spec["classes"]["names"]) != spec["classes"]["num_classes"]:
        raise StoreSpecError("classes.names must have classes.num_classes entries")
    return spec


def encoder_identity(spec_or_encoder: dict | None) -> dict | None:
    """The part of a store's encoder that decides what its latents mean. Two artifacts (a DiT and a
    decoder, say) are compatible when their identities are equal. ``None`` for synthetic stores."""
    enc = spec_or_encoder.get("encoder", spec_or_encoder) if spec_or_encoder else None
    if not enc:
        return None
    return {
        "name": enc["name"],
        "arch": enc["arch"],
        "input_size": enc["input_size"],
        "weights_sha256": enc["weights"]["sha256"],
        "weights_source": enc["weights"]["source"],
    }



def encoder_mismatch(a: dict | None, b: dict | None) -> str | None:
    """Why two encoder identities (:func:`encoder_identity`) are incompatible, or None when they are.

    Rule: ``name``, ``arch`` and ``input_size`` must be equal; ``weights_sha256`` is compared only
    when both sides know it (imports record None). A None identity (unknown) matches anything.
    """
    if a is None or b is None:
        return None
    for key in ("name", "arch", "input_size"):
        if a.get(key) != b.get(key):
            return f"encoder {key} differs: {a.get(key)!r} vs {b.get(key)!r}"
    if a.get("weights_sha256") and b.get("weights_sha256") and a["weights_sha256"] != b["weights_sha256"]:
        return f"encoder weights differ: sha256 {a['weights_sha256'][:12]}... vs {b['weights_sha256'][:12]}..."
    return None

def latent_shape(spec: dict) -> tuple[int, int, int]:
    c, h, w = spec["latent"]["shape"]
    return int(c), int(h), int(w)


def summary(spec: dict) -> dict[str, Any]:
    """A short human-facing summary (for `stores list`)."""
    enc = spec.get("encoder") or {}
    return {
        "store_id": spec["store_id"],
        "kind": spec["kind"],
        "encoder": enc.get("name"),
        "weights": (enc.get("weights") or {}).get("source"),
        "split": spec["source"]["split"],
        "latent": "x".join(str(d) for d in spec["latent"]["shape"]),
        "dtype": spec["latent"]["logical_dtype"],
        "samples": spec["counts"]["num_samples"],
        "valid": spec["counts"]["num_valid"],
        "failed": spec["counts"]["num_failed"],
    }
