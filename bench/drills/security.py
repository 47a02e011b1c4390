"""Security drills: a recognisable fake secret must not reach Ray's session folders, the store or any output
(``credential_scan``), and a store encoded under a group-readable umask is readable by a teammate
(``teammate_reads_store``)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile

from bench.drills.context import S3_BUCKET, DrillContext, DrillRecord, drill
from bench.drills.tools import (compare_digests, describe_comparison, encode_outcome, proc_title, proc_tree,
                                store_digests)

# A teammate: another user (uid 65534) in the group that owns the store; an outsider: the same user in
# another group. Only root can start processes as them.
OTHER_UID = 65534
OTHER_GID = 65534
TEAM_UMASK = 0o027  # group may read, others may not


def secret_forms(secret: str) -> dict[str, bytes]:
    """The byte strings that give ``secret`` away: itself, its hex (both cases), and its standard and
    URL-safe base64 at each of the 3 alignments it can have inside a longer encoded blob (the
    characters made of the secret's bits alone)."""
    raw = secret.encode()
    forms = {"plain": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}
    for pad in range(3):
        first, last = -(-8 * pad // 6), 8 * (pad + len(raw)) // 6
        for name, enc in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            forms[f"{name}@{pad}"] = enc(b"\0" * pad + raw)[first:last]
    return forms


def scan_bytes(data: bytes, where: str, forms: dict[str, bytes]) -> list[str]:
    return [f"{where} ({name})" for name, form in forms.items() if form in data]


def scan_tree(root: str, forms: dict[str, bytes]) -> tuple[list[str], int]:
    """(hits, files read) over every regular file under ``root``."""
    hits, files = [], 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            files += 1
            hits += scan_bytes(data, path, forms)
    return hits, files


def scan_s3(ctx: DrillContext, prefix: str, forms: dict[str, bytes]) -> tuple[list[str], int]:
    """(hits, objects read) over every object under ``prefix`` of the drills' bucket."""
    client = ctx.s3().access.client()
    hits, count = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            hits += scan_bytes(client.get_object(Bucket=S3_BUCKET, Key=obj["Key"])["Body"].read(),
                          f"s3://{S3_BUCKET}/{obj['Key']}", forms)
            count += 1
    return hits, count


def ray_session_dirs(ctx: DrillContext) -> list[str]:
    """The session folders of the drills' Ray cluster, from its raylets' command lines."""
    found = set()
    for pid in proc_tree(ctx.ray().pid):
        m = re.search(r"--raylet_socket_name=(\S+)/sockets/raylet", proc_title(pid))
        if m:
            found.add(m.group(1))
    return sorted(found)


def _record_digest(data: bytes) -> str:
    """sha256 of a shard record without the Ray node that wrote it (another cluster, another node)."""
    from schemas import store_v1 as S

    record = json.loads(data)
    record.pop(S.RECORD_WRITTEN_BY, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def compare_with_clean(ctx: DrillContext, uri: str, storage_options: dict | None = None) -> dict:
    """:func:`compare_digests` of the store at ``uri`` with the clean run's, every object byte for
    byte except the shard records, compared without their ``written_by``."""
    from pipeline import uri as U

    clean = ctx.clean_store()
    stores = ((store_digests(uri, storage_options), uri, storage_options), (dict(clean["digests"]), clean["uri"], None))
    for digests, root, so in stores:
        for key in [k for k in digests if k.startswith("records/")]:
            digests[key] = _record_digest(U.read_bytes(U.join(root, key), so))
    return compare_digests(stores[0][0], stores[1][0])


def _without_ray_address(cmd: list[str]) -> list[str]:
    i = cmd.index("--ray-address")
    return cmd[:i] + cmd[i + 2:]


@drill("credential_scan", "security", "encode with a canary secret: nowhere in Ray's sessions, the store, outputs")
def credential_scan(ctx: DrillContext, rec: DrillRecord) -> None:
    ctx.clean_store()  # the reference (and the drills' Ray) first
    s3 = ctx.s3()
    key_id, secret = "AKIACANARY" + secrets.token_hex(5).upper(), "rae-canary-" + secrets.token_hex(16)
    forms = secret_forms(secret)
    env = ctx.s3_env(s3.url)
    env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)  # moto accepts any key pair
    rec.did = ("ran `rae-pipeline encode` (shared config) to s3:// on moto with a fresh recognisable secret in "
               "the driver's AWS_SECRET_ACCESS_KEY, twice: on the drills' Ray cluster (--ray-address; its workers "
               "have the cluster's own credentials) and on a Ray the job starts itself in a Ray temp folder of its "
               "own (its workers inherit the secret); then read every file under both Ray session folders, every "
               "object under the output prefixes (stores, run logs) and every output file of the drills' jobs, "
               "looking for the secret, its hex and its base64 forms (3 alignments, standard and URL-safe)")
    rec.expected = ("both jobs succeed and write the clean run's store (shard records compared without the node "
                    "that wrote them); zero hits anywhere: no credential in "
                    "runtime_env, task arguments, the object store, Ray's logs, the store, the run log or any "
                    "printed line")
    ray_tmp = tempfile.mkdtemp(prefix="rae-drill-ray-")  # short: Ray's socket paths stay under 107 bytes
    runs, hits, scanned = {}, [], {"files": 0, "objects": 0}
    try:
        for name, cmd, run_env in (
            ("cluster", ctx.encode_cmd(s3.uri("credential-scan/cluster")), env),
            ("own_ray", _without_ray_address(ctx.encode_cmd(s3.uri("credential-scan/own-ray"))),
             dict(env, RAY_TMPDIR=ray_tmp)),
        ):
            job, rc = ctx.run(f"credential-scan-{name}", cmd, run_env)
            outcome = encode_outcome(job, rc)
            if rc == 0:
                cmp = compare_with_clean(ctx, outcome["uri"], ctx.s3_options())
                outcome["store"] = describe_comparison(cmp)
                outcome["identical"] = cmp["identical"]
            runs[name] = outcome
        sessions = ray_session_dirs(ctx) + [ray_tmp]
        for root in sessions + [ctx.path("logs")]:
            h, n = scan_tree(root, forms)
            hits += h
            scanned["files"] += n
        h, n = scan_s3(ctx, "credential-scan/", forms)
        hits += h
        scanned["objects"] = n
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rec.figures = {"files_scanned": scanned["files"], "objects_scanned": scanned["objects"], "hits": len(hits),
                   "forms": len(forms), "job_s": {k: r["seconds"] for k, r in runs.items()}}
    rec.details = {"runs": runs, "session_folders": sessions, "hits": hits[:50]}
    jobs_ok = all(r["rc"] == 0 and r.get("identical") for r in runs.values())
    rec.ok = bool(jobs_ok and not hits and scanned["files"] and scanned["objects"])
    rec.happened = (
        "; ".join(f"{k}: exit {r['rc']} in {r['seconds']} s" + (f", {r['store']}" if r.get("store") else
                                                               f" ({r.get('error')})") for k, r in runs.items())
        + f"; scanned {scanned['files']} files ({len(sessions)} Ray session folder(s) and the jobs' outputs) and "
        f"{scanned['objects']} objects for {len(forms)} forms of the secret: {len(hits)} hit(s)"
        + (f", e.g. {hits[0]}" if hits else ""))
    rec.lost = "nothing" if rec.ok else "see happened"
    if hits:
        rec.findings.append(f"the driver's AWS secret appears in {len(hits)} place(s), first {hits[0]}")


def _modes(root: str) -> tuple[dict[str, int], dict[str, int]]:
    """({path: permission bits} of the files, of the folders) under ``root``."""
    files, dirs = {}, {}
    for folder, names_d, names_f in os.walk(root):
        for n in names_d:
            dirs[os.path.join(folder, n)] = os.stat(os.path.join(folder, n)).st_mode & 0o7777
        for n in names_f:
            files[os.path.join(folder, n)] = os.stat(os.path.join(folder, n)).st_mode & 0o7777
    return files, dirs


def _read_all_as(uid: int, gid: int, root: str) -> dict:
    """sha256 of every file under ``root``, read by ``find -exec sha256sum`` running as uid:gid (no
    Python: the interpreter may not be reachable by another user)."""
    def become():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    proc = subprocess.run(["find", root, "-type", "f", "-exec", "sha256sum", "{}", "+"], preexec_fn=become,
                          capture_output=True, text=True, cwd="/", timeout=120)
    digests = {}
    for line in proc.stdout.splitlines():
        digest, _, path = line.partition("  ")
        digests[os.path.relpath(path, root)] = digest
    return {"rc": proc.returncode, "digests": digests, "stderr": proc.stderr.strip()[:300]}


@drill("teammate_reads_store", "security", "encode under umask 027: modes follow it; a teammate reads every file")
def teammate_reads_store(ctx: DrillContext, rec: DrillRecord) -> None:
    ctx.clean_store()  # the reference first
    out = ctx.path("teammate", "stores")
    ray_tmp = tempfile.mkdtemp(prefix="rae-drill-ray-")
    # The whole job under the umask: the driver, and the Ray it starts (so its workers have it too).
    cmd = ["sh", "-c", f"umask {TEAM_UMASK:03o} && exec \"$@\"", "sh",
           *_without_ray_address(ctx.encode_cmd(out))]
    try:
        job, rc = ctx.run("teammate-encode", cmd, ctx.env(RAY_TMPDIR=ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    outcome = encode_outcome(job, rc)
    root_user = os.geteuid() == 0
    rec.did = (f"ran `rae-pipeline encode` (shared config, a Ray of its own) under umask {TEAM_UMASK:03o}; checked "
               "the mode of every file and folder under its output (store and run log); then "
               + ("read every file as a teammate (uid 65534 in the store's group, `find -exec sha256sum`) and as an "
                  "outsider (uid 65534, group 65534), and " if root_user else "")
               + "ran `stores verify` from a process under umask 077")
    rec.expected = (f"files {0o666 & ~TEAM_UMASK:04o} and folders {0o777 & ~TEAM_UMASK:04o} (what open()/mkdir() give "
                    "under the umask); " + ("the teammate reads every file, as the owner does; the outsider "
                                            "reads none; " if root_user else "")
                    + "the store is the clean run's; `stores verify` passes")
    if rc != 0:
        rec.happened = f"the encode failed (exit {rc}): {outcome.get('error')}"
        rec.lost = "see happened"
        rec.details = {"encode": outcome}
        return
    store = outcome["uri"]
    files, dirs = _modes(out)
    wrong = {p: f"{m:04o}" for p, m in files.items() if m != 0o666 & ~TEAM_UMASK}
    wrong.update({p + "/": f"{m:04o}" for p, m in dirs.items() if m != 0o777 & ~TEAM_UMASK})
    details = {"encode": outcome, "files": len(files), "folders": len(dirs),
               "wrong_modes": dict(list(wrong.items())[:20])}
    ok = bool(files) and not wrong
    happened = [f"{len(files)} files and {len(dirs)} folders, {len(wrong)} with another mode"
                + (f" (e.g. {next(iter(wrong.items()))})" if wrong else "")]
    if root_user:
        gid = os.stat(store).st_gid
        mate, outsider = _read_all_as(OTHER_UID, gid, store), _read_all_as(OTHER_UID, OTHER_GID, store)
        same = mate["digests"] == store_digests(store)  # every byte the owner reads
        details.update(teammate={k: v for k, v in mate.items() if k != "digests"}, teammate_files=len(mate["digests"]),
                       outsider={k: v for k, v in outsider.items() if k != "digests"},
                       outsider_files=len(outsider["digests"]))
        ok = ok and mate["rc"] == 0 and same and not outsider["digests"]
        happened.append(f"teammate (uid {OTHER_UID}, gid {gid}) read {len(mate['digests'])} files (exit {mate['rc']}), "
                        f"{'every byte as the owner reads it' if same else 'NOT what the owner reads'}; outsider "
                        f"read {len(outsider['digests'])} files (exit {outsider['rc']})")
    cmp = compare_with_clean(ctx, store)
    ok = ok and cmp["identical"]
    happened.append(f"store: {describe_comparison(cmp)} (shard records without the node that wrote them)")
    details["comparison"] = cmp
    vjob, vrc = ctx.run("teammate-verify", ["sh", "-c", "umask 077 && exec \"$@\"", "sh", *ctx.verify_cmd(store)],
                        timeout_s=300)
    ok = ok and vrc == 0
    happened.append(f"`stores verify` under umask 077 exit {vrc}")
    details["verify"] = vjob.stdout().strip()[-500:]
    rec.ok, rec.details = ok, details
    rec.figures = {"files": len(files), "wrong_modes": len(wrong), "encode_s": outcome["seconds"]}
    if not root_user:
        happened.append("not run as root: no process of another user could be started (modes and verify checked)")
    rec.happened = "; ".join(happened)
    rec.lost = "nothing" if ok else "see happened"
