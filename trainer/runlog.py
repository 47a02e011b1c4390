"""What a training run reports: a JSON-lines metrics log, TensorBoard scalars, a loss-curve PNG,
a progress bar, the data-wait timer, and the SIGTERM handler that lets the loop save and stop.

Files of a run directory::

    <run_dir>/logs/metrics.jsonl     one JSON object a line: {"step", "time", <metric>: value, ...}
    <run_dir>/logs/tensorboard/      TensorBoard event files (scalars of every logged metric)
    <run_dir>/loss_curve.png         loss (and LR) against step, redrawn by plot_loss_curve()

Metric names the trainers use: ``loss``, ``lr``, ``grad_norm``, ``samples_per_s``,
``data_wait_frac``. Non-finite values are written as the strings "nan", "inf", "-inf" (JSON has
no such numbers); ``float()`` reads them back.

Run directories on object stores (``s3://``): appends are impossible there, so the log files are
written to a local staging folder (``staging_dir``, default a fresh temporary folder) and
uploaded: ``metrics.jsonl`` on every :meth:`RunLogger.flush` (the trainers call it at each
checkpoint) and at :meth:`RunLogger.close`, the TensorBoard event files at close only. On resume
the existing remote ``metrics.jsonl`` is downloaded first.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import torch

from pipeline import uri as uri_lib

METRICS_FILE = "logs/metrics.jsonl"
TENSORBOARD_DIR = "logs/tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"
PROGRESS_KEYS = ("loss", "samples_per_s", "data_wait_frac")  # shown on the progress bar


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_metrics(path: str, max_step: int | None = None) -> tuple[list[dict], bool]:
    """Records of a local metrics.jsonl (those with step <= ``max_step`` when given), and whether
    anything was dropped (records past ``max_step``, or a torn last line of a killed writer)."""
    if not os.path.exists(path):
        return [], False
    records, dropped = [], False
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped = True
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            dropped = True
            continue
        if max_step is not None and rec["step"] > max_step:
            dropped = True
            continue
        records.append(rec)
    if data and not data.endswith(b"\n"):
        dropped = True
    return records, dropped


class RunLogger:
    """Metrics of one run. Every method is a no-op when ``is_main`` is False (non-zero ranks).

    resume_step: when resuming from a checkpoint at this step, records with a larger step (logged
    after that checkpoint by the interrupted run) are removed and TensorBoard purges them too.
    """

    def __init__(
        self,
        run_dir: str,
        is_main: bool = True,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        staging_dir: str | None = None,
        storage_options: dict | None = None,
    ):
        self.run_dir, self.is_main = uri_lib.normalize(run_dir), is_main
        self.storage_options = storage_options
        self.remote = not uri_lib.is_local(self.run_dir)
        self._bar = None
        self._tb = None
        self._file = None
        if not is_main:
            return
        if self.remote:
            self.local_dir = staging_dir or tempfile.mkdtemp(prefix="rae-runlog-")
        else:
            self.local_dir = self.run_dir
        self.metrics_path = os.path.join(self.local_dir, METRICS_FILE)
        os.makedirs(os.path.dirname(self.metrics_path), exist_ok=True)
        if self.remote and resume_step is not None:
            remote_metrics = uri_lib.join(self.run_dir, METRICS_FILE)
            if uri_lib.exists(remote_metrics, storage_options):
                with open(self.metrics_path, "wb") as f:
                    f.write(uri_lib.read_bytes(remote_metrics, storage_options))
        records, dropped = read_metrics(self.metrics_path, resume_step)
        if dropped:
            body = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
            uri_lib.atomic_write_bytes(self.metrics_path, body.encode())
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(self.local_dir, TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one record; scalars also go to TensorBoard and the progress bar."""
        if not self.is_main:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _json_value(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "time"):
                    continue
                if isinstance(value, str) and value in ("nan", "inf", "-inf"):
                    value = float(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
        if self._bar is not None:
            self.progress(step, **{k: record[k] for k in PROGRESS_KEYS if k in record})

    def info(self, message: str) -> None:
        """Print a line on the main rank without breaking the progress bar."""
        if not self.is_main:
            return
        from tqdm import tqdm

        tqdm.write(message)

    def start_progress(self, total_steps: int, initial_step: int = 0) -> None:
        """Show a progress bar (steps/s and ETA from tqdm; loss and samples/s from logged metrics)."""
        if not self.is_main:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def progress(self, step: int, **postfix: Any) -> None:
        """Move the bar to ``step``; ``postfix`` values are shown next to it."""
        if not self.is_main or self._bar is None:
            return
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        if postfix:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)

    def records(self) -> list[dict]:
        """Every record logged so far (read back from the metrics file)."""
        if not self.is_main:
            return []
        if self._file is not None:
            self._file.flush()
        return read_metrics(self.metrics_path)[0]

    def plot_loss_curve(self, terms: tuple[str, ...] = ()) -> str | None:
        """Draw ``<run_dir>/loss_curve.png`` from the metrics log; return its URI (None if there is
        no loss yet). ``terms``: other logged metrics (a loss's parts) drawn in a panel of their own.
        Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend."""
        if not self.is_main:
            return None
        records = self.records()
        points = [(r["step"], float(r["loss"])) for r in records if "loss" in r]
        if not points:
            return None
        parts = {k: [(r["step"], float(r[k])) for r in records if k in r] for k in terms}
        png = _loss_curve_png(points, [(r["step"], float(r["lr"])) for r in records if "lr" in r],
                              {k: v for k, v in parts.items() if v})
        out = uri_lib.join(self.run_dir, LOSS_CURVE_FILE)
        uri_lib.atomic_write_bytes(out, png, self.storage_options)
        return out

    def flush(self) -> None:
        """Flush to disk; for object-store run dirs upload metrics.jsonl."""
        if not self.is_main or self._file is None:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self.remote:
            with open(self.metrics_path, "rb") as f:
                uri_lib.atomic_write_bytes(uri_lib.join(self.run_dir, METRICS_FILE), f.read(), self.storage_options)

    def close(self) -> None:
        if not self.is_main or self._file is None:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
            if self.remote:
                fs, path = uri_lib.get_fs(uri_lib.join(self.run_dir, TENSORBOARD_DIR), self.storage_options)
                fs.put(os.path.join(self.local_dir, TENSORBOARD_DIR) + "/", path, recursive=True)
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._file.close()
        self._file = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _smooth(values: list[float], weight: float | None = None) -> list[float]:
    """TensorBoard-style debiased exponential smoothing, skipping non-finite values. ``weight``
    defaults to a window of about a tenth of the curve (0.5 for 20 points, at most 0.99)."""
    if weight is None:
        weight = min(0.99, max(0.0, 1.0 - 10.0 / max(len(values), 1)))
    out, acc, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            acc, n = weight * acc + (1 - weight) * v, n + 1
        out.append(acc / (1 - weight**n) if n else float("nan"))
    return out


def _loss_curve_png(loss: list[tuple[int, float]], lr: list[tuple[int, float]],
                    parts: dict[str, list[tuple[int, float]]] | None = None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = parts or {}
    panels = 1 + bool(parts) + bool(lr)
    fig = Figure(figsize=(8, 2 + 2 * panels), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    steps, values = zip(*loss)
    ax = axes[0]
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    if len(values) > 10:
        ax.plot(steps, _smooth(list(values)), color="tab:blue", linewidth=1.5, label="smoothed")
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if parts:
        ax = axes[1]
        for name, points in parts.items():
            part_steps, part_values = zip(*points)
            ax.plot(part_steps, _smooth(list(part_values)) if len(part_values) > 10 else part_values, label=name)
        ax.set_ylabel("terms")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    if lr:
        lr_steps, lr_values = zip(*lr)
        axes[-1].plot(lr_steps, lr_values, color="tab:orange")
        axes[-1].set_ylabel("learning rate")
        axes[-1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class StepTimer:
    """Measures how much of the wall time the loop spends waiting for data.

    Wrap the loader with :meth:`iterate` (or time a fetch with :meth:`waiting`), call
    :meth:`end_step` after each optimizer step, and :meth:`pop` at each log interval:
    ``data_wait_frac`` = time blocked fetching batches / wall time since the previous pop.
    On GPU, wall time is only accurate once the host synchronizes (e.g. ``loss.item()``), which
    logging does anyway; over a log interval the fraction is right.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._window_start, self._wait, self._steps, self._samples = now, 0.0, 0, 0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self._wait += self.clock() - start

    def iterate(self, iterable: Iterable) -> Iterator:
        """Yield the items of ``iterable``, timing each fetch as data wait."""
        it = iter(iterable)
        while True:
            with self.waiting():
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def end_step(self, samples: int = 0) -> None:
        """Count one optimizer step of ``samples`` samples (global batch, for samples/s)."""
        self._steps += 1
        self._samples += samples

    def pop(self) -> dict[str, float]:
        """Rates since the previous pop, then start a new window: ``data_wait_frac``,
        ``steps_per_s``, ``samples_per_s``, ``step_time_s`` (mean wall seconds per step)."""
        now = self.clock()
        elapsed = max(now - self._window_start, 1e-12)
        out = {
            "data_wait_frac": min(1.0, self._wait / elapsed),
            "steps_per_s": self._steps / elapsed,
            "samples_per_s": self._samples / elapsed,
            "step_time_s": elapsed / self._steps if self._steps else float("nan"),
        }
        self._reset(now)
        return out


class SigtermHandler:
    """Context manager that turns SIGTERM into a flag the training loop polls.

    Inside the block a SIGTERM only sets ``requested`` (and ``signum``); the loop then saves a
    checkpoint and leaves. In DDP, combine the flag across ranks (``all_reduce_any``) so every
    rank stops at the same step. The previous handlers are restored on exit. Must be entered in
    the main thread (Python delivers signals there only).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> "SigtermHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SigtermHandler must be entered in the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
