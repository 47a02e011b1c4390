"""The streaming latent loader (trainer/data.py) on tiny synthetic stores.

Sample identity is readable from every batch: the stores have one class per row (y = row index)
and latents filled with row + 1, so |x| names the row and the sign of x its orientation
(``latents_flip = -latents``).
"""
from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pytest
import torch

from pipeline.store import IncompleteStoreError, LatentStore, StoreError, StoreLayout, write_array_store
from trainer.data import LatentLoader, LoaderConfig, epoch_sequence
from trainer.normalize import LatentNormalizer, load_stats_file

SHAPE = (8, 4, 4)
IDENTITY = LatentNormalizer(None, None, eps=0.0)  # z / sqrt(1 + 0): batches carry the stored values


def _row_latents(n: int) -> np.ndarray:
    return np.broadcast_to((np.arange(n, dtype=np.float32) + 1)[:, None, None, None], (n,) + SHAPE).copy()


@pytest.fixture(scope="module")
def flip_store(tmp_path_factory) -> LatentStore:
    """37 rows, chunks of 3 (13 chunks), chunk 3 wholly invalid, 32 valid; latents_flip = -latents."""
    n = 37
    valid = np.ones(n, dtype=bool)
    valid[[3, 9, 10, 11, 30]] = False
    lat = _row_latents(n)
    return write_array_store(
        str(tmp_path_factory.mktemp("flip") / "store"), lat, np.arange(n), latents_flip=-lat, valid=valid,
        num_classes=n, layout=StoreLayout(dtype="float32", samples_per_shard=12, samples_per_chunk=3),
    )


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> LatentStore:
    """160 rows in 80 chunks of 2, no flips, 152 valid: many more chunks than one block."""
    n = 160
    valid = np.ones(n, dtype=bool)
    valid[[5, 17, 18, 63, 100, 101, 102, 159]] = False
    return write_array_store(
        str(tmp_path_factory.mktemp("big") / "store"), _row_latents(n), np.arange(n), valid=valid, num_classes=n,
        layout=StoreLayout(dtype="float16", samples_per_shard=40, samples_per_chunk=2),
    )


def _loader(store, *, batch, streams, rank=0, world=1, workers=0, block=2, seed=0, normalizer=IDENTITY, **kw):
    cfg = LoaderConfig(global_batch=batch, num_workers=workers, block_chunks=block, num_streams=streams, seed=seed,
                       **kw)
    return LatentLoader(store, cfg, rank=rank, world_size=world, normalizer=normalizer)


def _take(loader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    out = [tuple(t.clone() for t in next(it)) for _ in range(steps)]
    it.close()
    return out


def _check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    """Every latent is the row its label names, whole (no mixing of rows)."""
    mag = x.abs().flatten(1)
    assert torch.equal(mag, (y.double() + 1).to(x.dtype)[:, None].expand_as(mag))


def _segments(v: int, p: int) -> list[tuple[int, int]]:
    base, extra = divmod(v, p)
    return [(q * base + min(q, extra), base + (q < extra)) for q in range(p)]


# ------------------------------------------------------------------------------------------ order


def test_epoch_sequence_shuffles_blocks_of_chunks():
    valid = np.ones(40, dtype=bool)
    valid[[0, 1, 2, 3, 17]] = False  # chunk 0 (rows 0-3) holds no valid sample
    seq, flip = epoch_sequence(valid, 4, 3, seed=7, epoch=0)
    assert sorted(seq.tolist()) == np.flatnonzero(valid).tolist()
    assert flip.shape == (10,) and flip.dtype == bool
    again, flip_again = epoch_sequence(valid, 4, 3, seed=7, epoch=0)
    assert np.array_equal(seq, again) and np.array_equal(flip, flip_again)
    assert not np.array_equal(seq, epoch_sequence(valid, 4, 3, seed=7, epoch=1)[0])
    assert not np.array_equal(seq, epoch_sequence(valid, 4, 3, seed=8, epoch=0)[0])
    # Consecutive runs of whole blocks: the first block is 3 live chunks, its samples contiguous.
    first_chunks = []
    for s in seq:
        if s // 4 not in first_chunks:
            first_chunks.append(s // 4)
        if len(first_chunks) == 4:
            break
    count = int(sum(valid[c * 4:(c + 1) * 4].sum() for c in first_chunks[:3]))
    assert {s // 4 for s in seq[:count]} == set(first_chunks[:3])
    assert not epoch_sequence(valid, 4, 3, seed=7, epoch=0, flips=False)[1].any()


# V = 32: divisible by 8, not by 6; 3 streams have segments of 11, 11 and 10.
@pytest.mark.parametrize("streams, batch", [(1, 8), (1, 6), (2, 8), (2, 6), (3, 6)])
def test_each_valid_sample_once_per_stream_epoch(flip_store, streams, batch):
    valid = flip_store.valid()
    v = int(valid.sum())
    per = batch // streams
    steps = -(-2 * v // batch) + 1
    loader = _loader(flip_store, batch=batch, streams=streams)
    served = [[] for _ in range(streams)]
    for x, y in _take(loader, steps):
        _check_rows(x, y)
        for p in range(streams):
            served[p] += y[p * per:(p + 1) * per].tolist()
    assert loader.samples_seen == steps * batch and loader.epoch == pytest.approx(steps * batch / v)
    for epoch in range(2):
        union = []
        for p, (start, length) in enumerate(_segments(v, streams)):
            part = served[p][epoch * length:(epoch + 1) * length]
            seq, _ = epoch_sequence(valid, 3, 2, 0, epoch)
            assert part == seq[start:start + length].tolist()  # stream p = its segment, in order
            union += part
        assert sorted(union) == np.flatnonzero(valid).tolist()  # once each; invalid never
    assert loader.steps_per_epoch == pytest.approx(v / batch)


def test_orientation_is_random_per_chunk_and_epoch(flip_store, big_store):
    valid = flip_store.valid()
    v = int(valid.sum())
    loader = _loader(flip_store, batch=8, streams=1)
    batches = _take(loader, 2 * v // 8)
    ys = torch.cat([y for _, y in batches]).numpy()
    signs = torch.cat([x[:, 0, 0, 0].sign() for x, _ in batches]).numpy()
    per_epoch = []
    for epoch in range(2):
        y, s = ys[epoch * v:(epoch + 1) * v], signs[epoch * v:(epoch + 1) * v]
        _, flip = epoch_sequence(valid, 3, 2, 0, epoch)
        assert np.array_equal(s < 0, flip[y // 3])  # one orientation per chunk, as drawn
        chunk_flip = {int(c): bool(f) for c, f in zip(y // 3, s < 0)}
        assert set(chunk_flip.values()) == {True, False}
        per_epoch.append(chunk_flip)
    assert per_epoch[0] != per_epoch[1]
    # A store without flipped latents always serves `latents`.
    plain = _take(_loader(big_store, batch=8, streams=1), 5)
    assert all(bool((x > 0).all()) for x, _ in plain)


# ------------------------------------------------------------------------------------------ ranks


@pytest.mark.parametrize("streams", [2, 4])
def test_ranks_split_the_global_batch(flip_store, streams):
    steps = 10  # crosses an epoch boundary (V = 32, B = 8)
    whole = _take(_loader(flip_store, batch=8, streams=streams), steps)
    loaders = [_loader(flip_store, batch=8, streams=streams, rank=r, world=2) for r in range(2)]
    ranks = [_take(ld, steps) for ld in loaders]
    for k in range(steps):
        (x0, y0), (x1, y1) = ranks[0][k], ranks[1][k]
        assert len(y0) == len(y1) == 4
        assert not set(y0.tolist()) & set(y1.tolist())
        assert sorted(y0.tolist() + y1.tolist()) == sorted(whole[k][1].tolist())
        x, y = torch.empty_like(whole[k][0]), torch.empty_like(whole[k][1])
        for ld, (xr, yr) in zip(loaders, (ranks[0][k], ranks[1][k])):
            x[ld.global_rows], y[ld.global_rows] = xr, yr
        assert torch.equal(y, whole[k][1]) and torch.equal(x, whole[k][0])  # same rows, same orientations


# ------------------------------------------------------------------------------------------ position


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_uninterrupted_batches(flip_store, workers):
    full = _take(_loader(flip_store, batch=6, streams=2), 13)
    first = _loader(flip_store, batch=6, streams=2, workers=workers)
    head = _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # it travels in JSON checkpoint metadata
    first.close()
    assert state["samples_seen"] == 30
    resumed = _loader(flip_store, batch=6, streams=2, workers=workers)
    resumed.load_state_dict(state)
    tail = _take(resumed, 8)
    for (xa, ya), (xb, yb) in zip(full, head + tail):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert resumed.samples_seen == 13 * 6
    assert resumed.last_wait_s >= 0 and resumed.total_wait_s > 0
    resumed.load_state_dict(state)  # rewind the same loader (its workers stay up)
    again = _take(resumed, 2)
    resumed.close()
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(again, tail))


def _global_step(store, state, world, steps, batch=8):
    """Restore ``state`` on ``world`` simulated ranks; the global batches (rank order) and the new state."""
    loaders = [_loader(store, batch=batch, streams=None, rank=r, world=world) for r in range(world)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    per_rank = [_take(ld, steps) for ld in loaders]
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)
    return [torch.cat([per_rank[r][k][1] for r in range(world)]) for k in range(steps)], states[0], loaders


def test_resume_on_other_world_sizes(flip_store, caplog):
    full = _take(_loader(flip_store, batch=8, streams=2), 12)
    ys, state, _ = _global_step(flip_store, None, 2, 3)  # first run: 2 ranks -> P = 2
    assert state["num_streams"] == 2
    for world, steps in ((1, 4), (2, 5)):  # P = 2 is kept: the very batches of an uninterrupted run
        more, state, _ = _global_step(flip_store, state, world, steps)
        ys += more
        assert state["num_streams"] == 2
    assert [y.tolist() for y in ys] == [y.tolist() for _, y in full]
    assert state["samples_seen"] == 12 * 8

    # 3 ranks do not divide P = 2: a new partition P' = 3 at the same sample count.
    v, valid = 32, flip_store.valid()
    state_b = dict(state)
    caplog.set_level("WARNING", logger="trainer.data")
    loaders = [_loader(flip_store, batch=6, streams=None, rank=r, world=3) for r in range(3)]
    for ld in loaders:
        ld.load_state_dict(state_b)
    assert "repartitioning into 3 streams at sample 96" in caplog.text, caplog.text
    assert all(ld.samples_seen == 96 and ld.num_streams == 3 for ld in loaders)
    e0, o0 = divmod(96, v)
    seq0, seq1 = (epoch_sequence(valid, 3, 2, 0, e)[0] for e in (e0, e0 + 1))
    for p, ((start, length), ld) in enumerate(zip(_segments(v, 3), loaders)):
        f = o0 * length // v  # each stream starts at the same fraction of its segment
        want = seq0[start + f:start + length].tolist() + seq1[start:start + length].tolist()
        got = torch.cat([y for _, y in _take(ld, -(-len(want) // 2))]).tolist()
        assert got[:len(want)] == want
        assert ld.state_dict()["partition_origin"] == 96


# ------------------------------------------------------------------------------------------ reads and memory


def test_reads_whole_chunks_once_per_segment(big_store, monkeypatch):
    reads, rows = [], []
    read_chunk, read_rows = LatentStore.read_chunk_stored, LatentStore.read_rows

    def counting_chunk(self, chunk, array="latents", out=None):
        reads.append(chunk)
        return read_chunk(self, chunk, array, out)

    def counting_rows(self, start, stop, array="latents"):
        rows.append((start, stop))
        return read_rows(self, start, stop, array)

    monkeypatch.setattr(LatentStore, "read_chunk_stored", counting_chunk)
    monkeypatch.setattr(LatentStore, "read_rows", counting_rows)
    valid = big_store.valid()
    v, block = int(valid.sum()), 4  # V = 152 = 2 streams x 76 = 19 steps of 8
    ld = _loader(big_store, batch=8, streams=2, block=block, prefetch_batches=0)  # no read-ahead past the epoch
    _take(ld, v // 8)
    assert all(a % 2 == 0 and b == min(a + 2, 160) for a, b in rows)  # only whole chunks
    live = {c for c in range(80) if valid[2 * c:2 * c + 2].any()}
    counts = np.bincount(reads, minlength=80)
    assert set(np.flatnonzero(counts)) == live  # every live chunk, never a dead one
    assert counts.max() <= 2 and (counts == 2).sum() <= block  # only the block the 2 segments share


def test_memory_stays_within_the_blocks(big_store):
    # 80 chunks; 2 streams of 3-chunk blocks: at most 6 chunks held, over two epochs.
    ld = _loader(big_store, batch=8, streams=2, block=3, workers=0, prefetch_batches=1)
    batches = _take(ld, 2 * 152 // 8)
    assert 0 < ld.max_chunks_held <= 3 * 2
    for x, y in batches:
        _check_rows(x, y)


# ------------------------------------------------------------------------------------------ normalization


@pytest.fixture(scope="module")
def random_store(tmp_path_factory) -> tuple[LatentStore, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 24
    lat = (rng.standard_normal((n,) + SHAPE) * rng.uniform(0.5, 3, SHAPE) + rng.normal(0, 2, SHAPE)).astype(np.float32)
    valid = np.ones(n, dtype=bool)
    valid[[4, 13]] = False
    store = write_array_store(
        str(tmp_path_factory.mktemp("rand") / "store"), lat, np.arange(n), valid=valid, num_classes=n,
        layout=StoreLayout(dtype="float32", samples_per_shard=8, samples_per_chunk=4),
    )
    return store, lat


def _served(store, normalizer) -> tuple[np.ndarray, np.ndarray]:
    x, y = _take(_loader(store, batch=22, streams=1, normalizer=normalizer), 1)[0]
    return x.numpy().astype(np.float64), y.numpy()


def test_normalizes_with_the_store_statistics(random_store):
    store, lat = random_store
    kept = lat[store.valid()].astype(np.float64)
    mean, var = kept.mean(0), kept.var(0)
    x, y = _served(store, None)  # default: the store's statistics
    assert sorted(y.tolist()) == np.flatnonzero(store.valid()).tolist()
    np.testing.assert_allclose(x, (lat[y] - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    assert abs(x.mean()) < 0.1 and abs(x.var() - 1) < 0.1


def test_cpu_batches_are_the_normalizer_applied_to_the_stored_values(random_store, tmp_path):
    """On the CPU the loader converts and normalizes on the consumer's side: bit for bit
    ``LatentNormalizer.normalize_`` of the float16 stored values, with and without workers."""
    _, lat = random_store
    store = write_array_store(str(tmp_path / "f16"), lat, np.arange(len(lat)), num_classes=len(lat),
                              layout=StoreLayout(dtype="float16", samples_per_shard=8, samples_per_chunk=4))
    norm = LatentNormalizer.from_store(store)
    stored = torch.from_numpy(store.read_rows(0, store.num_samples))  # float16 values, as float32
    for workers in (0, 2):
        (x, y), = _take(_loader(store, batch=24, streams=1, workers=workers, normalizer=norm), 1)
        assert x.dtype == torch.float32
        assert torch.equal(x, norm.normalize_(stored[y].clone()))


@pytest.mark.parametrize("prefetch", [0, 1])
def test_batches_held_by_the_consumer_are_never_reused(flip_store, prefetch):
    """Batch memory is recycled only once nothing holds it: batches, views of them and numpy
    views kept for many steps still hold their values."""
    loader = _loader(flip_store, batch=8, streams=2, block=1, prefetch_batches=prefetch)
    it = iter(loader)
    kept, copies = [], []
    for step in range(12):
        x, y = next(it)
        _check_rows(x, y)
        if step % 3 == 0:
            kept.append((x, y) if step % 2 else (x[2:5], y[2:5]))  # a whole batch, or a view of one
            copies.append((kept[-1][0].clone(), kept[-1][1].clone()))
        elif step % 3 == 1:
            kept.append((x.numpy(), None))
            copies.append((x.numpy().copy(), None))
        del x, y
    for (x, y), (cx, cy) in zip(kept, copies):
        if y is None:
            assert np.array_equal(x, cx)
        else:
            assert torch.equal(x, cx) and torch.equal(y, cy)
    it.close()
    loader.close()


def test_normalizes_with_a_stat_file_holding_var_only(random_store, tmp_path):
    store, lat = random_store
    var = np.random.default_rng(1).uniform(0.5, 4, SHAPE).astype(np.float32)
    torch.save({"var": torch.from_numpy(var)}, tmp_path / "stat.pt")  # the reference release's layout
    mean_file, var_file = load_stats_file(str(tmp_path / "stat.pt"))
    assert mean_file is None and np.array_equal(var_file, var)
    norm = LatentNormalizer.from_file(str(tmp_path / "stat.pt"))
    assert norm.describe() == {"mean": False, "var": True, "source": f"file:{tmp_path / 'stat.pt'}"}
    x, y = _served(store, norm)
    np.testing.assert_allclose(x, lat[y] / np.sqrt(var + 1e-5), rtol=1e-6)
    z = torch.from_numpy(lat[:3])
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    # Mean only, as .npz and .safetensors: var defaults to 1.
    np.savez(tmp_path / "mean.npz", mean=var)
    import safetensors.numpy

    safetensors.numpy.save_file({"mean": var}, str(tmp_path / "mean.safetensors"))
    for name in ("mean.npz", "mean.safetensors"):
        mean, v = load_stats_file(str(tmp_path / name))
        assert v is None and np.array_equal(mean, var)


def test_bad_stat_files_name_the_file_and_key(random_store, tmp_path):
    store, _ = random_store
    torch.save({"mean": torch.zeros(8, 4, 4), "var": torch.ones(4, 4, 4)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt.*'mean'.*\[8, 4, 4\].*differ"):
        load_stats_file(str(tmp_path / "wrong.pt"))
    torch.save({"var": torch.ones(16, 4, 4)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: 'var' has shape \[16, 4, 4\]"):
        _loader(store, batch=4, streams=1, normalizer=LatentNormalizer.from_file(str(tmp_path / "other.pt")))
    torch.save({"weights": torch.ones(3)}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"none\.pt holds neither 'mean' nor 'var'"):
        load_stats_file(str(tmp_path / "none.pt"))
    torch.save({"var": -torch.ones(8, 4, 4)}, tmp_path / "neg.pt")
    with pytest.raises(ValueError, match=r"neg\.pt: 'var' holds negative"):
        load_stats_file(str(tmp_path / "neg.pt"))


# ------------------------------------------------------------------------------------------ errors, S3


def test_clear_errors(flip_store, tmp_path):
    with pytest.raises(ValueError, match="global_batch 6 is not divisible by the world size 4"):
        _loader(flip_store, batch=6, streams=4, world=4)
    with pytest.raises(ValueError, match="global_batch 6 is not divisible by data.num_streams 4"):
        _loader(flip_store, batch=6, streams=4, world=2)
    with pytest.raises(ValueError, match="num_streams 3 is not a multiple of the world size 2"):
        _loader(flip_store, batch=6, streams=3, world=2)
    ld = _loader(flip_store, batch=8, streams=1)
    with pytest.raises(ValueError, match="belongs to store nope"):
        ld.load_state_dict({**ld.state_dict(), "store_id": "nope"})
    n = 6
    write_array_store(str(tmp_path / "s"), _row_latents(n), np.arange(n), num_classes=n,
                      layout=StoreLayout(dtype="float32", samples_per_shard=6, samples_per_chunk=2))
    os.remove(tmp_path / "s" / "COMPLETE")
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        LatentLoader(str(tmp_path / "s"), LoaderConfig(global_batch=2))


def test_a_corrupt_chunk_fails_loudly(tmp_path):
    n = 8
    write_array_store(str(tmp_path / "s"), _row_latents(n), np.arange(n), num_classes=n,
                      layout=StoreLayout(dtype="float32", samples_per_shard=4, samples_per_chunk=2))
    obj = tmp_path / "s" / "latents" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(obj.read_bytes())
    data[10] ^= 0xFF
    obj.write_bytes(bytes(data))
    ld = _loader(str(tmp_path / "s"), batch=8, streams=1)  # assembled in the background thread
    with pytest.raises(StoreError, match=r"shard\(s\) \[1\]"):
        _take(ld, 1)


@pytest.mark.timeout(90)
def test_streams_from_s3_with_workers(s3_endpoint):
    n = 20
    valid = np.ones(n, dtype=bool)
    valid[7] = False
    uri = f"s3://test-bucket/data-{uuid.uuid4().hex[:8]}/store"
    write_array_store(uri, _row_latents(n), np.arange(n), latents_flip=-_row_latents(n), valid=valid, num_classes=n,
                      layout=StoreLayout(dtype="bfloat16", samples_per_shard=10, samples_per_chunk=5))
    ld = LatentLoader(uri, LoaderConfig(global_batch=19, num_workers=2, block_chunks=2, num_streams=1),
                      normalizer=IDENTITY)
    (x, y), = _take(ld, 1)
    ld.close()
    _check_rows(x, y)
    assert sorted(y.tolist()) == np.flatnonzero(valid).tolist()


def _s3_rows_store(n: int, dtype: str, shard: int, chunk: int, invalid=(), compressor="zstd") -> tuple[str, np.ndarray]:
    valid = np.ones(n, dtype=bool)
    valid[list(invalid)] = False
    uri = f"s3://test-bucket/data-{uuid.uuid4().hex[:8]}/store"
    write_array_store(uri, _row_latents(n), np.arange(n), latents_flip=-_row_latents(n), valid=valid, num_classes=n,
                      layout=StoreLayout(dtype=dtype, samples_per_shard=shard, samples_per_chunk=chunk,
                                         compressor=compressor))
    return uri, valid


@pytest.mark.timeout(120)
def test_concurrent_reads_give_the_sequential_batches_and_state(s3_endpoint):
    """Groups of range GETs in flight at once, decoded as their bytes arrive, serve exactly the batches
    and positions of one blocking GET at a time: in workers, then resumed in-process."""
    # 36 rows in 12 chunks of 3 (2 shards), chunk 5 wholly invalid: V = 31
    uri, valid = _s3_rows_store(36, "float16", 18, 3, invalid=(4, 15, 16, 17, 29))
    steps, cut = int(valid.sum()) // 6 + 3, 4  # past the end of the first epoch
    seq = _loader(uri, batch=6, streams=2, block=4, read_ahead_bytes=0)  # one chunk per read, in-process
    assert seq.reads_per_group == 1
    want = _take(seq, steps)
    for x, y in want:
        _check_rows(x, y)
    first = _loader(uri, batch=6, streams=2, block=4, workers=2)
    assert first.reads_per_group == 4  # tiny chunks: a whole unit's GETs at once
    head = _take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = _loader(uri, batch=6, streams=2, block=4, workers=0)
    assert resumed.reads_per_group == 4
    resumed.load_state_dict(state)
    tail = _take(resumed, steps - cut)
    for (xa, ya), (xb, yb) in zip(want, head + tail):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert resumed.state_dict() == seq.state_dict()


@pytest.mark.timeout(120)
def test_a_group_of_chunk_reads_costs_one_request_latency(s3_endpoint):
    """Through a proxy adding 0.5 s to every request, 6 chunks of both arrays read as one group take
    two latencies (the chunks of shard 0, whose indexes are cached, at once with the two indexes of
    shard 1, then its chunks) where one at a time takes 8; same bytes as single reads; a corrupt
    chunk in a group names its shard."""
    import s3fs

    from bench.faultproxy import FaultProxy

    delay = 0.5
    uri, _ = _s3_rows_store(24, "float32", 12, 2, compressor="none")  # chunks of 2 x 512 B + crc32c
    chunks = [1, 3, 4, 7, 9, 10]  # shards 0 and 1
    reads = [(c, "latents_flip" if c % 2 else "latents", np.empty((2,) + SHAPE, np.float32)) for c in chunks]
    with FaultProxy(s3_endpoint) as proxy:
        so = {"client_kwargs": {"endpoint_url": proxy.url}}
        grouped, single = LatentStore.open(uri, so), LatentStore.open(uri, so)  # metadata read at D = 0
        for array in ("latents", "latents_flip"):
            grouped.read_chunk_stored(0, array)  # zarr.json and shard 0's index of both arrays: cached
        proxy.set_latency(delay * 1000)
        t0 = time.perf_counter()
        order = [pos for pos, _ in grouped.read_chunks_stored(reads)]
        elapsed = time.perf_counter() - t0
        peak = proxy.stats()["in_flight"]["peak"]
        proxy.set_latency(0)
        assert sorted(order) == list(range(6))
        assert 2 * delay <= elapsed < 5 * delay, elapsed  # 8 requests one after another: >= 4 s
        assert peak == 5  # 3 chunks of shard 0 and shard 1's 2 indexes
        for chunk, array, out in reads:
            assert np.array_equal(out, single.read_chunk_stored(chunk, array))
            assert np.array_equal(np.abs(out), np.repeat(np.arange(2 * chunk, 2 * chunk + 2) + 1.0, 128)
                                  .reshape(out.shape))
    fs = s3fs.S3FileSystem()
    key = uri[len("s3://"):] + "/latents/c/1/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[100] ^= 0xFF  # inside the shard's first chunk (chunk 6: bytes [0, 1028))
    fs.pipe_file(key, bytes(data))
    corrupt = LatentStore.open(uri)
    with pytest.raises(StoreError, match=r"latents\[12:14\] failed in shard\(s\) \[1\].*crc32c"):
        list(corrupt.read_chunks_stored([(c, "latents", np.empty((2,) + SHAPE, np.float32)) for c in (2, 6, 9)]))


@pytest.mark.timeout(120)
def test_workers_of_a_ray_connected_process_start_from_a_fork_server(ray_local, tmp_path):
    """A process connected to Ray (this test session's, a Ray worker's) must not fork its gRPC
    threads' locks into DataLoader workers: they start from a fork server, and serve the same batches."""
    from trainer.data import worker_start_method

    assert worker_start_method(2) == "forkserver" and worker_start_method(0) is None
    n = 20
    uri = str(tmp_path / "store")
    write_array_store(uri, _row_latents(n), np.arange(n), num_classes=n,
                      layout=StoreLayout(dtype="float16", samples_per_shard=10, samples_per_chunk=5))
    inline = _take(_loader(uri, batch=4, streams=1, workers=0), 6)
    with _loader(uri, batch=4, streams=1, workers=2) as ld:
        served = _take(ld, 6)
        assert ld._dataloader.multiprocessing_context.get_start_method() == "forkserver"
    for (x0, y0), (x1, y1) in zip(inline, served):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
