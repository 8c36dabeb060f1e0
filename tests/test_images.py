"""Safe decoding: every mode becomes RGB uint8, every bad file becomes one UnreadableImage line."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgekd.data.images import (
    RESIZE_METHOD,
    ImageTooLarge,
    UnreadableImage,
    load_image,
    load_rgb,
    resize_square,
)

LIMIT = 40_000_000


@pytest.fixture(scope="module")
def real_jpeg(rice_sample_dir):
    return sorted((rice_sample_dir / "Arborio").iterdir())[0]


def _save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_real_jpeg_decodes_to_rgb_uint8(real_jpeg):
    img = load_rgb(real_jpeg, LIMIT)
    assert img.shape == (250, 250, 3) and img.dtype == np.uint8
    assert img.max() > 150 and img[0, 0].max() < 40  # a bright grain on a black background


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    img = load_rgb(_save(tmp_path, "g.png", Image.fromarray(grey)), LIMIT)
    assert img.shape == (8, 8, 3)
    assert (img == grey[:, :, None]).all()


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3], rgba[1, 1, 3], rgba[2, 2, 3] = 255, 0, 128
    img = load_rgb(_save(tmp_path, "a.png", Image.fromarray(rgba)), LIMIT)
    assert img[0, 0].tolist() == [200, 200, 200]
    assert img[1, 1].tolist() == [0, 0, 0]
    assert img[2, 2].tolist() == [100, 100, 100]


def test_palette_and_palette_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_rgb(_save(tmp_path, "p.png", im), LIMIT)[0, 0].tolist() == [10, 200, 30]
    im.info["transparency"] = 1  # index 1 is fully transparent -> black background
    assert load_rgb(_save(tmp_path, "pt.png", im, transparency=1), LIMIT)[0, 0].tolist() == [0, 0, 0]


def test_cmyk_jpeg(tmp_path):
    path = _save(tmp_path, "c.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_rgb(path, LIMIT)
    assert img.shape == (16, 16, 3) and img.min() > 240  # no ink = white


def test_16bit_grey_png_keeps_full_range(tmp_path):
    raw = np.array([[0, 257 * 100], [65535, 257 * 255]], dtype=np.uint16)
    path = _save(tmp_path, "i16.png", Image.fromarray(raw))
    assert Image.open(path).mode == "I;16"
    assert load_rgb(path, LIMIT)[..., 0].tolist() == [[0, 100], [255, 255]]


def test_48bit_rgb_png(tmp_path, make_png):
    rgb16 = np.array([[[65535, 0, 257 * 50]]], dtype=">u2")  # 1x1, 16 bits per channel
    path = tmp_path / "rgb48.png"
    path.write_bytes(make_png(1, 1, bit_depth=16, colour_type=2, rows=rgb16.tobytes()))
    assert load_rgb(path, LIMIT)[0, 0].tolist() == [255, 0, 50]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # landscape, marker at the top-left
    arr[0, 0] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = load_rgb(_save(tmp_path, "o.jpg", im, exif=exif.tobytes(), quality=100), LIMIT)
    assert img.shape == (20, 10, 3)
    assert img[0, -1].min() > 150  # top-left marker moved to the top-right


@pytest.mark.parametrize(
    "case", ["zero_byte", "text_named_jpg", "truncated_jpeg", "corrupt_jpeg", "truncated_png", "directory"]
)
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path, real_jpeg, case):
    data = real_jpeg.read_bytes()
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    path = tmp_path / f"bad {case}.jpg"
    if case == "directory":
        path.mkdir()
    else:
        path.write_bytes(
            {
                "zero_byte": b"",
                "text_named_jpg": b"just some notes, not a picture\n",
                "truncated_jpeg": data[: len(data) // 2],
                "corrupt_jpeg": data[:2] + bytes(range(256)) * 4 + data[1026:],
                "truncated_png": png.getvalue()[: len(png.getvalue()) // 2],
            }[case]
        )
    with pytest.raises(UnreadableImage) as err:
        load_rgb(path, LIMIT)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, make_png):
    # A 10,000 x 10,000 header with no pixel data: decoding would fail differently (truncated),
    # so ImageTooLarge proves the refusal happened on the header alone.
    path = tmp_path / "bomb.png"
    path.write_bytes(make_png(10_000, 10_000))
    assert path.stat().st_size < 100
    with pytest.raises(ImageTooLarge, match=r"bomb\.png: 10000x10000 = 100000000 pixels exceeds"):
        load_rgb(path, LIMIT)
    # Above PIL's own 2x bomb threshold too: still our error, not a PIL exception.
    path.write_bytes(make_png(100_000, 100_000))
    with pytest.raises(ImageTooLarge):
        load_rgb(path, 10**11)


def test_pixel_limit_on_a_real_image(real_jpeg):
    with pytest.raises(ImageTooLarge, match="62500 pixels exceeds the limit of 62499"):
        load_rgb(real_jpeg, 250 * 250 - 1)
    assert load_rgb(real_jpeg, 250 * 250).shape == (250, 250, 3)


def test_resize_square_pads_non_square_with_black():
    img = np.full((50, 100, 3), 200, np.uint8)  # wide
    out = resize_square(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[-1].max() == 0  # padding rows above and below
    assert out[16].min() == 200  # the image itself, centred
    assert "pad" in RESIZE_METHOD and "bilinear" in RESIZE_METHOD


def test_load_image_is_load_then_resize(real_jpeg):
    expected = resize_square(load_rgb(real_jpeg, LIMIT), 64)
    assert np.array_equal(load_image(real_jpeg, 64, LIMIT), expected)
    assert np.array_equal(resize_square(expected, 64), expected)  # same size: untouched
