"""Per-sample augmentation of batched uint8 images.

Works on the decoded uint8 cache (B, 3, H, W) so CPU time goes to the models, not to JPEG decoding.
torchvision transforms v2 draw ONE set of random parameters per call, so a batch would share a
single transform; here every sample gets its own, drawn from an explicit generator so a seed fixes
the whole epoch, and the work runs where the images are (GPU included).

Only transforms that keep each grain's size and sharpness: the 8 symmetries of the square (flips
and quarter turns: grains photographed from above have no canonical orientation) and colour jitter
(lighting differs between photo sessions). The rice photos share one scale (grain area varies 8-11 %
within 4 of the 5 varieties) and size is a variety cue (reports/grain_size.md: Arborio grains cover
12.2 % of the frame, Karacadag grains of similar shape 10.4 %, Ipsala 22.6 %), so no random resized
crop or zoom (those changed grain area by 0.8-1.5x); free rotations and shifts resample, i.e. blur,
64 px training images, which test images never are. On rice val, 3 seeds each, the student lost
0.6 point with crop + zoom + rotation + shift and 0.2 point with rotation + shift alone
(reports/augmentation.md).

Photos of upright objects (CIFAR-10) have a canonical orientation, so quarter turns and vertical
flips would show the models scenes that test images never are: `crop_flip` is the standard recipe
there, a random 32x32 window of the image zero-padded by 1/8 of its side and a horizontal flip.
`flip_translate` is airbench's lighter version of it: a shift of at most 2 px with the border
reflected instead of black, and the flip; in its short high-lr runs it beats the 4 px crop
(docs/recipe.md). `train.augment` selects one for every training stage and the teachers' views alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgekd.config import AUGMENTATIONS

JITTER = 0.1  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
CROP_PAD = 1 / 8  # crop_flip: zero padding per side as a fraction of the side (4 px at 32 px)
TRANSLATE_PX = 2  # flip_translate: the largest shift in px, border reflected


def draw_augmentation(n: int, side: int, generator: torch.Generator, kind: str) -> dict[str, Tensor]:
    """Random transforms drawn per sample, on CPU, for `n` samples of side `side`: `dihedral`, a
    flip/quarter turn and colour jitter; `crop_flip`, a zero-padded random crop and a horizontal
    flip; `flip_translate`, a shift of at most TRANSLATE_PX (border reflected) and a horizontal flip.
    Deterministic given the generator state. A table, not pixels: `apply_augmentation` renders any
    of its rows later, a batch at a time, on any device."""
    if kind in ("crop_flip", "flip_translate"):
        pad = _pad(side, kind)
        return {
            "offsets": torch.randint(0, 2 * pad + 1, (n, 2), generator=generator),  # (N, [dy, dx])
            "flips": torch.rand(n, generator=generator) < 0.5,
        }
    if kind != "dihedral":
        raise ValueError(f"augmentation {kind!r} is not one of {list(AUGMENTATIONS)}")
    return {
        "symmetries": torch.randint(0, 8, (n,), generator=generator),
        "factors": _uniform(generator, n, 3, 1 - JITTER, 1 + JITTER),
    }


def rows_of(table: dict[str, Tensor], rows: Tensor | slice) -> dict[str, Tensor]:
    """The augmentation table of a subset of its images (`rows` index every column alike)."""
    return {name: column[rows] for name, column in table.items()}


def apply_augmentation(images: Tensor, params: dict[str, Tensor], kind: str) -> Tensor:
    """Square uint8 (B, 3, H, W) -> uint8 (B, 3, H, W) transformed by the B rows of a
    `draw_augmentation` table, on the images' device; each sample's pixels depend on its own row
    only, never on the rest of the batch."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    params = {name: value.to(images.device) for name, value in params.items()}
    if kind in ("crop_flip", "flip_translate"):
        return _crop_flip(images, params["offsets"], params["flips"], _pad(images.shape[-1], kind), kind)
    x = _colour_jitter(_square_symmetry(images, params["symmetries"]).float(), params["factors"])
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _pad(side: int, kind: str) -> int:
    return round(side * CROP_PAD) if kind == "crop_flip" else TRANSLATE_PX


def _crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, pad: int, kind: str) -> Tensor:
    """Each sample: a window of its own side from the padded image (zeros for crop_flip, the border
    reflected for flip_translate) at its offset, then mirrored left-right where `flips`; exact pixel
    copies, no resampling."""
    b, _, side, _ = images.shape
    if kind == "crop_flip":
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, 3, side + 2 pad, side + 2 pad)
    else:  # reflect padding has no uint8 kernel
        padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="reflect").to(torch.uint8)
    grid = torch.arange(side, device=images.device)
    rows = offsets[:, :1] + grid  # (B, side)
    cols = offsets[:, 1:] + torch.where(flips[:, None], grid.flip(0), grid)  # (B, side)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _uniform(g: torch.Generator, *shape_and_range: float) -> Tensor:
    """uniform(low, high) of shape `shape_and_range[:-2]`."""
    *shape, low, high = shape_and_range
    return low + (high - low) * torch.rand(*shape, generator=g)


def _square_symmetry(images: Tensor, symmetries: Tensor) -> Tensor:
    """Sample i turned by `symmetries[i] % 4` quarter turns, mirrored first when `symmetries[i] >= 4`:
    exact pixel permutations, no resampling. One call per symmetry present in the batch."""
    out = torch.empty_like(images)
    for symmetry in symmetries.unique().tolist():
        pick = symmetries == symmetry
        x = images[pick].flip(-1) if symmetry >= 4 else images[pick]
        out[pick] = torch.rot90(x, symmetry % 4, dims=(-2, -1))
    return out


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
