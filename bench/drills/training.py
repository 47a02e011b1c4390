"""Training drills: a SIGKILL inside a checkpoint write (the resume must equal the uninterrupted
run), and a NaN loss (a clean stop with the last good checkpoint kept)."""
from __future__ import annotations

import glob
import os
import re
import shutil

from bench.drills.context import DrillContext, DrillRecord, drill
from bench.drills.tools import batch_records, describe_checkpoints, error_line, same_weights, wait_until

# A wider debug model (checkpoints of ~140 MB with EMA and Adam moments) so that a checkpoint write
# lasts long enough for a SIGKILL to land inside it.
TRAIN_WIDE = ["model.hidden_size=256", "model.head_hidden_size=512"]


@drill("train_ckpt_kill", "training", "SIGKILL during a checkpoint write; resume = the uninterrupted run")
def train_ckpt_kill(ctx: DrillContext, rec: DrillRecord) -> None:
    from trainer.checkpoint import list_checkpoints

    store = ctx.clean_store()["uri"]
    target = 5 if ctx.options.quick else 6
    base = [*TRAIN_WIDE, "data.global_batch=8", "train.debug_record_batches=true"]
    rec.did = ("trained a wide debug DiT^DH (hidden 256, head 512; ~140 MB checkpoints) with a checkpoint every "
               "step and SIGKILLed the trainer while a checkpoint folder was being written; resumed that run "
               f"directory to step {target}; trained the same config uninterrupted to step {target} (at the same time "
               "as the killed run: the results do not depend on timing)")
    rec.expected = ("the half-written checkpoint is never listed as complete; the resume starts from the newest "
                    "complete one, and its batches and final weights equal the uninterrupted run's")
    whole = ctx.path("train_ckpt_kill", "uninterrupted")
    ujob = ctx.start("ckpt-kill-uninterrupted", ctx.train_cmd(store, whole, *base, "train.ckpt_every=1000",
                                                              f"train.max_steps={target}"))
    hit, attempts = None, 0
    for attempt in range(3):
        attempts += 1
        run = ctx.path("train_ckpt_kill", f"run{attempt}")
        root = os.path.join(run, "checkpoints")
        job = ctx.start(f"ckpt-kill-{attempt}", ctx.train_cmd(
            store, run, *base, "train.ckpt_every=1", "train.max_steps=10000", "train.keep_last=2"))

        def writing() -> bool:
            names = os.listdir(root) if os.path.isdir(root) else []
            return any(n.startswith("step-") for n in names) and any(n.startswith(".tmp-step-") for n in names)

        landed = wait_until(writing, job, 240, poll_s=0.005)
        job.kill()
        job.wait(60)
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        if landed and any(n.startswith(".tmp-step-") for n in names):
            hit = {"run": run, "names": names, "after_s": round(job.seconds, 1)}
            break
    urc = ujob.wait(ctx.options.timeout_s)
    if hit is None:
        rec.happened = f"could not land a SIGKILL inside a checkpoint write in {attempts} attempts"
        rec.lost = "not tested"
        return
    run = hit["run"]
    entries = list_checkpoints(run)
    survivor = max(e.step for e in entries if e.complete)
    if survivor >= target:
        raise RuntimeError(f"the kill landed after step {survivor}, past the compared steps (..{target})")
    n_before = len(batch_records(run))
    rjob, rrc = ctx.run("ckpt-kill-resume", ctx.train_cmd(store, run, *base, "train.ckpt_every=1000",
                                                          f"train.max_steps={target}"))
    resumed_msg = re.search(r"resuming from checkpoint (\S+) at step (\d+)", rjob.stdout() + rjob.stderr())
    killed_recs, resumed_recs = batch_records(run)[:n_before], batch_records(run)[n_before:]
    whole_recs = batch_records(whole)
    same_after = resumed_recs == whole_recs[survivor:] and [r["step"] for r in resumed_recs] == list(
        range(survivor + 1, target + 1))
    same_before = killed_recs[:survivor] == whole_recs[:survivor] and len(whole_recs) == target
    weights_same, step = same_weights(run, whole) if rrc == 0 and urc == 0 else (False, None)
    incomplete_listed = [e.step for e in entries if not e.complete]
    leftover = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".tmp-"))
    rec.details = {"checkpoint_folder_at_kill": hit["names"], "listed": [(e.step, e.complete) for e in entries],
                   "temporary_folders_after_resume": leftover,
                   "resume": {"rc": rrc, "seconds": round(rjob.seconds, 1),
                              "message": resumed_msg[0] if resumed_msg else None},
                   "uninterrupted": {"rc": urc, "seconds": round(ujob.seconds, 1)}}
    rec.figures = {"killed_after_s": hit["after_s"], "kill_attempts": attempts, "resumed_from_step": survivor,
                   "compared_steps": f"{survivor + 1}..{target}", "resume_s": round(rjob.seconds, 1),
                   "uninterrupted_s": round(ujob.seconds, 1)}
    rec.ok = bool(rrc == 0 and urc == 0 and resumed_msg and int(resumed_msg[2]) == survivor and same_after
                  and same_before and weights_same and not incomplete_listed)
    rec.happened = (
        f"SIGKILL after {hit['after_s']} s with checkpoints folder {hit['names']}; listed complete: "
        f"{[e.step for e in entries if e.complete]}, incomplete listed: {incomplete_listed or 'none'}; the resume "
        f"(exit {rrc}) {'said ' + repr(resumed_msg[0]) if resumed_msg else 'did not say it resumed'}; batches of steps "
        f"{survivor + 1}..{target} {'identical' if same_after else 'DIFFERENT'} to the uninterrupted run's (steps "
        f"1..{survivor} {'identical' if same_before else 'DIFFERENT'}); step-{step} model+EMA weights "
        f"{'identical' if weights_same else 'DIFFERENT'}; temporary folders left after the resume: "
        f"{leftover or 'none'}")
    rec.lost = (f"the steps after step {survivor} (redone identically) and the half-written checkpoint "
                f"({'pruned by the resumed run' if not leftover else 'still on disk'})" if rec.ok else "see happened")
    for folder in glob.glob(os.path.join(ctx.work, "train_ckpt_kill", "*", "checkpoints")):
        shutil.rmtree(folder)  # ~140 MB each; the batch records and logs stay for inspection


@drill("train_nan", "training", "a NaN loss at step 5: clean stop, last good checkpoint kept and loadable")
def train_nan(ctx: DrillContext, rec: DrillRecord) -> None:
    import torch

    from trainer.checkpoint import list_checkpoints, load_checkpoint

    store = ctx.clean_store()["uri"]
    run = ctx.path("train_nan", "run")
    rec.did = ("ran `train-dit` (debug, checkpoint every 2 steps, 10 steps) with train.debug_nan_at_step=5 (the "
               "loss of step 5 multiplied by NaN); loaded the newest checkpoint; resumed without the fault to step 6")
    rec.expected = ("exit 1 with a message naming the non-finite loss and step 5; checkpoints 2 and 4 complete and "
                    "nothing after; step 4 loads with finite weights; the resume continues from it")
    job, rc = ctx.run("nan", ctx.train_cmd(store, run, "train.max_steps=10", "train.ckpt_every=2",
                                           "train.debug_nan_at_step=5", "data.global_batch=8"))
    err = error_line(job.stderr())
    entries = list_checkpoints(run)
    good = load_checkpoint(run)
    finite = all(torch.isfinite(v).all() for v in good.model_state.values()) and all(
        torch.isfinite(v).all() for v in (good.ema_state or {}).values())
    rjob, rrc = ctx.run("nan-resume", ctx.train_cmd(store, run, "train.max_steps=6", "train.ckpt_every=2",
                                                    "data.global_batch=8"))
    resumed = re.search(r"resuming from checkpoint (\S+) at step (\d+)", rjob.stdout())
    rec.details = {"rc": rc, "error": err, "checkpoints": [(e.step, e.complete) for e in entries],
                   "resume_rc": rrc, "resume_message": resumed[0] if resumed else None}
    rec.figures = {"exit_code": rc, "checkpoints": [e.step for e in entries], "last_good_step": good.step,
                   "seconds": round(job.seconds, 1)}
    rec.ok = bool(rc == 1 and "non-finite loss" in err and "step 5" in err and [e.step for e in entries] == [2, 4]
                  and all(e.complete for e in entries) and good.step == 4 and finite and rrc == 0 and resumed
                  and int(resumed[2]) == 4)
    rec.happened = (f"exit {rc}: {err[:300]}; checkpoints {describe_checkpoints(entries)}; "
                    f"newest loads at step {good.step} with {'finite' if finite else 'NON-FINITE'} weights; "
                    "resume exit "
                    f"{rrc}{' from step ' + resumed[2] if resumed else ' (no resume message)'}")
    rec.lost = "step 5 onwards (not saved); the last good checkpoint (step 4) kept" if rec.ok else "see happened"
