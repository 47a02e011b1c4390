"""Store tools on broken and lying stores: verify checks the spec against the arrays, opening for
training refuses a spec that lies, list shows broken stores, rm removes them only with --broken."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import uri as U
from pipeline.cli import app
from pipeline.store import (
    LatentStore,
    StoreError,
    StoreLayout,
    identify_store,
    list_stores,
    remove_store,
    shard_partial_stats,
    store_status,
    verify_store,
    write_array_store,
)
from schemas import store_v1 as S

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    """A complete store: 13 rows of 8x4x4 latents with flips, shards of 5 rows, chunks of 1 row."""
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((13, 8, 4, 4)).astype(np.float32)
    flip = rng.standard_normal((13, 8, 4, 4)).astype(np.float32)
    valid = np.ones(13, bool)
    valid[5] = False
    uri = str(tmp_path_factory.mktemp("admin") / "good")
    write_array_store(uri, lat, rng.integers(0, 3, 13), latents_flip=flip, valid=valid, num_classes=3,
                      layout=StoreLayout(samples_per_shard=5, samples_per_chunk=1))
    return uri


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_spec(store: str, edit) -> None:
    """Edit spec.json and fix the checksum in COMPLETE to match, as someone hiding the edit would."""
    spec = json.loads(open(f"{store}/{S.SPEC_FILE}", "rb").read())
    edit(spec)
    data = U.canonical_json(spec)
    open(f"{store}/{S.SPEC_FILE}", "wb").write(data)
    marker = json.loads(open(f"{store}/{S.COMPLETE_MARKER}").read())
    marker["spec_sha256"] = U.sha256_bytes(data)
    open(f"{store}/{S.COMPLETE_MARKER}", "w").write(json.dumps(marker))


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _both_dtypes(spec):
    spec["latent"]["logical_dtype"] = spec["latent"]["storage_dtype"] = "float32"


LIES = {
    # name: (edit, the spec key the report must name, the array metadata it contradicts)
    "latent shape": (_set("latent", "shape", [8, 2, 8]), "latent.shape", "latents/zarr.json shape"),
    "dtype": (_both_dtypes, "latent.storage_dtype", "latents/zarr.json dtype"),
    "inner chunk": (_set("layout", "samples_per_chunk", 5), "layout.samples_per_chunk",
                    "latents/zarr.json chunk shape"),
    "codec": (_set("layout", "compressor", {"name": "zstd", "level": 9}), "layout.compressor",
              "latents/zarr.json codecs"),
    "no flips": (_set("layout", "flips", False), "layout.flips", "layout.arrays.latents_flip"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_verify_and_open_refuse_a_spec_that_lies(good, tmp_path, lie):
    edit, key, where = LIES[lie]
    store = _copy(good, tmp_path / "lie")
    _rewrite_spec(store, edit)
    report = verify_store(store, workers=1)
    assert not report.ok and report.error is None
    assert any(key in p and where in p for p in report.problems), report.problems
    with pytest.raises(StoreError, match=key):
        LatentStore.open(store)
    st = store_status(store)
    assert st.complete and st.broken and key in st.broken


def test_verify_names_counts_that_lie(good, tmp_path):
    store = _copy(good, tmp_path / "counts")

    def edit(spec):
        spec["shards"][0]["num_valid"] -= 1  # counts.num_valid left alone: still a valid spec

    _rewrite_spec(store, edit)
    report = verify_store(store, workers=1)
    assert not report.ok
    assert any("counts.num_valid" in p for p in report.problems), report.problems
    # A record claiming rows of another shard.
    store2 = _copy(good, tmp_path / "record")
    rec = json.loads(open(f"{store2}/{S.record_name(1)}").read())
    rec["start"] = 4
    open(f"{store2}/{S.record_name(1)}", "w").write(json.dumps(rec))
    report = verify_store(store2, workers=1)
    assert any(p.startswith("shard 1: record start is 4") for p in report.problems), report.problems


def test_train_dit_refuses_a_lying_store_in_one_line(good, tmp_path):
    store = _copy(good, tmp_path / "lie")
    _rewrite_spec(store, _set("latent", "shape", [8, 2, 8]))
    out = runner.invoke(app, ["train-dit", "--store", store, "--run-dir", str(tmp_path / "run"), "--preset", "debug"])
    assert out.exit_code == 1, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in out.output
    assert store in lines[0] and "latent.shape" in lines[0]


def test_verify_of_a_spec_missing_a_key_is_one_line(good, tmp_path):
    store = _copy(good, tmp_path / "nokey")

    def edit(spec):
        del spec["statistics"]

    _rewrite_spec(store, edit)
    out = runner.invoke(app, ["stores", "verify", store])
    assert out.exit_code == 1
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.output
    assert f"{store}/{S.SPEC_FILE}" in lines[0] and "statistics" in lines[0]


def test_verify_workers_give_the_same_report(good, tmp_path):
    out = runner.invoke(app, ["stores", "verify", good, "--workers", "2"])
    assert out.exit_code == 0 and "OK (3 shards checked)" in out.stdout, out.output
    store = _copy(good, tmp_path / "corrupt")
    for shard in (0, 2):
        obj = tmp_path / "corrupt" / S.LATENTS_FLIP / "c" / str(shard) / "0" / "0" / "0"
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0x10
        obj.write_bytes(bytes(data))
    (tmp_path / "corrupt" / S.record_name(1)).unlink()
    one, three = verify_store(store, workers=1), verify_store(store, workers=3)
    assert one.problems == three.problems and not one.ok
    assert one.problems == [
        "shard 0: object latents_flip/c/0/0/0/0 is corrupt (sha256 differs from its record)",
        "shard 1: completion record records/shard-000001.json is missing",
        "shard 2: object latents_flip/c/2/0/0/0 is corrupt (sha256 differs from its record)",
    ]
    assert one.checked_shards == 2


def _broken_root(good, root) -> dict[str, str]:
    """Under ``root``: a good store and stores broken four ways, plus two prefixes that are not stores."""
    names = {}
    names["good"] = _copy(good, root / "good")
    names["lying"] = _copy(good, root / "lying")
    _rewrite_spec(names["lying"], _set("latent", "shape", [8, 2, 8]))
    names["no_spec"] = _copy(good, root / "no_spec")
    (root / "no_spec" / S.SPEC_FILE).unlink()
    names["no_group"] = _copy(good, root / "no_group")
    (root / "no_group" / "zarr.json").unlink()
    names["bad_marker"] = _copy(good, root / "bad_marker")
    (root / "bad_marker" / S.COMPLETE_MARKER).write_text("{not json")
    names["foreign"] = _copy(good, root / "foreign")
    (root / "foreign" / "zarr.json").unlink()
    (root / "foreign" / "notes.txt").write_text("not part of a store")
    (root / "empty").mkdir()
    names["empty"] = str(root / "empty")
    return names


def test_list_shows_broken_stores_with_the_reason(good, tmp_path):
    _broken_root(good, tmp_path)
    statuses = {st.uri.rsplit("/", 1)[-1]: st for st in list_stores(str(tmp_path))}
    assert sorted(statuses) == ["bad_marker", "good", "lying", "no_group", "no_spec"]
    assert statuses["good"].broken is None and statuses["good"].complete
    assert "latent.shape" in statuses["lying"].broken
    assert "no spec.json" in statuses["no_spec"].broken
    assert "zarr.json" in statuses["no_group"].broken and statuses["no_group"].store_id is None
    assert "COMPLETE is not valid JSON" in statuses["bad_marker"].broken

    out = runner.invoke(app, ["stores", "list", str(tmp_path)])
    assert out.exit_code == 0, out.output
    rows = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("│")}
    assert " complete " in rows["good"]
    for name in ("lying", "no_spec", "no_group", "bad_marker"):
        assert " BROKEN " in rows[name]
        assert any(line.startswith(f"BROKEN {name}: ") for line in out.stdout.splitlines())
    assert "foreign" not in rows and "empty" not in rows


def test_which_prefix_is_a_store(good, tmp_path):
    names = _broken_root(good, tmp_path)
    assert identify_store(names["good"]).problem is None
    assert identify_store(names["no_group"]).problem == "zarr.json (the store's group) is missing"
    assert identify_store(names["foreign"]) is None  # a file the store does not hold
    assert identify_store(names["empty"]) is None
    assert identify_store(str(tmp_path)) is None  # the root holding stores
    assert identify_store(str(tmp_path / "nowhere")) is None
    # Leftovers of interrupted atomic writes do not stop rule 2.
    (tmp_path / "no_group" / ".tmp-abc123").write_bytes(b"")
    assert identify_store(names["no_group"]) is not None
    # A group of some other Zarr data is not a store, whatever it holds.
    other = _copy(good, tmp_path / "other")
    (tmp_path / "other" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                              "attributes": {"project": "x"}}))
    (tmp_path / "other" / "extra").mkdir()
    assert identify_store(other) is None


def test_rm_removes_broken_stores_only_with_broken(good, tmp_path):
    names = _broken_root(good, tmp_path)
    for name in ("lying", "no_spec", "no_group", "bad_marker"):
        refused = runner.invoke(app, ["stores", "rm", "-y", names[name]])
        assert refused.exit_code == 1 and "--broken" in refused.stderr, refused.output
        assert len(refused.output.strip().splitlines()) == 1
        assert U.exists(names[name])
    with pytest.raises(StoreError, match="broken"):
        remove_store(names["lying"])

    declined = runner.invoke(app, ["stores", "rm", "--broken", names["lying"]], input="n\n")
    assert declined.exit_code != 0 and U.exists(U.join(names["lying"], S.SPEC_FILE))
    confirmed = runner.invoke(app, ["stores", "rm", "--broken", names["lying"]], input="y\n")
    assert confirmed.exit_code == 0 and "BROKEN" in confirmed.output and not U.exists(names["lying"])
    for name in ("no_spec", "no_group", "bad_marker"):
        out = runner.invoke(app, ["stores", "rm", "--broken", "-y", names[name]])
        assert out.exit_code == 0, out.output
        assert not U.exists(names[name])

    for name in ("foreign", "empty"):
        refused = runner.invoke(app, ["stores", "rm", "--broken", "-y", names[name]])
        assert refused.exit_code == 1 and "not a latent store" in refused.stderr
        assert U.exists(names[name])
    assert (tmp_path / "foreign" / "notes.txt").exists()
    refused = runner.invoke(app, ["stores", "rm", "--broken", "-y", str(tmp_path)])
    assert refused.exit_code == 1 and (tmp_path / "good").exists()
    # The good store is removed without --broken, as before.
    assert runner.invoke(app, ["stores", "rm", "-y", names["good"]]).exit_code == 0
    assert [st.uri for st in list_stores(str(tmp_path))] == []


def test_list_and_rm_of_a_broken_store_on_s3(good, s3_endpoint):
    root = "s3://test-bucket/admin-broken"
    fs, _ = U.get_fs(root)
    fs.put(good, f"{root}/lying", recursive=True)
    fs.put(good, f"{root}/good", recursive=True)
    fs.rm(f"{root}/lying/{S.SPEC_FILE}")
    statuses = {st.uri.rsplit("/", 1)[-1]: st for st in list_stores(root)}
    assert statuses["good"].broken is None and "no spec.json" in statuses["lying"].broken
    assert verify_store(f"{root}/good", workers=2).ok
    refused = runner.invoke(app, ["stores", "rm", "-y", f"{root}/lying"])
    assert refused.exit_code == 1 and "--broken" in refused.stderr
    assert runner.invoke(app, ["stores", "rm", "--broken", "-y", f"{root}/lying"]).exit_code == 0
    assert [st.uri.rsplit("/", 1)[-1] for st in list_stores(root)] == ["good"]


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_verify_recomputes_the_statistics_of_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(1)
    lat = rng.standard_normal((10, 8, 4, 4)).astype(np.float32) * 3
    valid = np.ones(10, bool)
    valid[[2, 7]] = False
    st = write_array_store(str(tmp_path / dtype), lat, rng.integers(0, 2, 10), valid=valid, num_classes=2,
                           layout=StoreLayout(dtype=dtype, samples_per_shard=4, samples_per_chunk=2))
    report = verify_store(st.uri, workers=2)
    assert report.ok and report.checked_shards == 3, report.problems


def test_tiled_partial_statistics_equal_the_whole_array_definition():
    """shard_partial_stats works on column tiles (cache-sized); the result is bit for bit the
    definition on the whole float64 array, which existing stores' partial statistics hold."""
    rng = np.random.default_rng(3)
    for rows, shape, dtype in [(1, (8, 4, 4), np.float16), (37, (5, 7, 3), np.float32),
                               (300, (96, 16, 16), np.float16), (2, (70_000,), np.float16)]:
        parts = [(rng.standard_normal((rows,) + shape) * 3 + 1).astype(dtype),
                 (rng.standard_normal((rows // 2,) + shape)).astype(dtype)]
        x = np.concatenate([p.astype(np.float64) for p in parts])
        mean = x.mean(axis=0)
        count, got_mean, got_m2 = shard_partial_stats(parts)
        assert count == len(x)
        assert got_mean.tobytes() == mean.tobytes()
        assert got_m2.tobytes() == ((x - mean) ** 2).sum(axis=0).tobytes()
    assert shard_partial_stats([np.zeros((0, 4))])[0] == 0


def test_verify_decodes_whole_shards_with_the_chunk_checks(tmp_path):
    """The verifier decodes each shard object from the bytes it hashed, chunk by chunk, with the
    reader's checks: the rows equal the store's; a flipped byte or a cut object is named."""
    rng = np.random.default_rng(2)
    lat = rng.standard_normal((10, 8, 4, 4)).astype(np.float32)
    st = write_array_store(str(tmp_path / "s"), lat, np.zeros(10, int), num_classes=1,
                           layout=StoreLayout(dtype="float16", samples_per_shard=4, samples_per_chunk=2))
    reader = st._chunk_reader(S.LATENTS)
    data = (tmp_path / "s" / reader.object_key(2)).read_bytes()  # the last shard: rows 8-9
    assert np.array_equal(reader.decode_shard(data, 2), st.read_chunk_stored(4))
    bad = bytearray(data)
    bad[5] ^= 0xFF
    with pytest.raises(ValueError, match="chunk 0 of the shard: stored and computed crc32c differ"):
        reader.decode_shard(bytes(bad), 2)
    with pytest.raises(ValueError, match="shorter than its index"):
        reader.decode_shard(data[:10], 2)
