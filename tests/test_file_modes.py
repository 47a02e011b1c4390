"""Files a store and a run directory hold get the mode a plain ``open(path, "w")`` gives under the umask
(0o666 & ~umask; folders 0o777 & ~umask), so a teammate can read a store on a shared disk (issue 12,
item 2). Checked under umask 022 and 027 (set in this process, restored after each test) for the uri
helpers' writes, a store written by the store library and a tiny train-dit run (checkpoints, logs,
TensorBoard, PNG), and for the session's encoded store (written by the driver and by Ray workers).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline import uri as U
from pipeline.store import StoreLayout, write_array_store

pytestmark = pytest.mark.usefixtures("one_thread")


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (this test process runs no threads that create files)
    os.umask(mask)
    return mask


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def wrong_modes(root: str, umask: int) -> tuple[int, dict[str, str]]:
    """(files seen, {path: mode} of every file and folder under ``root`` whose permission bits are not
    what open()/mkdir() give under ``umask``)."""
    wrong, files = {}, 0
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if (mode := os.stat(path).st_mode & 0o7777) != 0o777 & ~umask:
                wrong[path + "/"] = oct(mode)
        for name in names:
            path = os.path.join(folder, name)
            files += 1
            if (mode := os.stat(path).st_mode & 0o7777) != 0o666 & ~umask:
                wrong[path] = oct(mode)
    return files, wrong


def test_uri_writes_follow_the_umask(umask, tmp_path):
    U.write_json(str(tmp_path / "a" / "config.json"), {"x": 1})
    U.atomic_write_bytes(str(tmp_path / "a" / "grid.png"), b"\x89PNG\r\n\x1a\n")
    U.atomic_write_with(str(tmp_path / "b" / "samples.npz"), lambda f: np.savez(f, arr_0=np.zeros(3)))
    U.write_json(str(tmp_path / "a" / "config.json"), {"x": 2})  # a replaced file too
    files, wrong = wrong_modes(str(tmp_path), umask)
    assert files == 3 and wrong == {}


@pytest.mark.timeout(180)
def test_store_and_run_dir_follow_the_umask(umask, tmp_path):
    from trainer.train_dit import DiTTrainer, resolve_config

    rng = np.random.default_rng(0)
    lat = rng.normal(size=(32, 8, 4, 4)).astype(np.float32)
    store = write_array_store(str(tmp_path / "store"), lat, rng.integers(0, 4, 32), latents_flip=-lat, num_classes=4,
                              layout=StoreLayout(dtype="float32", samples_per_shard=16, samples_per_chunk=4))
    cfg = resolve_config("debug", ["train.max_steps=2", "train.ckpt_every=1", "train.log_every=1",
                                   "train.progress=false", "train.tensorboard=true", "data.global_batch=8"])
    DiTTrainer(cfg, store.uri, str(tmp_path / "run")).train()
    for root, at_least in ((store.uri, 20), (str(tmp_path / "run"), 8)):
        files, wrong = wrong_modes(root, umask)
        assert files >= at_least and wrong == {}, (root, wrong)
    names = {n for _, _, ns in os.walk(tmp_path / "run") for n in ns}
    assert {"config.json", "metrics.jsonl", "COMPLETE"} <= names and any(n.startswith("events.") for n in names)


@pytest.mark.timeout(240)
def test_an_encoded_store_follows_the_umask(sample_store):
    """The session's store: metadata, spec and COMPLETE written by the driver, shards and records by
    Ray workers (which inherited this process's umask when the session's Ray started)."""
    files, wrong = wrong_modes(sample_store, current_umask())
    assert files >= 20 and wrong == {}
