"""Does a store's ``spec.json`` describe the store? Checks of the spec against itself and against the
arrays' own Zarr metadata, reading metadata only (no chunk data).

Opening a store for reading (:meth:`LatentStore.open`) runs :func:`layout_problems` and refuses a
store with any; ``stores verify`` reports them all. What the arrays must look like comes from the
spec's primary keys (``latent.shape``, ``latent.storage_dtype``, ``layout.num_samples``,
``layout.samples_per_shard``, ``layout.samples_per_chunk``, ``layout.compressor``, ``layout.flips``)
through the writer's own array definitions (``layout._array_definitions``), so reader and writer
share one rule.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

from pipeline import uri as U
from pipeline.store.layout import StoreLayout, StorePlan, _array_definitions
from schemas import store_v1 as S

_LATENT_ARRAYS = (S.LATENTS, S.LATENTS_FLIP)
_ROW_ARRAYS = (S.LABELS, S.VALID, S.SAMPLE_IDS)
_PARTIAL_ARRAYS = (S.PARTIAL_MEAN, S.PARTIAL_M2)
# What each array's description is compared on, in report order.
_FIELDS = ("shape", "dtype", "shards", "chunks", "codecs")


def layout_from_spec(spec: dict) -> StoreLayout:
    """The :class:`StoreLayout` a spec states (ValueError when its options do not go together)."""
    lay, lat = spec["layout"], spec["latent"]
    return StoreLayout(
        dtype=lat["logical_dtype"],
        compressor=lay["compressor"]["name"],
        zstd_level=lay["compressor"].get("level", StoreLayout.zstd_level),
        samples_per_shard=lay["samples_per_shard"],
        samples_per_chunk=lay["samples_per_chunk"],
        flips=lay["flips"],
        blosc_level=lay["compressor"].get("clevel"),
        blosc_blocksize=lay["compressor"].get("blocksize"),
    ).resolved(S.latent_shape(spec))


def _codec_names(codecs: list[dict]) -> list[str]:
    """Codec dicts of zarr.json -> short names ("zstd(level=3)", "crc32c"); a little-endian bytes
    codec (the default serializer) is left out."""
    out = []
    for c in codecs:
        name, conf = c["name"], c.get("configuration") or {}
        if name == "bytes":
            if conf.get("endian", "little") != "little":
                out.append(f"bytes(endian={conf['endian']})")
        elif name == "zstd":
            out.append(f"zstd(level={conf.get('level')})")
        elif name == "blosc":
            out.append("blosc(" + ",".join(f"{k}={conf.get(k)}" for k in ("cname", "clevel", "shuffle", "typesize",
                                                                           "blocksize")) + ")")
        else:
            out.append(name)
    return out


@lru_cache(maxsize=32)
def _implied(num_samples: int, latent_shape: tuple[int, int, int], layout: StoreLayout) -> dict[str, dict]:
    plan = StorePlan(kind="synthetic", num_samples=num_samples, latent_shape=latent_shape, layout=layout,
                     source={}, classes={})
    out = {}
    for name, kw in _array_definitions(plan).items():
        codecs = [c.to_dict() for c in list(kw.get("filters") or []) + list(kw.get("compressors") or [])]
        out[name] = {
            "shape": list(kw["shape"]),
            "dtype": str(kw["dtype"]),
            "shards": list(kw["shards"]) if kw.get("shards") else None,
            "chunks": list(kw["chunks"]),
            "codecs": _codec_names(codecs),
        }
    return out


def implied_arrays(spec: dict) -> dict[str, dict]:
    """Every array the spec's primary keys call for: name -> {shape, dtype, shards (None: not
    sharded), chunks (the inner chunk of a sharded array), codecs (short names)}."""
    layout = layout_from_spec(spec)
    return _implied(spec["layout"]["num_samples"], S.latent_shape(spec), layout)


def described_array(meta: dict) -> dict:
    """The same description as :func:`implied_arrays` gives, read from an array's ``zarr.json``
    (KeyError/TypeError/IndexError when it is not a Zarr v3 array description)."""
    codecs = meta["codecs"]
    grid = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        conf = codecs[0]["configuration"]
        shards, chunks, inner = grid, list(conf["chunk_shape"]), conf["codecs"]
    else:
        shards, chunks, inner = None, grid, codecs
    return {"shape": list(meta["shape"]), "dtype": meta["data_type"], "shards": shards, "chunks": chunks,
            "codecs": _codec_names(inner)}


def _spec_keys(name: str, field: str) -> str:
    """The spec keys that decide ``field`` of array ``name``."""
    latent, rows = name in _LATENT_ARRAYS, name in _ROW_ARRAYS
    if field == "shape":
        if latent:
            return "latent.shape and layout.num_samples"
        if rows:
            return "layout.num_samples"
        return "layout.num_shards and latent.shape" if name in _PARTIAL_ARRAYS else "latent.shape"
    if field == "dtype":
        return "latent.storage_dtype" if latent else "the store format"
    if field == "shards":
        return "layout.samples_per_shard"
    if field == "chunks":
        if latent:
            return "layout.samples_per_chunk"
        return "layout.samples_per_shard" if rows else "latent.shape"
    if latent:
        return "layout.compressor and layout.checksum"
    return "layout.compressor.level and layout.checksum" if rows else "layout.checksum"


def _imply(name: str, field: str) -> str:
    keys = _spec_keys(name, field)
    return f"{keys} {'imply' if ' and ' in keys else 'implies'}"


def spec_problems(spec: dict) -> list[str]:
    """What a spec (already valid by :func:`schemas.store_v1.validate_spec`) contradicts in itself:
    ``layout.arrays`` against the primary keys, ``id_inputs`` and ``store_id`` against the keys they
    repeat, the shard ranges against ``layout``, the shards' valid counts against ``counts``."""
    try:
        implied = implied_arrays(spec)
    except (ValueError, KeyError, TypeError) as e:
        return [f"spec.json layout: {e}"]
    problems = []
    stated = spec["layout"]["arrays"]
    for name, want in implied.items():
        if name not in stated:
            problems.append(f"spec.json layout.arrays.{name} is missing")
            continue
        for field in ("shape", "dtype", "shards", "chunks"):
            got = stated[name].get(field)
            if got != want[field]:
                problems.append(f"spec.json layout.arrays.{name}.{field} is {got}, but {_imply(name, field)} "
                                f"{want[field]}")
    for name in sorted(set(stated) - set(implied)):
        problems.append(f"spec.json layout.arrays.{name}: not an array of this layout (layout.flips is "
                        f"{spec['layout']['flips']})")

    ids = spec["id_inputs"]
    id_hash = hashlib.sha256(U.canonical_json(ids)).hexdigest()[:20]
    if id_hash != spec["store_id"]:
        problems.append(f"spec.json store_id {spec['store_id']} is not the hash of its id_inputs ({id_hash})")
    lay = layout_from_spec(spec)
    repeated = {
        "latent_shape": (list(S.latent_shape(spec)), "latent.shape"),
        "num_samples": (spec["layout"]["num_samples"], "layout.num_samples"),
        "layout": (lay.id_dict(), "latent.logical_dtype and layout"),
        "kind": (spec["kind"], "kind"),
        "classes": (spec["classes"], "classes"),
    }
    for key, (value, where) in repeated.items():
        if ids.get(key) != value:
            problems.append(f"spec.json id_inputs.{key} is {ids.get(key)}, but {where} says {value}")

    n, s = spec["layout"]["num_samples"], spec["layout"]["samples_per_shard"]
    for i, sh in enumerate(spec["shards"]):
        want = (i, i * s, min((i + 1) * s, n))
        if (sh["index"], sh["start"], sh["stop"]) != want:
            problems.append(f"spec.json shards[{i}] is shard {sh['index']} rows [{sh['start']}, {sh['stop']}), "
                            f"layout says shard {want[0]} rows [{want[1]}, {want[2]})")
    valid = sum(sh["num_valid"] for sh in spec["shards"])
    if valid != spec["counts"]["num_valid"]:
        problems.append(f"spec.json shards count {valid} valid samples, counts.num_valid is "
                        f"{spec['counts']['num_valid']}")
    return problems


def metadata_problems(spec: dict, group: dict | BaseException | None,
                      arrays: dict[str, dict | BaseException | None]) -> list[str]:
    """What the store's Zarr metadata contradicts in the spec. ``group`` is the parsed root
    ``zarr.json``, ``arrays`` each array's (an exception or None: it could not be read)."""
    problems = []
    want_group = {"format": S.FORMAT, "version": S.VERSION, "store_id": spec["store_id"]}
    if not isinstance(group, dict):
        problems.append(f"zarr.json (the store's group) is {_unreadable(group)}")
    else:
        got = (group.get("attributes") or {}).get("rae_store")
        if got != want_group:
            problems.append(f"zarr.json attributes.rae_store is {got}, spec.json says {want_group}")
    try:
        implied = implied_arrays(spec)
    except (ValueError, KeyError, TypeError) as e:
        return problems + [f"spec.json layout: {e}"]
    for name, want in implied.items():
        meta = arrays.get(name)
        if not isinstance(meta, dict):
            problems.append(f"{name}/zarr.json is {_unreadable(meta)}")
            continue
        try:
            got = described_array(meta)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            problems.append(f"{name}/zarr.json is not a Zarr v3 array description ({type(e).__name__}: {e})")
            continue
        for field in _FIELDS:
            if got[field] != want[field]:
                label = {"shards": "shard shape", "chunks": "chunk shape"}.get(field, field)
                problems.append(f"{name}/zarr.json {label} is {got[field]}, but spec.json "
                                f"{_imply(name, field)} {want[field]}")
    return problems


def _unreadable(e: BaseException | None) -> str:
    if e is None or isinstance(e, FileNotFoundError):
        return "missing"
    return f"unreadable ({type(e).__name__}: {e})"


def read_metadata(uri: str, names, storage_options: dict | None = None):
    """(root zarr.json, {name: zarr.json}) parsed, in one concurrent fetch; a value that could not
    be fetched or parsed is the exception."""
    import json

    fs, root = U.get_fs(uri, storage_options)
    root = root.rstrip("/")
    paths = {"": f"{root}/zarr.json", **{name: f"{root}/{name}/zarr.json" for name in names}}
    fetched = fs.cat(list(paths.values()), on_error="return")
    parsed = {}
    for name, path in paths.items():
        value = fetched.get(path, FileNotFoundError(path))
        if not isinstance(value, BaseException):
            try:
                value = json.loads(value)
            except ValueError as e:
                value = e
        parsed[name] = value
    group = parsed.pop("")
    return group, parsed


def layout_problems(uri: str, spec: dict, storage_options: dict | None = None) -> list[str]:
    """Every way the (valid) spec of the store at ``uri`` contradicts itself or the store's Zarr
    metadata: shapes, dtypes, shard and chunk shapes, codecs, row counts, the store id."""
    try:
        names = list(implied_arrays(spec))
    except (ValueError, KeyError, TypeError) as e:
        return [f"spec.json layout: {e}"]
    group, arrays = read_metadata(uri, names, storage_options)
    # The arrays are the ground truth: their disagreements first, then the spec's with itself.
    return metadata_problems(spec, group, arrays) + spec_problems(spec)
