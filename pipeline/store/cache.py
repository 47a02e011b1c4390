"""An optional local-disk cache of a store's chunk bytes, for multi-epoch training from an object
store on nodes with local NVMe: the second and later epochs read from the disk, not the network.

The cache is an accelerator, never a source of truth:

- an entry is the chunk's bytes exactly as stored (compressed, ending with their own crc32c), so
  every hit is checked like a read from the store; an entry that fails its crc32c is deleted and
  the chunk is read from the store again;
- entries are keyed by the store's id (a new store at the same URI has another id), array and chunk,
  so a hit can never be another store's chunk;
- entries are written atomically (a temporary file, then ``os.replace``): a reader sees a whole
  entry or none, and processes sharing the folder (every loader worker of every rank of a node) may
  write the same entry at once;
- the folder's size is bounded: a process that has written ``max_bytes / 16`` since its last look
  lists the folder and deletes the least recently used entries (by modification time, which a hit
  refreshes) until the total is under 90% of ``max_bytes``. Between looks the folder can exceed the
  bound by that much per process.

Files are created with mode 0o666 and folders 0o777 before the umask, as every file of the project.
"""
from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field

from pipeline.store.chunks import _check_crc32c

_EVICT_EVERY = 16  # a process lists the folder after writing max_bytes / this
_EVICT_TO = 0.9  # eviction deletes down to this fraction of max_bytes
_TMP_PREFIX = ".tmp-"


def _crc_ok(data) -> bool:
    try:
        _check_crc32c(data, "cache entry")
        return len(data) >= 4
    except ValueError:
        return False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0  # entries that failed their crc32c, deleted and read from the store again
    evicted: int = 0


@dataclass
class ChunkCache:
    """Chunk bytes under ``root`` (a local folder), at most about ``max_bytes`` of them.

    Picklable (a DataLoader worker gets its own copy, counting its own stats)."""

    root: str
    max_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        if self.max_bytes < 1:
            raise ValueError(f"chunk cache: max_bytes must be >= 1, got {self.max_bytes}")
        self.root = os.path.abspath(os.path.expanduser(self.root))
        self._written = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"root": self.root, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["root"], state["max_bytes"])

    def path(self, store_id: str, array: str, chunk: int) -> str:
        return os.path.join(self.root, store_id, array, f"{chunk}")

    def get(self, store_id: str, array: str, chunk: int) -> bytes | None:
        """The chunk's bytes as stored, checked; None when absent or corrupt (then deleted)."""
        path = self.path(store_id, array, chunk)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        if not _crc_ok(data):
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._remove(path)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            pass  # evicted by another process meanwhile: the bytes read are whole and checked
        self.stats.hits += 1
        return data

    def put(self, store_id: str, array: str, chunk: int, data) -> None:
        """Keep the chunk's bytes (as read from the store, crc32c already checked by the caller).
        Never raises for the cache's own trouble (a full disk, a vanished folder): the read goes on."""
        if len(data) > self.max_bytes:
            return
        path = self.path(store_id, array, chunk)
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            self._remove(tmp)
            return
        self.stats.writes += 1
        with self._lock:
            self._written += len(data)
            due = self._written >= self.max_bytes / _EVICT_EVERY
            if due:
                self._written = 0
        if due:
            self.evict()

    def size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self) -> None:
        """Delete the least recently used entries until the folder holds under 90% of max_bytes
        (stale temporary files of killed writers go first)."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        goal = _EVICT_TO * self.max_bytes
        for _, size, path in sorted(entries, key=lambda e: (not os.path.basename(e[2]).startswith(_TMP_PREFIX), e[0])):
            if total <= goal:
                break
            if self._remove(path):
                self.stats.evicted += 1
            total -= size

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # removed by another process meanwhile
                out.append((st.st_mtime, st.st_size, path))
        return out

    @staticmethod
    def _remove(path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
