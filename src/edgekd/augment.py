"""Per-sample augmentation of batched uint8 images, and normalisation to the model's float input.

Works on the decoded uint8 cache (B, 3, H, W) so CPU time goes to the models, not to JPEG decoding.
torchvision transforms v2 draw ONE set of random parameters per call, so a batch would share a
single crop/angle; here every sample gets its own parameters, drawn from an explicit generator so
a seed fixes the whole epoch, and the geometric ones are composed into one affine resampling of the
whole batch (`grid_sample`): 4x faster on CPU than per-sample torchvision calls, and it runs on the
GPU when the images are there. Rice grains photographed from above have no canonical orientation:
every flip and 90-degree rotation is label-preserving. Geometry stays mild (grains must not leave
the frame); colour jitter covers lighting differences between photo sessions.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

CROP_SCALE = (0.8, 1.0)  # area fraction kept by the random resized crop
MAX_ROTATE_DEG = 15.0  # small free rotation on top of the 90-degree ones
MAX_TRANSLATE = 0.06  # fraction of the side
SCALE_RANGE = (0.9, 1.1)
JITTER = 0.1  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]


def augment_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random flips, rot90, mild resized crop, small affine and colour jitter, per sample.

    (B, 3, H, W) uint8 -> (B, 3, H, W) uint8, H == W, on the images' device. Deterministic given the
    generator state (a CPU generator: parameters are drawn on CPU, pixels move where the images are).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    theta = _sampling_matrices(len(images), generator).to(images.device)
    x = images.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # black background
    x = _colour_jitter(x, _uniform(generator, len(images), 3, 1 - JITTER, 1 + JITTER).to(images.device))
    return x.round_().clamp_(0, 255).to(torch.uint8)


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


def _uniform(g: torch.Generator, *shape_and_range: float) -> Tensor:
    """uniform(low, high) of shape `shape_and_range[:-2]`."""
    *shape, low, high = shape_and_range
    return low + (high - low) * torch.rand(*shape, generator=g)


def _sampling_matrices(b: int, g: torch.Generator) -> Tensor:
    """(B, 2, 3) maps from output to input coordinates (normalised, as `affine_grid` takes them).

    Composes, per sample, what separate torchvision calls would do (flip/rot90, a square crop with
    area in CROP_SCALE resized back to full size, then rotation, scale and translation about the centre)
    into one resampling: one interpolation instead of three, and one call for the whole batch.
    """
    # Square crop (a grain's length/width ratio is what tells varieties apart): side k of the frame
    # (k = sqrt of the area fraction), centred uniformly inside the frame.
    k = _uniform(g, b, *CROP_SCALE).sqrt()
    centre = (1 - k).unsqueeze(1) * (2 * torch.rand(b, 2, generator=g) - 1)  # (x, y), normalised
    # Affine about the centre: output = s R(angle) input + t; sampling needs its inverse.
    angle = torch.deg2rad(_uniform(g, b, -MAX_ROTATE_DEG, MAX_ROTATE_DEG))
    scale = _uniform(g, b, *SCALE_RANGE)
    shift = 2 * MAX_TRANSLATE * (2 * torch.rand(b, 2, generator=g) - 1)  # MAX_TRANSLATE of the side
    cos, sin = torch.cos(angle), torch.sin(angle)
    inverse_rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (B, 2, 2)
    linear = (k / scale).view(b, 1, 1) * inverse_rotation
    offset = centre - (linear @ shift.unsqueeze(-1)).squeeze(-1)
    # Flips and quarter turns of the source: every one is label-preserving for grains seen from above.
    flips = torch.where(torch.rand(b, 2, generator=g) < 0.5, -1.0, 1.0)
    quarter_turns = torch.randint(0, 4, (b,), generator=g)
    turn = _ROT90[quarter_turns] * flips.unsqueeze(-1)
    return turn @ torch.cat([linear, offset.unsqueeze(-1)], dim=-1)


_ROT90 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]],
                       [[-1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [-1.0, 0.0]]])  # (4, 2, 2): k quarter turns


def _colour_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast, saturation (factors (B, 3)) on float pixels in [0, 255], as
    torchvision's adjust_* define them: blends with black, the image's mean grey, the pixel's grey."""
    def grey(img: Tensor) -> Tensor:
        return (img * _GREY_WEIGHTS.to(img.device).view(1, 3, 1, 1)).sum(1, keepdim=True)

    def blend(img: Tensor, other: Tensor | float, f: Tensor) -> Tensor:
        f = f.view(-1, 1, 1, 1)
        return (f * img + (1 - f) * other).clamp_(0, 255)

    x = blend(x, 0.0, factors[:, 0])
    x = blend(x, grey(x).mean(dim=(2, 3), keepdim=True), factors[:, 1])
    return blend(x, grey(x), factors[:, 2])


_GREY_WEIGHTS = torch.tensor([0.2989, 0.587, 0.114])  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
