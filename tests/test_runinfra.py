"""Training-run infrastructure: process groups (single process and torchrun/gloo), optimizer,
EMA, LR schedules, clipping, the non-finite guard, run logs, the data-wait timer and SIGTERM."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch
from torch import nn

from trainer import distributed
from trainer.checkpoint import load_checkpoint
from trainer.optim import (
    EMA,
    DecoderLRSchedule,
    DiTLRSchedule,
    NonFiniteLossError,
    build_adamw,
    build_lr_scheduler,
    check_finite,
    clip_grad_norm,
)
from trainer.runlog import RunLogger, SigtermHandler, StepTimer, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------


def test_single_process_without_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.is_main and not info.is_distributed
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.tensor([1.0, 3.0])
    out = distributed.all_reduce_mean(x)
    assert torch.equal(out, x) and out is not x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(5) == [5]
    assert distributed.all_reduce_any(True) is True
    distributed.barrier()
    distributed.cleanup()
    assert dict(os.environ) == before  # never sets environment variables


def test_malformed_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="RANK"):
        distributed.init_distributed()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        distributed.init_distributed()


DIST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    from trainer import distributed as d
    info = d.init_distributed()
    mean = d.all_reduce_mean(torch.tensor([float(info.rank), 10.0 * info.rank]))
    obj = d.broadcast_object({"seed": 1234} if info.is_main else None)
    gathered = d.all_gather_object(f"rank{info.rank}")
    any_flag = d.all_reduce_any(info.rank == 1)
    none_flag = d.all_reduce_any(False)
    d.barrier()
    out = {"rank": info.rank, "world": info.world_size, "local": info.local_rank, "backend": info.backend,
           "device": str(info.device), "main": info.is_main, "mean": mean.tolist(), "obj": obj,
           "gathered": gathered, "any": any_flag, "none": none_flag}
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    d.cleanup()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torchrun_gloo_two_processes(tmp_path):
    script = tmp_path / "dist_check.py"
    script.write_text(DIST_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["local"], res["backend"]) == (r, 2, r, "gloo")
        assert res["main"] == (r == 0) and res["device"] == "cpu"
        assert res["mean"] == [0.5, 5.0]
        assert res["obj"] == {"seed": 1234}
        assert res["gathered"] == ["rank0", "rank1"]
        assert res["any"] is True and res["none"] is False


# ---------------------------------------------------------------------------------------------
# optim
# ---------------------------------------------------------------------------------------------


def test_adamw_reference_settings():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    opt = build_adamw(model)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-4, (0.9, 0.95), 0.0)
    assert len(group["params"]) == 3  # the frozen bias is left out
    with pytest.raises(ValueError, match="no trainable"):
        build_adamw([])


def test_dit_schedule_values():
    # 1000 samples per epoch at global batch 100: 10 optimizer steps per epoch.
    sched = DiTLRSchedule(samples_per_epoch=1000, global_batch_size=100)  # 2e-4 -> 2e-5, epochs 40 -> 800
    expected = {0: 1.0, 399: 1.0, 400: 1.0, 4200: 0.55, 8000: 0.1, 12000: 0.1}
    for step, factor in expected.items():
        assert sched(step) == pytest.approx(factor, abs=1e-12), step
    assert sched(401) == pytest.approx(1 - 0.9 / 7600, abs=1e-12)
    # Same as the reference trainer's formula when an epoch is a whole number of steps.
    for step in range(0, 9000, 37):
        start, end = 400, 8000
        ref = 1.0 if step < start else (0.1 if step >= end else 1.0 - 0.9 * (step - start) / (end - start))
        assert sched(step) == pytest.approx(ref, abs=1e-12)
    # Through LambdaLR on a real optimizer; state_dict round trip with weights_only=True.
    opt = build_adamw([nn.Parameter(torch.zeros(1))])
    lr_sched = build_lr_scheduler(opt, sched)
    for _ in range(4200):
        opt.step()
        lr_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.55)
    import io

    buf = io.BytesIO()
    torch.save(lr_sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["last_epoch"] == 4200
    with pytest.raises(ValueError, match="base_lr"):
        build_lr_scheduler(build_adamw([nn.Parameter(torch.zeros(1))], lr=1e-3), sched)
    with pytest.raises(ValueError):
        DiTLRSchedule(samples_per_epoch=0, global_batch_size=10)


def test_decoder_schedule_values():
    sched = DecoderLRSchedule(samples_per_epoch=1000, global_batch_size=100)  # warm-up 10 steps, end at 160
    assert sched(0) == pytest.approx(0.1)  # never a zero LR on the first step
    assert sched(4) == pytest.approx(0.5)
    assert sched(9) == pytest.approx(1.0)
    assert sched(10) == pytest.approx(1.0)
    assert sched(85) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert sched(160) == pytest.approx(0.1)
    assert sched(500) == pytest.approx(0.1)
    values = [sched(s) for s in range(10, 161)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up


def test_ema_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 3, bias=False))
    model.to(torch.bfloat16)
    p0 = {k: v.float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    ema = EMA(model, decay=0.9)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values() if v.is_floating_point())
    assert list(ema.state_dict()) == list(model.state_dict())
    v1 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    v2 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(v1[n])
        model[1].running_mean.fill_(7.0)
    ema.update(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(v2[n])
    ema.update(model)
    for n in v1:
        expected = 0.81 * p0[n] + 0.9 * 0.1 * v1[n].float() + 0.1 * v2[n].float()
        torch.testing.assert_close(ema.state_dict()[n], expected, rtol=1e-6, atol=1e-6)
    assert torch.all(ema.state_dict()["1.running_mean"] == 7.0)  # buffers are copied, not averaged
    fresh = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 3, bias=False))
    ema.copy_to(fresh)
    torch.testing.assert_close(fresh[0].weight, ema.state_dict()["0.weight"])
    ema2 = EMA(fresh, decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="missing"):
        ema2.load_state_dict({"0.weight": torch.zeros(3, 2)})


def test_ema_tied_weights_and_wrappers():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        a.weight.add_(2.0)
    wrapped = nn.DataParallel(model)  # prefixed keys: the EMA still sees plain names
    ema.update(wrapped)
    torch.testing.assert_close(ema.state_dict()["0.weight"], ema.state_dict()["1.weight"])
    torch.testing.assert_close(ema.state_dict()["0.weight"], a.weight - 1.0)


def test_clip_grad_norm_and_finite_guard():
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    p1.grad, p2.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_grad_norm([p1, p2], max_norm=None)
    assert float(norm) == pytest.approx(5.0) and float(p2.grad) == 4.0  # measured, not clipped
    norm = clip_grad_norm([p1, p2], max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert math.hypot(*p1.grad.tolist(), *p2.grad.tolist()) == pytest.approx(1.0, rel=1e-5)
    assert check_finite(torch.tensor(0.25), step=3) == 0.25
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 17.*last good one") as err:
        check_finite(torch.tensor(float("nan")), step=17)
    assert err.value.step == 17
    with pytest.raises(NonFiniteLossError, match="grad_norm"):
        check_finite(float("inf"), step=2, what="grad_norm")


# ---------------------------------------------------------------------------------------------
# runlog
# ---------------------------------------------------------------------------------------------


def test_runlog_jsonl_tensorboard_png_and_resume(tmp_path):
    import matplotlib

    backend_before = matplotlib.get_backend()
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    run = str(tmp_path / "run")
    with RunLogger(run, is_main=True) as log:
        log.start_progress(total_steps=40)
        for step in range(1, 41):
            log.log(step, {"loss": torch.tensor(1.0 / step), "lr": 2e-4, "grad_norm": 0.5, "samples_per_s": 100.0})
        log.log(41, {"loss": float("nan")})
        assert log._bar.n == 41
        png_uri = log.plot_loss_curve()
    records, dropped = read_metrics(os.path.join(run, "logs", "metrics.jsonl"))
    assert not dropped and [r["step"] for r in records] == list(range(1, 42))
    assert records[1]["loss"] == 0.5 and records[1]["lr"] == 2e-4 and "time" in records[1]
    assert records[-1]["loss"] == "nan" and math.isnan(float(records[-1]["loss"]))
    assert png_uri == os.path.join(run, "loss_curve.png")
    with open(png_uri, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png_uri).size == (800, 600)
    # A loss's logged parts get a panel of their own; parts never logged are left out.
    with RunLogger(run, resume_step=41, tensorboard=False) as log:
        log.log(42, {"loss": 0.1, "lr": 1e-4, "rec": 0.2, "gan": -0.1})
        assert log.plot_loss_curve(("rec", "gan", "never")) == png_uri
    assert Image.open(png_uri).size == (800, 800)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "logs", "tensorboard")))
    assert matplotlib.get_backend() == backend_before
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded

    # A killed writer leaves a torn last line; resuming from step 30 drops it and steps > 30.
    with open(os.path.join(run, "logs", "metrics.jsonl"), "a") as f:
        f.write('{"step": 42, "lo')
    with RunLogger(run, resume_step=30, tensorboard=False) as log:
        assert [r["step"] for r in log.records()] == list(range(1, 31))
        log.log(31, {"loss": 0.01})
    records, dropped = read_metrics(os.path.join(run, "logs", "metrics.jsonl"))
    assert not dropped and [r["step"] for r in records] == list(range(1, 32))


def test_runlog_non_main_rank_writes_nothing(tmp_path):
    log = RunLogger(str(tmp_path / "run"), is_main=False)
    log.start_progress(10)
    log.log(1, {"loss": 1.0})
    assert log.plot_loss_curve() is None and log.records() == []
    log.close()
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.timeout(60)
def test_runlog_s3_run_dir(s3_endpoint, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    run = f"s3://test-bucket/runlog-{uuid.uuid4().hex[:8]}/run"
    log = RunLogger(run, staging_dir=str(tmp_path / "stage"))
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step})
    log.flush()
    remote = run.removeprefix("s3://") + "/logs/metrics.jsonl"
    assert [json.loads(l)["step"] for l in fs.cat(remote).decode().splitlines()] == [1, 2, 3, 4, 5]
    assert log.plot_loss_curve() == run + "/loss_curve.png"
    log.close()
    assert fs.find(run.removeprefix("s3://") + "/logs/tensorboard")  # event files uploaded at close
    # Resume in a new process-like logger (fresh staging dir): remote records past step 3 go.
    with RunLogger(run, resume_step=3, tensorboard=False, staging_dir=str(tmp_path / "stage2")) as log:
        log.log(4, {"loss": 0.2})
    fs.invalidate_cache()
    assert [json.loads(l)["step"] for l in fs.cat(remote).decode().splitlines()] == [1, 2, 3, 4]


def test_step_timer_fake_clock():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])

    def loader():
        for i in range(4):
            now[0] += 0.3  # the fetch blocks for 0.3 s
            yield i

    for _ in timer.iterate(loader()):
        now[0] += 0.7  # compute
        timer.end_step(samples=32)
    stats = timer.pop()
    assert stats["data_wait_frac"] == pytest.approx(0.3)
    assert stats["steps_per_s"] == pytest.approx(1.0)
    assert stats["samples_per_s"] == pytest.approx(32.0)
    assert stats["step_time_s"] == pytest.approx(1.0)
    # A new window starts at pop.
    with timer.waiting():
        now[0] += 1.0
    now[0] += 1.0
    timer.end_step()
    assert timer.pop()["data_wait_frac"] == pytest.approx(0.5)


def test_step_timer_real_clock():
    timer = StepTimer()

    def slow_loader():
        for i in range(5):
            time.sleep(0.03)
            yield i

    for _ in timer.iterate(slow_loader()):
        time.sleep(0.01)
        timer.end_step(samples=1)
    frac = timer.pop()["data_wait_frac"]
    assert 0.55 < frac < 0.9  # 0.75 nominally; loose for a loaded machine


# ---------------------------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------------------------

SIGTERM_CHILD = textwrap.dedent(
    """
    import signal, sys, time, torch
    from trainer.runlog import SigtermHandler
    from trainer.checkpoint import save_checkpoint
    run_dir = sys.argv[1]
    previous = signal.getsignal(signal.SIGTERM)
    step = 0
    with SigtermHandler() as stop:
        print("ready", flush=True)
        while not stop.requested:  # the training loop
            step += 1
            time.sleep(0.005)
        meta = {"kind": "dit", "epoch": 0.0, "samples_seen": step, "config": {}, "model": {"class": "X", "config": {}}}
        save_checkpoint(run_dir, step, model_state={"w": torch.full((3,), float(step))}, meta=meta)
        print("saved", step, stop.signum, flush=True)
    print("restored", signal.getsignal(signal.SIGTERM) is previous, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, run], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=50)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    lines = out.splitlines()
    saved = lines[0].split()
    assert saved[0] == "saved" and int(saved[2]) == signal.SIGTERM
    assert lines[1] == "restored True"
    ckpt = load_checkpoint(run)
    assert ckpt.step == int(saved[1]) > 0 and float(ckpt.model_state["w"][0]) == ckpt.step


def test_sigterm_handler_in_process():
    previous = signal.getsignal(signal.SIGTERM)
    with SigtermHandler() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_loss_curve_smoothing_is_debiased_and_sized_to_the_curve():
    from trainer.runlog import _smooth

    # A constant curve stays constant from its first point (no pull toward 0 or the first value).
    assert _smooth([2.0] * 20) == pytest.approx([2.0] * 20)
    # A short falling curve: the smoothed line tracks it within a few points, never above the start.
    values = [10.0 - i * 0.5 for i in range(20)]
    smoothed = _smooth(values)
    assert smoothed[0] == 10.0 and smoothed[-1] < values[-5]
    # Non-finite values are skipped; leading ones give NaN.
    s = _smooth([float("nan"), 1.0, float("inf"), 1.0])
    assert s[0] != s[0] and s[1:] == pytest.approx([1.0, 1.0, 1.0])
