"""The encode side of the ``scale`` bench item: a synthetic ImageFolder of many small JPEGs, a
stand-in encoder of about zero cost plugged into the real encode job, one job per size run in a
child process (the job's driver: its memory is the driver's), and per-step costs on one core.

The stand-in is **not** an encoder and never a user's choice: :class:`StandInShardEncoder` takes the
place of :class:`pipeline.encode.ShardEncoder` (same constructor, same call), and its module
average-pools the 256 px crop to a [8, 4, 4] "latent". Everything else is the encode job as users run
it: the source listing, the plan, Ray Data's read tasks (fetch, sha256, decode, ADM crop), the
actor step (micro-batches, image and flip), the write tasks (``StoreWriter.write_shard``: objects,
partial statistics, the completion record) and finalize. So what the job costs besides the encoder
is measured at 5,000 to 20,000 images, where a per-image cost that grows with the job shows.

The latent bytes of a real store (DINOv2-B: [768, 16, 16] float16, 48x the stand-in's) are a cost of
the write step the stand-in does not pay; :func:`real_size_store` measures it on real-size shards apart.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import threading
import time

import numpy as np

from bench.drills.tools import json_from_child, proc_tree

STANDIN_CHANNELS, STANDIN_GRID = 8, 4
NUM_CLASSES = 1000  # as ImageNet-1k: the class listing is the same at every size
SMALL_JPEG_PX = 32
RAY_CPUS = 2
RAY_OBJECT_STORE_BYTES = 512 * 1024 * 1024
MARKER = ".scale-images"  # a folder holding this file was made by us (complete) and is reused


# --------------------------------------------------------------------------------------------
# synthetic JPEGs


def _smooth_image(rng: np.random.Generator, width: int, height: int, noise: float):
    """A random colour field upsampled from 4 x 3 cells, plus Gaussian noise: photo-like JPEG sizes."""
    from PIL import Image

    cells = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(cells, "RGB").resize((width, height), Image.BICUBIC)
    if noise:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (height, width, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


def make_small_jpegs(root: str, count: int, px: int = SMALL_JPEG_PX, seed: int = 0) -> str:
    """``count`` px x px JPEGs in an ImageFolder ``root/train/<class>/<class>_<i>.JPEG`` spread over
    :data:`NUM_CLASSES` classes; kept when already complete (a marker file says so). Returns root."""
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == {"count": count, "px": px, "seed": seed}:
                return root
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = f"c{i % NUM_CLASSES:04d}"
        folder = os.path.join(root, "train", cls)
        if i < NUM_CLASSES:
            os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        _smooth_image(rng, px, px, 6.0).save(buf, "JPEG", quality=90)
        with open(os.path.join(folder, f"{cls}_{i:07d}.JPEG"), "wb") as f:
            f.write(buf.getvalue())
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"count": count, "px": px, "seed": seed}, f)
    return root


def imagenet_like_jpegs(count: int, seed: int = 1) -> list[bytes]:
    """``count`` JPEGs of ImageNet's typical size (500 x 375, quality 90, about 100-150 KB)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        _smooth_image(rng, 500, 375, 10.0).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------
# the stand-in encoder


class StandInModule:
    """uint8-derived float [n, 3, R, R] -> [n, 8, 4, 4]: R/4 x R/4 average pooling, the 3 colour
    means repeated to 8 channels. What ``rows_with_holes`` needs of an encoder: ``spec.hidden_size``
    and ``grid_size``. Costs about 0.1 ms per image."""

    def __init__(self):
        self.spec = dataclasses.make_dataclass("StandInSpec", [("hidden_size", int)])(STANDIN_CHANNELS)
        self.grid_size = STANDIN_GRID

    def __call__(self, x):
        import torch.nn.functional as F

        pooled = F.adaptive_avg_pool2d(x, STANDIN_GRID)  # [n, 3, 4, 4]
        reps = -(-STANDIN_CHANNELS // 3)
        return pooled.repeat(1, reps, 1, 1)[:, :STANDIN_CHANNELS]

    def state_dict(self) -> dict:
        return {}


def _standin_actor_class():
    from pipeline.encode import ShardEncoder

    class StandInShardEncoder(ShardEncoder):
        """The encode job's actor with :class:`StandInModule` in place of the ViT (bench only)."""

        def __init__(self, *, cfg: dict, weights_ref: list, weights_sha256: str, threads: int, logical_dtype: str):
            import torch

            torch.set_num_threads(threads)
            self.encoder = StandInModule()
            self.device = torch.device("cpu")
            self.batch_size = int(cfg["batch_size"])
            self.flips = bool(cfg["flips"])
            self.logical_dtype = logical_dtype

    return StandInShardEncoder


STANDIN_WEIGHTS = {"source": "random", "ref": "bench stand-in: no weights", "layout": None, "sha256": "0" * 64,
                   "seed": 0}


def standin_job(cfg):
    """The encode job of ``cfg`` with the stand-in's latent shape and encoder section (so its store
    never passes for an encoded one: the arch says what it is). Returns (job, module)."""
    from pipeline import uri as U
    from pipeline.encode import EncodeJob, plan_encode

    module = StandInModule()
    job, _ = plan_encode(cfg, encoder=module, weights_info=dict(STANDIN_WEIGHTS))
    section = dict(job.plan.encoder, arch="bench stand-in: 64 px average pooling, not an encoder",
                   hidden_size=STANDIN_CHANNELS, patch_size=job.plan.encoder["input_size"] // STANDIN_GRID)
    plan = dataclasses.replace(job.plan, latent_shape=(STANDIN_CHANNELS, STANDIN_GRID, STANDIN_GRID), encoder=section)
    return EncodeJob(cfg, job.source, job.order, plan, U.join(cfg.out, plan.default_name()), job.encoder_name,
                     job.weights_info), module


# --------------------------------------------------------------------------------------------
# the job in a child process: the child is the job's driver


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory now (VmRSS) or its high-water mark (VmHWM) of ``pid``, KiB; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)", f.read(), re.M)
        return int(m[1]) if m else 0
    except OSError:
        return 0


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU clock ticks of ``pid`` so far (/proc/<pid>/stat); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


class _Sampler:
    """Polls the driver's resident memory and the Ray object store's bytes in use (peaks), and the
    CPU time of every process under the driver (Ray's raylet and workers are its descendants): the
    last value seen per process, so a worker that exits keeps what it had used."""

    def __init__(self, gcs_address: str, interval_s: float = 0.2):
        self.gcs_address, self.interval_s = gcs_address, interval_s
        self.cpu_ticks: dict[int, int] = {}
        self.cpu_start: dict[int, int] = {}
        self._cpu_lock = threading.Lock()
        self.rss_peak_kib = 0
        self.store_peak = 0
        self.store_error: str | None = None
        self.spilled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _store_used(self) -> tuple[int, int] | None:
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            stats = get_memory_info_reply(get_state_from_address(self.gcs_address)).store_stats
            return int(stats.object_store_bytes_used), int(stats.spilled_bytes_total)
        except Exception as e:  # noqa: BLE001 - a private Ray API: report that it failed, never fail the job
            self.store_error = f"{type(e).__name__}: {e}"
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll_cpu(self) -> None:
        seen = {pid: _cpu_ticks(pid) for pid in proc_tree(os.getpid())}
        with self._cpu_lock:
            for pid, ticks in seen.items():
                if ticks is not None:
                    self.cpu_ticks[pid] = max(ticks, self.cpu_ticks.get(pid, 0))

    def mark_cpu(self) -> None:
        """From now on: CPU time is counted from what each live process has used so far."""
        self.poll_cpu()
        with self._cpu_lock:
            self.cpu_start = dict(self.cpu_ticks)

    def cpu_seconds(self) -> float:
        """CPU seconds used by the driver's process tree since :meth:`mark_cpu`."""
        self.poll_cpu()
        with self._cpu_lock:
            used = sum(t - self.cpu_start.get(pid, 0) for pid, t in self.cpu_ticks.items())
        return used / os.sysconf("SC_CLK_TCK")

    def poll(self) -> None:
        self.poll_cpu()
        self.rss_peak_kib = max(self.rss_peak_kib, _rss_kib(os.getpid()))
        if self.store_error is None:
            got = self._store_used()
            if got:
                self.store_peak = max(self.store_peak, got[0])
                self.spilled = max(self.spilled, got[1])

    def start(self) -> "_Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()


def run_job(images_root: str, out: str, samples_per_shard: int = 256) -> dict:
    """Encode ``images_root`` with the stand-in on a local Ray started here; this process is the
    driver. Returns what was measured (see :func:`run_job_in_child`)."""
    import ray

    from pipeline.encode import EncodeConfig, _encode_pending
    from pipeline import uri as U

    cfg = EncodeConfig(encoder="dinov2", data=images_root, out=out, weights="random", split="train",
                       resolution=256, samples_per_shard=samples_per_shard, batch_size=64, num_actors=1, threads=1,
                       actor_cpus=0.5, progress=False)
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=RAY_OBJECT_STORE_BYTES)
    try:
        rss_base, hwm_base = _rss_kib(os.getpid()), _rss_kib(os.getpid(), "VmHWM")
        sampler = _Sampler(ray.get_runtime_context().gcs_address).start()
        t0 = time.perf_counter()
        job, module = standin_job(cfg)
        plan_s = time.perf_counter() - t0
        rss_after_plan = _rss_kib(os.getpid())
        writer = job.writer
        writer.create()
        pending = writer.pending_shards()
        images = job.plan.num_samples
        # ray.init started the raylet under this process; the workers are the raylet's children.
        sampler.mark_cpu()
        t1 = time.perf_counter()
        tally = _encode_pending(job, module, pending, images, actor_cls=_standin_actor_class())
        pipeline_s = time.perf_counter() - t1
        cpu_pipeline = sampler.cpu_seconds()
        rss_after_pipeline = _rss_kib(os.getpid())
        t2 = time.perf_counter()
        spec = writer.finalize()
        finalize_s = time.perf_counter() - t2
        sampler.stop()
        # The kernel's high-water mark catches a peak between two polls (finalize holds every record
        # at once for a moment); it counts only once it exceeds the mark from before the job.
        hwm = _rss_kib(os.getpid(), "VmHWM")
        peak_kib = max(sampler.rss_peak_kib, hwm if hwm > hwm_base else 0)
        fs, root = U.get_fs(job.uri)
        objects = fs.find(root)
        return {
            "images": images, "shards": job.plan.num_shards, "samples_per_shard": samples_per_shard,
            "store_uri": job.uri, "plan_s": plan_s, "pipeline_s": pipeline_s, "finalize_s": finalize_s,
            "cpu_seconds_pipeline": cpu_pipeline,
            "driver_rss_base_mib": rss_base / 1024, "driver_rss_after_plan_mib": rss_after_plan / 1024,
            "driver_rss_after_pipeline_mib": rss_after_pipeline / 1024,
            "driver_rss_peak_mib": peak_kib / 1024, "driver_rss_peak_sampled_mib": sampler.rss_peak_kib / 1024,
            "driver_rss_growth_mib": (peak_kib - rss_base) / 1024,
            "object_store_peak_mib": sampler.store_peak / 2**20, "object_store_spilled_mib": sampler.spilled / 2**20,
            "object_store_capacity_mib": RAY_OBJECT_STORE_BYTES / 2**20, "object_store_error": sampler.store_error,
            "objects_written": len(objects), "store_bytes": sum(fs.size(p) for p in objects),
            "shards_encoded": len(tally.counts), "num_valid": spec["counts"]["num_valid"],
            "execution": {k: v for k, v in tally.execution.items() if k != "shards_by_node"},
        }
    finally:
        ray.shutdown()


def run_job_in_child(images_root: str, out: str, env: dict, log_path: str, timeout_s: float = 1200.0) -> dict:
    """:func:`run_job` in a fresh Python process (its driver memory, CPU time and Ray its own); the
    result is its last stdout line (JSON). Driver RSS growth = peak VmRSS during plan, pipeline and
    finalize minus VmRSS right after Ray started. CPU seconds: driver + raylet + Ray workers (the
    driver's process tree), user + system, over the pipeline (read, encode step, write)."""
    code = ("import json, sys; from bench.scale_encode import run_job; "
            f"print(json.dumps(run_job({images_root!r}, {out!r})))")
    return json_from_child(code, env, log_path, timeout_s, f"the scale encode of {images_root}")


# --------------------------------------------------------------------------------------------
# per-step costs on one core


def _cpu_time(fn, repeats: int = 1) -> float:
    """Smallest process CPU seconds of ``fn()`` over ``repeats`` calls (this thread only does it)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def step_costs(images_root: str, sample: int = 512, imagenet_sample: int = 48) -> dict:
    """CPU seconds per image, one thread, of the read task's steps on ``sample`` of the small JPEGs
    (read, sha256, decode + ADM crop to 256 px) and of decode + crop on ImageNet-sized JPEGs."""
    import hashlib

    from pipeline.preprocess import preprocess_image_bytes
    from pipeline.sources import open_source

    source = open_source(images_root, "train")
    items = source.items[:sample]
    blobs: list[bytes] = []
    read = _cpu_time(lambda: blobs.extend(source.read_group(items))) / len(items)
    sha = _cpu_time(lambda: [hashlib.sha256(b).hexdigest() for b in blobs], 3) / len(blobs)
    crop = _cpu_time(lambda: [preprocess_image_bytes(b, 256) for b in blobs], 2) / len(blobs)
    big = imagenet_like_jpegs(imagenet_sample)
    crop_big = _cpu_time(lambda: [preprocess_image_bytes(b, 256) for b in big], 2) / len(big)
    return {"small_jpeg": {"px": SMALL_JPEG_PX, "bytes_mean": float(np.mean([len(b) for b in blobs])),
                           "read_s": read, "sha256_s": sha, "decode_crop_s": crop, "images": len(blobs)},
            "imagenet_like_jpeg": {"px": [500, 375], "bytes_mean": float(np.mean([len(b) for b in big])),
                                   "decode_crop_s": crop_big, "images": len(big),
                                   "sha256_s": _cpu_time(lambda: [hashlib.sha256(b).digest() for b in big], 3)
                                   / len(big)}}


def real_size_store(folder: str, shape: tuple[int, int, int], rows: int = 32, shards: int = 4) -> dict:
    """A store of ``shards`` shards of ``rows`` random-normal latents of ``shape`` (both orientations,
    float16, zstd) written shard by shard through ``StoreWriter.write_shard`` (the write task's work),
    then finalized. Returns its URI and the write's CPU seconds per image (one thread)."""
    import shutil

    from pipeline.store import StoreLayout, StorePlan, StoreWriter

    shutil.rmtree(folder, ignore_errors=True)
    n = rows * shards
    plan = StorePlan(kind="synthetic", num_samples=n, latent_shape=shape,
                     layout=StoreLayout(samples_per_shard=rows, flips=True),
                     source={"kind": "synthetic", "uri": None, "split": "train", "fingerprint": "0" * 64,
                             "num_items": n, "order": {"seed": 0, "granularity": "none"}},
                     classes={"num_classes": 2, "names": ["a", "b"]}, content_hash=f"bench scale {shape}")
    writer = StoreWriter(folder, plan).create()
    rng = np.random.default_rng(0)
    cpu = 0.0
    for s in range(shards):
        x = rng.standard_normal((2, rows) + tuple(shape), dtype=np.float32)
        t = time.process_time()
        writer.write_shard(s, latents=x[0], latents_flip=x[1], labels=np.zeros(rows), valid=np.ones(rows),
                           sample_ids=np.arange(s * rows, (s + 1) * rows))
        cpu += time.process_time() - t
        del x
    t = time.perf_counter()
    writer.finalize()
    finalize_s = time.perf_counter() - t
    return {"uri": writer.uri, "latent_shape": list(shape), "rows_per_shard": rows, "shards": shards, "images": n,
            "write_s": cpu / n, "latent_bytes_per_image": 2 * int(np.prod(shape)) * 2,
            "finalize_s": finalize_s, "finalize_s_per_shard": finalize_s / shards}


__all__ = ["StandInModule", "imagenet_like_jpegs", "make_small_jpegs", "real_size_store", "run_job", "run_job_in_child",
           "standin_job", "step_costs"]
