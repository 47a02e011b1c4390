"""Encode drills: the encode driver SIGKILLed mid-job, the encoder actor SIGKILLed mid-shard, two
encode jobs on one output at once; each store compared object by object with the clean run's."""
from __future__ import annotations

import os
import signal
import time

from bench.drills.context import DrillContext, DrillRecord, drill
from bench.drills.tools import (compare_digests, describe_comparison, encode_outcome, proc_title, records_written,
                                store_digests, wait_until)

ENCODER_ACTOR_CLASS = "ShardEncoder"  # Ray Data names the actor MapWorker(MapBatches(ShardEncoder))


@drill("encode_driver_kill", "encode", "SIGKILL the encode driver mid-job, rerun: the clean run's store")
def encode_driver_kill(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    out = ctx.path("encode_driver_kill", "stores")
    store = os.path.join(out, clean["name"])
    num_shards = sum(1 for k in clean["digests"] if k.startswith("records/"))
    rec.did = ("ran `rae-pipeline encode` (shared config, 4 shards) as a subprocess on the drills' Ray; SIGKILLed "
               "the driver once the first shard's completion record existed; reran the same command")
    rec.expected = ("killed run leaves no COMPLETE marker; the rerun encodes only the shards without a record and "
                    "finishes a store byte-identical (every object) to the clean run, no temporary files left")
    job = ctx.start("driver-kill-1", ctx.encode_cmd(out))
    landed = wait_until(lambda: records_written(store) >= 1, job, ctx.options.timeout_s)
    at_kill = records_written(store)
    job.kill()
    rc1 = job.wait(60)
    complete_after_kill = os.path.exists(os.path.join(store, "COMPLETE"))
    time.sleep(1.0)  # let Ray reap the dead driver's workers before counting what is on disk
    before_rerun = records_written(store)
    rerun, rc2 = ctx.run("driver-kill-rerun", ctx.encode_cmd(out))
    second = encode_outcome(rerun, rc2)
    cmp = compare_digests(store_digests(store), clean["digests"]) if rc2 == 0 else None
    rec.figures = {"records_at_kill": at_kill, "records_before_rerun": before_rerun, "num_shards": num_shards,
                   "shards_reencoded": second.get("shards_encoded"), "killed_after_s": round(job.seconds, 1),
                   "rerun_s": second["seconds"], "clean_run_s": clean["seconds"]}
    rec.details = {"kill_exit_code": rc1, "rerun": second, "comparison": cmp}
    rec.ok = bool(landed and rc1 == -signal.SIGKILL and at_kill < num_shards and not complete_after_kill
                  and rc2 == 0 and second.get("shards_encoded") == num_shards - before_rerun and cmp["identical"])
    rec.happened = (
        f"driver SIGKILLed after {job.seconds:.1f} s with {at_kill}/{num_shards} shard records written "
        f"(exit {rc1}; COMPLETE {'present' if complete_after_kill else 'absent'}); {before_rerun} records when "
        f"rerun; the rerun (exit {rc2}) encoded {second.get('shards_encoded')} shard(s) in {second['seconds']} s"
        + (f"; store: {describe_comparison(cmp)}" if cmp else f"; rerun error: {second.get('error')}"))
    if not landed:
        rec.happened += "; the kill did not land mid-job (the job ended or timed out first)"
    rec.lost = (f"nothing: {before_rerun} shard(s) of the killed run kept, the rest re-encoded, store identical"
                if rec.ok else "see happened")


def _encoder_actor(ctx: DrillContext) -> dict | None:
    alive = [a for a in ctx.ray().actors() if ENCODER_ACTOR_CLASS in (a["class_name"] or "") and a["state"] == "ALIVE"]
    return alive[0] if alive else None


@drill("encode_actor_kill", "encode", "SIGKILL the encoder actor mid-job: Ray restarts it, the store is identical")
def encode_actor_kill(ctx: DrillContext, rec: DrillRecord) -> None:
    clean = ctx.clean_store()
    num_shards = sum(1 for k in clean["digests"] if k.startswith("records/"))
    out = ctx.path("encode_actor_kill", "stores")
    store = os.path.join(out, clean["name"])
    rec.did = ("ran `rae-pipeline encode` (shared config) as a subprocess on the drills' Ray; found the encoder "
               "actor's pid in Ray's actor table and SIGKILLed that process while it was running a shard (its "
               "process title ray::...ShardEncoder).submit), with no shard written yet")
    rec.expected = ("Ray restarts the actor (max_restarts=-1) and retries the shard (max_task_retries=3); the job "
                    "completes and the store is byte-identical to the clean run")
    job = ctx.start("actor-kill", ctx.encode_cmd(out))
    deadline = time.monotonic() + ctx.options.timeout_s
    actor, killed, restarted = None, None, None
    while job.poll() is None and time.monotonic() < deadline:
        if actor is None:
            actor = _encoder_actor(ctx)
            time.sleep(0.1)
            continue
        # Ray titles a worker ray::<class>.<method> while a method runs: .submit is a shard being encoded.
        title = proc_title(actor["pid"])
        if ".submit" in title and records_written(store) < num_shards:
            os.kill(actor["pid"], signal.SIGKILL)
            killed = {"pid": actor["pid"], "records_at_kill": records_written(store),
                      "after_s": round(job.seconds, 1), "title": title}
            break
        if not title:
            actor = None  # the actor is gone (restarted by something else, or the job ended)
        time.sleep(0.005)
    if killed:
        t_kill = time.monotonic()
        while job.poll() is None and time.monotonic() < deadline:
            now = _encoder_actor(ctx)
            if now and now.get("pid") and now["pid"] != killed["pid"]:
                restarted = {"pid": now["pid"], "num_restarts": now["num_restarts"],
                             "after_s": round(time.monotonic() - t_kill, 1)}
                break
            time.sleep(0.1)
    rc = job.wait(max(deadline - time.monotonic(), 30))
    outcome = encode_outcome(job, rc)
    cmp = compare_digests(store_digests(store), clean["digests"]) if rc == 0 else None
    rec.details = {"killed": killed, "restarted": restarted, "outcome": outcome, "comparison": cmp,
                   "actor_table": ctx.ray().actor_method}
    rec.figures = {"records_at_kill": killed and killed["records_at_kill"], "num_shards": num_shards,
                   "restart_after_s": restarted and restarted["after_s"], "job_s": outcome["seconds"],
                   "clean_run_s": clean["seconds"]}
    rec.ok = bool(killed and rc == 0 and cmp and cmp["identical"])
    if not killed:
        rec.happened = f"no kill landed: the job ended (exit {rc}) before its encoder actor was seen running a shard"
    else:
        rec.happened = (
            f"actor pid {killed['pid']} ({killed['title']}) SIGKILLed {killed['after_s']} s into the job with "
            f"{killed['records_at_kill']}/{num_shards} shards written; "
            + (f"a new actor (pid {restarted['pid']}, restarts {restarted['num_restarts']}) was up "
               f"{restarted['after_s']} s later; " if restarted else "no replacement actor was seen; ")
            + f"the job exited {rc} after {outcome['seconds']} s"
            + (f"; store: {describe_comparison(cmp)}" if cmp else f": {outcome.get('error')}"))
    rec.lost = "nothing: the shard in flight was redone, store identical" if rec.ok else "see happened"


@drill("encode_concurrent", "encode", "two encode jobs on one output at once: one complete, identical store")
def encode_concurrent(ctx: DrillContext, rec: DrillRecord) -> None:
    from pipeline.store import verify_store

    clean = ctx.clean_store()
    out = ctx.path("encode_concurrent", "stores")
    store = os.path.join(out, clean["name"])
    rec.did = "started two `rae-pipeline encode` processes with the same config and --out at the same moment"
    rec.expected = ("both exit 0 (each encodes the shards it finds pending, or reuses the finished store); one "
                    "complete store, byte-identical to the clean run, `verify` OK")
    jobs = [ctx.start(f"concurrent-{i}", ctx.encode_cmd(out)) for i in range(2)]
    rcs = [j.wait(ctx.options.timeout_s) for j in jobs]
    outcomes = [encode_outcome(j, rc) for j, rc in zip(jobs, rcs)]
    cmp = compare_digests(store_digests(store), clean["digests"]) if os.path.isdir(store) else None
    report = verify_store(store) if os.path.isdir(store) else None
    rec.details = {"jobs": outcomes, "comparison": cmp, "verify": str(report) if report else None}
    rec.figures = {"shards_encoded": [o.get("shards_encoded") for o in outcomes],
                   "job_s": [o["seconds"] for o in outcomes], "clean_run_s": clean["seconds"]}
    rec.ok = bool(all(rc == 0 for rc in rcs) and cmp and cmp["identical"] and report and report.ok)
    said = ["reused the finished store" if o.get("reused") else
            (f"encoded {o.get('shards_encoded')} shard(s)" if o["rc"] == 0 else f"failed: {o.get('error')}")
            for o in outcomes]
    rec.happened = (f"job A exited {rcs[0]} ({said[0]}, {outcomes[0]['seconds']} s), job B exited {rcs[1]} "
                    f"({said[1]}, {outcomes[1]['seconds']} s); store: "
                    + (describe_comparison(cmp) if cmp else "missing")
                    + (f"; verify {'OK' if report.ok else 'FAILED'}" if report else ""))
    rec.lost = "nothing: one store, identical to the clean run" if rec.ok else "see happened"
