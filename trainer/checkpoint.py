"""Save, find, load and prune checkpoints in the ``rae-checkpoint`` v1 format (``schemas/checkpoint_v1``).

Every stage writes the same directory layout under ``<run_dir>/checkpoints/step-NNNNNNN/`` at any
fsspec URI (local path, ``file://``, ``s3://``, ``memory://``). A checkpoint counts only once its
``COMPLETE`` marker exists, and the marker is written after every other file, so a writer killed at
any point (SIGKILL included) leaves the previous checkpoint as the newest complete one:

- local filesystems: the folder is built as ``checkpoints/.tmp-step-NNNNNNN-<random>/``, every file
  fsync'ed, the marker written last, then the folder is renamed into place (readers never see a
  partly written ``step-*`` folder);
- object stores (S3): files are PUT directly under ``step-NNNNNNN/``, ``meta.json`` after them and
  ``COMPLETE`` last; a prefix without the marker is ignored by readers and removed by pruning.

``meta.json`` carries the SHA-256 of every payload file and ``COMPLETE`` carries the SHA-256 of
``meta.json``; :func:`load_checkpoint` checks both and names the file that does not match. A
complete checkpoint that a resuming trainer finds corrupt is set aside (:func:`set_aside_checkpoint`:
``COMPLETE`` renamed to ``COMPLETE.corrupt``, files kept), so it no longer counts as complete.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import uuid
from typing import Any, NamedTuple

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from pipeline import uri as uri_lib
from schemas import checkpoint_v1 as spec
from schemas.checkpoint_v1 import CheckpointMeta
from schemas.errors import UserError

_HASH_CHUNK = 8 << 20  # bytes read at a time when hashing local files
_TMP_DIR = re.compile(r"^\.tmp-step-(\d+)-")  # local writes in progress or interrupted
# A complete checkpoint found corrupt on resume keeps its files; its marker gets this name, so no
# reader counts it (renaming it back to COMPLETE restores it).
SET_ASIDE_MARKER = spec.COMPLETE_FILE + ".corrupt"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be saved or used; the message names the checkpoint and file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or no complete one) where one was asked for."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint folder without its COMPLETE marker: its write did not finish."""


class CorruptCheckpointError(CheckpointError):
    """A file of a complete checkpoint is missing, unreadable or does not match its hash."""


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint. Tensors are on ``map_location``; ``train_state`` is None when not
    requested or not saved; ``extra_weights`` maps a group name (``disc``) to its state dict."""

    meta: CheckpointMeta
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    train_state: dict | None
    stats: dict[str, torch.Tensor] | None
    uri: str
    extra_weights: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.meta.step


class CheckpointEntry(NamedTuple):
    step: int
    uri: str
    complete: bool


# ----------------------------------------------------------------------------------------------
# State dict hygiene
# ----------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_state_dict(state: dict[str, Any] | nn.Module) -> dict[str, Any]:
    """State dict with plain keys: ``_orig_mod.`` segments (torch.compile) removed anywhere, and a
    leading ``module.`` (DDP) removed when every key has it. Accepts a module or a state dict."""
    if isinstance(state, nn.Module):
        state = unwrap_model(state).state_dict()
    out = {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v for k, v in state.items()}
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
        out = {k.removeprefix("_orig_mod."): v for k, v in out.items()}
    return out


def tensors_for_safetensors(state: dict[str, Any], what: str = "state") -> dict[str, torch.Tensor]:
    """CPU, detached, contiguous tensors with no two sharing memory (safetensors refuses shared or
    strided tensors; tied weights are written twice and load back fine with ``load_state_dict``)."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{what}[{key!r}] is a {type(value).__name__}, not a tensor; safetensors files hold "
                "tensors only (put other state in train_state)"
            )
        t = value.detach()
        if t.device.type == "meta":
            raise ValueError(f"{what}[{key!r}] is on the meta device and has no data to save")
        if t.device.type != "cpu":
            t = t.to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or ptr in seen_storage:
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        seen_storage.add(ptr)
        out[key] = t
    return out


_WEIGHTS_ONLY_LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
_WEIGHTS_ONLY_MAPPINGS = (dict, collections.OrderedDict)
_WEIGHTS_ONLY_SEQUENCES = (list, tuple)


def check_weights_only_safe(obj: Any, path: str = "train_state") -> None:
    """Raise TypeError naming the key path of the first object that ``torch.load(weights_only=True)``
    would refuse (numpy arrays and scalars, arbitrary classes, namedtuples...). Exact types are
    checked because e.g. ``numpy.float64`` subclasses ``float`` but does not unpickle."""
    if isinstance(obj, torch.Tensor):
        return
    tp = type(obj)
    if tp in _WEIGHTS_ONLY_LEAVES:
        return
    if tp in _WEIGHTS_ONLY_MAPPINGS:
        for k, v in obj.items():
            check_weights_only_safe(k, f"{path} key {k!r}")
            check_weights_only_safe(v, f"{path}[{k!r}]")
        return
    if tp in _WEIGHTS_ONLY_SEQUENCES:
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{path}[{i}]")
        return
    raise TypeError(
        f"{path} is a {tp.__module__}.{tp.__qualname__}, which torch.load(weights_only=True) refuses; "
        "store tensors, Python numbers, strings, lists, tuples and dicts"
    )


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (when initialized) CUDA generator states, weights_only-safe."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what passes through it to ``sink``."""

    def __init__(self, sink):
        super().__init__()
        self.sink, self.sha = sink, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.sink.write(view)
        return view.nbytes


class _CheckpointWriter:
    """Writes payload files into one folder, then meta.json, then COMPLETE; returns hashes."""

    def __init__(self, fs, folder: str):
        self.fs, self.folder = fs, folder
        self.local = isinstance(fs, LocalFileSystem)
        if self.local:
            os.makedirs(folder, exist_ok=False)

    def write(self, name: str, fill) -> str:
        """Call ``fill(stream)`` to produce the file ``name``; return its SHA-256 hex."""
        path = f"{self.folder}/{name}"
        if self.local:
            with open(path, "wb") as f:
                hw = _HashingWriter(f)
                fill(hw)
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.fs.open(path, "wb") as f:
                hw = _HashingWriter(f)
                fill(hw)
        return hw.sha.hexdigest()

    def write_bytes(self, name: str, data: bytes) -> str:
        return self.write(name, lambda s: s.write(data))

    def sync_folder(self) -> None:
        if self.local:
            _fsync_dir(self.folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    import safetensors.torch

    return safetensors.torch.save(tensors, metadata=header)


def _meta_from(meta: CheckpointMeta | dict, step: int) -> CheckpointMeta:
    if isinstance(meta, CheckpointMeta):
        fields = dataclasses.asdict(meta)
    elif isinstance(meta, dict):
        fields = {k: v for k, v in meta.items() if k not in ("format", "version")}
    else:
        raise TypeError(f"meta must be a dict or CheckpointMeta, got {type(meta).__name__}")
    if fields.get("step", step) != step:
        raise ValueError(f"meta step {fields['step']} differs from the step being saved ({step})")
    fields["step"] = step
    fields.pop("files", None)
    fields.pop("created_by", None)
    names = {f.name for f in dataclasses.fields(CheckpointMeta)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise spec.CheckpointMetaError(f"unknown checkpoint meta key(s): {', '.join(unknown)} (use 'extra')")
    missing = [k for k in ("kind", "epoch", "samples_seen", "config", "model") if k not in fields]
    if missing:
        raise spec.CheckpointMetaError(f"checkpoint meta lacks required key(s): {', '.join(missing)}")
    return CheckpointMeta(**fields)


def _check_stats(stats: dict[str, torch.Tensor] | None, meta: CheckpointMeta) -> None:
    if stats is None:
        if meta.statistics is not None:
            raise ValueError("meta.statistics is set but no stats tensors were given")
        return
    unknown = sorted(set(stats) - set(spec.STATS_KEYS))
    if unknown or not stats:
        raise ValueError(
            f"stats must hold 'mean' and/or 'var' tensors (got keys {sorted(stats)}); pass None for none"
        )
    if meta.statistics is None:
        raise ValueError("stats tensors were given but meta.statistics is null")
    for key in spec.STATS_KEYS:
        if bool(meta.statistics.get(key)) != (key in stats):
            raise ValueError(
                f"meta.statistics[{key!r}] is {meta.statistics.get(key)!r} but stats "
                f"{'has' if key in stats else 'lacks'} {key!r}"
            )


def save_checkpoint(
    run_dir_uri: str,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | nn.Module,
    ema_state: dict[str, torch.Tensor] | None = None,
    train_state: dict | None = None,
    meta: CheckpointMeta | dict,
    stats: dict[str, torch.Tensor] | None = None,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write ``<run_dir>/checkpoints/step-NNNNNNN/`` and return its URI. Call on one rank only.

    model_state / ema_state: state dicts (or a module for model_state); prefixes are stripped.
    train_state: optimizer, scheduler, scaler, RNG and data state; must be weights_only-safe
    (checked before anything is written). meta: everything of :class:`CheckpointMeta` except
    ``step``, ``files`` and ``created_by``, which are filled in here. stats: {"mean", "var"}
    tensors (either may be absent), consistent with ``meta["statistics"]``. extra_weights: further
    state dicts by group name (``{"disc": ...}`` -> ``disc.safetensors``).
    Re-saving an existing step replaces it.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    m = _meta_from(meta, step)
    _check_stats(stats, m)
    payload = {spec.MODEL_FILE: tensors_for_safetensors(unwrap_state_dict(model_state), "model_state")}
    if ema_state is not None:
        payload[spec.EMA_FILE] = tensors_for_safetensors(unwrap_state_dict(ema_state), "ema_state")
    if stats is not None:
        payload[spec.STATS_FILE] = tensors_for_safetensors(stats, "stats")
    for name, state in (extra_weights or {}).items():
        payload[spec.weights_file_name(name)] = tensors_for_safetensors(unwrap_state_dict(state), name)
    if train_state is not None:
        check_weights_only_safe(train_state)
    # Validate the meta before writing gigabytes (hashes are placeholders until the files exist).
    names = list(payload) + ([spec.STATE_FILE] if train_state is not None else [])
    spec.validate_meta(dataclasses.replace(m, files={n: "0" * 64 for n in names}).to_dict(), "meta")
    try:
        uri_lib.canonical_json(m.to_dict())
    except (TypeError, ValueError) as e:
        raise spec.CheckpointMetaError(f"checkpoint meta is not JSON-serializable: {e}") from e
    root_uri = uri_lib.join(run_dir_uri, spec.CHECKPOINTS_DIR)
    fs, root = uri_lib.get_fs(root_uri, storage_options)
    _write_checkpoint(fs, root, spec.step_dir_name(step), m, payload, train_state)
    return uri_lib.join(root_uri, spec.step_dir_name(step))


def _write_checkpoint(fs, root: str, final_name: str, meta: CheckpointMeta, payload: dict, train_state) -> None:
    """Payload files, then meta.json (with their hashes), then COMPLETE: locally in a hidden
    folder renamed into place at the end, on object stores directly under the final prefix."""
    final = f"{root}/{final_name}"
    local = isinstance(fs, LocalFileSystem)
    if local:
        os.makedirs(root, exist_ok=True)
        folder = f"{root}/.tmp-{final_name}-{uuid.uuid4().hex[:8]}"
    else:
        folder = final
        if fs.exists(final):
            # Re-saving a step: drop the old marker first so no reader takes a mix of old and
            # new files as complete.
            if fs.exists(f"{final}/{spec.COMPLETE_FILE}"):
                fs.rm(f"{final}/{spec.COMPLETE_FILE}")
            fs.rm(final, recursive=True)
    header = {"format": spec.FORMAT, "kind": str(meta.kind), "step": str(meta.step)}
    writer = _CheckpointWriter(fs, folder)
    try:
        files = {name: writer.write_bytes(name, _safetensors_bytes(t, header)) for name, t in payload.items()}
        if train_state is not None:
            files[spec.STATE_FILE] = writer.write(spec.STATE_FILE, lambda s: torch.save(train_state, s))
        meta.files = files
        meta_bytes = uri_lib.canonical_json(meta.to_dict())
        writer.write_bytes(spec.META_FILE, meta_bytes)
        marker = {"format": spec.FORMAT, "step": meta.step, "meta_sha256": uri_lib.sha256_bytes(meta_bytes)}
        writer.write_bytes(spec.COMPLETE_FILE, uri_lib.canonical_json(marker))
        writer.sync_folder()
        if local:
            _move_into_place(folder, final, root)
    except BaseException:
        if local and os.path.exists(folder):
            # Best effort: a leftover is harmless (hidden name) and pruning removes it later.
            fs.rm(folder, recursive=True)
        raise
    if not local:
        fs.invalidate_cache(root)


def _move_into_place(folder: str, final: str, root: str) -> None:
    """Rename the finished temporary folder to its final name (replacing an older save of the
    same step), then fsync the parent so the rename survives a power loss."""
    if os.path.exists(final):
        displaced = f"{root}/.tmp-{os.path.basename(final)}-replaced-{uuid.uuid4().hex[:8]}"
        os.rename(final, displaced)
        os.rename(folder, final)
        _fsync_dir(root)
        LocalFileSystem().rm(displaced, recursive=True)
    else:
        os.rename(folder, final)
        _fsync_dir(root)


# ----------------------------------------------------------------------------------------------
# Finding
# ----------------------------------------------------------------------------------------------


def _checkpoints_root(run_dir: str) -> str:
    return uri_lib.join(run_dir, spec.CHECKPOINTS_DIR)


def list_checkpoints(run_dir: str, storage_options: dict | None = None) -> list[CheckpointEntry]:
    """Every ``step-*`` folder of a run directory, oldest first, with whether it is COMPLETE.
    Hidden temporary folders of local writes in progress are not listed."""
    root_uri = _checkpoints_root(run_dir)
    fs, root = uri_lib.get_fs(root_uri, storage_options)
    fs.invalidate_cache(root)  # object-store listings are cached per process; another may have written
    if not fs.exists(root):
        return []
    steps: dict[int, str] = {}
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        step = spec.parse_step_dir_name(name)
        if step is not None and info.get("type") == "directory":
            steps[step] = name
    complete = set()
    for path in fs.glob(f"{root}/step-*/{spec.COMPLETE_FILE}"):
        complete.add(path.rstrip("/").split("/")[-2])
    return [
        CheckpointEntry(step, uri_lib.join(root_uri, name), name in complete)
        for step, name in sorted(steps.items())
    ]


def _is_checkpoint_dir(fs, path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return (
        spec.parse_step_dir_name(name) is not None
        or fs.exists(f"{path}/{spec.META_FILE}")
        or fs.exists(f"{path}/{spec.COMPLETE_FILE}")
    )


def resolve_checkpoint(uri: str, storage_options: dict | None = None) -> str:
    """A checkpoint URI from a checkpoint directory, a run directory (its newest complete
    checkpoint) or a run's ``checkpoints/`` folder. Raises :class:`CheckpointNotFoundError` or
    :class:`IncompleteCheckpointError` with what was found instead."""
    uri = uri_lib.normalize(uri)
    fs, path = uri_lib.get_fs(uri, storage_options)
    fs.invalidate_cache(path)
    if _is_checkpoint_dir(fs, path):
        if not fs.exists(path):
            raise CheckpointNotFoundError(f"checkpoint {uri} does not exist")
        if not fs.exists(f"{path}/{spec.COMPLETE_FILE}"):
            if fs.exists(f"{path}/{SET_ASIDE_MARKER}"):
                raise CorruptCheckpointError(
                    f"checkpoint {uri} was set aside as corrupt (its marker is {SET_ASIDE_MARKER}). "
                    "Pass the run directory to use its newest intact checkpoint."
                )
            raise IncompleteCheckpointError(
                f"checkpoint {uri} has no {spec.COMPLETE_FILE} marker: its write did not finish. "
                "Pass the run directory to use its newest complete checkpoint."
            )
        return uri
    if path.rstrip("/").endswith("/" + spec.CHECKPOINTS_DIR) and not fs.exists(f"{path}/{spec.CHECKPOINTS_DIR}"):
        run_dir = uri.rstrip("/")[: -len(spec.CHECKPOINTS_DIR) - 1]
    else:
        run_dir = uri
    entries = list_checkpoints(run_dir, storage_options)
    if not entries:
        raise CheckpointNotFoundError(
            f"{uri} is neither a checkpoint directory (no {spec.META_FILE} / {spec.COMPLETE_FILE}) "
            f"nor a run directory with checkpoints (nothing under {_checkpoints_root(run_dir)})"
        )
    complete = [e for e in entries if e.complete]
    if not complete:
        names = ", ".join(e.uri.rsplit("/", 1)[-1] for e in entries)
        raise CheckpointNotFoundError(
            f"run directory {run_dir} has no complete checkpoint (incomplete, never used: {names})"
        )
    return complete[-1].uri


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _sha256_local(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


class _Reader:
    """Reads files of one checkpoint folder, verifying hashes; names the file in every error."""

    def __init__(self, uri: str, storage_options: dict | None, verify: bool):
        self.uri, self.verify = uri, verify
        self.fs, self.path = uri_lib.get_fs(uri, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._file(name))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint {self.uri}: {name} is missing") from None

    def check(self, name: str, expected: str, data: bytes | None = None) -> None:
        if not self.verify and data is None:
            return
        try:
            actual = uri_lib.sha256_bytes(data) if data is not None else (
                _sha256_local(self._file(name)) if self.local else uri_lib.sha256_bytes(self.read_bytes(name))
            )
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint {self.uri}: {name} is missing") from None
        if actual != expected:
            raise CorruptCheckpointError(
                f"checkpoint {self.uri}: {name} is corrupt (sha256 {actual[:16]}..., meta.json "
                f"records {expected[:16]}...)"
            )

    def tensors(self, name: str, expected: str, device: torch.device) -> dict[str, torch.Tensor]:
        import safetensors
        import safetensors.torch

        try:
            if self.local:
                self.check(name, expected)
                return safetensors.torch.load_file(self._file(name), device=str(device))
            data = self.read_bytes(name)
            if self.verify:
                self.check(name, expected, data)
            return {k: v.to(device) for k, v in safetensors.torch.load(data).items()}
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError, safetensors.SafetensorError) as e:
            raise CorruptCheckpointError(f"checkpoint {self.uri}: cannot read {name}: {e}") from e

    def torch_object(self, name: str, expected: str, map_location) -> Any:
        try:
            if self.local:
                self.check(name, expected)
                return torch.load(self._file(name), map_location=map_location, weights_only=True)
            data = self.read_bytes(name)
            if self.verify:
                self.check(name, expected, data)
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            raise CorruptCheckpointError(f"checkpoint {self.uri}: cannot read {name}: {e}") from e


def read_meta(uri: str, storage_options: dict | None = None) -> CheckpointMeta:
    """The validated meta of a complete checkpoint (checkpoint or run directory), without tensors."""
    ckpt_uri = resolve_checkpoint(uri, storage_options)
    return _read_meta(_Reader(ckpt_uri, storage_options, verify=True))


def _read_meta(reader: _Reader) -> CheckpointMeta:
    try:
        marker = json.loads(reader.read_bytes(spec.COMPLETE_FILE))
        expected_meta_sha = marker["meta_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint {reader.uri}: {spec.COMPLETE_FILE} is unreadable: {e}") from e
    meta_bytes = reader.read_bytes(spec.META_FILE)
    reader.check(spec.META_FILE, expected_meta_sha, meta_bytes)
    try:
        meta_dict = json.loads(meta_bytes)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"checkpoint {reader.uri}: {spec.META_FILE} is not JSON: {e}") from e
    meta = CheckpointMeta.from_dict(meta_dict, source=f"{reader.uri}/{spec.META_FILE}")
    if marker.get("step") != meta.step:
        raise CorruptCheckpointError(
            f"checkpoint {reader.uri}: {spec.COMPLETE_FILE} says step {marker.get('step')}, "
            f"{spec.META_FILE} says {meta.step}"
        )
    return meta


def load_checkpoint(
    uri: str,
    *,
    load_train_state: bool = True,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    storage_options: dict | None = None,
) -> Checkpoint:
    """Load a checkpoint (checkpoint or run directory URI). Requires COMPLETE; checks meta.json
    against the marker and every loaded file against meta.json (``verify=False`` skips the payload
    hashes, not the meta one). ``state.pt`` is read with ``weights_only=True``."""
    ckpt_uri = resolve_checkpoint(uri, storage_options)
    reader = _Reader(ckpt_uri, storage_options, verify)
    meta = _read_meta(reader)
    device = torch.device(map_location)
    files = meta.files
    model_state = reader.tensors(spec.MODEL_FILE, files[spec.MODEL_FILE], device)
    ema_state = reader.tensors(spec.EMA_FILE, files[spec.EMA_FILE], device) if spec.EMA_FILE in files else None
    stats = reader.tensors(spec.STATS_FILE, files[spec.STATS_FILE], device) if spec.STATS_FILE in files else None
    extra = {
        name.removesuffix(".safetensors"): reader.tensors(name, sha, device)
        for name, sha in files.items()
        if name.endswith(".safetensors") and name not in (spec.MODEL_FILE, spec.EMA_FILE, spec.STATS_FILE)
    }
    train_state = None
    if load_train_state and spec.STATE_FILE in files:
        train_state = reader.torch_object(spec.STATE_FILE, files[spec.STATE_FILE], map_location)
    return Checkpoint(meta, model_state, ema_state, train_state, stats, ckpt_uri, extra)


def set_aside_checkpoint(uri: str, storage_options: dict | None = None) -> None:
    """Take a complete but corrupt checkpoint out of use: rename its ``COMPLETE`` marker to
    :data:`SET_ASIDE_MARKER` (files kept). Listings then count it as incomplete, so the newest
    intact checkpoint is the newest again, and pruning removes it once a newer one is complete.
    Call on one rank only; a marker already gone is left so."""
    fs, path = uri_lib.get_fs(uri, storage_options)
    marker = f"{path}/{spec.COMPLETE_FILE}"
    try:
        fs.mv(marker, f"{path}/{SET_ASIDE_MARKER}")
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path.rsplit("/", 1)[0])


# ----------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------


def _pinned(uri: str, storage_options: dict | None) -> bool:
    """Whether a complete checkpoint's meta asks to be kept (``extra.keep``); an unreadable meta
    does not (the checkpoint is unusable anyway)."""
    try:
        return bool((read_meta(uri, storage_options).extra or {}).get("keep"))
    except (CheckpointError, spec.CheckpointMetaError):
        return False


def prune_checkpoints(
    run_dir: str, keep_last: int = 3, keep_every: int = 0, storage_options: dict | None = None
) -> list[str]:
    """Delete old checkpoints; return the URIs removed. Call on one rank only.

    Kept: the ``keep_last`` newest complete checkpoints, every complete one whose step is a
    multiple of ``keep_every`` (0 = none), every complete one whose meta says ``extra.keep`` (a
    reason, e.g. train-dit's ``train.keep_epochs``: pinned whatever the settings of later runs),
    and always the newest complete one. Removed as well:
    incomplete ``step-*`` folders older than the newest complete one and hidden temporary folders
    of interrupted local writes for steps up to it. Nothing is removed while no checkpoint is complete.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if keep_every < 0:
        raise ValueError(f"keep_every must be >= 0, got {keep_every}")
    entries = list_checkpoints(run_dir, storage_options)
    complete = [e for e in entries if e.complete]
    if not complete:
        return []
    newest = complete[-1].step
    keep = {e.step for e in complete[-keep_last:]} | {newest}
    if keep_every:
        keep |= {e.step for e in complete if e.step % keep_every == 0}
    keep |= {e.step for e in complete if e.step not in keep and _pinned(e.uri, storage_options)}
    doomed = [e.uri for e in entries if (e.complete and e.step not in keep) or (not e.complete and e.step < newest)]
    root_uri = _checkpoints_root(run_dir)
    fs, root = uri_lib.get_fs(root_uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        for name in os.listdir(root):
            m = _TMP_DIR.match(name)
            if m and int(m.group(1)) <= newest:
                doomed.append(uri_lib.join(root_uri, name))
    for uri in doomed:
        _, path = uri_lib.get_fs(uri, storage_options)
        marker = f"{path}/{spec.COMPLETE_FILE}"
        # Marker first: an interrupted delete must not leave a half-deleted folder that looks complete.
        if fs.exists(marker):
            fs.rm(marker)
        fs.rm(path, recursive=True)
    if doomed:
        fs.invalidate_cache(root)
    return doomed
