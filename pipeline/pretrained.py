"""Folders written by ``transformers``' ``save_pretrained``: ``config.json`` beside the weights, either
one file (``model.safetensors``, or ``pytorch_model.bin`` from ``safe_serialization=False``) or
shards named by an index (``model.safetensors.index.json``: ``{"weight_map": {key: shard file}}``,
shards ``model-00001-of-00003.safetensors`` ...; likewise ``pytorch_model.bin.index.json``).

Local paths and fsspec URIs alike; every file goes through ``pipeline.weights`` (safetensors, or
``torch.load(weights_only=True)``). What the config must say is the caller's business
(``pipeline.encoders`` checks it against the encoder the folder claims to be).
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from pipeline import uri as uri_lib
from pipeline.weights import TORCH_SUFFIXES, WeightsFileError, read_state_dict

CONFIG_FILE = "config.json"
# In the order save_pretrained's readers prefer them: safetensors first, an index before a single file.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def is_pretrained_folder(uri: str, storage_options: dict | None = None) -> bool:
    """Whether ``uri`` names a folder (not a weights file) that exists."""
    location = uri_lib.normalize(uri)
    if location.lower().endswith((".safetensors", *TORCH_SUFFIXES)):
        return False
    fs, path = uri_lib.get_fs(location, storage_options)
    return fs.isdir(path)


def read_pretrained_folder(uri: str, storage_options: dict | None = None, *, skip_prefixes: tuple[str, ...] = (),
                           check_config: Callable[[dict, str], None] | None = None,
                           ) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """(config.json as a dict, the state dict of every weights file, the files read) of a
    ``save_pretrained`` folder. ``check_config(config, config_uri)`` runs before any weights are
    read (a folder of another model fails without reading gigabytes). Keys starting with one of
    ``skip_prefixes`` are left out. A missing config or weights file, a shard the index names but
    the folder lacks, or a key the index lists that its shard does not hold is a
    :class:`~pipeline.weights.WeightsFileError` naming it."""
    folder = uri_lib.normalize(uri).rstrip("/")
    config_uri = uri_lib.join(folder, CONFIG_FILE)
    if not uri_lib.exists(config_uri, storage_options):
        raise WeightsFileError(f"{folder}: a weights folder needs the {CONFIG_FILE} that save_pretrained writes "
                               "beside the weights; there is none")
    try:
        config = uri_lib.read_json(config_uri, storage_options)
    except ValueError as e:
        raise WeightsFileError(f"{config_uri}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise WeightsFileError(f"{config_uri}: expected a JSON object, got {type(config).__name__}")
    if check_config is not None:
        check_config(config, config_uri)
    for name in INDEX_FILES:
        index_uri = uri_lib.join(folder, name)
        if uri_lib.exists(index_uri, storage_options):
            sd, files = _read_shards(folder, index_uri, storage_options, skip_prefixes)
            return config, sd, [CONFIG_FILE, name] + files
    for name in SINGLE_FILES:
        file_uri = uri_lib.join(folder, name)
        if uri_lib.exists(file_uri, storage_options):
            return config, read_state_dict(file_uri, storage_options, skip_prefixes=skip_prefixes), [CONFIG_FILE, name]
    raise WeightsFileError(f"{folder}: holds {CONFIG_FILE} but no weights: expected one of "
                           f"{', '.join(SINGLE_FILES + INDEX_FILES)}")


def _read_shards(folder: str, index_uri: str, storage_options: dict | None, skip_prefixes: tuple[str, ...]
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        index = json.loads(uri_lib.read_bytes(index_uri, storage_options))
    except ValueError as e:
        raise WeightsFileError(f"{index_uri}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsFileError(f"{index_uri}: no 'weight_map' (key -> shard file) in it")
    shards = sorted(set(map(str, weight_map.values())))
    bad = [s for s in shards if "/" in s or "\\" in s or s in (".", "..")]
    if bad:
        raise WeightsFileError(f"{index_uri}: shard names must be files of the folder, got {bad[:5]}")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_uri = uri_lib.join(folder, shard)
        try:
            part = read_state_dict(shard_uri, storage_options, skip_prefixes=skip_prefixes)
        except FileNotFoundError:
            raise WeightsFileError(f"{index_uri} names the shard {shard}, which is not in {folder}") from None
        listed = {k for k, s in weight_map.items() if s == shard and not k.startswith(skip_prefixes)}
        missing = sorted(listed - part.keys())
        if missing:
            raise WeightsFileError(f"{shard_uri}: lacks {len(missing)} key(s) the index puts there, e.g. {missing[:5]}")
        sd.update(part)
    return sd, shards
