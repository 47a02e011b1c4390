"""Reading a latent store's chunks for :class:`trainer.data.LatentLoader`, in DataLoader workers (or
in-process), into chunk slots shared with the main process: the slots, the dataset of chunk reads
(groups whose range GETs are in flight at once on object stores) and the order of the reads.
"""
from __future__ import annotations

import collections
import os
import pickle
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.store import LatentStore
from schemas import store_v1 as S

if TYPE_CHECKING:
    from trainer.data import LatentLoader

_STORED_TORCH_DTYPE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; bfloat16 (no numpy dtype) as its uint16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


class _Slots:
    """``count`` chunk buffers [count, k, C, H, W], allocated once per DataLoader (in shared memory
    when workers read): a read names the free slot it fills, the assembler gathers rows from the
    slots and frees a unit's slots once the unit is served. Reads then move no tensor between
    processes and touch no fresh memory. Free-list calls come from one thread (the assembler: the
    DataLoader draws indices from :class:`_ReadOrder` in the thread that asks it for the next read).
    """

    def __init__(self, count: int, chunk_shape: tuple[int, ...], dtype: torch.dtype, shared: bool):
        self.count = count
        self.buffers = torch.empty((count,) + tuple(chunk_shape), dtype=dtype)
        if shared:
            self.buffers.share_memory_()
        self.rows = _numpy_view(self.buffers).reshape((count * chunk_shape[0],) + tuple(chunk_shape[1:]))
        self._free: list[int] = []
        self.reset()

    def reset(self) -> None:
        self._free = list(range(self.count - 1, -1, -1))

    def take(self) -> int:
        if not self._free:
            raise RuntimeError(f"latent loader: all {self.count} chunk slots are in use (a bug: the read-ahead "
                               "and the blocks held should fit)")
        return self._free.pop()

    def give(self, slots: list[int]) -> None:
        self._free.extend(slots)


class ChunkReads(Dataset):
    """Items are ``(reads, ahead)``: a group of whole chunk reads, each ``(chunk, flip, slot)``, and
    the chunks ``(chunk, flip)`` of the next group this process will be given. Chunk ``chunk`` of
    ``latents`` (or ``latents_flip``) is written into ``slots[slot]``; the item returns the list of
    (chunk, flip, slot, rows) in the group's order. From an object store the group's GETs are in
    flight at once, each chunk decoded as its bytes arrive, and the next group's GETs start as soon
    as this one's are under way (``LatentStore.prefetch_chunks``), so a process always has reads in
    flight while it decodes.

    slots: [count, k, C, H, W] of the store's dtype: each chunk is decoded straight into its slot,
    the stored values unchanged (the device converts and normalizes). Each process reads through
    its own store client."""

    def __init__(self, store: LatentStore, slots: torch.Tensor):
        self.store, self.slots = store, slots
        if slots.dtype != _STORED_TORCH_DTYPE[store.logical_dtype]:
            raise ValueError(f"ChunkReads: slots of {slots.dtype} for a {store.logical_dtype} store")
        self._pid = os.getpid()

    def _store(self) -> LatentStore:
        if self._pid != os.getpid():
            # A forked worker inherits the parent's clients (zarr, s3fs sessions): open fresh ones.
            # The inherited ones stay referenced: collected here, s3fs would close their sessions on
            # this process's event loop, not theirs (a "Task exception was never retrieved" each).
            self._inherited, self.store = self.store, pickle.loads(pickle.dumps(self.store))
            self._pid = os.getpid()
        return self.store

    def __len__(self) -> int:
        return self.store.num_chunks

    def __getitem__(self, item: tuple[list, list]) -> list[tuple[int, bool, int, int]]:
        group, ahead = item
        reads = [(int(c), bool(f), int(s)) for c, f, s in group]
        store = self._store()
        rows = [0] * len(reads)
        requests = [(chunk, S.LATENTS_FLIP if flip else S.LATENTS, _numpy_view(self.slots[slot]))
                    for chunk, flip, slot in reads]
        ahead = [(int(c), S.LATENTS_FLIP if f else S.LATENTS) for c, f in ahead]
        for pos, got in store.read_chunks_stored(requests, ahead):
            rows[pos] = len(got)
        return [(chunk, flip, slot, n) for (chunk, flip, slot), n in zip(reads, rows)]


def _pieces(n: int, most: int) -> list[range]:
    """0..n-1 cut into the fewest consecutive pieces of at most ``most``, as equal as possible."""
    k = -(-n // most)
    bounds = [i * n // k for i in range(k + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class _ReadOrder(Sampler):
    """The lazily generated items ``(reads, ahead)`` of this rank from the loader's position at
    iteration start: every unit's chunks in order, cut into groups of at most ``group`` reads (a
    group never spans two units, so the assembler never waits for reads past the unit it serves),
    each read ``(chunk, flip, slot)`` with a free slot to fill; ``ahead`` is the ``(chunk, flip)``
    of the group ``stride`` items later: the next one the same process reads, as the DataLoader
    deals items to its workers in turn (a hint: a wrong one costs reads, never batches; stride 0:
    none)."""

    def __init__(self, loader: "LatentLoader", slots: _Slots, group: int, stride: int):
        self.loader, self.slots, self.group, self.stride = loader, slots, group, stride

    def _groups(self) -> Iterator[list[tuple[int, bool]]]:
        for u in self.loader._schedule():
            chunks, flips = u.chunks.tolist(), u.flips.tolist()
            for piece in _pieces(len(chunks), self.group):
                yield [(chunks[i], flips[i]) for i in piece]

    def __iter__(self):
        # Runs on the first index the DataLoader draws, after its reset: no read of an earlier
        # iteration is still writing, so every slot is free.
        self.slots.reset()
        groups = self._groups()
        upcoming = collections.deque(next(groups) for _ in range(self.stride))
        while True:
            upcoming.append(next(groups))
            reads = upcoming.popleft()
            yield [(c, f, self.slots.take()) for c, f in reads], upcoming[-1] if self.stride else []
