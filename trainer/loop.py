"""The stage-independent half of a training run, shared by ``train-dit`` and ``fit-decoder``.

A stage's trainer subclasses :class:`TrainLoop` and keeps only what is its own (model, losses,
data, what a step computes, what a checkpoint holds). The base does the rest, the same way for
every stage::

    setup    _init_run()            process group (torchrun) and device, run directory URI
             load_resume_checkpoint()  the run directory's newest complete checkpoint that loads
                                    intact, checked: same checkpoint kind, same store id (else
                                    TrainError); a corrupt newer one is set aside with a warning
             _start_logging()       RunLogger (metrics.jsonl, TensorBoard, progress), config.json
                                    (and which keys changed since the last run), the announcement
    loop     train()                batch (timed as data wait) -> run_step -> every rank agrees on
                                    SIGTERM -> report -> checkpoint every ckpt_every / at the end /
                                    on SIGTERM -> barrier; close() always
             report()               window means every log_every steps, with samples/s, steps/s
                                    and the data-wait fraction
             save()                 rank 0 writes (trainer/checkpoint.py), prunes, flushes the log,
                                    redraws the loss curve, then after_save(); other ranks go on
                                    (the final barrier waits for rank 0)

The non-finite guard lives in the subclasses' steps (``trainer.optim.check_finite`` before any
state changes), so a NaN stops the run without saving: the newest checkpoint stays the last good one.

Hooks a subclass provides: ``run_step(batch) -> {metric: float}``, ``batches()`` (an iterable of
batches), ``checkpoint_payload() -> save_checkpoint keyword arguments``, ``result(stopped_by)``,
``describe_run()`` (the announcement line), and the properties ``samples_seen``, ``epoch`` and
``global_batch``. ``on_train_start()``, ``after_save(uri)`` and ``train_context()`` are optional.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
from typing import Any, ClassVar, Iterable, Iterator, TypeVar

import numpy as np
import torch

from pipeline import uri as uri_lib
from pipeline.config import ConfigError, from_dict, to_dict
from schemas.errors import UserError
from trainer import distributed
from trainer.checkpoint import (
    SET_ASIDE_MARKER,
    Checkpoint,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
    set_aside_checkpoint,
)
from trainer.runlog import RunLogger, SigtermHandler, StepTimer

T = TypeVar("T")

CONFIG_FILE = "config.json"
# Exit code of train-dit / fit-decoder stopped by SIGTERM after saving (the shell's 128 + SIGTERM):
# non-zero, so `train-dit ... && sample ...` does not go on with an unfinished model.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
LAST_VALUE_KEYS = ("lr", "disc_lr")  # logged as their value at the window's last step, not a mean


class TrainError(UserError, ValueError):
    """Inputs a trainer refuses (store, run directory, --init-from, statistics); says which and why."""


def newest_checkpoint(run_dir: str, storage_options: dict | None = None) -> str | None:
    """URI of the newest complete checkpoint of ``run_dir``, None when it has none."""
    complete = [e.uri for e in list_checkpoints(run_dir, storage_options) if e.complete]
    return complete[-1] if complete else None


def store_meta(store) -> dict:
    """The ``meta["store"]`` of a checkpoint trained on ``store`` (a LatentStore)."""
    return {"store_id": store.store_id, "uri": store.uri, "latent_shape": list(store.latent_shape)}


def check_resume(meta, store, run_dir: str, kind: str) -> None:
    """Resuming needs a checkpoint of the same kind, trained on the same store."""
    if meta.kind != kind:
        raise TrainError(f"run directory {run_dir} holds {meta.kind!r} checkpoints, not {kind!r} ones")
    saved = (meta.store or {}).get("store_id")
    if saved != store.store_id:
        raise TrainError(
            f"run directory {run_dir} was trained on store {saved} ({(meta.store or {}).get('uri')}); "
            f"--store {store.uri} is store {store.store_id}. Resuming needs the same store: pass that store, "
            "or use a new --run-dir (with --init-from to fine-tune on this store)"
        )


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


@contextlib.contextmanager
def float32_matmul_precision(device: torch.device, tf32: bool) -> Iterator[None]:
    """TF32 float32 matmuls on CUDA while training; the previous setting is restored."""
    if device.type != "cuda" or not tf32:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def total_steps(cfg, num_valid: int) -> int:
    """Steps to train to: ``train.max_steps``, or ceil(``train.epochs`` * N / ``data.global_batch``),
    the smaller (a stage's config; ``check_steps`` has made sure one of them is set)."""
    limits = []
    if cfg.train.max_steps is not None:
        limits.append(cfg.train.max_steps)
    if cfg.train.epochs is not None:
        limits.append(math.ceil(cfg.train.epochs * num_valid / cfg.data.global_batch))
    return min(limits)


def check_steps(cfg) -> None:
    """ConfigError unless ``train.max_steps`` or ``train.epochs`` says how long to train."""
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        raise ConfigError("set train.max_steps or train.epochs (both: whichever comes first)")


def mix_seed(tag: int, *parts: int) -> int:
    """A 63-bit seed from a stage's ``tag`` and integers; nearby inputs give unrelated seeds
    (SeedSequence hashing)."""
    hi, lo = np.random.SeedSequence([tag, *(int(p) for p in parts)]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


def read_run_config(cls: type[T], run_dir: str, storage_options: dict | None = None) -> T:
    """The resolved config (a ``cls`` tree) a run directory was trained with: its config.json."""
    return from_dict(cls, uri_lib.read_json(uri_lib.join(run_dir, CONFIG_FILE), storage_options))


def window_means(window: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the steps of the window that report it (``lr``-like keys: the last
    value). Metrics that only some steps have (a term that starts mid-window) average those steps."""
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for m in window for k in m))
    for key in keys:
        values = [m[key] for m in window if key in m]
        out[key] = values[-1] if key in LAST_VALUE_KEYS else sum(values) / len(values)
    return out


class TrainLoop:
    """Run directory, resume, logging, the loop, checkpoints and SIGTERM for one stage's trainer.

    The subclass's ``__init__`` calls, in order: :meth:`_init_run`, its own setup (store, model, ...,
    using :meth:`load_resume_checkpoint`), then :meth:`_start_logging`. It must set ``self.step`` (the
    optimizer steps taken, resumed ones included), ``self.total_steps``, ``self.resumed_from``,
    ``self.loader`` (iterable batches with ``samples_seen``, ``epoch`` and ``close()``) and
    ``self.train_model`` (the module the loop trains, DDP-wrapped or not).
    ``cfg.train`` must have ``log_every``, ``ckpt_every``, ``keep_last``, ``keep_every``,
    ``progress``, ``tensorboard`` and ``tf32``.
    """

    KIND: ClassVar[str] = ""  # checkpoint kind written and required on resume
    STAGE: ClassVar[str] = ""  # the command, for messages
    CURVE_TERMS: ClassVar[tuple[str, ...]] = ()  # logged parts of the loss drawn beside it in loss_curve.png

    step: int
    total_steps: int
    resumed_from: str | None

    # -- setup
    def _init_run(self, cfg, run_dir: str, storage_options: dict | None,
                  dist_info: distributed.DistInfo | None) -> None:
        self.cfg, self.so = cfg, storage_options
        self.dist = dist_info or distributed.init_distributed()
        self.device = self.dist.device
        self.run_dir = uri_lib.normalize(run_dir)

    def load_resume_checkpoint(self, store) -> Checkpoint | None:
        """The checkpoint this run continues, loaded onto the device with its training state: the run
        directory's newest complete checkpoint (of this stage and store) that reads intact; None for a
        fresh run directory.

        A complete checkpoint that does not read back (a file missing, unreadable or not matching its
        hash) is skipped for the next older one and, by rank 0, set aside (its ``COMPLETE`` marker
        renamed, files kept for inspection) so that nothing else uses it: pruning, ``sample`` and the
        next resume see the older one as the newest. Each one set aside is reported as a warning line
        when logging starts. TrainError when checkpoints exist but none is intact (also on the runs
        after: a run directory whose checkpoints were all set aside is not silently restarted)."""
        self.resume_warnings: list[str] = []
        corrupt: list[str] = []
        entries = [e for e in list_checkpoints(self.run_dir, self.so) if e.complete]
        for entry in reversed(entries):
            try:
                check_resume(read_meta(entry.uri, self.so), store, self.run_dir, self.KIND)
                return load_checkpoint(entry.uri, map_location=self.device, storage_options=self.so)
            except IncompleteCheckpointError:
                continue  # set aside by rank 0 between our listing and reading it
            except CorruptCheckpointError as e:
                corrupt.append(entry.uri)
                if self.dist.is_main:
                    set_aside_checkpoint(entry.uri, self.so)
                self.resume_warnings.append(
                    f"warning: {e}; set aside (its COMPLETE marker renamed to {SET_ASIDE_MARKER}), "
                    "resuming from the newest intact checkpoint before it"
                )
        if not corrupt:  # set aside by an earlier run (its listing shows them as incomplete)
            corrupt = [e.uri for e in list_checkpoints(self.run_dir, self.so)
                       if not e.complete and uri_lib.exists(uri_lib.join(e.uri, SET_ASIDE_MARKER), self.so)]
        if corrupt:
            raise TrainError(
                f"run directory {self.run_dir} has no intact checkpoint to resume from (corrupt, set aside: "
                f"{', '.join(u.rsplit('/', 1)[-1] for u in corrupt)}); use a new --run-dir"
            )
        return None

    def _start_logging(self) -> None:
        """The run's logger (metrics cut back to the resumed step), config.json, the announcement."""
        t = self.cfg.train
        self.logger = RunLogger(self.run_dir, self.dist.is_main, resume_step=self.step,
                                tensorboard=t.tensorboard, storage_options=self.so)
        self.last_saved = self.step if self.resumed_from else None
        self._write_config()
        self.logger.info(self.describe_run())
        for line in getattr(self, "resume_warnings", ()):
            self.logger.info(line)
        if self.resumed_from:
            self.logger.info(f"resuming from checkpoint {self.resumed_from} at step {self.step} "
                             f"(epoch {self.epoch:.3f}, {self.samples_seen} samples seen)")

    def _write_config(self) -> None:
        if not self.dist.is_main:
            return
        path = uri_lib.join(self.run_dir, CONFIG_FILE)
        new = json.loads(json.dumps(to_dict(self.cfg)))
        if self.resumed_from and uri_lib.exists(path, self.so):
            changed = sorted(diff_keys(uri_lib.read_json(path, self.so), new))
            if changed:
                self.logger.info(f"config changed since the last run: {', '.join(changed)}")
        uri_lib.write_json(path, new, self.so)

    # -- hooks
    def describe_run(self) -> str:
        raise NotImplementedError

    def run_step(self, batch) -> dict[str, float]:
        raise NotImplementedError

    def checkpoint_payload(self) -> dict:
        """Keyword arguments of :func:`trainer.checkpoint.save_checkpoint` besides the run
        directory, step and storage options (model_state, ema_state, train_state, meta, ...)."""
        raise NotImplementedError

    def after_save(self, uri: str) -> None:
        """Rank 0, after each checkpoint (e.g. a reconstruction grid)."""

    def after_step(self) -> None:
        """Every rank, after each step's logging and checkpoint (e.g. a preview grid every N steps)."""

    def result(self, stopped_by: str):
        raise NotImplementedError

    def on_train_start(self) -> None:
        """Called once inside the loop's context, before the first batch (default: train mode)."""
        self.train_model.train()

    def train_context(self) -> contextlib.AbstractContextManager:
        """Entered around the whole loop (TF32 on CUDA by default)."""
        return float32_matmul_precision(self.device, self.cfg.train.tf32)

    def batches(self) -> Iterable:
        return self.loader

    @property
    def samples_seen(self) -> int:
        return self.loader.samples_seen

    @property
    def epoch(self) -> float:
        return self.loader.epoch

    @property
    def global_batch(self) -> int:
        return self.cfg.data.global_batch

    # -- the loop
    def train(self):
        """Steps until ``total_steps`` (or a SIGTERM on any rank), logging and checkpointing on the way."""
        stopped_by, timer, window = "end", StepTimer(), []
        t = self.cfg.train
        if self.step >= self.total_steps:
            self.logger.info(f"step {self.step} is already at the {self.total_steps} steps to train: nothing to do")
        try:
            with SigtermHandler() as sigterm, self.train_context():
                self.on_train_start()
                if t.progress:
                    self.logger.start_progress(self.total_steps, self.step)
                batches = timer.iterate(self.batches())
                while self.step < self.total_steps:
                    batch = next(batches)
                    self.step += 1
                    window.append(self.run_step(batch))
                    timer.end_step(self.global_batch)
                    stop = distributed.all_reduce_any(sigterm.requested, self.device)  # every rank stops together
                    window = self.report(window, timer, force=stop)
                    if stop:
                        stopped_by = "sigterm"
                        self.logger.info(f"SIGTERM: saving a checkpoint at step {self.step} and stopping")
                    if stop or self.step % t.ckpt_every == 0 or self.step == self.total_steps:
                        self.save()
                    self.after_step()
                    if stop:
                        break
            distributed.barrier()
        finally:
            self.close()
        return self.result(stopped_by)

    def report(self, window: list[dict], timer: StepTimer, force: bool = False) -> list[dict]:
        """Move the progress bar; every ``log_every`` steps (and at the end) log the window's means and
        the rates. Returns the window still to be logged."""
        self.logger.progress(self.step)
        if not (force or self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps):
            return window
        rates = timer.pop()
        record = window_means(window)
        record.update(samples_per_s=rates["samples_per_s"], steps_per_s=rates["steps_per_s"],
                      data_wait_frac=rates["data_wait_frac"], epoch=self.epoch)
        self.logger.log(self.step, record)
        return []

    def save(self) -> None:
        """Checkpoint the current step (rank 0 writes; others go on), prune, redraw the loss curve."""
        self.last_saved = self.step
        if not self.dist.is_main:
            return
        uri = save_checkpoint(self.run_dir, self.step, storage_options=self.so, **self.checkpoint_payload())
        prune_checkpoints(self.run_dir, self.cfg.train.keep_last, self.cfg.train.keep_every, self.so)
        self.logger.flush()
        self.logger.plot_loss_curve(self.CURVE_TERMS)
        self.after_save(uri)
        self.logger.info(f"saved checkpoint {uri}")

    def checkpoint_uri(self) -> str | None:
        return newest_checkpoint(self.run_dir, self.so) if self.dist.is_main else None

    def close(self) -> None:
        self.loader.close()
        self.logger.close()


__all__ = [
    "CONFIG_FILE", "SIGTERM_EXIT_CODE", "TrainError", "TrainLoop", "check_resume", "check_steps", "diff_keys",
    "float32_matmul_precision", "mix_seed", "newest_checkpoint", "read_run_config", "store_meta", "total_steps",
    "window_means",
]
