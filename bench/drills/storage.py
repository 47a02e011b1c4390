"""Storage drills: encode to and train from s3:// through the fault proxy of ``bench.faultproxy``
(a share of requests failed, then an outage), and a corrupt chunk that `stores verify` and the
trainer's loader must name."""
from __future__ import annotations

import os
import re
import shutil
import signal
import time

from bench.drills.context import S3_BUCKET, DrillContext, DrillRecord, drill
from bench.drills.tools import (batch_records, compare_digests, describe_checkpoints, describe_comparison,
                                encode_outcome, error_line, flip_bytes, line_with, metrics_steps, same_weights,
                                store_digests, wait_until)

# Share of S3 requests the proxy fails, per kind (bench.faultproxy.FAULT_KINDS): 15% in all.
S3_FAULTS = {"error": 0.06, "drop": 0.04, "lost_response": 0.02, "truncate": 0.03}


def _fault_proxy(ctx: DrillContext, name: str):
    from bench.faultproxy import FaultProxy, FaultRates

    proxy = FaultProxy(ctx.s3().url, FaultRates(**S3_FAULTS), seed=0, log_path=ctx.path("logs", f"{name}.err"))
    return proxy.start()


def _fault_summary(stats: dict) -> str:
    f = stats["faults"]
    return (f"{stats['faulted']} of {stats['requests']} requests faulted ({f['error']} 500/503, {f['drop']} dropped, "
            f"{f['lost_response']} lost responses, {f['truncate']} truncated bodies)")


@drill("s3_faults_encode", "storage", "encode to s3:// through a proxy failing 15% of requests; verify direct")
def s3_faults_encode(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    s3 = ctx.s3()
    out = s3.uri("encode")
    store = f"{out}/{clean['name']}"
    proxy = _fault_proxy(ctx, "faultproxy-encode")
    rates = ", ".join(f"{k} {v:.0%}" for k, v in S3_FAULTS.items())
    rec.did = (f"ran `rae-pipeline encode --out {out}` (shared config) with AWS_ENDPOINT_URL at a fault proxy "
               f"(its own process) in front of moto, failing {sum(S3_FAULTS.values()):.0%} of requests ({rates}); "
               "rerun on failure (up to 3 runs); then `stores verify` against moto directly; then an outage: another "
               "encode through a clean proxy switched to fail every request once its first shard record existed")
    rec.expected = ("the job finishes through retries (or stops with a clear error and no COMPLETE marker); the "
                    "finished store verifies OK against the direct endpoint and is byte-identical to the clean local "
                    "run; in the outage the job stops (no hang) with an error and leaves no COMPLETE marker (whether "
                    "the error names the shard/object it could not write is reported); never a COMPLETE store with "
                    "wrong bytes")
    runs = []
    try:
        for attempt in range(1 if ctx.options.quick else 3):
            job, rc = ctx.run(f"s3-encode-{attempt}", ctx.encode_cmd(out), ctx.s3_env(proxy.url))
            runs.append(encode_outcome(job, rc))
            if rc == 0:
                break
        stats = proxy.stats()
    finally:
        proxy.stop()
    so = ctx.s3_options()
    from pipeline import uri as U

    complete = U.exists(f"{store}/COMPLETE", so)
    vjob, vrc = ctx.run("s3-encode-verify", ctx.verify_cmd(store), ctx.s3_env(s3.url), 300)
    verify_out = vjob.stdout().strip()
    cmp = compare_digests(store_digests(store, so), clean["digests"]) if complete else None
    finished = runs[-1]["rc"] == 0
    ctx.s3_store_from_encode = store if finished and complete and vrc == 0 and cmp and cmp["identical"] else None
    outage = _encode_outage(ctx, clean["name"])
    rec.details = {"runs": runs, "proxy": stats, "verify_exit": vrc, "verify": verify_out[-2000:], "comparison": cmp,
                   "outage": outage}
    rec.figures = {"runs": len(runs), "requests": stats["requests"], "faulted": stats["faulted"],
                   "faults": stats["faults"], "job_s": [r["seconds"] for r in runs], "clean_run_s": clean["seconds"],
                   "outage_seconds_to_stop": outage["seconds_to_stop"]}
    clear_errors = all(r.get("error") for r in runs if r["rc"] != 0)
    if finished:
        rec.ok = bool(complete and vrc == 0 and cmp and cmp["identical"])
    else:
        rec.ok = bool(not complete and clear_errors)
    rec.ok = rec.ok and outage["ok"]
    rec.happened = (
        f"{len(runs)} run(s): " + "; ".join(
            f"exit {r['rc']} after {r['seconds']} s" + (f" ({r['error']})" if r.get("error") else
                                                        f" ({r.get('shards_encoded')} shards encoded)")
            for r in runs)
        + f"; proxy: {_fault_summary(stats)}; `stores verify` (direct) exit {vrc}"
        + (f"; store: {describe_comparison(cmp)}" if cmp else "; no COMPLETE store")
        + f"; outage after {outage['records_at_outage']} shard record(s): the job exited {outage['rc']} "
        f"{outage['seconds_to_stop']} s later, COMPLETE {'PRESENT' if outage['complete'] else 'absent'}, "
        f"{outage['records_after']} record(s) kept; stderr names the failing object: "
        f"{outage['names_object'] or 'no'}; its last line: '{outage['last_line']}'")
    if outage["ok"] and not outage["last_line_says_what"]:
        where = (f"the failing object ({outage['names_object']}) appears only inside the chained traceback"
                 if outage["names_object"] else "no line of the error names the shard or object that failed (the "
                 "store appears only in the job's opening INFO line)")
        rec.findings.append(
            "`rae-pipeline encode` on a storage outage (every request answered 500/503) ends with a Ray traceback "
            f"whose last line is '{outage['last_line']}'; {where}. pipeline/cli/encode.py turns only its own error "
            "types into a one-line `Error: ...`; the write path (write_shard_row -> StoreWriter.write_shard) does not "
            "wrap storage errors with the shard and object the way LatentStore's read path does. Ray Data also makes "
            "one attempt per write task (DataContext max_map_retries / retried_io_errors not set), so one write whose "
            "s3fs retries are exhausted fails the whole job (resumable: finished shards are kept).")
    rec.lost = ("faulted run: nothing (store complete, verified, identical); outage: the shards not yet written "
                "(the job stops, the written shards stay for the rerun)" if finished and rec.ok else
                "the job stopped with a clear error and left an incomplete store (resumable)" if rec.ok else
                "see happened")


def _encode_outage(ctx: DrillContext, store_name: str) -> dict:
    """An encode to s3:// through a proxy that starts failing every request once the first shard
    record exists: how the job stops, what it says, what it leaves."""
    from bench.faultproxy import FaultProxy

    s3 = ctx.s3()
    prefix = f"outage/{store_name}"
    client = s3.access.client()

    def keys(sub: str) -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=f"{prefix}/{sub}")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    proxy = FaultProxy(s3.url, seed=2, log_path=ctx.path("logs", "faultproxy-encode-outage.err")).start()
    try:
        job = ctx.start("s3-encode-outage", ctx.encode_cmd(s3.uri("outage")), ctx.s3_env(proxy.url))
        reached = wait_until(lambda: len(keys("records/")) >= 1, job, ctx.options.timeout_s, poll_s=0.1)
        at_outage = len(keys("records/"))
        proxy.set_rates(error=1.0)  # the endpoint answers 500/503 to everything from now on
        t = time.monotonic()
        rc = job.wait(300)
        to_stop = time.monotonic() - t
    finally:
        proxy.stop()
    err = job.stderr()
    last = error_line(err)
    named = line_with(err, rf"{S3_BUCKET}/{prefix}/\S+")
    named_object = re.search(rf"{S3_BUCKET}/{prefix}/([^\s\"']+)", named).group(1) if named else None
    complete = bool(keys("COMPLETE"))
    return {"ok": bool(reached and rc not in (0, -signal.SIGKILL) and not complete and last),
            "rc": rc, "records_at_outage": at_outage, "records_after": len(keys("records/")),
            "seconds_to_stop": round(to_stop, 1), "complete": complete, "names_object": named_object,
            "object_line": named, "last_line": last,
            "last_line_says_what": bool(named_object and named_object in last)}


def _s3_training_store(ctx: DrillContext) -> str:
    """A complete copy of the clean store on moto: the one the S3 encode drill wrote, or an upload."""
    if ctx.s3_store_from_encode:
        return ctx.s3_store_from_encode
    clean = ctx.clean_store()
    prefix = f"train-store/{clean['name']}"
    ctx.s3().upload_dir(clean["uri"], prefix)
    return ctx.s3().uri(prefix)


@drill("s3_faults_train", "storage", "train from an s3:// store through the fault proxy; then an outage")
def s3_faults_train(ctx: DrillContext, rec: DrillRecord) -> None:
    from trainer.checkpoint import list_checkpoints, load_checkpoint

    s3 = ctx.s3()
    store = _s3_training_store(ctx)
    steps = 3 if ctx.options.quick else 6
    sets = [f"train.max_steps={steps}", "train.ckpt_every=1000", "train.debug_record_batches=true",
            "data.num_workers=1"]
    rec.did = (f"trained the debug DiT^DH {steps} steps (global batch 16 = the whole 16-sample store per step, one "
               f"DataLoader worker) from {store}: once with moto directly, once through the fault proxy failing "
               f"{sum(S3_FAULTS.values()):.0%} of requests; then an outage: a run through a clean proxy switched to "
               "fail every request once step 3 was logged")
    rec.expected = ("the faulted run finishes with the direct run's batches and weights (retries), or stops with a "
                    "clear error; in the outage the trainer stops (no hang) with an error naming what it could not "
                    "read, its last checkpoint complete and loadable; never training on wrong data")
    direct_dir, proxied_dir = ctx.path("s3_train", "direct"), ctx.path("s3_train", "proxied")
    dj, drc = ctx.run("s3-train-direct", ctx.train_cmd(store, direct_dir, *sets), ctx.s3_env(s3.url))
    proxy = _fault_proxy(ctx, "faultproxy-train")
    try:
        pj, prc = ctx.run("s3-train-proxied", ctx.train_cmd(store, proxied_dir, *sets), ctx.s3_env(proxy.url))
        stats = proxy.stats()
    finally:
        proxy.stop()
    same_batches = drc == 0 and prc == 0 and batch_records(direct_dir) == batch_records(proxied_dir)
    weights_same, step = same_weights(direct_dir, proxied_dir) if drc == 0 and prc == 0 else (False, None)

    # The outage: every request fails from some point on.
    from bench.faultproxy import FaultProxy

    outage_dir = ctx.path("s3_train", "outage")
    proxy = FaultProxy(s3.url, seed=1, log_path=ctx.path("logs", "faultproxy-outage.err")).start()
    try:
        cmd = ctx.train_cmd(store, outage_dir, "train.max_steps=100000", "train.log_every=1", "train.ckpt_every=2",
                            "data.num_workers=1")
        oj = ctx.start("s3-train-outage", cmd, ctx.s3_env(proxy.url))
        reached = wait_until(lambda: max(metrics_steps(outage_dir), default=0) >= 3, oj, 240, poll_s=0.05)
        at_outage = max(metrics_steps(outage_dir), default=0)
        proxy.set_rates(error=0.5, drop=0.5)
        t_out = time.monotonic()
        orc = oj.wait(240)
        to_stop = time.monotonic() - t_out
        ostats = proxy.stats()
    finally:
        proxy.stop()
    oerr = line_with(oj.stderr(), r"StoreError|shard\(s\)") or error_line(oj.stderr())
    oentries = list_checkpoints(outage_dir)
    last_good = load_checkpoint(outage_dir, load_train_state=False).step if any(e.complete for e in oentries) else None
    outage_ok = bool(reached and orc not in (0, -signal.SIGKILL) and oerr and last_good is not None
                     and all(e.complete for e in oentries))

    rec.details = {"direct": {"rc": drc, "seconds": round(dj.seconds, 1), "error": drc and error_line(dj.stderr())},
                   "proxied": {"rc": prc, "seconds": round(pj.seconds, 1), "error": prc and error_line(pj.stderr())},
                   "proxy": stats,
                   "outage": {"rc": orc, "logged_step_at_outage": at_outage, "seconds_to_stop": round(to_stop, 1),
                              "error": oerr, "checkpoints": [(e.step, e.complete) for e in oentries],
                              "last_good_step": last_good, "proxy": ostats}}
    rec.figures = {"steps": steps, "requests": stats["requests"], "faulted": stats["faulted"],
                   "faults": stats["faults"], "direct_s": round(dj.seconds, 1), "proxied_s": round(pj.seconds, 1),
                   "outage_seconds_to_stop": round(to_stop, 1)}
    outage_text = (f"outage at logged step {at_outage}: the trainer exited {orc} {to_stop:.1f} s later with "
                   f"'{oerr[:300]}'; checkpoints {describe_checkpoints(oentries)}, "
                   f"newest loads at step {last_good}")
    if prc == 0:
        rec.ok = drc == 0 and same_batches and weights_same and outage_ok
        rec.happened = (f"direct run exit {drc} ({dj.seconds:.1f} s); faulted run exit {prc} ({pj.seconds:.1f} s), "
                        f"proxy: {_fault_summary(stats)}; batches {'identical' if same_batches else 'DIFFERENT'}, "
                        f"step-{step} weights {'identical' if weights_same else 'DIFFERENT'}; " + outage_text)
        rec.lost = (f"faulted run: nothing (same batches and weights as the direct run); outage: the steps after "
                    f"checkpoint {last_good}" if rec.ok else "see happened")
    else:
        err = error_line(pj.stderr())
        rec.ok = drc == 0 and bool(err) and outage_ok
        rec.happened = (f"direct run exit {drc}; faulted run stopped with exit {prc}: {err}; proxy: "
                        f"{_fault_summary(stats)}; " + outage_text)
        rec.lost = "the faulted run stopped with a clear error (resumable from its last checkpoint)"


@drill("corrupt_chunk", "storage", "flip bytes in one shard object: verify and the trainer's loader name it")
def corrupt_chunk(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    store = ctx.path("corrupt_chunk", clean["name"])
    shutil.copytree(clean["uri"], store)
    shard = 1
    obj = os.path.join(store, "latents", "c", str(shard), "0", "0", "0")
    size = os.path.getsize(obj)
    offset = size // 3
    flip_bytes(obj, offset, 64)
    rec.did = (f"copied the clean store and flipped 64 bytes at offset {offset} of latents/c/{shard}/0/0/0 (shard "
               f"{shard}, {size} bytes); ran `stores verify` and `train-dit` (debug, 0 and 1 DataLoader workers) on it")
    rec.expected = (f"`stores verify` exits 1 naming shard {shard} and its object; training stops with an error "
                    f"naming shard {shard}")
    vjob, vrc = ctx.run("corrupt-verify", ctx.verify_cmd(store), timeout_s=300)
    verify_out = vjob.stdout()
    named = re.findall(r"shard (\d+)", verify_out)
    verify_ok = vrc == 1 and f"latents/c/{shard}/0/0/0" in verify_out and set(named) == {str(shard)}
    trains = {}
    for workers in (0, 1):
        run_dir = ctx.path("corrupt_chunk", f"run-w{workers}")
        cmd = ctx.train_cmd(store, run_dir, "train.max_steps=20", "train.ckpt_every=1000",
                            f"data.num_workers={workers}")
        tjob, trc = ctx.run(f"corrupt-train-w{workers}", cmd, timeout_s=180)
        # The line naming the shard (with DataLoader workers it is the last line of the worker's traceback).
        err = line_with(tjob.stderr(), r"StoreError|shard\(s\)") or error_line(tjob.stderr())
        trains[workers] = {"rc": trc, "error": err, "seconds": round(tjob.seconds, 1),
                           "names_shard": bool(re.search(rf"shard\(s\) \[{shard}\]|shard {shard}\b", tjob.stderr())
                                               and f"latents/c/{shard}/0/0/0" in tjob.stderr())}
    rec.details = {"verify_exit": vrc, "verify": verify_out.strip()[-2000:], "train": trains}
    rec.figures = {"verify_exit": vrc, "train_exit": {f"workers_{w}": t["rc"] for w, t in trains.items()}}
    rec.ok = verify_ok and all(t["rc"] != 0 and t["names_shard"] for t in trains.values())
    rec.happened = (f"`stores verify` exit {vrc}: " + " / ".join(
        ln.strip() for ln in verify_out.splitlines() if ln.strip().startswith("-"))[:400]
        + "; " + "; ".join(f"train-dit with {w} worker(s) exit {t['rc']}: {t['error'][:300]}"
                           for w, t in trains.items()))
    rec.lost = (f"nothing silently: the damaged shard {shard} is named; re-encoding that shard (or restoring its "
                "object) repairs the store" if rec.ok else "see happened")
