"""Image decoding and the ADM center crop: pure functions, safe to call inside Ray tasks.

The reference pipeline (torchvision ``ImageFolder`` + ``center_crop_arr`` from ADM/guided-diffusion)
does ``PIL.Image.open(f).convert("RGB")`` and then the crop below. This module reproduces that
exactly for every image ImageNet contains (8-bit RGB, grayscale ``L`` and CMYK JPEGs, one PNG
named .JPEG), and fixes the cases where PIL's ``convert("RGB")`` is wrong (16-bit and float
grayscale, which PIL clips instead of scaling). It never touches PIL's global settings
(``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``): the size limit is an argument.

Not done, on purpose, because the reference does not do it either: EXIF orientation is ignored,
alpha is dropped without compositing onto a background, ICC profiles are not applied, animated
images use their first frame.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from schemas.errors import UserError

if TYPE_CHECKING:
    import torch

# PIL's own default limit (2 * Image.MAX_IMAGE_PIXELS): above it, Image.open raises by itself.
DEFAULT_MAX_PIXELS = 178_956_970

# Errors the PIL plugins raise on corrupt data (Image.open itself swallows the first four while
# probing formats). MemoryError is deliberately not here: it is not a property of the file.
_PIL_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
    KeyError,
    zlib.error,
    Image.DecompressionBombError,
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(UserError, ValueError):
    """An image that cannot be decoded.

    ``reason`` is short and machine-friendly (it is counted and reported per store): one of
    ``"empty file"``, ``"not an image"``, ``"truncated"``, ``"decompression bomb (W x H)"``,
    ``"unsupported mode X"`` or ``"corrupt"``; ``detail`` holds PIL's message where there is one.
    """

    def __init__(self, reason: str, detail: str | None = None):
        # Both values go to Exception.args so the error pickles (Ray sends it between processes).
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.reason if not self.detail else f"{self.reason}: {self.detail}"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, GIF, BMP or JPEG header, without PIL; None if unknown.

    Only used to word the error message when PIL refuses a decompression bomb before it tells us
    the size.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if pos + 9 > len(data):
                    return None
                h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return w, h
            pos += 2 + length
    return None


def _bomb_error(data: bytes, size: tuple[int, int] | None, limit: int, detail: str | None = None):
    size = size or _header_size(data)
    where = f"{size[0]} x {size[1]}" if size else "size unknown"
    return ImageDecodeError(f"decompression bomb ({where})", detail or f"more than {limit} pixels")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any common mode to 8-bit RGB.

    - RGB: as is. L, 1, P (with or without transparency), CMYK, YCbCr, RGBX: PIL's
      ``convert("RGB")``, identical to the reference. Palette transparency and alpha are dropped.
    - LA, RGBA, PA: alpha dropped (the colour channels kept as stored), which is what the
      reference's ``convert("RGB")`` does; no compositing onto white.
    - 16-bit grayscale (I;16*, and I, which is how some readers deliver 16-bit PNG/TIFF): scaled
      from [0, 65535] to [0, 255] with rounding (``(v + 128) // 257``). PIL would clip at 255.
    - F (32-bit float): taken as [0, 1], clipped, scaled to [0, 255] with rounding. PIL would
      clip on a [0, 255] scale.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        gray = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    if mode == "P" and "transparency" in img.info:
        # Same pixels as P -> RGB; going through RGBA avoids PIL's warning about transparency.
        return img.convert("RGBA").convert("RGB")
    if mode == "PA":
        return img.convert("RGBA").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported mode {mode}", str(e)) from e


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into a fully loaded 8-bit RGB PIL image.

    The header's width x height is checked against ``max_pixels`` before any pixel is decoded, so
    a small file claiming 20000 x 20000 never allocates. PIL additionally refuses anything above
    its own global limit (2 * ``Image.MAX_IMAGE_PIXELS``, 178,956,970 pixels by default) and warns
    (``DecompressionBombWarning``) above half of it; a ``max_pixels`` larger than PIL's limit
    therefore has no effect, and this function does not change PIL's globals to allow it.
    The image is fully loaded (``img.load()``) so a truncated file fails here, not later.

    Raises:
        ImageDecodeError: with a short ``reason`` (see the class).
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not an image") from e
    except Image.DecompressionBombError as e:
        raise _bomb_error(data, None, max_pixels, str(e)) from e
    except _PIL_DECODE_ERRORS as e:
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from e
    # No `with img:` needed: the file object is an in-memory BytesIO, nothing to leak.
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"header size {width} x {height}")
    if width * height > max_pixels:
        raise _bomb_error(data, (width, height), max_pixels)
    try:
        img.load()
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except _PIL_DECODE_ERRORS as e:
        message = f"{type(e).__name__}: {e}"
        if re.search(r"truncated", str(e), re.IGNORECASE) or isinstance(e, EOFError):
            raise ImageDecodeError("truncated", message) from e
        raise ImageDecodeError("corrupt", message) from e


def adm_crop_geometry(
    width: int, height: int, size: int
) -> tuple[list[tuple[int, int]], tuple[int, int], tuple[int, int]]:
    """The sizes :func:`adm_center_crop` goes through, without touching pixels.

    Returns (sizes after each BOX halving, size after the BICUBIC resize, (left, top) of the crop);
    all sizes are (width, height) in pixels.
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    halvings = []
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        halvings.append((width, height))
    short = min(width, height)
    resized = (round(width * size / short), round(height * size / short))
    return halvings, resized, ((resized[0] - size) // 2, (resized[1] - size) // 2)


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The ADM (guided-diffusion) center crop to ``size`` x ``size``, exactly as the format doc.

    1. While the short side is >= 2 * size, halve both sides (floor) with BOX filtering.
    2. Resize with BICUBIC so the short side is ``size``: each side becomes
       ``round(side * size / short)`` (Python's round, half to even).
    3. Crop at top = (H - size) // 2, left = (W - size) // 2.

    ADM writes step 2 as ``round(side * (size / short))``. When ``size`` is a power of two the two
    agree on every image (a tie needs short >= 2 * size, which halving rules out; the tests check
    256 and 512 exhaustively up to aspect ratio 16); for other sizes they can differ by one pixel on
    rare shapes (224: a 201 x 192 image resizes to 234 x 224 here, 235 x 224 in ADM), and this
    follows the format doc. Images smaller than ``size`` are upscaled. Works on any PIL mode.
    """
    halvings, resized, (left, top) = adm_crop_geometry(img.width, img.height, size)
    for half in halvings:
        img = img.resize(half, resample=Image.Resampling.BOX)
    img = img.resize(resized, resample=Image.Resampling.BICUBIC)
    return img.crop((left, top, left + size, top + size))


def preprocess_image_bytes(data: bytes, resolution: int, **decode_kwargs) -> np.ndarray:
    """Encoded bytes -> ADM-cropped uint8 array [3, resolution, resolution] (CHW, RGB, 0..255).

    ``decode_kwargs`` go to :func:`decode_image` (``max_pixels``). Raises ImageDecodeError.
    """
    img = adm_center_crop(decode_image(data, **decode_kwargs), resolution)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def to_unit_float(batch_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, R, R] (numpy or torch) -> float32 [B, 3, R, R] in [0, 1] (value / 255)."""
    import torch  # here, so that decoding-only workers never import torch

    batch = torch.as_tensor(batch_uint8)
    if batch.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 batch, got dtype {batch.dtype}")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected shape [B, 3, R, R], got {tuple(batch.shape)}")
    return batch.to(torch.float32).div_(255.0)
