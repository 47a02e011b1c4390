"""Built-in sample data: a tiny ImageNet-shaped ImageFolder every command can use offline.

Four real ImageNet classes (wnids), each drawn procedurally with its own structure so that a model
can tell them apart and the crop sees varied sizes: a fish in green water (tench), a liver-and-white
dog in a dry field (English springer), a stone church with a spire under a sky gradient (church), a
dimpled white ball on striped grass (golf ball). Image sizes and aspect ratios vary (portrait,
landscape, square, panorama), and every class has training images whose short side is >= 512, so
the ADM crop's halving step runs.

Everything here is deterministic: the same arguments give byte-identical files (with the pinned
numpy and Pillow of requirements.lock). Writes go through fsspec, so ``root`` may be ``s3://``.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline import uri as uri_lib

SAMPLE_CLASSES: list[str] = ["n01440764", "n02102040", "n03028079", "n03445777"]
SAMPLE_CLASS_NAMES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n03028079": "church",
    "n03445777": "golf ball",
}
# Their labels in the standard ImageNet-1k index (sorted wnids); written next to the data as
# wnid_to_imagenet_index.json so `open_source(..., class_index=...)` can use the real labels.
SAMPLE_IMAGENET_INDEX: dict[str, int] = {"n01440764": 0, "n02102040": 217, "n03028079": 497, "n03445777": 574}

SAMPLE_DATA_VERSION = 1
MARKER_NAME = ".rae-sample-data.json"
CLASS_INDEX_NAME = "wnid_to_imagenet_index.json"

# (width, height): ImageNet-like shapes. Any 4 consecutive entries (cyclically) starting at an even
# position hold a short side >= 512, so each class's first 4 training images include one.
_SIZES = [(500, 375), (1024, 683), (375, 500), (640, 427), (333, 500), (600, 600), (500, 333), (900, 300)]
_JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------
# Procedural drawing. Backgrounds and textures are float32 arrays [H, W, 3] in [0, 1] computed
# once per image; shapes are drawn and pasted with PIL (C code), which keeps 24 images ~1 s.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Value noise [H, W] in about [0, 1]: a coarse random grid upsampled bicubically."""
    grid_h = max(2, round(cells * height / max(height, width)))
    grid_w = max(2, round(cells * width / max(height, width)))
    coarse = Image.fromarray(rng.random((grid_h, grid_w)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _vertical_gradient(height: int, width: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    column = (1 - t) * np.asarray(top, dtype=np.float32) + t * np.asarray(bottom, dtype=np.float32)
    return np.broadcast_to(column, (height, width, 3)).copy()


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8), mode="RGB")


def _rgb(*color: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in color)


def _paste(canvas: Image.Image, texture: Image.Image, draw_fn) -> None:
    """Paste ``texture`` onto ``canvas`` inside the shapes ``draw_fn`` draws on a mask."""
    mask = Image.new("L", canvas.size, 0)
    draw_fn(ImageDraw.Draw(mask))
    canvas.paste(texture, (0, 0), mask)


def _draw_tench(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    water = _vertical_gradient(h, w, (0.25, 0.45, 0.35), (0.05, 0.18, 0.12))
    water += np.float32(0.12) * (_smooth_noise(rng, h, w, 12)[:, :, None] - np.float32(0.5))  # caustics
    canvas = _to_image(water)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    length, thick = min(w, h * 1.6) * rng.uniform(0.5, 0.7), min(w, h) * rng.uniform(0.18, 0.26)
    direction = 1 if rng.random() < 0.5 else -1
    tail_x = cx - direction * length / 2
    # olive back shading into a golden belly, with a fine scale texture
    shade = np.clip((np.arange(h, dtype=np.float32) - (cy - thick / 2)) / max(thick, 1), 0, 1)[:, None, None]
    scales = np.float32(0.1) * (_smooth_noise(rng, h, w, 80)[:, :, None] - np.float32(0.5))
    back, belly = np.array([0.22, 0.3, 0.12], np.float32), np.array([0.75, 0.62, 0.3], np.float32)
    skin = (1 - shade) * back + shade * belly + scales

    def fish(d: ImageDraw.ImageDraw) -> None:
        d.ellipse([cx - length / 2, cy - thick / 2, cx + length / 2, cy + thick / 2], fill=255)
        fin_x = tail_x - direction * thick
        d.polygon([(tail_x, cy), (fin_x, cy - thick * 0.6), (fin_x, cy + thick * 0.6)], fill=255)

    _paste(canvas, _to_image(skin), fish)
    eye_x, eye_y, r = cx + direction * length * 0.38, cy - thick * 0.15, thick * 0.08
    ImageDraw.Draw(canvas).ellipse([eye_x - r, eye_y - r, eye_x + r, eye_y + r], fill=_rgb(0.9, 0.55, 0.1))
    return canvas


def _draw_springer(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    # a dry autumn field: ochre grass with darker clumps and horizontal furrows
    field = np.empty((h, w, 3), dtype=np.float32)
    field[:] = (0.7, 0.55, 0.3)
    field *= np.float32(0.75) + np.float32(0.5) * _smooth_noise(rng, h, w, 30)[:, :, None]
    furrows = np.sin(np.arange(h, dtype=np.float32) / max(2.0, h / 40))[:, None, None]
    field *= np.float32(0.9) + np.float32(0.1) * furrows
    canvas = _to_image(field)
    cx, cy, s = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.5, 0.65), min(w, h) * rng.uniform(0.3, 0.4)
    side = 1 if rng.random() < 0.5 else -1
    hx = cx + side * s * 0.9

    def dog(d: ImageDraw.ImageDraw) -> None:
        d.ellipse([cx - s, cy - s * 0.45, cx + s, cy + s * 0.45], fill=255)  # body
        d.ellipse([hx - s * 0.35, cy - s * 0.95, hx + s * 0.35, cy - s * 0.3], fill=255)  # head
        for lx in (cx - s * 0.7, cx - s * 0.4, cx + s * 0.4, cx + s * 0.7):
            d.rectangle([lx - s * 0.08, cy, lx + s * 0.08, cy + s * 0.85], fill=255)  # legs

    # liver-and-white patches, with fur strokes (noise stretched horizontally)
    patches = (_smooth_noise(rng, h, w, 10) > 0.5)[:, :, None]
    fur = np.where(patches, np.array([0.42, 0.2, 0.1], np.float32), np.array([0.92, 0.9, 0.86], np.float32))
    strokes = Image.fromarray(rng.random((h // 2 + 1, max(2, w // 16))).astype(np.float32), mode="F")
    strokes = np.asarray(strokes.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    _paste(canvas, _to_image(fur * (np.float32(0.85) + np.float32(0.3) * strokes[:, :, None])), dog)
    ear_x = hx - side * s * 0.3
    ear = [ear_x - s * 0.12, cy - s * 0.8, ear_x + s * 0.12, cy - s * 0.2]
    ImageDraw.Draw(canvas).ellipse(ear, fill=_rgb(0.35, 0.16, 0.08))
    return canvas


def _draw_church(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    canvas = _to_image(_vertical_gradient(h, w, (0.35, 0.55, 0.9), (0.8, 0.88, 0.95)))
    draw = ImageDraw.Draw(canvas)
    ground = h * rng.uniform(0.78, 0.88)
    draw.rectangle([0, ground, w, h], fill=_rgb(0.35, 0.42, 0.25))
    left, right = w * rng.uniform(0.15, 0.3), w * rng.uniform(0.6, 0.75)
    wall_top = h * rng.uniform(0.45, 0.55)
    tower_l, tower_r = right, right + w * rng.uniform(0.08, 0.12)
    tower_top = h * rng.uniform(0.25, 0.32)
    # stone with brick courses (horizontal stripes)
    courses = ((np.arange(h) // max(3, h // 60)) % 2).astype(np.float32)[:, None, None]
    grain = np.float32(0.9) + np.float32(0.2) * _smooth_noise(rng, h, w, 40)[:, :, None]
    stone = np.array([0.72, 0.66, 0.56], np.float32) * grain
    _paste(
        canvas,
        _to_image(stone * (1 - np.float32(0.08) * courses)),
        lambda d: (
            d.rectangle([left, wall_top, right, ground], fill=255),
            d.rectangle([tower_l, tower_top, tower_r, ground], fill=255),
        ),
    )
    roof = [(left - w * 0.03, wall_top), (right + w * 0.03, wall_top), ((left + right) / 2, wall_top - h * 0.15)]
    draw.polygon(roof, fill=_rgb(0.45, 0.2, 0.15))
    spire_tip = tower_top - h * rng.uniform(0.12, 0.2)
    spire = [(tower_l, tower_top), (tower_r, tower_top), ((tower_l + tower_r) / 2, spire_tip)]
    draw.polygon(spire, fill=_rgb(0.3, 0.3, 0.35))
    n_windows = int(rng.integers(3, 6))
    win_w = (right - left) / (2 * n_windows + 1)
    sill_top, sill_bottom = wall_top + (ground - wall_top) * 0.35, ground - (ground - wall_top) * 0.2
    for i in range(n_windows):  # arched windows
        x0 = left + win_w * (2 * i + 1)
        draw.rectangle([x0, sill_top, x0 + win_w, sill_bottom], fill=_rgb(0.15, 0.18, 0.3))
        draw.ellipse([x0, sill_top - win_w / 2, x0 + win_w, sill_top + win_w / 2], fill=_rgb(0.15, 0.18, 0.3))
    return canvas


def _draw_golf_ball(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    stripe_width = max(8, w // int(rng.integers(5, 9)))
    mowing = ((np.arange(w) // stripe_width) % 2).astype(np.float32)[None, :, None]
    grass = np.array([0.2, 0.48, 0.15], np.float32) * (np.float32(0.9) + np.float32(0.15) * mowing)
    grass = grass + np.float32(0.15) * (_smooth_noise(rng, h, w, 90)[:, :, None] - np.float32(0.5))
    r = min(w, h) * rng.uniform(0.15, 0.3)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.6)
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).ellipse([cx - r * 0.9, cy + r * 0.6, cx + r * 1.5, cy + r * 1.15], fill=115)
    grass *= 1 - np.asarray(shadow, dtype=np.float32)[:, :, None] / np.float32(255.0)
    canvas = _to_image(grass)
    # the ball: lit from the top left, a lattice of dimples; computed on its bounding box only
    x0, y0 = int(cx - r), int(cy - r)
    size = int(2 * r) + 2
    yy, xx = np.mgrid[y0 : y0 + size, x0 : x0 + size].astype(np.float32)
    light = np.clip(1.0 - 0.35 * np.sqrt((xx - cx + r * 0.4) ** 2 + (yy - cy + r * 0.4) ** 2) / r, 0.45, 1.0)
    pitch = max(3.0, r / 6)
    dimples = 1 - 0.12 * ((np.sin(xx * np.pi / pitch) * np.sin(yy * np.pi / pitch)) > 0.6)
    ball = _to_image((light * dimples)[:, :, None] * np.array([0.97, 0.97, 0.95], np.float32))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([cx - r - x0, cy - r - y0, cx + r - x0, cy + r - y0], fill=255)
    canvas.paste(ball, (x0, y0), mask)
    return canvas


_DRAWERS = {
    "n01440764": _draw_tench,
    "n02102040": _draw_springer,
    "n03028079": _draw_church,
    "n03445777": _draw_golf_ball,
}


def _render_jpeg(wnid: str, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    width, height = size
    pixels = np.asarray(_DRAWERS[wnid](rng, height, width), dtype=np.int16)
    pixels = pixels + rng.integers(-4, 5, pixels.shape, dtype=np.int16)  # sensor noise
    buf = io.BytesIO()
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The sample ImageFolder


def _expected_files(train_per_class: int, val_per_class: int) -> dict[str, tuple[str, int, int]]:
    """{relative path: (wnid, split number, k)} of the files one generation writes."""
    out = {}
    for split_no, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for wnid in SAMPLE_CLASSES:
            for k in range(count):
                out[f"{split}/{wnid}/{wnid}_{k}.JPEG"] = (wnid, split_no, k)
    return out


def generate_sample_data(root: str, *, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0) -> str:
    """Write the sample ImageFolder under ``root`` and return ``root`` (normalized).

    Layout: ``root/train/<wnid>/<wnid>_<k>.JPEG`` and ``root/val/<wnid>/<wnid>_<k>.JPEG``, plus
    ``root/wnid_to_imagenet_index.json`` (the classes' real ImageNet labels) and a completion
    marker ``root/.rae-sample-data.json`` written last. If the marker holds the same parameters,
    nothing is written. Otherwise every file is (re)written and sample files from other parameters
    are removed; a ``root/train`` or ``root/val`` holding anything that is not sample data is
    refused (ValueError), so a wrong ``root`` never loses user files.
    """
    if train_per_class < 0 or val_per_class < 0:
        raise ValueError("train_per_class and val_per_class must be >= 0")
    root = uri_lib.normalize(root)
    params = {
        "version": SAMPLE_DATA_VERSION,
        "classes": SAMPLE_CLASSES,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
    }
    marker = uri_lib.join(root, MARKER_NAME)
    if uri_lib.exists(marker):
        try:
            if uri_lib.read_json(marker) == params:
                return root
        except json.JSONDecodeError:
            pass
        uri_lib.rm(marker)  # readers must not see the old marker over new files

    expected = _expected_files(train_per_class, val_per_class)
    fs, root_path = uri_lib.get_fs(root)
    ours = re.compile(r"^(train|val)/(n\d{8})/\2_\d+\.JPEG$")
    stale = []
    for split in ("train", "val"):
        split_path = f"{root_path}/{split}"
        if not fs.exists(split_path):
            continue
        for path in fs.find(split_path):
            rel = path[len(root_path) + 1 :]
            if posixpath.basename(rel).startswith(".tmp-"):  # left by a killed atomic write
                stale.append(path)
                continue
            match = ours.match(rel)
            if not match or match.group(2) not in SAMPLE_CLASSES:
                raise ValueError(f"{root} holds {rel}, which is not sample data; choose an empty folder")
            if rel not in expected:
                stale.append(path)
    for path in stale:
        fs.rm(path)

    for rel, (wnid, split_no, k) in expected.items():
        # One generator per image, keyed by everything that identifies it: any image can be
        # regenerated alone, and changing train_per_class does not change the other images.
        rng = np.random.default_rng([seed, SAMPLE_CLASSES.index(wnid), split_no, k])
        size = _SIZES[(k + 2 * SAMPLE_CLASSES.index(wnid) + 5 * split_no) % len(_SIZES)]
        uri_lib.atomic_write_bytes(uri_lib.join(root, rel), _render_jpeg(wnid, size, rng))
    uri_lib.write_json(uri_lib.join(root, CLASS_INDEX_NAME), SAMPLE_IMAGENET_INDEX)
    uri_lib.write_json(marker, params)
    return root


def default_sample_data_dir() -> str:
    """``<repository>/data/sample`` (``/data/`` is gitignored). Other places: pass ``root``."""
    return str(Path(__file__).resolve().parent.parent / "data" / "sample")


def ensure_sample_data(root: str | None = None) -> str:
    """The sample data folder with default parameters, generated on first use; returns its path."""
    return generate_sample_data(root if root is not None else default_sample_data_dir())


# ---------------------------------------------------------------------------------------------
# Odd files for robustness tests and drills


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png_bytes(width: int = 20000, height: int = 20000) -> bytes:
    """A valid-looking 8-bit grayscale PNG whose header claims width x height (a few hundred bytes;
    decoding it would need width * height bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def odd_image_bytes(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, "ok" | "fail")} of the odd files (see :func:`write_odd_images`)."""
    rng = np.random.default_rng([seed, 1000])
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = _encode(Image.fromarray(noise, mode="RGB"), "JPEG", quality=90)
    gradient = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (32, 1))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    palette.paste(2, (0, 0, 4, 8))  # left half green, right half red, index 0 (black) transparent
    palette.putpixel((0, 0), 0)
    la = Image.merge("LA", [Image.new("L", (6, 4), 77), Image.new("L", (6, 4), 0)])
    rgba = Image.new("RGBA", (6, 4), (10, 200, 30, 0))
    gray16 = Image.fromarray(np.array([[0, 257, 65535, 32896]], dtype=np.uint16))
    return {
        "gray_L.JPEG": (_encode(Image.fromarray(gradient, mode="L"), "JPEG", quality=90), "ok"),
        "cmyk.JPEG": (_encode(Image.new("CMYK", (32, 24), (255, 0, 0, 0)), "JPEG", quality=95), "ok"),
        "palette_transparent.png": (_encode(palette, "PNG", transparency=0), "ok"),
        "la.png": (_encode(la, "PNG"), "ok"),
        "rgba.png": (_encode(rgba, "PNG"), "ok"),
        "gray16.png": (_encode(gray16, "PNG"), "ok"),
        "tiny_3x2.png": (_encode(Image.fromarray(noise[:2, :3]), "PNG"), "ok"),
        "png_bytes.JPEG": (_encode(Image.fromarray(noise[:40, :56]), "PNG"), "ok"),
        "zero_bytes.JPEG": (b"", "fail"),
        "truncated.JPEG": (jpeg[: len(jpeg) // 2], "fail"),
        "not_an_image.JPEG": (b"this is not an image, just text with a JPEG name\n" * 8, "fail"),
        "bomb_20000x20000.png": (bomb_png_bytes(20000, 20000), "fail"),
    }


def write_odd_images(folder: str, seed: int = 0) -> dict[str, str]:
    """Write odd files into ``folder`` (e.g. an ImageFolder class folder); {name: "ok" | "fail"}.

    "ok" files decode to RGB: grayscale JPEG, CMYK JPEG (pure cyan), palette PNG with a
    transparent index, LA and RGBA PNGs (fully transparent alpha), 16-bit grayscale PNG, a 3x2
    image, PNG bytes named .JPEG. "fail" files must be rejected with ImageDecodeError: a zero-byte
    file, a JPEG cut in half, text named .JPEG, a PNG whose header claims 20000 x 20000.
    """
    outcomes = {}
    for name, (data, outcome) in odd_image_bytes(seed).items():
        uri_lib.atomic_write_bytes(uri_lib.join(folder, name), data)
        outcomes[name] = outcome
    return outcomes


# ---------------------------------------------------------------------------------------------
# The same images as Parquet


def write_sample_parquet(
    image_folder_root: str, out_uri: str, split: str = "train", rows_per_group: int = 4, num_files: int = 2
) -> str:
    """Write ``split`` of an ImageFolder as Hugging Face-style Parquet shards; returns ``out_uri``.

    Files: ``out_uri/<split>-0000i-of-0000n.parquet`` with columns ``image`` (struct
    ``{bytes: binary, path: string}``, path = the file name) and ``label`` (int64), row groups of
    ``rows_per_group`` rows, rows in the ImageFolder's listing order, the ``datasets`` feature
    metadata (``huggingface`` key: Image + ClassLabel names) in each file's schema, and
    ``out_uri/classes.json`` (the class names as a JSON list).
    """
    from pipeline.sources import open_source  # sources does not import this module; keep it so

    if rows_per_group < 1 or num_files < 1:
        raise ValueError("rows_per_group and num_files must be >= 1")
    source = open_source(image_folder_root, split, kind="imagefolder")
    out_uri = uri_lib.normalize(out_uri)
    hf_features = {
        "image": {"_type": "Image"},
        "label": {"names": list(source.class_names), "_type": "ClassLabel"},
    }
    schema = pa.schema(
        [
            pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
            pa.field("label", pa.int64()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": hf_features}})},
    )
    num_files = min(num_files, len(source.items))
    bounds = np.linspace(0, len(source.items), num_files + 1).round().astype(int)
    for i in range(num_files):
        items = source.items[bounds[i] : bounds[i + 1]]
        contents = source.read_group(items)
        images = [{"bytes": data, "path": it.key.rsplit("/", 1)[-1]} for it, data in zip(items, contents)]
        table = pa.table({"image": images, "label": [it.label for it in items]}, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=rows_per_group)
        uri_lib.atomic_write_bytes(uri_lib.join(out_uri, f"{split}-{i:05d}-of-{num_files:05d}.parquet"), buf.getvalue())
    uri_lib.write_json(uri_lib.join(out_uri, "classes.json"), list(source.class_names))
    return out_uri
