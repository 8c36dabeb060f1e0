"""Safe image decoding shared by `prepare` (training) and `predict` (inference).

Both sides must preprocess identically, so the decode -> RGB -> square-resize chain lives here once
and its resize rule is named by `RESIZE_METHOD` (recorded in the ONNX metadata by export).
Any file a user points us at may be corrupt, truncated, not an image at all, or a decompression bomb:
each case raises `UnreadableImage` with one line naming the file, never a PIL traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from edgekd.errors import UserError

# Non-square images are zero-padded (black, like the rice background) to a centred square, then
# resized with PIL's antialiased bilinear filter; nothing is cropped away. Square inputs (the
# 250x250 rice images) are just resized.
RESIZE_METHOD = "pad-center-black-to-square, PIL bilinear antialiased resize"

# Extensions scanned as images (case-insensitive); anything else in a class folder is ignored.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImage(UserError):
    """A file that cannot be decoded into an RGB image (message: `<path>: <reason>`)."""


class ImageTooLarge(UnreadableImage):
    """The header announces more pixels than allowed: refused before any pixel is decoded."""


def load_rgb(path: str | Path, max_pixels: int) -> np.ndarray:
    """Decode `path` to an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    The pixel count is read from the header and checked against `max_pixels` before decoding, so a
    small file that would expand to gigabytes is refused cheaply.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below; PIL's global bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of "
                        f"{max_pixels}"
                    )
                im.load()
                return _to_rgb_array(ImageOps.exif_transpose(im))
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{path}: refused as a decompression bomb ({err})") from None
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path}: is a directory, not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableImage(f"{path}: not a readable image ({reason})") from None


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8. Transparency is composited on black, like the rice background."""
    if im.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey: keep the high byte (65535 -> 255) instead of PIL's clipping conversion to L.
        grey = (np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        grey = np.asarray(im, dtype=np.float64).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
        rgb = rgba[:, :, :3] * (rgba[:, :, 3:] / 255.0)
        return rgb.round().clip(0, 255).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(im, dtype=np.uint8).copy()


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 following `RESIZE_METHOD`."""
    height, width = img.shape[:2]
    if height != width:
        side = max(height, width)
        padded = np.zeros((side, side, 3), dtype=np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        padded[top : top + height, left : left + width] = img
        img = padded
    if img.shape[0] == size:
        return np.ascontiguousarray(img)
    resized = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def normalize_array(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std: in numpy the same operations, in the same
    float32 order, as the torch path (edgekd.data.batches.normalize), for code that runs without torch."""
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - mean_a) / std_a


def load_image(path: str | Path, size: int, max_pixels: int) -> np.ndarray:
    """The full inference preprocessing up to normalisation: file -> (size, size, 3) uint8 RGB."""
    return resize_square(load_rgb(path, max_pixels), size)
