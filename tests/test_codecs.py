"""The latents' codecs: every codec written and read back bit for bit through the fast chunk reader,
the slow path's warning, the spec and schema for blosc, and the ids of stores written before it."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

from pipeline.store import LatentStore, StoreLayout, StorePlan, to_stored, write_array_store
from pipeline.store.layout import DEFAULT_COMPRESSOR
from schemas import store_v1 as S

SHAPE = (8, 4, 4)


def _arrays(n=11, seed=0):
    rng = np.random.default_rng(seed)
    # Per-channel scales as in encoder latents: exponents vary, the byte shuffle has work to do.
    scale = rng.lognormal(0.0, 1.0, SHAPE[0]).astype(np.float32)[:, None, None]
    lat = rng.standard_normal((n,) + SHAPE).astype(np.float32) * scale
    flip = rng.standard_normal((n,) + SHAPE).astype(np.float32) * scale
    return lat, flip, rng.integers(0, 3, n)


@pytest.mark.parametrize("compressor", S.COMPRESSORS)
@pytest.mark.parametrize("dtype", S.LOGICAL_DTYPES)
def test_every_codec_round_trips_bit_exactly_through_the_fast_reader(tmp_path, compressor, dtype):
    lat, flip, labels = _arrays()
    # 11 rows in chunks of 3: a short last chunk; shards of 6: a short last shard.
    st = write_array_store(str(tmp_path / "s"), lat, labels, latents_flip=flip, num_classes=3,
                           layout=StoreLayout(dtype=dtype, compressor=compressor, samples_per_shard=6,
                                              samples_per_chunk=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to zarr's path
        store = LatentStore.open(st.uri)
        for array, want in ((S.LATENTS, lat), (S.LATENTS_FLIP, flip)):
            reader = store._chunk_reader(array)
            assert reader is not None
            assert reader.codec == {"blosc-zstd": "blosc", "blosc-lz4": "blosc"}.get(compressor, compressor)
            stored = to_stored(want, dtype)
            out = np.full((3,) + SHAPE, 7, dtype=stored.dtype)
            for chunk in range(store.num_chunks):
                a, b = store.chunk_bounds(chunk)
                got = store.read_chunk_stored(chunk, array)
                into = store.read_chunk_stored(chunk, array, out=out)
                assert got.dtype == stored.dtype and got.tobytes() == stored[a:b].tobytes()
                assert into.tobytes() == stored[a:b].tobytes() and np.shares_memory(into, out)
                # The same values as zarr's own read of the array.
                assert got.tobytes() == store._raw.read(array, slice(a, b)).tobytes()
    assert store.spec["layout"]["compressor"]["name"] == compressor


def test_the_codecs_are_what_their_names_say_and_blosc_saves_bytes(tmp_path):
    rng = np.random.default_rng(0)
    scale = rng.lognormal(0.0, 1.0, 256).astype(np.float32)[:, None, None]
    # Chunks of 1 MiB, blosc-zstd's block: byte shuffle then puts 512 KiB of sign/exponent bytes
    # before 512 KiB of mantissa bytes, and zstd's 128 KiB blocks each see one kind.
    lat = rng.standard_normal((16, 256, 16, 16)).astype(np.float32) * scale
    labels = np.zeros(16, np.int64)
    sizes, metas = {}, {}
    for comp in S.COMPRESSORS:
        st = write_array_store(str(tmp_path / comp), lat, labels, num_classes=3,
                               layout=StoreLayout(compressor=comp, samples_per_shard=16, samples_per_chunk=8))
        metas[comp] = json.loads((tmp_path / comp / S.LATENTS / "zarr.json").read_text())
        sizes[comp] = sum(p.stat().st_size for p in (tmp_path / comp / S.LATENTS / "c").rglob("*") if p.is_file())
        assert st.spec["layout"]["compressor"] == StoreLayout(compressor=comp).resolved((256, 16, 16)).compressor_spec()
    inner = {c: [x["name"] for x in m["codecs"][0]["configuration"]["codecs"]] for c, m in metas.items()}
    assert inner == {"blosc-zstd": ["bytes", "blosc", "crc32c"], "blosc-lz4": ["bytes", "blosc", "crc32c"],
                     "zstd": ["bytes", "zstd", "crc32c"], "none": ["bytes", "crc32c"]}
    blosc = metas["blosc-zstd"]["codecs"][0]["configuration"]["codecs"][1]["configuration"]
    assert blosc == {"typesize": 2, "cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 1 << 20}
    assert sizes["blosc-zstd"] < 0.95 * sizes["zstd"] and sizes["zstd"] < sizes["none"]


def test_defaults_agree_everywhere():
    from pipeline.cli.encode import CompressorChoice
    from pipeline.encode import EncodeConfig

    assert StoreLayout().compressor == EncodeConfig().compressor == DEFAULT_COMPRESSOR == "blosc-zstd"
    assert [c.value for c in CompressorChoice] == list(S.COMPRESSORS)
    import inspect

    from pipeline.cli.encode import encode_command

    default = inspect.signature(encode_command).parameters["compressor"].default.default
    assert default.value == DEFAULT_COMPRESSOR


def test_encode_options_accept_every_codec_and_refuse_others():
    from pipeline.encode import EncodeConfig, _check_options

    for comp in S.COMPRESSORS:
        _check_options(EncodeConfig(compressor=comp))
    with pytest.raises(ValueError, match="layout.compressor 'lz4' is not one of"):
        _check_options(EncodeConfig(compressor="lz4"))
    with pytest.raises(ValueError, match="apply to the blosc compressors only"):
        StoreLayout(compressor="zstd", blosc_level=3).resolved(SHAPE)
    with pytest.raises(ValueError, match=r"blosc_level must be in \[0, 9\]"):
        StoreLayout(compressor="blosc-lz4", blosc_level=12).resolved(SHAPE)


# --------------------------------------------------------------------------------------------
# stores written before blosc existed


def _plan(layout: StoreLayout) -> StorePlan:
    return StorePlan(kind="synthetic", num_samples=10, latent_shape=(4, 2, 2), layout=layout,
                     source={"kind": "synthetic", "split": "train", "fingerprint": "0" * 64, "num_items": 10,
                             "order": {"seed": 0, "granularity": "none"}},
                     classes={"num_classes": 2, "names": ["a", "b"]}, content_hash="ab" * 32)


def test_zstd_and_none_stores_keep_the_ids_they_had_before_blosc():
    # Ids computed by the code before the blosc codecs existed (its id_inputs had no blosc keys).
    assert _plan(StoreLayout(compressor="zstd", samples_per_shard=4)).store_id == "0d3bf62d8971f9471993"
    assert _plan(StoreLayout(compressor="none", samples_per_shard=4)).store_id == "06f2af33f84edf6b80b1"
    ids = _plan(StoreLayout(compressor="blosc-zstd", samples_per_shard=4)).id_inputs()["layout"]
    assert (ids["blosc_level"], ids["blosc_blocksize"]) == (1, 1 << 20)
    other = _plan(StoreLayout(compressor="blosc-zstd", samples_per_shard=4, blosc_level=3))
    assert other.store_id != _plan(StoreLayout(compressor="blosc-zstd", samples_per_shard=4)).store_id


def test_old_specs_validate_and_blosc_specs_need_their_settings(tmp_path):
    lat, flip, labels = _arrays()
    old = write_array_store(str(tmp_path / "z"), lat, labels, num_classes=3,
                            layout=StoreLayout(compressor="zstd", samples_per_shard=6)).spec
    assert old["layout"]["compressor"] == {"name": "zstd", "level": 3}  # as before blosc
    S.validate_spec(old)
    new = write_array_store(str(tmp_path / "b"), lat, labels, num_classes=3,
                            layout=StoreLayout(compressor="blosc-lz4", samples_per_shard=6)).spec
    assert new["layout"]["compressor"] == {"name": "blosc-lz4", "level": 3, "clevel": 5, "shuffle": "shuffle",
                                           "blocksize": 0}
    S.validate_spec(new)
    missing = copy.deepcopy(new)
    del missing["layout"]["compressor"]["clevel"]
    with pytest.raises(S.StoreSpecError, match="layout/compressor: 'clevel' is a required property"):
        S.validate_spec(missing)
    stray = copy.deepcopy(old)
    stray["layout"]["compressor"]["shuffle"] = "shuffle"
    with pytest.raises(S.StoreSpecError, match="layout/compressor"):
        S.validate_spec(stray)
    unknown = copy.deepcopy(old)
    unknown["layout"]["compressor"]["name"] = "lz4"
    with pytest.raises(S.StoreSpecError, match="'lz4' is not one of"):
        S.validate_spec(unknown)


def test_a_spec_that_misstates_the_blosc_level_is_refused(tmp_path):
    from pipeline.store.checks import layout_problems

    lat, flip, labels = _arrays()
    st = write_array_store(str(tmp_path / "b"), lat, labels, num_classes=3,
                           layout=StoreLayout(compressor="blosc-zstd", samples_per_shard=6))
    assert layout_problems(st.uri, st.spec) == []
    wrong = copy.deepcopy(st.spec)
    wrong["layout"]["compressor"]["clevel"] = 4
    problems = layout_problems(st.uri, wrong)
    assert any("latents/zarr.json codecs" in p and "clevel=1" in p and "clevel=4" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# the slow path is loud


def test_an_array_the_fast_reader_cannot_decode_is_read_through_zarr_with_one_warning(tmp_path):
    import zarr
    from zarr.codecs import Crc32cCodec, GzipCodec
    from zarr.storage import LocalStore

    lat, flip, labels = _arrays()
    st = write_array_store(str(tmp_path / "s"), lat, labels, num_classes=3,
                           layout=StoreLayout(compressor="zstd", samples_per_shard=6, samples_per_chunk=3))
    # Rewrite the latents with a codec this library never writes (another tool's store, say).
    stored = to_stored(lat, "float16")
    arr = zarr.create_array(LocalStore(st.uri), name=S.LATENTS, shape=stored.shape, dtype="float16",
                            chunks=(3,) + SHAPE, shards=(6,) + SHAPE, compressors=[GzipCodec(), Crc32cCodec()],
                            fill_value=0, overwrite=True)
    arr[...] = stored
    store = LatentStore.open(st.uri, check_arrays=False)  # the spec says zstd: the checks would refuse it
    with pytest.warns(RuntimeWarning) as caught:
        first = store.read_chunk_stored(0)
        rest = [store.read_chunk_stored(c) for c in range(1, store.num_chunks)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert st.uri in message and "'latents'" in message and "gzip" in message and "slower path" in message
    assert np.concatenate([first] + rest).tobytes() == stored.tobytes()


def test_the_reader_refuses_a_blosc_frame_of_the_wrong_size(tmp_path):
    import numcodecs

    lat, flip, labels = _arrays()
    st = write_array_store(str(tmp_path / "s"), lat, labels, num_classes=3,
                           layout=StoreLayout(compressor="blosc-lz4", samples_per_shard=6, samples_per_chunk=3))
    reader = LatentStore.open(st.uri)._chunk_reader(S.LATENTS)
    short = numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE).encode(np.zeros((2,) + SHAPE, np.float16))
    with pytest.raises(ValueError, match="blosc header declares 512 bytes from 50, expected 768"):
        reader.decode(memoryview(short), np.empty((3,) + SHAPE, np.float16))


# --------------------------------------------------------------------------------------------
# the bench's codecs item measures the writer's codecs


def test_the_codecs_bench_encodes_as_the_writer_does(tmp_path):
    import bench.bench  # noqa: F401  (first: registers every item in the bench's order)
    from bench.bench_codecs import CODEC_OPTIONS, default_option, numcodecs_codec

    assert default_option() == "blosc-zstd-1"
    lat, flip, labels = _arrays(n=4)
    stored = to_stored(lat, "float16")
    for name, kw in CODEC_OPTIONS.items():
        layout = StoreLayout(**kw, samples_per_shard=4, samples_per_chunk=2)
        st = write_array_store(str(tmp_path / name), lat, labels, num_classes=3, layout=layout)
        reader = LatentStore.open(st.uri)._chunk_reader(S.LATENTS)
        shard, offset, length = reader.locate(1)
        at_rest = bytes(reader._read(reader.object_key(shard), offset, offset + length))[:-4]  # less the crc32c
        codec = numcodecs_codec(layout.resolved(SHAPE))
        assert at_rest == (stored[2:4].tobytes() if codec is None else bytes(codec.encode(stored[2:4]))), name
