"""Per-sample augmentation of batched uint8 images, and normalisation to the model's float input.

Works on the decoded uint8 cache (B, 3, H, W) so CPU time goes to the models, not to JPEG decoding.
torchvision transforms v2 draw ONE set of random parameters per call, so a batch would share a
single crop/angle; here every sample gets its own parameters, drawn from an explicit generator so
a seed fixes the whole epoch. Rice grains photographed from above have no canonical orientation:
every flip and 90-degree rotation is label-preserving. Geometry stays mild (grains must not leave
the frame); colour jitter covers lighting differences between photo sessions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

CROP_SCALE = (0.8, 1.0)  # area fraction kept by the random resized crop
CROP_RATIO = (1.0, 1.0)  # square crops: a grain's length/width ratio is what tells varieties apart
MAX_ROTATE_DEG = 15.0  # small free rotation on top of the 90-degree ones
MAX_TRANSLATE = 0.06  # fraction of the side
SCALE_RANGE = (0.9, 1.1)
JITTER = 0.1  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]


def augment_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random flips, rot90, mild resized crop, small affine and colour jitter, per sample.

    (B, 3, H, W) uint8 -> (B, 3, H, W) uint8, H == W. Deterministic given the generator state.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    images = _flips_rot90(images, generator)
    return torch.stack([_geometry_and_colour(img, generator) for img in images])


def resize_batch(images: Tensor, size: int | None) -> Tensor:
    """uint8 (B, 3, H, W) -> (B, 3, size, size), antialiased bilinear; as is when size is None or H."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, the only input the models ever see."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def _flips_rot90(images: Tensor, g: torch.Generator) -> Tensor:
    """Vectorised: boolean masks pick which samples flip, k in 0..3 picks the quarter turns."""
    b = images.shape[0]
    h_flip = torch.rand(b, generator=g) < 0.5  # (B,)
    v_flip = torch.rand(b, generator=g) < 0.5
    k = torch.randint(0, 4, (b,), generator=g)
    out = images.clone()
    out[h_flip] = out[h_flip].flip(-1)
    out[v_flip] = out[v_flip].flip(-2)
    for turns in range(1, 4):
        sel = k == turns
        out[sel] = torch.rot90(out[sel], turns, dims=(-2, -1))
    return out


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _geometry_and_colour(img: Tensor, g: torch.Generator) -> Tensor:
    """One sample (3, H, W) uint8 with its own crop, affine and jitter parameters."""
    size = img.shape[-1]
    top, left, h, w = _crop_box(size, g)
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    shift = MAX_TRANSLATE * size
    img = TF.affine(
        img,
        angle=_uniform(g, -MAX_ROTATE_DEG, MAX_ROTATE_DEG),
        translate=[round(_uniform(g, -shift, shift)), round(_uniform(g, -shift, shift))],
        scale=_uniform(g, *SCALE_RANGE),
        shear=[0.0, 0.0],
        interpolation=v2.InterpolationMode.BILINEAR,
        fill=0,  # the rice photos have a black background
    )
    img = TF.adjust_brightness(img, _uniform(g, 1 - JITTER, 1 + JITTER))
    img = TF.adjust_contrast(img, _uniform(g, 1 - JITTER, 1 + JITTER))
    return TF.adjust_saturation(img, _uniform(g, 1 - JITTER, 1 + JITTER))


def _crop_box(size: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop with area in CROP_SCALE and aspect in CROP_RATIO."""
    area = size * size * _uniform(g, *CROP_SCALE)
    ratio = math.exp(_uniform(g, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    w = min(size, max(1, round((area * ratio) ** 0.5)))
    h = min(size, max(1, round((area / ratio) ** 0.5)))
    top = int(torch.randint(0, size - h + 1, (), generator=g))
    left = int(torch.randint(0, size - w + 1, (), generator=g))
    return top, left, h, w
