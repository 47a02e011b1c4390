"""`make drills`: faults the pipeline must survive, each staged for real and checked.

Every drill runs the real commands (``python -m pipeline.cli encode|train-dit|stores verify``) as
subprocesses against servers the drills start themselves on 127.0.0.1 (a local Ray cluster, a moto
S3 server, the fault proxy of ``bench.faultproxy``), injects one fault, and checks the outcome
against a clean run made in the same session. Each result says what was done, what was expected,
what happened and whether anything was lost; ``bench/drills.json`` keeps them (merged by drill
name) and a table is printed at the end::

    python -m bench.drills [--quick] [--only NAME,...] [--out bench/drills.json]

Drills (``--only`` names): encode_driver_kill, encode_actor_kill, encode_concurrent,
s3_faults_encode, s3_faults_train, corrupt_chunk, train_ckpt_kill, train_nan, bad_input, credential_scan,
teammate_reads_store, encode_node_loss
(a two-node Ray cluster of its own, see ``bench.drills.cluster``).

The encode drills share one configuration: the built-in sample data (16 images, train split), a
shallow DINOv2-B (1 block, random weights: the encoder's cost is not what is drilled), 4 shards of
4, micro-batches of 4, one encoder actor with one thread. A clean run of it is the reference every
encode drill's store is compared with, object by object (sha256 of every object's bytes).

The encoder actor is found through Ray's actor table: ``ray.util.state.list_actors`` when the
dashboard is installed, else the GCS table (a minimal Ray, as here). Peak memory comes from /proc
(Linux). ``--device cuda`` lets the jobs see this machine's GPUs (default: hidden).

Nothing here sets environment variables of this process: the children get theirs explicitly (Ray on
loopback without auth, the hub offline, the S3 endpoint of the drill).

The package: ``tools`` (/proc, jobs, the Ray host, store digests), ``context`` (records, the
registry, :class:`~bench.drills.context.DrillContext`), the drills by kind (``encode``, ``storage``,
``training``, ``inputs``), and here the results file, the table and the command.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import textwrap
import time

# Importing a drill module registers its drills; they run in this order: encode, storage, training, input.
from bench.drills import encode  # noqa: F401
from bench.drills import storage  # noqa: F401  (isort: keep this order)
from bench.drills import training  # noqa: F401
from bench.drills import inputs  # noqa: F401
from bench.drills import security  # noqa: F401
from bench.drills import cluster  # noqa: F401  (its own multi-node Ray cluster: last)
from bench.drills.context import DRILLS, DrillContext, DrillOptions, DrillRecord, select_drills
from bench.drills.tools import RAY_CPUS, log
from bench.harness import Column, ResultsFile, format_columns

# bench/drills.json: the facts of the latest run, then every drill's latest record (insertion order).
RESULTS_FILE = ResultsFile(format="rae-drills-results", version=1, items_key="drills", what="drills",
                           canonical=False, strict=False)

# --------------------------------------------------------------------------------------------
# the table and the results file


def _cell(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


SUMMARY_COLUMNS = [Column("drill", 20), Column("category", 9, gap=" "), Column("result", 6, gap=" "),
                   Column("seconds", 8, right=True, gap=" "), Column("findings", 8, right=True, gap=" "),
                   Column("lost", 0)]


def format_table(records: dict[str, dict]) -> str:
    """A summary line per drill, then each drill's done / expected / happened / lost, wrapped."""
    rows = []
    for name, r in records.items():
        result = "ERROR" if r.get("error") else ("PASS" if r.get("ok") else "FAIL")
        rows.append((name, r.get("category", ""), result, f"{r.get('seconds', 0):.1f}",
                     str(len(r.get("findings") or [])), _cell(r.get("lost", ""), 52)))
    lines = format_columns(SUMMARY_COLUMNS, rows, rule=105, strip=False)
    for name, r in records.items():
        result = "ERROR" if r.get("error") else ("PASS" if r.get("ok") else "FAIL")
        lines += ["", f"[{name}] {result} ({r.get('seconds', 0):.1f} s)"]
        fields = [("done", r.get("did")), ("expected", r.get("expected")), ("happened", r.get("happened")),
                  ("lost", r.get("lost"))]
        fields += [("finding", f) for f in r.get("findings") or []]
        if r.get("error"):
            fields.append(("error", r["error"]))
        for label, text in fields:
            wrapped = textwrap.wrap(" ".join(str(text or "").split()), 90) or [""]
            lines.append(f"  {label + ':':<10}{wrapped[0]}")
            lines += [f"  {'':<10}{w}" for w in wrapped[1:]]
    return "\n".join(lines)


def load_results(path: str) -> dict:
    """The results file's content; an empty one when there is none or it is not a drills results file."""
    return RESULTS_FILE.load(path)


def merge_results(path: str, run: dict, records: dict[str, dict]) -> dict:
    """Write ``run`` (facts of this invocation) with the drills of an earlier file that were not
    rerun, and this run's; returns what was written."""
    return RESULTS_FILE.merge(path, records, facts=run)


# --------------------------------------------------------------------------------------------
# the command


def run_drills(names: list[str], options: DrillOptions) -> tuple[dict[str, dict], dict]:
    ctx = DrillContext(options)
    records: dict[str, dict] = {}
    reference: dict = {}
    try:
        # Every drill compares with the clean run: make it (and start Ray) first, timed on its own.
        t0 = time.monotonic()
        ctx.clean_store()
        reference["setup_s"] = round(time.monotonic() - t0, 1)
        for name in names:
            d = DRILLS[name]
            rec = DrillRecord(name, d.category)
            log(f"{name}: {d.summary}")
            t0 = time.monotonic()
            try:
                d.run(ctx, rec)
            except Exception as e:  # noqa: BLE001 - one drill's failure must not stop the others
                import traceback

                rec.ok = False
                rec.error = f"{type(e).__name__}: {e}"
                log(f"{name}: the drill raised:\n{traceback.format_exc()}")
            rec.seconds = round(time.monotonic() - t0, 1)
            records[name] = rec.to_dict()
            log(f"{name}: {'PASS' if rec.ok else 'FAIL'} in {rec.seconds:.1f} s")
        reference.update({k: v for k, v in ctx._clean.items() if k != "digests"})
        reference["objects"] = len(ctx._clean["digests"])
    finally:
        ctx.close()
    return records, reference


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.drills", description="Faults the pipeline must survive.")
    p.add_argument("--quick", action="store_true", help="fewer steps and attempts (the code paths, quickly)")
    p.add_argument("--only", default=None, help=f"comma-separated drills: {', '.join(DRILLS)}")
    p.add_argument("--out", default="bench/drills.json", help="results file (merged by drill name)")
    p.add_argument("--work-dir", default="bench/work/drills", help="scratch folder (emptied first)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per command")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: hide GPUs from the jobs; cuda: let the encoder actors and the trainer use them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = select_drills(args.only)
    options = DrillOptions(quick=args.quick, work_dir=args.work_dir, timeout_s=args.timeout, device=args.device)
    started = time.time()
    t0 = time.monotonic()
    try:
        records, reference = run_drills(names, options)
    except (RuntimeError, ValueError) as e:  # the Ray cluster or the clean reference run could not be made
        print(f"drills: setup failed: {e}", file=sys.stderr)
        return 2
    run = {
        "command": " ".join(["python -m bench.drills", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.monotonic() - t0, 1),
        "quick": args.quick,
        "device": args.device,
        "environment": {"cpus": os.cpu_count(), "ray_cpus": RAY_CPUS, "host": socket.gethostname(),
                        "python": sys.version.split()[0]},
        "reference_clean_encode": reference,
    }
    merge_results(args.out, run, records)
    mem = reference.get("memory") or {}
    print(f"reference: Ray start + clean encode {reference.get('setup_s')} s (the clean encode "
          f"{reference.get('seconds')} s, {reference.get('objects')} objects, largest process "
          f"{mem.get('max_process_peak_mib')} MiB)\n")
    print(format_table(records))
    failed = [n for n, r in records.items() if not r["ok"]]
    print(f"\n{len(records) - len(failed)}/{len(records)} drills passed in {run['seconds']:.0f} s; results in "
          f"{args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
