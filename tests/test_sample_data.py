"""pipeline.sample_data: the built-in ImageFolder, odd files and the Parquet copy."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.preprocess import ImageDecodeError, decode_image, preprocess_image_bytes
from pipeline.sample_data import (
    MARKER_NAME,
    SAMPLE_CLASS_NAMES,
    SAMPLE_CLASSES,
    default_sample_data_dir,
    ensure_sample_data,
    generate_sample_data,
    write_odd_images,
    write_sample_parquet,
)
from pipeline.sources import open_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("sample") / "ensured")
    assert ensure_sample_data(root) == root  # generated on first use, default parameters
    return root


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_layout_classes_and_sizes(sample_root):
    assert len(SAMPLE_CLASSES) == 4 and set(SAMPLE_CLASS_NAMES) == set(SAMPLE_CLASSES)
    assert all(w.startswith("n") and len(w) == 9 for w in SAMPLE_CLASSES)
    for split, count in (("train", 4), ("val", 2)):
        assert sorted(os.listdir(os.path.join(sample_root, split))) == sorted(SAMPLE_CLASSES)
        for wnid in SAMPLE_CLASSES:
            names = sorted(os.listdir(os.path.join(sample_root, split, wnid)))
            assert names == [f"{wnid}_{k}.JPEG" for k in range(count)]
    sizes = {}
    for wnid in SAMPLE_CLASSES:
        for k in range(4):
            with Image.open(os.path.join(sample_root, "train", wnid, f"{wnid}_{k}.JPEG")) as img:
                assert (img.format, img.mode) == ("JPEG", "RGB")
                sizes.setdefault(wnid, []).append(img.size)
        # every class goes through the ADM crop's halving step at 256
        assert any(min(size) >= 512 for size in sizes[wnid])
    all_sizes = [s for v in sizes.values() for s in v]
    assert any(w > h for w, h in all_sizes) and any(w < h for w, h in all_sizes) and any(w == h for w, h in all_sizes)
    assert len(set(all_sizes)) >= 6
    assert os.path.exists(os.path.join(sample_root, MARKER_NAME))


def test_classes_are_visually_distinct(sample_root):
    """A nearest-centroid classifier on tiny colour layouts of the training images must label
    every validation image right: each class has its own structure."""

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        source = open_source(sample_root, split)
        feats = [
            preprocess_image_bytes(data, 32).astype(np.float32).reshape(3, 4, 8, 4, 8).mean(axis=(2, 4)).ravel()
            for data in source.read_group(source.items)
        ]
        return np.stack(feats), np.array([it.label for it in source.items])

    train_x, train_y = features("train")
    val_x, val_y = features("val")
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(4)])
    predicted = np.argmin(((val_x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(predicted, val_y)


def test_byte_identical_across_runs_and_seeded(sample_root, tmp_path):
    # Each image depends only on (seed, class, split, k): a smaller run reproduces the same files.
    full = tree_digest(sample_root)
    again = tree_digest(generate_sample_data(str(tmp_path / "again"), train_per_class=1, val_per_class=1))
    assert len([k for k in again if k.endswith(".JPEG")]) == 8
    assert all(full[k] == v for k, v in again.items() if k.endswith(".JPEG"))
    other = tree_digest(generate_sample_data(str(tmp_path / "other"), train_per_class=1, val_per_class=0, seed=1))
    assert len([k for k in other if k.endswith(".JPEG")]) == 4
    assert all(full[k] != v for k, v in other.items() if k.endswith(".JPEG"))


def test_idempotent_and_parameter_changes(tmp_path):
    root = str(tmp_path / "s")
    generate_sample_data(root, train_per_class=2, val_per_class=1)
    marker = os.path.join(root, MARKER_NAME)
    stamp = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in tree_digest(root)}
    generate_sample_data(root, train_per_class=2, val_per_class=1)  # marker matches: no writes
    assert {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in tree_digest(root)} == stamp

    generate_sample_data(root, train_per_class=1, val_per_class=0)  # fewer: extras removed
    files = [p for p in tree_digest(root) if p.endswith(".JPEG")]
    assert sorted(files) == sorted(f"train/{c}/{c}_0.JPEG" for c in SAMPLE_CLASSES)
    assert json.load(open(marker))["train_per_class"] == 1

    # a killed run (no marker, a file missing, a temporary file left) is completed by the next call
    os.remove(marker)
    os.remove(os.path.join(root, "train", SAMPLE_CLASSES[0], f"{SAMPLE_CLASSES[0]}_0.JPEG"))
    leftover = os.path.join(root, "train", SAMPLE_CLASSES[1], ".tmp-abc123")
    open(leftover, "wb").close()
    generate_sample_data(root, train_per_class=1, val_per_class=0)
    assert len([p for p in tree_digest(root) if p.endswith(".JPEG")]) == 4 and os.path.exists(marker)
    assert not os.path.exists(leftover)


def test_refuses_folders_holding_other_files(tmp_path):
    root = tmp_path / "mine"
    (root / "train" / "n01440764").mkdir(parents=True)
    precious = root / "train" / "n01440764" / "my_photo.jpg"
    precious.write_bytes(b"precious")
    with pytest.raises(ValueError, match="not sample data"):
        generate_sample_data(str(root))
    assert precious.read_bytes() == b"precious"
    with pytest.raises(ValueError):
        generate_sample_data(str(tmp_path / "x"), train_per_class=-1)


def test_default_dir_is_gitignored_and_ensure_is_idempotent(sample_root):
    default = default_sample_data_dir()
    assert default == os.path.join(REPO, "data", "sample")
    result = subprocess.run(["git", "check-ignore", "-q", "data/sample/train/x.JPEG"], cwd=REPO)
    assert result.returncode == 0  # /data/ is in .gitignore
    marker = os.path.join(sample_root, MARKER_NAME)
    before = os.stat(marker).st_mtime_ns
    assert ensure_sample_data(sample_root) == sample_root
    assert os.stat(marker).st_mtime_ns == before
    assert len(open_source(sample_root, "train")) == 16 and len(open_source(sample_root, "val")) == 8


def test_odd_images_outcomes_match_decoding(tmp_path):
    folder = tmp_path / "odd" / "train" / "n01440764"
    outcomes = write_odd_images(str(folder))
    assert outcomes == {
        "gray_L.JPEG": "ok",
        "cmyk.JPEG": "ok",
        "palette_transparent.png": "ok",
        "la.png": "ok",
        "rgba.png": "ok",
        "gray16.png": "ok",
        "tiny_3x2.png": "ok",
        "png_bytes.JPEG": "ok",
        "zero_bytes.JPEG": "fail",
        "truncated.JPEG": "fail",
        "not_an_image.JPEG": "fail",
        "bomb_20000x20000.png": "fail",
    }
    # every odd file is an item of the ImageFolder (so the encode job meets them all)
    source = open_source(str(tmp_path / "odd"), "train")
    assert sorted(it.key.split("/")[1] for it in source.items) == sorted(outcomes)
    reasons = {}
    for item, data in zip(source.items, source.read_group(source.items)):
        name = item.key.split("/")[1]
        try:
            out = preprocess_image_bytes(data, 16)
            assert out.shape == (3, 16, 16)
            assert outcomes[name] == "ok", name
        except ImageDecodeError as e:
            assert outcomes[name] == "fail", name
            reasons[name] = e.reason
    assert reasons == {
        "zero_bytes.JPEG": "empty file",
        "truncated.JPEG": "truncated",
        "not_an_image.JPEG": "not an image",
        "bomb_20000x20000.png": "decompression bomb (20000 x 20000)",
    }
    assert os.path.getsize(folder / "bomb_20000x20000.png") < 1000
    with Image.open(folder / "png_bytes.JPEG") as img:
        assert img.format == "PNG"
    with Image.open(folder / "cmyk.JPEG") as img:
        assert img.mode == "CMYK"
    with Image.open(folder / "gray16.png") as img:
        assert img.mode == "I;16"
    assert decode_image((folder / "tiny_3x2.png").read_bytes()).size == (3, 2)


def test_parquet_layout_like_hugging_face(sample_root, tmp_path):
    out = write_sample_parquet(sample_root, str(tmp_path / "pq"), "train", rows_per_group=4)
    assert sorted(os.listdir(out)) == ["classes.json", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert json.load(open(os.path.join(out, "classes.json"))) == sorted(SAMPLE_CLASSES)
    pf = pq.ParquetFile(os.path.join(out, "train-00000-of-00002.parquet"))
    schema = pf.schema_arrow
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("label").type == pa.int64()
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": sorted(SAMPLE_CLASSES), "_type": "ClassLabel"}
    assert features["image"] == {"_type": "Image"}
    assert pf.metadata.num_rows == 8 and pf.metadata.num_row_groups == 2
    first = pf.read_row_group(0).to_pylist()[0]
    folder = open_source(sample_root, "train")
    assert first["image"]["path"] == "n01440764_0.JPEG" and first["label"] == 0
    assert first["image"]["bytes"] == folder.read_bytes(folder.items[0])
    again = write_sample_parquet(sample_root, str(tmp_path / "pq2"), "train", rows_per_group=4)
    assert tree_digest(again) == tree_digest(out)  # deterministic too


@pytest.mark.timeout(60)
def test_generate_on_s3(s3_endpoint, sample_root):
    root = generate_sample_data("s3://test-bucket/sample-gen", train_per_class=1, val_per_class=1)
    assert root == "s3://test-bucket/sample-gen"
    fs = fsspec.filesystem("s3")
    assert fs.exists("test-bucket/sample-gen/" + MARKER_NAME)
    remote = open_source(root, "train")
    assert len(remote) == 4
    local = open_source(sample_root, "train")
    local_first = {it.key: it for it in local.items}
    for item, data in zip(remote.items, remote.read_group(remote.items)):
        assert data == local.read_bytes(local_first[item.key])  # same bytes as the local run
    generate_sample_data(root, train_per_class=1, val_per_class=1)  # idempotent on S3 as well
    pq_uri = write_sample_parquet(root, "s3://test-bucket/sample-gen-pq", "val", rows_per_group=2, num_files=1)
    assert len(open_source(pq_uri, "val")) == 4
