"""pipeline.preprocess: the exact ADM crop, mode conversions and decode failures."""
from __future__ import annotations

import io
import pickle
import resource
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.preprocess import (
    ImageDecodeError,
    adm_center_crop,
    adm_crop_geometry,
    decode_image,
    preprocess_image_bytes,
    to_unit_float,
)
from pipeline.sample_data import bomb_png_bytes


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth content plus noise, so that resampling filters matter
    base = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def guided_diffusion_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Written from the ADM/guided-diffusion `center_crop_arr` description (as quoted in the
    format doc and the reference code), independently of pipeline.preprocess."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


# --------------------------------------------------------------------------------------------
# ADM crop


@pytest.mark.parametrize(
    "width, height, size, halvings, resized, offset",
    [
        # tiny: upscaled; long side round(5 * 256 / 3) = round(426.67) = 427; left (427-256)//2
        (5, 3, 256, [], (427, 256), (85, 0)),
        (3, 5, 256, [], (256, 427), (0, 85)),
        (1, 1, 256, [], (256, 256), (0, 0)),
        # ImageNet-typical 4:3, short side < 512: no halving; 500*256/375 = 341.33 -> 341
        (500, 375, 256, [], (341, 256), (42, 0)),
        (375, 500, 256, [], (256, 341), (0, 42)),
        (256, 256, 256, [], (256, 256), (0, 0)),
        (511, 511, 256, [], (256, 256), (0, 0)),
        # panorama 3:1
        (900, 300, 256, [], (768, 256), (256, 0)),
        # short side 683 >= 512: halve once (floor) -> 512 x 341, then 512*256/341 = 384.37 -> 384
        (1024, 683, 256, [(512, 341)], (384, 256), (64, 0)),
        # twice: 2048x1536 -> 1024x768 -> 512x384; 512*256/384 = 341.33 -> 341
        (2048, 1536, 256, [(1024, 768), (512, 384)], (341, 256), (42, 0)),
        # odd sides floor at each halving: 1025 -> 512 -> 256
        (1025, 1025, 256, [(512, 512), (256, 256)], (256, 256), (0, 0)),
        # exactly 2 * size halves; 2 * size - 1 does not
        (512, 700, 256, [(256, 350)], (256, 350), (0, 47)),
        (511, 700, 256, [], (256, round(700 * 256 / 511)), (0, (round(700 * 256 / 511) - 256) // 2)),
        # 512 px crops
        (1024, 683, 512, [], (768, 512), (128, 0)),  # 683 < 1024: no halving; 767.6 -> 768
        (640, 480, 512, [], (683, 512), (85, 0)),
    ],
)
def test_crop_geometry_matches_hand_computation(width, height, size, halvings, resized, offset):
    assert adm_crop_geometry(width, height, size) == (halvings, resized, offset)
    out = adm_center_crop(Image.new("RGB", (width, height), (1, 2, 3)), size)
    assert out.size == (size, size)


@pytest.mark.parametrize(
    "width, height, size",
    [(5, 3, 256), (3, 5, 16), (500, 375, 256), (333, 500, 256), (1100, 800, 256), (1300, 520, 256),
     (700, 2100, 256), (640, 427, 128), (257, 1031, 64), (1024, 683, 512)],
)
def test_crop_pixels_equal_guided_diffusion(width, height, size):
    img = random_rgb(width, height, seed=width * 7 + height)
    ours = np.asarray(adm_center_crop(img, size))
    theirs = guided_diffusion_center_crop(img, size)
    assert ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("size", [256, 512])
def test_doc_rounding_equals_adm_rounding_for_power_of_two_sizes(size):
    # The format doc says round(side * S / short); ADM computes round(side * (S / short)).
    # After halving short < 2 * S; check every short side and aspect ratios up to 16.
    side = np.arange(1, 16 * 2 * size + 1, dtype=np.int64)[None, :]
    for first in range(1, 2 * size, 128):  # chunks of short sides keep memory small
        short = np.arange(first, min(first + 128, 2 * size), dtype=np.int64)[:, None]
        doc = np.rint(side * size / short)  # numpy rint rounds half to even, like Python round
        adm = np.rint(side * (size / short))
        assert not np.any((doc != adm) & (side >= short))


def test_doc_rounding_differs_from_adm_for_224_on_a_rare_shape():
    # Documented divergence: the format doc's formula is followed.
    assert adm_crop_geometry(201, 192, 224)[1] == (234, 224)  # 201 * 224 / 192 = 234.5 -> 234
    assert round(201 * (224 / 192)) == 235


def test_crop_rejects_bad_sizes():
    with pytest.raises(ValueError):
        adm_center_crop(Image.new("RGB", (4, 4)), 0)


# --------------------------------------------------------------------------------------------
# Mode conversions


def test_rgb_jpeg_roundtrip_and_grayscale_jpeg():
    rgb = random_rgb(40, 30)
    out = decode_image(encode(rgb, "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == (40, 30)
    gray = Image.fromarray(np.tile(np.linspace(0, 255, 48).astype(np.uint8), (32, 1)), mode="L")
    arr = np.asarray(decode_image(encode(gray, "PNG")))
    assert arr.shape == (32, 48, 3)
    np.testing.assert_array_equal(arr[..., 0], np.asarray(gray))
    np.testing.assert_array_equal(arr[..., 1], arr[..., 0])
    np.testing.assert_array_equal(arr[..., 2], arr[..., 0])


def test_cmyk_pure_cyan_is_rgb_cyan():
    data = encode(Image.new("CMYK", (32, 24), (255, 0, 0, 0)), "JPEG", quality=95)
    arr = np.asarray(decode_image(data)).astype(int)
    assert np.abs(arr - np.array([0, 255, 255])).max() <= 2


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.paste(2, (0, 0, 4, 8))
    pal.putpixel((0, 0), 0)
    for kwargs in ({}, {"transparency": 0}):
        arr = np.asarray(decode_image(encode(pal, "PNG", **kwargs)))
        assert tuple(arr[0, 0]) == (0, 0, 0)  # the transparent index keeps its palette colour
        assert tuple(arr[5, 1]) == (0, 255, 0)
        assert tuple(arr[5, 6]) == (255, 0, 0)


def test_alpha_is_dropped_like_pil_convert():
    la = Image.merge("LA", [Image.new("L", (6, 4), 77), Image.new("L", (6, 4), 0)])
    assert np.all(np.asarray(decode_image(encode(la, "PNG"))) == 77)
    rgba = Image.new("RGBA", (6, 4), (10, 200, 30, 0))
    arr = np.asarray(decode_image(encode(rgba, "PNG")))
    assert np.all(arr == np.array([10, 200, 30]))  # colours kept, not composited onto white
    np.testing.assert_array_equal(arr, np.asarray(rgba.convert("RGB")))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    arr = np.asarray(decode_image(encode(img, "PNG")))
    np.testing.assert_array_equal(arr[0, :, 0], [0, 0, 1, 1, 128, 255])
    assert np.all(arr[..., 0] == arr[..., 2])


def test_int32_and_float_modes():
    ints = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32))
    assert ints.mode == "I"
    np.testing.assert_array_equal(np.asarray(decode_image(encode(ints, "TIFF")))[0, :, 1], [0, 1, 255, 255, 0])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32))
    assert floats.mode == "F"
    np.testing.assert_array_equal(np.asarray(decode_image(encode(floats, "TIFF")))[0, :, 0], [0, 128, 255, 255, 0])
    bilevel = Image.fromarray(np.array([[0, 1, 1, 0]], dtype=bool))
    np.testing.assert_array_equal(np.asarray(decode_image(encode(bilevel, "PNG")))[0, :, 0], [0, 255, 255, 0])


def test_png_bytes_are_decoded_whatever_the_name_and_other_formats():
    img = random_rgb(20, 10)
    for fmt in ("PNG", "BMP", "WEBP", "GIF", "TIFF"):
        assert decode_image(encode(img, fmt)).size == (20, 10)


# --------------------------------------------------------------------------------------------
# Failures


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return info.value.reason


def test_failures_have_clear_reasons():
    jpeg = encode(random_rgb(64, 64), "JPEG", quality=90)
    png = encode(random_rgb(32, 32), "PNG")
    assert reason_of(b"") == "empty file"
    assert reason_of(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason_of(jpeg[:-2]) == "truncated"  # only the end-of-image marker missing
    assert reason_of(png[: len(png) // 2]) == "truncated"
    assert reason_of(b"hello, this is text named .JPEG\n" * 20) == "not an image"
    corrupt = bytearray(png)
    corrupt[corrupt.find(b"IDAT") + 20] ^= 0xFF
    assert reason_of(bytes(corrupt)) == "corrupt"


def test_decompression_bomb_is_refused_from_the_header_fast_and_small():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb_png_bytes(20000, 20000))
    assert info.value.reason == "decompression bomb (20000 x 20000)"
    # Below PIL's own limit, our header check must still win before any decoding: a PNG whose
    # data is missing would otherwise fail as "truncated" after allocating 150 MB.
    # (PIL itself only warns between MAX_IMAGE_PIXELS and twice that; the warning is documented.)
    with pytest.raises(ImageDecodeError) as info, pytest.warns(Image.DecompressionBombWarning):
        decode_image(bomb_png_bytes(15000, 10000), max_pixels=100_000_000)
    assert info.value.reason == "decompression bomb (15000 x 10000)"
    assert reason_of(bomb_png_bytes(300, 300), max_pixels=1000) == "decompression bomb (300 x 300)"
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_pil_globals_untouched():
    from PIL import ImageFile

    max_pixels, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageDecodeError):
        decode_image(bomb_png_bytes(20000, 20000))
    decode_image(encode(random_rgb(8, 8), "PNG"), max_pixels=10**12)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (max_pixels, truncated)


def test_decode_error_pickles_with_its_reason():
    err = ImageDecodeError("truncated", "OSError: image file is truncated")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (back.reason, back.detail, str(back)) == (err.reason, err.detail, str(err))


# --------------------------------------------------------------------------------------------
# Bytes -> arrays -> tensors


def test_preprocess_image_bytes_is_chw_uint8_crop():
    img = random_rgb(700, 520, seed=3)
    data = encode(img, "PNG")
    out = preprocess_image_bytes(data, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out.transpose(1, 2, 0), guided_diffusion_center_crop(img, 64))
    with pytest.raises(ImageDecodeError):
        preprocess_image_bytes(bomb_png_bytes(20000, 20000), 64)
    with pytest.raises(ImageDecodeError):
        preprocess_image_bytes(bomb_png_bytes(100, 100), 64, max_pixels=99)


def test_to_unit_float():
    batch = np.array([[[[0, 255], [51, 102]]] * 3], dtype=np.uint8)  # [1, 3, 2, 2]
    for value in (batch, torch.from_numpy(batch)):
        out = to_unit_float(value)
        assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
        torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    with pytest.raises(ValueError):
        to_unit_float(batch.astype(np.float32))
    with pytest.raises(ValueError):
        to_unit_float(batch[0])
