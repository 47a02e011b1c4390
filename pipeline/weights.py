"""The one reader of weights files: ``.safetensors``, or a torch pickle (``.pt``/``.pth``/``.bin``/
``.ckpt``) loaded with ``torch.load(weights_only=True)`` — only tensors, numbers, strings and
containers; a file that needs arbitrary unpickling (which can run code) is refused. Local paths and
fsspec URIs alike. Encoders, the decoder's LPIPS / discriminator backbones, Inception, statistics
files and the published RAE files all read through here; each caller adds its own checks.
"""
from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

import torch

from pipeline import uri as uri_lib
from schemas.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightsFileError(UserError, ValueError):
    """A weights file that cannot be read as one; names the file."""


def parse_tensor_file(data: bytes, uri: str) -> Any:
    """The object in the bytes of the file ``uri`` (its suffix picks the format): a tensor dict for
    ``.safetensors``, else whatever ``torch.load(weights_only=True)`` returns."""
    if str(uri).lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError) as e:
            raise WeightsFileError(f"{uri}: not a readable safetensors file ({e})") from e
    try:
        with warnings.catch_warnings():  # a refused pickle is reported below, as one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsFileError(
            f"{uri}: refused: the file holds objects that torch.load(weights_only=True) will not "
            f"unpickle (only tensors, numbers, strings and containers are loaded; arbitrary pickles "
            f"can run code). Re-save its state dicts alone. Detail: {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsFileError(f"{uri}: not a readable torch weights file ({type(e).__name__}: {e})") from e


def load_tensor_file(uri: str, storage_options: dict | None = None) -> Any:
    """The object in the weights file at ``uri`` (:func:`parse_tensor_file`); FileNotFoundError naming
    it when there is none."""
    try:
        data = uri_lib.read_bytes(uri, storage_options)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{uri}: no such file") from None
    return parse_tensor_file(data, uri)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, uri: str, nested: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """``obj`` if it is a state dict (name -> tensor), else the one under the first key of ``nested``
    that holds one; WeightsFileError naming the file otherwise."""
    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in nested:
            if is_state_dict(obj.get(key)):
                return obj[key]
    under = f" or a dict with one under {' or '.join(repr(k) for k in nested)}" if nested else ""
    raise WeightsFileError(f"{uri}: expected a state dict (name -> tensor){under}, got {type(obj).__name__}")


def read_state_dict(uri: str, storage_options: dict | None = None, *, skip_prefixes: tuple[str, ...] = (),
                    nested: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """The state dict in the weights file at ``uri`` (bare, or under one of ``nested``). Keys starting
    with one of ``skip_prefixes`` are left out (a local safetensors file does not even read them)."""
    location = uri_lib.normalize(uri)
    lower = location.lower()
    if not lower.endswith((".safetensors", *TORCH_SUFFIXES)):
        raise WeightsFileError(
            f"{uri}: unsupported weights file type; expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    if lower.endswith(".safetensors") and uri_lib.is_local(location) and skip_prefixes:
        from safetensors import SafetensorError, safe_open

        if not uri_lib.exists(location):
            raise FileNotFoundError(f"{uri}: no such file")
        try:
            with safe_open(location, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip_prefixes)}
        except SafetensorError as e:
            raise WeightsFileError(f"{uri}: not a readable safetensors file ({e})") from e
    sd = unwrap_state_dict(load_tensor_file(location, storage_options), uri, nested)
    return {k: v for k, v in sd.items() if not k.startswith(skip_prefixes)}
