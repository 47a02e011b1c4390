"""The encode job: images -> frozen encoder -> a sharded Zarr v3 latent store, with Ray Data.

One job encodes one split of one source with one encoder, once::

    plan (driver)      list the source once, fix the encoder's weights (checksum), build the
                       StorePlan; its id names the store under ``out``. A complete store there
                       is the answer: return its URI (no decoding, no encoding, no Ray).
    read (CPU tasks)   one task per shard: fetch the shard's image bytes, sha256 them, decode
                       and ADM-crop each one. A file that fails becomes an invalid hole with its
                       reason; the job never dies on one image and never drops one silently.
    encode (actors)    an actor pool holding the encoder (one GPU each, or CPU threads pinned)
                       encodes a shard in fixed micro-batches, image and horizontal flip.
    write (CPU tasks)  one task per shard writes it whole: StoreWriter.write_shard (objects,
                       then the completion record).
    finalize (driver)  statistics, spec, then COMPLETE; a run log goes *outside* the store.

The read, encode and write steps are plain functions in :mod:`pipeline.encode_tasks`; this module
plans the job, runs them on Ray (:class:`ShardEncoder` is the actor) and finalizes the store.

Row p of the store is source item ``order[p]`` with ``order = storage_order(source, seed)``;
shard s holds rows ``[s * S, (s + 1) * S)``. A job only processes shards without a completion
record, so a job killed at any point resumes where it stopped, and two jobs on one output write
the same bytes to the same objects. The micro-batch partition of a shard depends on the shard
alone (its valid rows, in row order, ``batch_size`` at a time), so the latents are bit-identical
whatever the number of actors, a restarted actor, or an interrupted run (on the same hardware and
software, with the same ``batch_size`` and ``threads``: those change float rounding, not the
store's id).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from pipeline import uri as U
from pipeline.encode_tasks import WRITE_FAILED, encode_pixels, read_shard, rows_with_holes, write_shard_row
from pipeline.preprocess import DEFAULT_MAX_PIXELS
from pipeline.sources import Source, open_source, storage_order
from pipeline.store import DEFAULT_SAMPLES_PER_SHARD, StoreLayout, StorePlan, StoreWriter
from pipeline.store.layout import DEFAULT_COMPRESSOR
from schemas.errors import UserError

log = logging.getLogger(__name__)

ENCODER_OUTPUT = "last block patch tokens, final LayerNorm without affine"
RUNS_DIR = "_runs"


class EncodeError(UserError, RuntimeError):
    """The job cannot run as configured (bad option combination, no resources for it)."""


@dataclass
class EncodeConfig:
    """One encode job. Options that change the store's content are part of its id (encoder,
    weights, resolution, split, data, layout options, order seed); the others (batch size, actors,
    threads, Ray) only change how fast it is written."""

    encoder: str = "dinov2"  # dinov2 | siglip2 (alias siglip) | mae
    data: str | None = None  # ImageFolder or Parquet URI; None: the built-in sample data
    out: str = "out/stores"  # root; the store goes to <out>/<plan.default_name()>
    weights: str = "hub"  # "hub" | path or URI of a weights file or save_pretrained folder | "random"
    weights_seed: int = 0  # seed of weights="random"
    split: str = "train"
    resolution: int = 256  # ADM crop size (256 or 512)
    class_index: str | None = None  # file fixing the class -> label mapping (subsets of ImageNet)
    # store layout (StoreLayout)
    dtype: str = "float16"  # float16 | float32 | bfloat16 (stored as uint16 bit patterns)
    compressor: str = DEFAULT_COMPRESSOR  # blosc-zstd | blosc-lz4 | zstd | none (schemas.store_v1.COMPRESSORS)
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    samples_per_chunk: int | None = None  # None: about 4 MB per chunk
    flips: bool = True  # also store the latents of the horizontally flipped images
    order_seed: int = 0  # seed of the storage-order permutation of the rows
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are recorded as decompression bombs
    # execution (not part of the store id)
    batch_size: int = 32  # images per encoder forward (micro-batch)
    num_actors: int | None = None  # encoder actors; None: one per GPU, else 1
    threads: int | None = None  # torch threads per actor; None: CPUs / actors (CPU), 4 (GPU)
    actor_cpus: float | None = None  # Ray CPUs each actor reserves; None: its threads, leaving 1 CPU free
    read_tasks: int | None = None  # concurrent read/decode tasks; None: as many as Ray schedules
    max_task_retries: int = 3  # retries of a shard whose actor died (actors are always replaced)
    # Custom Ray resources (as nodes advertise them: `ray start --resources '{"encode_io": 8}'`) that each
    # read/write task, and each encoder actor, asks for besides its CPUs/GPU: they keep the job's work on
    # the nodes that offer them and cap how much of it runs on each. None: any node with the CPUs/GPU.
    task_resources: dict | None = None
    actor_resources: dict | None = None
    ray_address: str | None = None  # existing cluster; None: reuse an initialized Ray or start one
    storage_options: dict | None = None  # fsspec options for data, weights and out (e.g. S3 endpoint)
    progress: bool = True  # progress bar on stderr
    # test-only: timm create_model kwargs (e.g. {"depth": 2}); recorded in the encoder's arch
    encoder_overrides: dict | None = None


@dataclass
class EncodeJob:
    """What the driver knows before encoding: the listed source, the row order, the plan."""

    config: EncodeConfig
    source: Source
    order: np.ndarray  # int64 [N]: row p holds source item order[p]
    plan: StorePlan
    uri: str
    encoder_name: str
    weights_info: dict

    @property
    def writer(self) -> StoreWriter:
        return StoreWriter(self.uri, self.plan, self.config.storage_options)


@dataclass
class EncodeResult:
    """What a job did. ``images_per_s`` counts source images (each encoded once per orientation)."""

    uri: str
    store_id: str
    reused: bool  # a complete store was found; nothing was computed
    num_shards: int
    shards_encoded: int = 0
    images_encoded: int = 0
    num_failed: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0  # the Ray pipeline alone
    images_per_s: float = 0.0
    run_log: str | None = None
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# plan


def _arch_string(timm_arch: str, overrides: dict | None) -> str:
    """The timm architecture, with test-only overrides spelled out so such a store never passes
    for one of the real encoder."""
    if not overrides:
        return timm_arch
    return timm_arch + "[" + ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(overrides.items())) + "]"


def build_configured_encoder(cfg: EncodeConfig, weights: str | None = None):
    """(RAEEncoder, weights_info) for the job's encoder, resolution and overrides (CPU, eval)."""
    from pipeline.encoders import build_encoder

    overrides = dict(cfg.encoder_overrides or {})
    unsupported = sorted(set(overrides) - {"depth"})
    if unsupported:
        raise EncodeError(f"encoder_overrides {unsupported} are not supported (only 'depth', for tests)")
    depth = int(overrides["depth"]) if "depth" in overrides else None
    return build_encoder(
        cfg.encoder, cfg.resolution, weights=weights if weights is not None else cfg.weights, seed=cfg.weights_seed,
        depth=depth,
    )


def _encoder_section(name: str, cfg: EncodeConfig, weights_info: dict) -> dict:
    from pipeline.encoders import ENCODERS, encoder_input_size

    spec = ENCODERS[name]
    return {
        "name": name,
        "arch": _arch_string(spec.timm_arch, cfg.encoder_overrides),
        "input_size": encoder_input_size(name, cfg.resolution),
        "patch_size": spec.patch_size,
        "hidden_size": spec.hidden_size,
        "num_prefix_tokens": spec.num_prefix_tokens,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "output": ENCODER_OUTPUT,
        "weights": dict(weights_info),
    }


def _layout(cfg: EncodeConfig) -> StoreLayout:
    return StoreLayout(
        dtype=cfg.dtype,
        compressor=cfg.compressor,
        samples_per_shard=cfg.samples_per_shard,
        samples_per_chunk=cfg.samples_per_chunk,
        flips=cfg.flips,
    )


def _preprocessing_section(cfg: EncodeConfig) -> dict:
    return {
        "crop": "adm_center_crop",
        "resolution": cfg.resolution,
        "encoder_resize": "bicubic",
        "antialias": False,
        "align_corners": False,
        "flip": "horizontal" if cfg.flips else "none",
        "max_pixels": cfg.max_pixels,
    }


def _source_section(source: Source, cfg: EncodeConfig) -> dict:
    return {
        "kind": source.kind,
        "uri": source.uri,
        "split": cfg.split,
        "fingerprint": source.fingerprint(),
        "num_items": len(source.items),
        "order": {"seed": cfg.order_seed, "granularity": "file" if source.kind == "imagefolder" else "row_group"},
        # Files in class folders without an image extension: not samples, but never dropped unseen.
        "ignored": list(source.ignored),
    }


def _data_uri(cfg: EncodeConfig) -> str:
    if cfg.data is not None:
        return U.normalize(cfg.data)
    from pipeline.sample_data import ensure_sample_data

    return ensure_sample_data()


def plan_encode(cfg: EncodeConfig, *, encoder=None, weights_info: dict | None = None) -> tuple[EncodeJob, Any]:
    """Everything known before encoding, and the encoder built for it.

    The options, the data's location and the output location are checked first (one short probe
    each: a wrong ``data`` path, an unwritable ``out``, missing credentials or a dead endpoint fail
    in seconds); then the encoder is built, so that unavailable weights (hub offline, a wrong file)
    fail before the source is listed. Returns (job, encoder); pass ``encoder``/``weights_info`` to
    reuse an encoder already built with the same settings.
    """
    from pipeline.encoders import latent_shape, resolve_encoder_name

    name = resolve_encoder_name(cfg.encoder)
    _check_options(cfg)
    data = _check_locations(cfg)
    if encoder is None or weights_info is None:
        encoder, weights_info = build_configured_encoder(dataclasses.replace(cfg, encoder=name))
    source = open_source(data, cfg.split, cfg.class_index, cfg.storage_options)
    unlabelled = sum(1 for it in source.items if it.label < 0)
    if unlabelled:
        raise EncodeError(
            f"{source.root}: {unlabelled} item(s) have no label (-1); a latent store needs a class for every "
            "image (the Hugging Face test split is unlabelled: encode train or validation)"
        )
    if source.ignored:
        log.warning(
            "%s: %d file(s) without an image extension are not encoded (listed in the spec's source.ignored): %s",
            source.root, len(source.ignored), ", ".join(source.ignored[:5]) + (" ..." if len(source.ignored) > 5 else ""),
        )
    order = storage_order(source, cfg.order_seed)
    plan = StorePlan(
        kind="encoded",
        num_samples=len(source.items),
        latent_shape=latent_shape(name, cfg.resolution),
        layout=_layout(cfg),
        encoder=_encoder_section(name, cfg, weights_info),
        preprocessing=_preprocessing_section(cfg),
        source=_source_section(source, cfg),
        classes={"num_classes": len(source.class_names), "names": list(source.class_names)},
    )
    uri = U.join(cfg.out, plan.default_name())
    job = EncodeJob(cfg, source, order, plan, uri, name, weights_info)
    return job, encoder


def _check_options(cfg: EncodeConfig) -> None:
    """Fail on bad options before anything is built or listed."""
    for key in ("batch_size", "samples_per_shard", "max_pixels", "resolution"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("num_actors", "threads", "read_tasks"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1 (or unset), got {value}")
    _layout(cfg).resolved((1, 1, 1))  # dtype, compressor, chunking
    for key in ("task_resources", "actor_resources"):
        _custom_resources(getattr(cfg, key), key)
    given = sorted(set(cfg.storage_options or {}) & set(U.CREDENTIAL_OPTIONS)
                   | set((cfg.storage_options or {}).get("client_kwargs") or {}) & set(U.CREDENTIAL_CLIENT_OPTIONS))
    if given:
        raise EncodeError(
            f"storage_options hold credentials ({', '.join(given)}): they would travel to the Ray workers in task "
            "arguments. Give credentials the way AWS clients find them (environment variables, an AWS profile or "
            "config file, an instance role): see 'Multi-node' in the README"
        )


def _check_locations(cfg: EncodeConfig) -> str:
    """The data's URI, after one short probe of it and of the output location (before the encoder is
    built, before Ray starts): a missing data path is a SourceError, an output location that cannot be
    written or reached (a file in the way, permissions, credentials, endpoint) a StorageError naming it."""
    from pipeline.sources import SourceError

    data = _data_uri(cfg)
    if not U.check_location(data, cfg.storage_options):
        raise SourceError(f"no such folder or file: {data} (the data to encode)")
    U.check_location(cfg.out, cfg.storage_options, write=True)
    return data


# --------------------------------------------------------------------------------------------
# the job's side of the per-shard steps (the steps themselves: pipeline/encode_tasks.py)


def shard_descriptor(job: EncodeJob, shard: int) -> dict:
    """The input row of one shard: its number, first row and items (JSON, in row order)."""
    start, stop = job.plan.shard_bounds(shard)
    items = [job.source.items[int(i)] for i in job.order[start:stop]]
    return {
        "shard": shard,
        "start": start,
        "items": json.dumps([[it.index, it.key, it.uri, it.row, it.size, it.label, it.group] for it in items]),
    }


class ShardEncoder:
    """Ray Data actor: holds the encoder, encodes one shard per call (``batch_size=1`` rows).

    The weights come from the driver through the object store (so workers need neither the hub
    nor the driver's files) and are checked against the plan's checksum before any use.
    """

    def __init__(self, *, cfg: dict, weights_ref: list, weights_sha256: str, threads: int, logical_dtype: str):
        import ray
        import torch

        from pipeline.encoders import state_dict_checksum

        # This actor's process is ours: pin its intra-op threads so actors do not oversubscribe.
        torch.set_num_threads(threads)
        config = EncodeConfig(**cfg)
        encoder, _ = build_configured_encoder(config, weights="random")
        state = {k: torch.from_numpy(np.array(v)) for k, v in ray.get(weights_ref[0]).items()}
        encoder.load_timm_state_dict(state, source="weights from the driver")
        got = state_dict_checksum(encoder.state_dict())
        if got != weights_sha256:
            raise EncodeError(f"encoder weights on this worker have sha256 {got}, the plan says {weights_sha256}")
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.encoder = encoder.to(self.device).eval()
        self.batch_size = config.batch_size
        self.flips = config.flips
        self.logical_dtype = logical_dtype

    def __call__(self, batch: dict) -> dict:
        pixels, ok = batch["pixels"][0], np.asarray(batch["ok"][0], dtype=bool)
        lat, lat_flip = encode_pixels(self.encoder, pixels[ok], self.batch_size, self.flips, self.device)
        out = {"shard": batch["shard"], "ok": batch["ok"], "meta": batch["meta"]}
        names = ["latents"] + (["latents_flip"] if self.flips else [])
        for name, x in zip(names, (lat, lat_flip)):
            out[name] = rows_with_holes(x, ok, self.encoder, self.logical_dtype)[None]
        return out


# --------------------------------------------------------------------------------------------
# Ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[bool]:
    """Connect to ``address``, or reuse an initialized Ray, or start a local one. Yields whether
    this call started (or connected) it; only then is it shut down (disconnected) afterwards."""
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def worker_storage_options(uri: str, storage_options: dict | None) -> dict | None:
    """The fsspec options the Ray workers get for ``uri`` (the data or the output).

    Never a credential: nothing secret goes into runtime_env, task arguments or the object store
    (Ray writes those into its session logs). Workers find credentials the way AWS clients do: on a
    local Ray started by the job, the environment they inherit from the driver; on an existing
    cluster, their own environment, AWS config files or instance role. One non-secret setting
    travels for ``s3://`` URIs: the endpoint the driver uses (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``, unless the options name one), because the workers must write the very
    storage the driver planned against and will finalize, not whatever endpoint their own
    configuration names.
    """
    options = dict(storage_options or {})
    if U.is_local(uri) or not str(uri).startswith(("s3://", "s3a://")):
        return options or None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not options.get("endpoint_url") and not (options.get("client_kwargs") or {}).get("endpoint_url"):
        options["endpoint_url"] = endpoint
    return options or None


@dataclass
class _Resources:
    num_actors: int
    threads: int
    actor_cpus: float
    actor_gpus: int


def _resources(cfg: EncodeConfig) -> _Resources:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), int(total.get("GPU", 0))
    if gpus:
        num_actors = cfg.num_actors or gpus
        if num_actors > gpus:
            raise EncodeError(f"num_actors={num_actors} GPU actors asked, the Ray cluster has {gpus} GPU(s)")
        threads = cfg.threads or 4
    else:
        num_actors = cfg.num_actors or 1
        threads = cfg.threads or max(1, int(cpus) // num_actors)
    # Actors reserve the CPUs their threads use, but one CPU always stays for reading/decoding and
    # writing: with every CPU held by actors the read tasks could never be scheduled.
    actor_cpus = min(float(threads), max(cpus - 1.0, 0.0) / num_actors)
    if cfg.actor_cpus is not None:
        actor_cpus = float(cfg.actor_cpus)
    return _Resources(num_actors, threads, round(actor_cpus, 4), 1 if gpus else 0)


def _custom_resources(resources: dict | None, key: str = "resources") -> dict:
    """Ray remote arguments asking for ``resources`` (custom resource name -> amount per task/actor)."""
    if not resources:
        return {}
    if not isinstance(resources, dict):
        raise EncodeError(f"{key} must map custom Ray resource names to amounts, got {resources!r}")
    bad = {k: v for k, v in resources.items()
           if k in ("CPU", "GPU", "memory", "object_store_memory") or isinstance(v, bool)
           or not isinstance(v, (int, float)) or not v > 0}
    if bad:
        raise EncodeError(f"{key} {bad}: give positive amounts of custom resources (CPUs and GPUs are set by "
                          "actor_cpus, threads and num_actors)")
    return {"resources": {str(k): float(v) for k, v in resources.items()}}


def _weights_for_workers(encoder) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in encoder.state_dict().items()}


def _run_pipeline(job: EncodeJob, encoder, pending: list[int], on_shard, actor_cls: type | None = None) -> dict:
    """Read -> encode -> write the pending shards with Ray Data; ``on_shard(counts)`` per shard
    written (in completion order). Returns facts about the execution for the run log.
    ``actor_cls``: the encode step's actor (default :class:`ShardEncoder`; the scale bench plugs
    in a stand-in of no cost with the same constructor and call)."""
    import ray
    import ray.data

    cfg = job.config
    res = _resources(cfg)
    weights_ref = ray.put(_weights_for_workers(encoder))
    # The actor builds the encoder from the config: it needs no storage options (nor any credential).
    actor_cfg = dataclasses.asdict(dataclasses.replace(cfg, encoder=job.encoder_name, storage_options=None))
    source = dataclasses.replace(  # items travel with each shard
        job.source, items=[], storage_options=worker_storage_options(job.source.uri, job.source.storage_options))
    writer = StoreWriter(job.uri, job.plan, worker_storage_options(job.uri, cfg.storage_options))

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries
    # Writes are idempotent (same bytes, atomic objects): a shard write that fails on a flaky store
    # is retried before the job gives up (and a rerun resumes anyway).
    ctx.retried_map_errors, ctx.max_map_retries = [WRITE_FAILED], cfg.max_task_retries
    ctx.enable_progress_bars = False  # our own progress display replaces Ray Data's bars
    try:
        ds = ray.data.from_items([shard_descriptor(job, s) for s in pending], override_num_blocks=len(pending))
        ds = ds.map(
            read_shard,
            fn_kwargs={"source": source, "resolution": cfg.resolution, "max_pixels": cfg.max_pixels},
            concurrency=cfg.read_tasks,
            **_custom_resources(cfg.task_resources),
        )
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing actor options (max_restarts...) this way but offers no
            # other one yet; the defaults (-1, -1) would retry a shard that always kills its
            # actor forever.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
            ds = ds.map_batches(
                actor_cls or ShardEncoder,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=res.num_actors),
                fn_constructor_kwargs={
                    "cfg": actor_cfg,
                    "weights_ref": [weights_ref],
                    "weights_sha256": job.weights_info["sha256"],
                    "threads": res.threads,
                    "logical_dtype": cfg.dtype,
                },
                num_cpus=res.actor_cpus,
                num_gpus=res.actor_gpus,
                # Dead actors are always replaced; a shard is retried on the new actor a few times.
                ray_remote_args_fn=functools.partial(dict, max_restarts=-1, max_task_retries=cfg.max_task_retries),
                **_custom_resources(cfg.actor_resources),
            )
        ds = ds.map(write_shard_row, fn_kwargs={"writer": writer}, **_custom_resources(cfg.task_resources))
        for counts in ds.iter_rows():
            on_shard(counts)
    finally:
        ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries = saved
    return {
        "num_actors": res.num_actors,
        "threads_per_actor": res.threads,
        "actor_cpus": res.actor_cpus,
        "actor_gpus": res.actor_gpus,
        "ray_cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
    }


class _Progress:
    """images/s, shards done/total and ETA on stderr (tqdm); silent when disabled."""

    def __init__(self, enabled: bool, images: int, shards_done: int, shards_total: int):
        self.shards_done, self.shards_total = shards_done, shards_total
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=images, unit="img", file=sys.stderr, desc="encode", dynamic_ncols=True)
            self._postfix()

    def _postfix(self):
        self.bar.set_postfix_str(f"shards {self.shards_done}/{self.shards_total}")

    def update(self, counts: dict):
        self.shards_done += 1
        if self.bar is not None:
            self.bar.update(counts["images"])
            self._postfix()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# the job


def encode(cfg: EncodeConfig) -> EncodeResult:
    """Run one encode job; returns where the store is and what was done.

    A complete store at the planned location is reused after that one check (no Ray, no
    decoding, no encoding). Otherwise only the shards without a completion record are processed,
    then the store is finalized and a run log is written under ``<out>/_runs/``.
    """
    t0 = time.perf_counter()
    started_at = time.time()
    job, encoder = plan_encode(cfg)
    writer = job.writer
    plan = job.plan
    if writer.is_complete():
        log.info("store %s is complete: reusing it", job.uri)
        return EncodeResult(job.uri, plan.store_id, True, plan.num_shards, seconds=time.perf_counter() - t0)

    writer.create()
    pending = writer.pending_shards()
    images = sum(plan.shard_bounds(s)[1] - plan.shard_bounds(s)[0] for s in pending)
    log.info(
        "store %s: %d of %d shard(s) to encode (%d images)", job.uri, len(pending), plan.num_shards, images
    )
    tally = _encode_pending(job, encoder, pending, images)
    spec = writer.finalize()
    _remove_stale_temp_files(job.uri, before=started_at)
    result = EncodeResult(
        uri=job.uri,
        store_id=plan.store_id,
        reused=False,
        num_shards=plan.num_shards,
        shards_encoded=len(tally.counts),
        images_encoded=tally.images,
        num_failed=spec["counts"]["num_failed"],
        seconds=time.perf_counter() - t0,
        encode_seconds=tally.seconds,
        images_per_s=tally.images / tally.seconds if tally.images and tally.seconds > 0 else 0.0,
        details=tally.execution,
    )
    result.run_log = _write_run_log(job, result, started_at)
    return result


@dataclass
class _Tally:
    """Shards written by one pipeline run, with the wall time each record was written."""

    counts: list[dict] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    execution: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return sum(c["images"] for c in self.counts)


def _encode_pending(job: EncodeJob, encoder, pending: list[int], images: int, actor_cls: type | None = None) -> _Tally:
    """Run the Ray pipeline over the pending shards with a progress display (nothing if none)."""
    tally = _Tally()
    if not pending:
        return tally
    plan = job.plan
    progress = _Progress(job.config.progress, images, plan.num_shards - len(pending), plan.num_shards)

    def on_shard(counts: dict) -> None:
        tally.counts.append(counts)
        tally.done_at.append(counts["written_at"])
        progress.update(counts)

    start = time.time()
    try:
        with ray_session(job.config.ray_address):
            tally.execution = _run_pipeline(job, encoder, pending, on_shard, actor_cls)
    finally:
        progress.close()
    tally.seconds = time.time() - start
    if len(tally.counts) > 1:
        # From the first shard on, actors are up and the pipeline is full: the rate a long job runs at.
        order = sorted(range(len(tally.counts)), key=lambda i: tally.done_at[i])
        first, last = order[0], order[-1]
        later = tally.images - tally.counts[first]["images"]
        tally.execution["steady_images_per_s"] = later / max(tally.done_at[last] - tally.done_at[first], 1e-9)
        tally.execution["first_shard_s"] = tally.done_at[first] - start
    # Which Ray node wrote how many shards (each shard's record names its node).
    by_node = collections.Counter(c.get("node") or "?" for c in tally.counts)
    tally.execution["shards_by_node"] = dict(sorted(by_node.items()))
    return tally


def _remove_stale_temp_files(store_uri: str, before: float) -> None:
    """Delete temporary files a killed job left in a local store (``.tmp-*`` from atomic writes).

    Only files older than this job's start: a live concurrent job's temporary file exists for
    the milliseconds of one write, long after that. Object stores have no temporary objects.
    """
    if not U.is_local(store_uri):
        return
    for folder, _, files in os.walk(U.normalize(store_uri)):
        for name in files:
            path = os.path.join(folder, name)
            if not name.startswith(".tmp-"):
                continue
            try:
                if os.stat(path).st_mtime < before:
                    os.unlink(path)
            except FileNotFoundError:
                pass  # its writer renamed it meanwhile


def _write_run_log(job: EncodeJob, result: EncodeResult, started_at: float) -> str:
    """A JSON record of this run beside the stores (time and host are fine here, not inside)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
    uri = U.join(job.config.out, RUNS_DIR, f"{job.plan.store_id}-{stamp}-{os.getpid()}.json")
    cfg = dataclasses.asdict(job.config)
    cfg["storage_options"] = sorted(cfg["storage_options"] or {})  # keys only: no secrets in logs
    record = {
        "store_uri": job.uri,
        "store_id": job.plan.store_id,
        "config": cfg,
        "result": {k: v for k, v in dataclasses.asdict(result).items() if k not in ("run_log", "details")},
        "execution": result.details,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    try:
        U.write_json(uri, record, job.config.storage_options)
    except OSError as e:  # the store is finished; a missing log must not fail the job
        log.warning("could not write the run log %s: %s", uri, e)
        return None
    return uri


# --------------------------------------------------------------------------------------------
# measurement


def encoder_forward_throughput(
    cfg: EncodeConfig, num_images: int | None = None, repeats: int = 1, pixels: np.ndarray | None = None
) -> dict:
    """Bare encoder speed in this process: images/s of :func:`encode_pixels` on uint8 images
    [n, 3, R, R] already in memory (``pixels``, or ``num_images`` random ones), with the job's
    threads, micro-batch and forwards per image (two with flips), best of ``repeats``. The same
    encoder the job builds; nothing is read, decoded or written.
    """
    import torch

    threads = cfg.threads or torch.get_num_threads()
    if pixels is None:
        shape = (num_images or cfg.batch_size, 3, cfg.resolution, cfg.resolution)
        pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    encoder, _ = build_configured_encoder(dataclasses.replace(cfg, weights="random"))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    encoder = encoder.to(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encode_pixels(encoder, pixels[: cfg.batch_size], cfg.batch_size, cfg.flips, device)  # warm-up, full batch
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            encode_pixels(encoder, pixels, cfg.batch_size, cfg.flips, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(previous)
    return {
        "images": len(pixels),
        "seconds": best,
        "images_per_s": len(pixels) / best,
        "threads": threads,
        "batch_size": cfg.batch_size,
        "forwards_per_image": 2 if cfg.flips else 1,
        "device": device.type,
    }


__all__ = [
    "EncodeConfig",
    "EncodeError",
    "EncodeJob",
    "EncodeResult",
    "ShardEncoder",
    "encode",
    "encoder_forward_throughput",
    "plan_encode",
    "shard_descriptor",
    "worker_storage_options",
]
