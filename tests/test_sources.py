"""pipeline.sources: ImageFolder and Parquet listings, labels, fingerprints, reads, storage order."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sample_data import SAMPLE_CLASSES, SAMPLE_IMAGENET_INDEX, generate_sample_data, write_sample_parquet
from pipeline.sources import (
    Source,
    SourceChangedError,
    SourceError,
    SourceItem,
    open_source,
    read_class_index,
    storage_order,
)

CLASSES = sorted(SAMPLE_CLASSES)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> str:
    return generate_sample_data(str(tmp_path_factory.mktemp("sample")))  # 16 train, 8 val


@pytest.fixture(scope="module")
def parquet_root(sample_root, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("parquet"))
    write_sample_parquet(sample_root, out, "train", rows_per_group=3)
    write_sample_parquet(sample_root, out, "val", rows_per_group=3)
    return out


@pytest.fixture()
def tree(sample_root, tmp_path) -> str:
    """A private copy of the sample's train split, free to modify."""
    dst = tmp_path / "data"
    shutil.copytree(os.path.join(sample_root, "train"), dst / "train")
    return str(dst)


def write_parquet(path, columns: dict, metadata: dict | None = None, row_group_size: int = 2) -> None:
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path, row_group_size=row_group_size)


# --------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_listing_and_labels(sample_root):
    source = open_source(sample_root, "train")
    assert (source.kind, source.split, source.layout) == ("imagefolder", "train", "split folder")
    assert source.root == os.path.join(sample_root, "train")
    assert source.class_names == CLASSES
    assert len(source) == 16 and source.num_groups == 16
    keys = [it.key for it in source.items]
    assert keys == sorted(keys)
    for i, it in enumerate(source.items):
        wnid = it.key.split("/")[0]
        assert it.index == i and it.group == i and it.row is None
        assert it.label == CLASSES.index(wnid)
        assert it.uri == os.path.join(sample_root, "train", it.key)
        assert it.size == os.path.getsize(it.uri)
    assert source.items[0].key == "n01440764/n01440764_0.JPEG"
    assert len(open_source(sample_root, "val")) == 8


def test_without_split_folder_the_folder_holds_the_classes(sample_root):
    with_split = open_source(sample_root, "train")
    without = open_source(os.path.join(sample_root, "train"), "train")
    assert without.layout == "no split folder"
    assert [(it.key, it.label) for it in without.items] == [(it.key, it.label) for it in with_split.items]
    assert without.fingerprint() == with_split.fingerprint()  # the listing, not the location
    # file:// URIs are the same local folder
    assert open_source("file://" + sample_root, "train").fingerprint() == with_split.fingerprint()


def test_split_folders_are_never_taken_for_classes(sample_root):
    with pytest.raises(SourceError, match=r"no 'test' folder.*\['train', 'val'\]"):
        open_source(sample_root, "test")


def test_extensions_hidden_nested_and_ignored_files(tree):
    cls = os.path.join(tree, "train", "n01440764")
    src_jpeg = os.path.join(cls, "n01440764_0.JPEG")
    os.makedirs(os.path.join(cls, "sub"))
    shutil.copy(src_jpeg, os.path.join(cls, "sub", "nested.jpg"))
    shutil.copy(src_jpeg, os.path.join(cls, "UPPER.PNG"))  # JPEG bytes, .PNG name: listed
    shutil.copy(src_jpeg, os.path.join(cls, "glob[1]*.jpeg"))  # glob characters are plain names
    shutil.copy(src_jpeg, os.path.join(cls, ".hidden.JPEG"))
    os.makedirs(os.path.join(cls, ".cache"))
    shutil.copy(src_jpeg, os.path.join(cls, ".cache", "x.JPEG"))
    os.makedirs(os.path.join(tree, "train", ".git"))
    shutil.copy(src_jpeg, os.path.join(tree, "train", ".git", "y.JPEG"))
    with open(os.path.join(cls, "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(tree, "train", "README.txt"), "w") as f:
        f.write("next to the class folders")
    source = open_source(tree, "train")
    keys = [it.key for it in source.items if it.label == 0]
    assert keys == [
        "n01440764/UPPER.PNG",
        "n01440764/glob[1]*.jpeg",
        "n01440764/n01440764_0.JPEG",
        "n01440764/n01440764_1.JPEG",
        "n01440764/n01440764_2.JPEG",
        "n01440764/n01440764_3.JPEG",
        "n01440764/sub/nested.jpg",
    ]
    assert source.class_names == CLASSES  # .git is not a class
    assert source.ignored == ("n01440764/notes.txt",)
    with open(src_jpeg, "rb") as f:
        assert source.read_group(source.items[:2]) == [f.read()] * 2


def test_fingerprint_is_stable_and_sensitive(tree, tmp_path):
    base = open_source(tree, "train")
    fp = base.fingerprint()
    assert len(fp) == 64
    assert open_source(tree, "train").fingerprint() == fp
    assert pickle.loads(pickle.dumps(base)).fingerprint() == fp
    copy = str(tmp_path / "copy")
    shutil.copytree(tree, copy)
    assert open_source(copy, "train").fingerprint() == fp

    cls = os.path.join(tree, "train", "n02102040")
    os.rename(os.path.join(cls, "n02102040_1.JPEG"), os.path.join(cls, "n02102040_1b.JPEG"))
    renamed = open_source(tree, "train").fingerprint()
    assert renamed != fp
    with open(os.path.join(cls, "n02102040_0.JPEG"), "ab") as f:
        f.write(b"\0")  # same name, one byte longer
    resized = open_source(tree, "train").fingerprint()
    assert resized not in (fp, renamed)
    # a different label mapping over the same files changes it too
    index = tmp_path / "index.json"
    index.write_text(json.dumps(list(reversed(CLASSES))))
    assert open_source(tree, "train", class_index=str(index)).fingerprint() != resized


def test_class_index_files(tree, sample_root, tmp_path):
    # JSON list: label = position
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(list(reversed(CLASSES))))
    source = open_source(tree, "train", class_index=str(as_list))
    assert source.class_names == list(reversed(CLASSES))
    assert {it.key.split("/")[0]: it.label for it in source.items} == {c: 3 - i for i, c in enumerate(CLASSES)}

    # JSON {wnid: label}: the real ImageNet labels written with the sample data
    real = open_source(sample_root, "train", class_index=os.path.join(sample_root, "wnid_to_imagenet_index.json"))
    assert {it.key.split("/")[0]: it.label for it in real.items} == SAMPLE_IMAGENET_INDEX
    assert len(real.class_names) == 575 and real.class_names[217] == "n02102040"
    assert real.class_names[1] == "class_1"

    # text, one wnid per line (LOC_synset_mapping.txt style, names after the wnid), a superset
    text = tmp_path / "synsets.txt"
    text.write_text("n00000001 something else\n" + "".join(f"{c} name of {c}\n" for c in CLASSES) + "\n")
    source = open_source(tree, "train", class_index=str(text))
    assert source.class_names == ["n00000001"] + CLASSES
    assert sorted({it.label for it in source.items}) == [1, 2, 3, 4]

    # Keras imagenet_class_index.json
    keras = tmp_path / "keras.json"
    keras.write_text(json.dumps({str(i): [c, f"name {i}"] for i, c in enumerate(CLASSES)}))
    assert read_class_index(str(keras)) == {c: i for i, c in enumerate(CLASSES)}

    # an empty class folder is fine when the index fixes the labels
    os.makedirs(os.path.join(tree, "train", "n09999999"))
    with pytest.raises(SourceError, match="without images.*n09999999"):
        open_source(tree, "train")
    with pytest.raises(SourceError, match=r"n09999999.*not in class index file"):
        open_source(tree, "train", class_index=str(as_list))
    superset = tmp_path / "superset.json"
    superset.write_text(json.dumps(CLASSES + ["n09999999"]))
    assert len(open_source(tree, "train", class_index=str(superset))) == 16


@pytest.mark.parametrize(
    "content, message",
    [
        ('["n01", "n01"]', "appears twice"),
        ('{"a": 0, "b": 0}', "share a label"),
        ('{"a": -1}', "bad label"),
        ("[", "not valid JSON"),
        ("", "is empty"),
    ],
)
def test_bad_class_index_files(tmp_path, content, message):
    path = tmp_path / "index.json"
    path.write_text(content)
    with pytest.raises(SourceError, match=message):
        read_class_index(str(path))
    with pytest.raises(SourceError, match="not found"):
        read_class_index(str(tmp_path / "missing.json"))


def test_clear_errors(tmp_path, tree):
    with pytest.raises(SourceError, match="no such folder"):
        open_source(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(SourceError, match="is empty"):
        open_source(str(empty))
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    (flat / "a.JPEG").write_bytes(b"x")
    with pytest.raises(SourceError, match="no class folders"):
        open_source(str(tmp_path / "flat"))
    only_text = tmp_path / "text" / "train" / "n01"
    only_text.mkdir(parents=True)
    (only_text / "a.txt").write_bytes(b"x")
    with pytest.raises(SourceError, match="without images"):
        open_source(str(tmp_path / "text"))
    with pytest.raises(ValueError, match="kind"):
        open_source(tree, kind="zarr")
    # a file name that is not UTF-8 cannot become a stable key
    bad = os.path.join(os.fsencode(os.path.join(tree, "train", "n01440764")), b"\xff\xfe.JPEG")
    with open(bad, "wb") as f:
        f.write(b"x")
    with pytest.raises(SourceError, match="not valid UTF-8"):
        open_source(tree)


def test_read_bytes_group_and_changes(tree):
    source = open_source(tree, "train")
    item = source.items[5]
    with open(item.uri, "rb") as f:
        assert source.read_bytes(item) == f.read()
    picked = [source.items[i] for i in (9, 2, 2, 14)]
    assert source.read_group(picked) == [open(it.uri, "rb").read() for it in picked]
    assert source.read_group([]) == []
    with open(item.uri, "ab") as f:
        f.write(b"more")
    with pytest.raises(SourceChangedError, match=item.key.split("/")[-1]):
        source.read_bytes(item)
    os.remove(source.items[6].uri)
    with pytest.raises(FileNotFoundError, match=source.items[6].key.split("/")[-1]):
        source.read_group(source.items[6:8])


def test_storage_order_imagefolder(sample_root):
    source = open_source(sample_root, "train")
    order = storage_order(source, seed=0)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(16))
    np.testing.assert_array_equal(order, storage_order(source, seed=0))
    assert not np.array_equal(order, storage_order(source, seed=1))
    labels = np.array([it.label for it in source.items])
    assert len(set(labels[order[:4]].tolist())) >= 2  # a contiguous run mixes classes
    assert not np.array_equal(order, np.arange(16))


# --------------------------------------------------------------------------------------------
# Parquet


def test_parquet_listing_matches_the_imagefolder(sample_root, parquet_root):
    folder = open_source(sample_root, "train")
    source = open_source(parquet_root, "train")
    assert (source.kind, source.layout, source.image_column) == ("parquet", "split in file name", "image")
    assert source.class_names == CLASSES  # from classes.json
    assert len(source) == 16
    assert [f.name for f in source.files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [f.row_group_rows for f in source.files] == [(3, 3, 2), (3, 3, 2)]
    assert source.items[4].key == "train-00000-of-00002.parquet#4"
    assert source.items[9].key == "train-00001-of-00002.parquet#1"
    assert [it.group for it in source.items] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
    assert all(it.size is None for it in source.items)
    assert [it.label for it in source.items] == [it.label for it in folder.items]
    assert source.read_group(source.items) == folder.read_group(folder.items)
    assert source.read_bytes(source.items[7]) == folder.read_bytes(folder.items[7])
    picked = [source.items[i] for i in (15, 0, 8, 1)]
    assert source.read_group(picked) == [folder.read_bytes(folder.items[i]) for i in (15, 0, 8, 1)]
    assert len(open_source(parquet_root, "val")) == 8
    assert pickle.loads(pickle.dumps(source)).read_bytes(source.items[3]) == folder.read_bytes(folder.items[3])


def test_parquet_fingerprint(parquet_root, tmp_path):
    copy = str(tmp_path / "pq")
    shutil.copytree(parquet_root, copy)
    fp = open_source(copy, "train").fingerprint()
    assert fp == open_source(parquet_root, "train").fingerprint()
    assert fp != open_source(copy, "val").fingerprint()
    # same rows and labels re-encoded with other row groups: the file size changes
    path = os.path.join(copy, "train-00001-of-00002.parquet")
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=8)
    assert open_source(copy, "train").fingerprint() != fp


def test_storage_order_parquet_keeps_row_groups_together(parquet_root):
    source = open_source(parquet_root, "train")
    order = storage_order(source, seed=3)
    assert sorted(order.tolist()) == list(range(16))
    np.testing.assert_array_equal(order, storage_order(source, seed=3))
    groups = [source.items[i].group for i in order]
    runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    assert sorted(runs) == list(range(6))  # each group is one contiguous run
    for i in range(1, 16):
        if groups[i] == groups[i - 1]:
            assert order[i] == order[i - 1] + 1  # rows of a group in order
    assert runs != sorted(runs)


def test_parquet_layouts_and_class_names(parquet_root, tmp_path):
    names = sorted(n for n in os.listdir(parquet_root) if n.startswith("train"))
    # uri/<split>/*.parquet, class names from the Hugging Face schema metadata (no classes.json)
    split_dir = tmp_path / "a" / "train"
    split_dir.mkdir(parents=True)
    for n in names:
        shutil.copy(os.path.join(parquet_root, n), split_dir / n.replace("train-", "shard-"))
    source = open_source(str(tmp_path / "a"), "train")
    assert source.layout == "split folder" and source.class_names == CLASSES
    # uri/data/<split>-*.parquet (a Hugging Face hub repository)
    data_dir = tmp_path / "b" / "data"
    data_dir.mkdir(parents=True)
    for n in names:
        shutil.copy(os.path.join(parquet_root, n), data_dir / n)
    assert open_source(str(tmp_path / "b"), "train").layout == "hub data folder"
    # a single file
    single = open_source(os.path.join(parquet_root, names[1]), "train")
    assert single.layout == "single file" and len(single) == 8
    assert single.items[0].key == names[1] + "#0"
    # unknown split: the error lists the splits present
    with pytest.raises(SourceError, match=r"split 'test'.*\['train', 'val'\]"):
        open_source(parquet_root, "test")


def test_parquet_plain_binary_column_and_fallback_names(tmp_path, sample_root):
    folder = open_source(sample_root, "val")
    data = folder.read_group(folder.items)
    labels = [it.label for it in folder.items]
    write_parquet(tmp_path / "val-0.parquet", {"jpg": pa.array(data, pa.binary()), "label": labels})
    source = open_source(str(tmp_path), "val")
    assert source.image_column == "jpg"
    assert source.class_names == [f"class_{i}" for i in range(4)]
    assert source.read_group(source.items) == data
    # -1 (unlabelled, as the Hugging Face test split) is allowed
    write_parquet(tmp_path / "test-0.parquet", {"jpg": pa.array(data[:2], pa.binary()), "label": [-1, -1]})
    assert [it.label for it in open_source(str(tmp_path), "test").items] == [-1, -1]


@pytest.mark.parametrize(
    "columns, kwargs, message",
    [
        ({"image": pa.array([b"x"], pa.binary())}, {}, r"bad-0\.parquet: no label column 'label'"),
        ({"image": pa.array([b"x"], pa.binary()), "label": ["a"]}, {}, "label column 'label' has type string"),
        ({"image": pa.array([b"x"], pa.binary()), "label": [-2]}, {}, "negative label -2"),
        ({"image": pa.array([b"x"], pa.binary()), "label": pa.array([None], pa.int64())}, {}, "null"),
        ({"pixels": [1], "label": [0]}, {}, r"bad-0\.parquet: no image column"),
        (
            {"a": pa.array([b"x"], pa.binary()), "b": pa.array([b"x"], pa.binary()), "label": [0]},
            {},
            "several possible image columns",
        ),
        (
            {"image": pa.array([b"x"], pa.binary()), "label": [0]},
            {"image_column": "img"},
            r"bad-0\.parquet: no image column 'img'",
        ),
        ({"image": [1], "label": [0]}, {"image_column": "image"}, "column 'image' has type int64"),
    ],
)
def test_parquet_column_errors_name_the_file_and_column(tmp_path, columns, kwargs, message):
    write_parquet(tmp_path / "bad-0.parquet", columns)
    with pytest.raises(SourceError, match=message):
        open_source(str(tmp_path), "bad", **kwargs)


def test_parquet_labels_beyond_class_names(tmp_path):
    write_parquet(tmp_path / "train-0.parquet", {"image": pa.array([b"x"], pa.binary()), "label": [7]})
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(SourceError, match="label 7.*only 2 class names"):
        open_source(str(tmp_path), "train")


def test_pickle_keeps_every_item_and_the_reader_is_small(sample_root, parquet_root):
    for source in (open_source(sample_root, "train"), open_source(parquet_root, "train")):
        back = pickle.loads(pickle.dumps(source))
        assert back.items == source.items and back.class_names == source.class_names
        assert back.fingerprint() == source.fingerprint()
        reader = pickle.loads(pickle.dumps(source.reader))
        assert len(pickle.dumps(source.reader)) < 2000
        assert reader.read_group(source.items[5:9]) == source.read_group(source.items[5:9])
    # a hand-made source whose URIs and indices do not follow open_source's rules survives too
    items = [
        SourceItem(7, "a/x.png", "/elsewhere/x.png", None, 10, 1, 0),
        SourceItem(3, "b/y.png", "s3://b/y.png", 4, None, -1, 2**40),
    ]
    odd = Source("imagefolder", "/data", "train", ["a", "b"], items, "/data/train", "split folder")
    assert pickle.loads(pickle.dumps(odd)).items == items


# --------------------------------------------------------------------------------------------
# S3


@pytest.mark.timeout(60)
def test_s3_imagefolder_and_parquet_match_local(s3_endpoint, sample_root, parquet_root):
    fs = fsspec.filesystem("s3")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)  # "someone else" changing the bucket
    fs.put(sample_root + "/", "test-bucket/sources/folder/", recursive=True)
    fs.put(parquet_root + "/", "test-bucket/sources/pq/", recursive=True)

    local = open_source(sample_root, "train")
    remote = open_source("s3://test-bucket/sources/folder/", "train")
    assert remote.layout == "split folder" and remote.root == "s3://test-bucket/sources/folder/train"
    assert [(it.key, it.label, it.size) for it in remote.items] == [(it.key, it.label, it.size) for it in local.items]
    assert remote.items[0].uri == "s3://test-bucket/sources/folder/train/n01440764/n01440764_0.JPEG"
    assert remote.fingerprint() == local.fingerprint()
    shipped = pickle.loads(pickle.dumps(remote))  # as a Ray task receives it
    assert shipped.read_group(shipped.items[3:7]) == local.read_group(local.items[3:7])
    np.testing.assert_array_equal(storage_order(remote, 5), storage_order(local, 5))
    with pytest.raises(SourceError, match="no 'test' folder"):
        open_source("s3://test-bucket/sources/folder", "test")

    remote_pq = open_source("s3://test-bucket/sources/pq", "train")
    local_pq = open_source(parquet_root, "train")
    assert remote_pq.kind == "parquet" and remote_pq.class_names == CLASSES
    assert remote_pq.fingerprint() == local_pq.fingerprint()
    assert remote_pq.read_group(remote_pq.items[2:5]) == local.read_group(local.items[2:5])
    # a shard added by someone else after a listing (fsspec's cached `ls` must not hide it)
    s3.copy_object(
        Bucket="test-bucket",
        Key="sources/pq/train-extra.parquet",
        CopySource={"Bucket": "test-bucket", "Key": "sources/pq/train-00000-of-00002.parquet"},
    )
    assert len(open_source("s3://test-bucket/sources/pq", "train").files) == 3

    # a fresh listing every time (fsspec caches S3 listings per instance): an object renamed by
    # someone else (here boto3, not fsspec) changes the next listing
    old_key = "sources/folder/train/n01440764/n01440764_0.JPEG"
    fs.ls("test-bucket/sources/folder/train/n01440764")  # warm the cache
    new_key = old_key.replace("_0.", "_renamed.")
    s3.copy_object(Bucket="test-bucket", Key=new_key, CopySource={"Bucket": "test-bucket", "Key": old_key})
    s3.delete_object(Bucket="test-bucket", Key=old_key)
    relisted = open_source("s3://test-bucket/sources/folder", "train")
    assert relisted.items[0].key == "n01440764/n01440764_1.JPEG"
    assert relisted.fingerprint() != local.fingerprint()

    index = "s3://test-bucket/sources/folder/wnid_to_imagenet_index.json"
    labeled = open_source("s3://test-bucket/sources/folder", "val", class_index=index)
    assert {it.key.split("/")[0]: it.label for it in labeled.items} == SAMPLE_IMAGENET_INDEX

