"""The pieces of `make drills` (the drills themselves are not part of the test suite): the fault
proxy as a real process in front of a tiny HTTP server and in front of moto (s3fs through it), the
/proc memory sampler, store digests and damage, the bad-input folder, the table and results file."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.drills import format_table, load_results, merge_results
from bench.drills.context import DRILLS, WORK_MARKER, DrillContext, DrillOptions, DrillRecord, select_drills
from bench.drills.inputs import _jpeg_with_header_size, write_bad_input
from bench.drills.tools import (Job, MemorySampler, compare_digests, describe_comparison, encode_outcome, error_line,
                                flip_bytes, line_with, proc_memory_kib, proc_title, proc_tree, records_written,
                                store_digests)
from bench.faultproxy import FAULT_KINDS, FaultProxy, FaultRates

# --------------------------------------------------------------------------------------------
# a tiny upstream: an object store in a dict, counting the requests it sees


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    objects: dict[str, bytes] = {}
    seen: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        self.seen.append(("GET", self.path))
        if self.path not in self.objects:
            return self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        self._reply(200, self.objects[self.path], {"ETag": '"e"', "X-Upstream": "yes"})

    def do_HEAD(self):
        self.seen.append(("HEAD", self.path))
        self._reply(200 if self.path in self.objects else 404)

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(("PUT", self.path))
        self.objects[self.path] = body
        self._reply(200, b"", {"ETag": '"put"'})

    def do_DELETE(self):
        self.seen.append(("DELETE", self.path))
        self.objects.pop(self.path, None)
        self._reply(204)


@pytest.fixture
def upstream():
    _Upstream.objects, _Upstream.seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Upstream
    server.shutdown()
    server.server_close()


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) over a fresh connection, or the exception the client saw."""
    conn = _conn(url)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    except (OSError, http.client.HTTPException) as e:
        return e
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# the fault proxy


@pytest.mark.timeout(60)
def test_proxy_without_faults_forwards_every_method_byte_for_byte(upstream):
    url, up = upstream
    with FaultProxy(url) as proxy:
        data = os.urandom(300_000)
        assert _request(proxy.url, "PUT", "/b/k", data)[0] == 200
        status, headers, body = _request(proxy.url, "GET", "/b/k")
        assert status == 200 and body == data and headers["X-Upstream"] == "yes"
        assert int(headers["Content-Length"]) == len(data)
        status, headers, body = _request(proxy.url, "HEAD", "/b/k")
        assert status == 200 and body == b""
        assert _request(proxy.url, "GET", "/b/missing")[0] == 404  # upstream errors pass through unchanged
        # A chunked request body reaches the upstream de-chunked.
        conn = _conn(proxy.url)
        conn.putrequest("PUT", "/b/chunked")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for part in (b"hello ", b"chunked ", b"world"):
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
        assert conn.getresponse().status == 200
        conn.close()
        assert up.objects["/b/chunked"] == b"hello chunked world"
        assert _request(proxy.url, "DELETE", "/b/k")[0] == 204 and "/b/k" not in up.objects
        # Keep-alive: several requests on one client connection.
        conn = _conn(proxy.url)
        for _ in range(3):
            conn.request("GET", "/b/chunked")
            assert conn.getresponse().read() == b"hello chunked world"
        conn.close()
        stats = proxy.stats()
    assert stats["requests"] == stats["forwarded"] == 9 and stats["faulted"] == 0
    assert stats["by_method"] == {"DELETE": 1, "GET": 5, "HEAD": 1, "PUT": 2}
    assert len(up.seen) == 9


@pytest.mark.timeout(60)
def test_each_fault_kind_does_what_it_says(upstream):
    url, up = upstream
    up.objects["/b/obj"] = data = bytes(range(256)) * 100
    # error: an S3-style 500/503 from the proxy; the upstream never sees the request.
    with FaultProxy(url, FaultRates(error=1.0)) as proxy:
        replies = [_request(proxy.url, "GET", "/b/obj") for _ in range(8)]
        assert {r[0] for r in replies} == {500, 503}
        assert all(b"<Code>" in r[2] and b"faultproxy" in r[2] for r in replies)
        assert {r[1]["Content-Type"] for r in replies} == {"application/xml"}
        assert up.seen == [] and proxy.stats()["faults"]["error"] == 8
    # drop: the connection is reset without a response; the upstream never sees the request.
    with FaultProxy(url, FaultRates(drop=1.0)) as proxy:
        assert isinstance(_request(proxy.url, "PUT", "/b/new", b"x"), (ConnectionError, http.client.HTTPException))
        assert up.seen == [] and "/b/new" not in up.objects
    # lost_response: the PUT takes effect upstream, the client gets no response.
    with FaultProxy(url, FaultRates(lost_response=1.0)) as proxy:
        reply = _request(proxy.url, "PUT", "/b/new", b"payload")
        assert isinstance(reply, (ConnectionError, http.client.HTTPException))
        assert up.objects["/b/new"] == b"payload" and up.seen == [("PUT", "/b/new")]
    # truncate: the full Content-Length is announced, half the body arrives, then the connection dies.
    with FaultProxy(url, FaultRates(truncate=1.0)) as proxy:
        conn = _conn(proxy.url)
        conn.request("GET", "/b/obj")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)) as info:
            resp.read()
        if isinstance(info.value, http.client.IncompleteRead):
            assert info.value.partial == data[: len(data) // 2]
        conn.close()
        # A response without a body cannot be cut: it is lost instead.
        assert isinstance(_request(proxy.url, "HEAD", "/b/obj"), (ConnectionError, http.client.HTTPException))


@pytest.mark.timeout(60)
def test_fault_draws_are_seeded_and_rates_can_change(upstream):
    url, up = upstream
    up.objects["/b/o"] = b"abc"
    rates = FaultRates(error=0.2, drop=0.1, truncate=0.1)

    def outcomes(proxy):
        out = []
        for _ in range(60):
            r = _request(proxy.url, "GET", "/b/o")
            out.append(type(r).__name__ if isinstance(r, Exception) else (r[0], r[2]))
        return out

    with FaultProxy(url, rates, seed=7) as a:
        first = outcomes(a)
        stats = a.stats()
    with FaultProxy(url, rates, seed=7) as b:
        assert outcomes(b) == first  # sequential requests: the same draws, the same faults
    assert stats["requests"] == 60 and 10 <= stats["faulted"] <= 36
    assert sum(stats["faults"].values()) == stats["faulted"] and set(stats["faults"]) == set(FAULT_KINDS)
    assert (200, b"abc") in first and any(o[0] in (500, 503) for o in first if isinstance(o, tuple))
    with FaultProxy(url, rates, seed=7) as c:
        assert c.set_rates(error=0.0, drop=0.0, truncate=0.0)["rates"]["error"] == 0.0
        assert all(o == (200, b"abc") for o in outcomes(c))
        status = _request(c.url, "POST", "/__faultproxy__/rates", json.dumps({"error": 2.0}).encode())
        assert status[0] == 400 and b"not in [0, 1]" in status[2]
        assert _request(c.url, "POST", "/__faultproxy__/rates", b'{"boom": 0.1}')[0] == 400
    with pytest.raises(ValueError, match="sum to"):
        FaultRates(error=0.6, drop=0.6)
    with pytest.raises(ValueError, match="not in"):
        FaultRates(truncate=-0.1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_s3fs_through_the_proxy_never_returns_wrong_bytes(s3_endpoint):
    """A real S3 client (s3fs/botocore) against moto through 25% faults: every call either returns
    exactly the stored bytes (retries) or raises; a 100% outage raises."""
    import s3fs

    rates = FaultRates(error=0.1, drop=0.05, lost_response=0.05, truncate=0.05)
    with FaultProxy(s3_endpoint, rates, seed=3) as proxy:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": proxy.url, "region_name": "us-east-1"})
        ok = 0
        for i in range(8):
            data = os.urandom(20_000 + i)
            try:
                fs.pipe_file(f"test-bucket/drills-unit/o{i}", data)
                assert fs.cat_file(f"test-bucket/drills-unit/o{i}") == data
                assert fs.cat_file(f"test-bucket/drills-unit/o{i}", start=5, end=900) == data[5:900]
                ok += 1
            except OSError:
                pass  # a clear failure is allowed; wrong bytes are not
        stats = proxy.stats()
        assert ok >= 6 and stats["faulted"] > 0
        proxy.set_rates(error=1.0, drop=0.0, lost_response=0.0, truncate=0.0)
        fs.invalidate_cache()
        with pytest.raises(OSError):
            fs.cat_file("test-bucket/drills-unit/o0")


# --------------------------------------------------------------------------------------------
# processes and memory


def test_memory_sampler_sees_a_childs_peak_and_the_process_tree():
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
            "x = bytearray(150 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.6); del x;"
            "print(c.pid, flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        sampler = MemorySampler(proc.pid, None, interval_s=0.02).start()
        grandchild = int(proc.stdout.readline())  # after the 150 MiB were freed again
        time.sleep(0.1)
        assert set(proc_tree(proc.pid)) == {proc.pid, grandchild}
        summary = sampler.stop()
    finally:
        for pid in proc_tree(proc.pid)[::-1]:
            os.kill(pid, 9)
        proc.wait()
    # The peak survives the free (VmHWM); RSS now is lower.
    assert summary["peak_mib_by_role"]["driver"] >= 150
    assert summary["max_process_peak_mib"] >= 150 and summary["processes"] == 2
    rss, hwm = proc_memory_kib(os.getpid())
    assert 0 < rss <= hwm
    assert proc_memory_kib(2**22 + 12345) is None and proc_title(2**22 + 12345) == ""


def test_job_wait_kills_on_timeout_and_error_lines(tmp_path):
    ctx = DrillContext(DrillOptions(work_dir=str(tmp_path / "w")))
    try:
        job, rc = ctx.run("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5)
        assert rc == -9 and job.seconds < 30
        code = "import sys; print('Error: the store is gone', file=sys.stderr); sys.exit(1)"
        job, rc = ctx.run("fails", [sys.executable, "-c", code])
        assert rc == 1 and error_line(job.stderr()) == "Error: the store is gone"
        env = ctx.s3_env("http://127.0.0.1:9")
        assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["RAY_AUTH_MODE"] == "disabled"
        assert "AWS_ENDPOINT_URL" not in ctx.env()
    finally:
        ctx.close()
    # A folder the drills did not make is never emptied; their own is, on every run.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not emptying"):
        DrillContext(DrillOptions(work_dir=str(tmp_path / "mine")))
    assert (tmp_path / "mine" / "keep.txt").exists()
    DrillContext(DrillOptions(work_dir=str(tmp_path / "w"))).close()
    assert sorted(os.listdir(tmp_path / "w")) == [WORK_MARKER, "logs"]
    tb = "Traceback (most recent call last):\n  File x\nray.exceptions.RayTaskError: boom\nValueError: bad shard 3\n"
    assert error_line(tb) == "ValueError: bad shard 3"
    assert line_with("a\nStoreError: shard(s) [1]\nb", r"shard\(s\)") == "StoreError: shard(s) [1]"


def test_encode_outcome_reads_what_the_cli_says(tmp_path):
    out, err = tmp_path / "o", tmp_path / "e"
    out.write_text("/x/stores/dinov2_train_256px_abc\n")
    err.write_text("encoded 12 images in 3 shard(s), 0.65 images/s, 2 failed; run log /x/_runs/r.json\n")
    job = Job("j", [], None, str(out), str(err), time.monotonic())
    got = encode_outcome(job, 0)
    assert (got["images"], got["shards_encoded"], got["failed"]) == (12, 3, 2)
    assert got["uri"] == "/x/stores/dinov2_train_256px_abc"
    err.write_text("store is complete, reused: /x\n")
    assert encode_outcome(job, 0)["reused"] is True


# --------------------------------------------------------------------------------------------
# stores, bad input, records


def test_store_digests_compare_and_flip_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "latents" / "c" / "1").mkdir(parents=True)
        (root / "latents" / "c" / "1" / "0").write_bytes(b"\x00" * 100)
        (root / "spec.json").write_text("{}")
    assert compare_digests(store_digests(str(a)), store_digests(str(b)))["identical"]
    flip_bytes(str(b / "latents" / "c" / "1" / "0"), 10, 4)
    assert (b / "latents" / "c" / "1" / "0").read_bytes()[8:16] == b"\x00\x00" + b"\xff" * 4 + b"\x00\x00"
    (b / ".tmp-leftover").write_bytes(b"x")
    (b / "spec.json").unlink()
    c = compare_digests(store_digests(str(b)), store_digests(str(a)))
    assert not c["identical"] and c["differ"] == ["latents/c/1/0"] and c["missing"] == ["spec.json"]
    assert c["extra"] == [".tmp-leftover"] and "NOT identical" in describe_comparison(c)
    (a / "records").mkdir()
    (a / "records" / "shard-000000.json").write_text("{}")
    assert records_written(str(a)) == 1


def test_bad_input_folder_fails_the_way_it_is_expected_to(tmp_path):
    """Every expected outcome of the bad-input folder is what the real preprocessing does."""
    from pipeline.preprocess import ImageDecodeError, preprocess_image_bytes
    from pipeline.sample_data import ensure_sample_data

    sample = ensure_sample_data(str(tmp_path / "sample"))
    expected = write_bad_input(str(tmp_path / "bad"), sample)
    assert sum(v == "ok" for v in expected.values()) == 13 and expected["odd/notes.txt"] == "not an item"
    for key, want in expected.items():
        data = (tmp_path / "bad" / "train" / key).read_bytes()
        if want == "not an item":
            continue
        try:
            preprocess_image_bytes(data, 32)
            got = "ok"
        except ImageDecodeError as e:
            got = e.reason
        assert got == want or (want == "truncated|corrupt" and got in ("truncated", "corrupt")), key
    with pytest.raises(ValueError, match="no SOF"):
        _jpeg_with_header_size(b"\xff\xd8\xff\xd9", 1, 1)


def test_registry_table_and_results_file(tmp_path):
    assert select_drills(None) == list(DRILLS)
    assert select_drills("train_nan, encode_driver_kill") == ["encode_driver_kill", "train_nan"]
    with pytest.raises(ValueError, match="unknown drill"):
        select_drills("nope")
    rec = DrillRecord("train_nan", "training", did="d", expected="e", happened="h " * 80, lost="nothing", ok=True,
                        seconds=3.25, findings=["a gap"])
    bad = DrillRecord("corrupt_chunk", "storage", error="RuntimeError: x")
    table = format_table({"train_nan": rec.to_dict(), "corrupt_chunk": bad.to_dict()})
    assert "train_nan" in table and "PASS" in table and "ERROR" in table and "finding:  a gap" in table
    assert max(len(line) for line in table.splitlines()) <= 110
    path = str(tmp_path / "drills.json")
    merge_results(path, {"command": "one"}, {"train_nan": rec.to_dict()})
    out = merge_results(path, {"command": "two"}, {"corrupt_chunk": bad.to_dict()})
    assert out["command"] == "two" and set(out["drills"]) == {"train_nan", "corrupt_chunk"}
    assert load_results(path)["drills"]["train_nan"]["ok"] is True
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    assert load_results(str(tmp_path / "other.json"))["drills"] == {}  # replaced by the next merge
    out = merge_results(str(tmp_path / "other.json"), {"command": "three"}, {"train_nan": rec.to_dict()})
    assert list(out) == ["format", "version", "command", "drills"] and list(out["drills"]) == ["train_nan"]


def test_the_package_runs_as_a_module_with_every_drill_in_order():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "bench.drills", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert " ".join(out.stdout.split()).count(", ".join(DRILLS)) == 1
    assert [DRILLS[n].category for n in DRILLS] == (["encode"] * 3 + ["storage"] * 3 + ["training"] * 2 + ["input"]
                                                    + ["security"] * 2 + ["encode"])  # the two-node cluster: last

