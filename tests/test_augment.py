"""Augmentation keeps shapes and dtype, is seeded, and draws its parameters per sample."""

import pytest
import torch

from edgekd.data.batches import load_split, normalize, resize_batch
from edgekd.train import augment
from edgekd.train.augment import apply_augmentation, draw_augmentation


def augment_batch(images, generator, kind="dihedral"):
    """Fresh transforms for a batch, as training draws them."""
    return apply_augmentation(images, draw_augmentation(len(images), images.shape[-1], generator, kind), kind)


@pytest.fixture(scope="module")
def images(prepared_small):
    return load_split(prepared_small, "train")[0][:8]  # (8, 3, 32, 32) uint8, real rice


def test_shape_and_dtype_kept(images):
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def test_deterministic_under_the_seed(images):
    a = augment_batch(images, torch.Generator().manual_seed(1))
    b = augment_batch(images, torch.Generator().manual_seed(1))
    c = augment_batch(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_parameters_differ_per_sample(images):
    same = images[:1].repeat(16, 1, 1, 1)  # one image 16 times
    out = augment_batch(same, torch.Generator().manual_seed(0))
    distinct = {bytes(o.flatten().tolist()) for o in out}
    assert len(distinct) == 16


def test_geometry_is_an_exact_square_symmetry(images, monkeypatch):
    """Without jitter every output is one of the 8 flips/quarter turns of its input, pixel for pixel
    (grain size and sharpness kept), and a batch of copies gets all 8."""
    monkeypatch.setattr(augment, "JITTER", 0.0)
    sources = images[:2].repeat(32, 1, 1, 1)
    out = augment_batch(sources, torch.Generator().manual_seed(0))
    seen = set()
    for src, dst in zip(sources, out):
        symmetries = [torch.rot90(v, k, dims=(-2, -1)) for v in (src, src.flip(-1)) for k in range(4)]
        matches = [i for i, v in enumerate(symmetries) if torch.equal(v, dst)]
        assert matches, "output is not a flip/quarter turn of its input"
        seen.add(matches[0])
    assert len(seen) == 8


def _windows_taken(padded, out) -> set[tuple[int, int, bool]]:
    """(dy, dx, mirrored) of the window of each padded input that each output is; fails on an output
    that is no window of its input, mirrored or not."""
    side, pad = out.shape[-1], (padded.shape[-1] - out.shape[-1])
    seen = set()
    for src, dst in zip(padded, out):
        matches = [
            (dy, dx, m)
            for dy in range(pad + 1)
            for dx in range(pad + 1)
            for m in (False, True)
            if torch.equal(dst, (lambda w: w.flip(-1) if m else w)(src[:, dy : dy + side, dx : dx + side]))
        ]
        assert matches, "output is not a window of its padded input"
        seen.add(matches[0])
    return seen


def test_crop_flip_is_a_window_of_the_padded_image_mirrored_left_right_or_not(images):
    """Every output is its input zero-padded by 4 px and cropped back to 32x32 at some offset,
    mirrored left-right or not (never turned or flipped upside down), and a batch gets all 81
    offsets x 2 mirrors often enough to see many of them."""
    sources = images[:2].repeat(64, 1, 1, 1)
    out = augment_batch(sources, torch.Generator().manual_seed(0), "crop_flip")
    assert out.shape == sources.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(sources, (4, 4, 4, 4))
    seen = _windows_taken(padded, out)
    assert len(seen) > 60 and {m for *_, m in seen} == {False, True}
    assert torch.equal(out, augment_batch(sources, torch.Generator().manual_seed(0), "crop_flip"))


def test_flip_translate_shifts_at_most_2_px_with_the_border_reflected(images):
    """airbench's augmentation: every output is its input shifted by -2..2 px each way, the border
    filled by reflection (never black), mirrored left-right or not; most of the 25 shifts x 2 mirrors occur.
    Random pixels: the rice photos' black borders would look the same zero-padded."""
    noise = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sources = noise.repeat(64, 1, 1, 1)
    out = augment_batch(sources, torch.Generator().manual_seed(0), "flip_translate")
    padded = torch.nn.functional.pad(sources.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    seen = _windows_taken(padded, out)
    assert len(seen) > 40


def test_unknown_augmentation_is_named():
    with pytest.raises(ValueError, match="'mixup' is not one of"):
        draw_augmentation(2, 8, torch.Generator(), "mixup")


def test_input_not_modified(images):
    before = images.clone()
    augment_batch(images, torch.Generator().manual_seed(0))
    assert torch.equal(images, before)


def test_rejects_float_or_non_square():
    g = torch.Generator()
    with pytest.raises(ValueError, match="uint8"):
        apply_augmentation(torch.zeros(2, 3, 8, 8), draw_augmentation(2, 8, g, "dihedral"), "dihedral")
    with pytest.raises(ValueError, match="square"):
        apply_augmentation(
            torch.zeros(2, 3, 8, 9, dtype=torch.uint8), draw_augmentation(2, 8, g, "crop_flip"), "crop_flip"
        )


def test_resize_batch_downscales_uint8_and_keeps_same_size_as_is(images):
    small = resize_batch(images, 16)
    assert small.shape == (8, 3, 16, 16) and small.dtype == torch.uint8
    assert resize_batch(images, None) is images and resize_batch(images, 32) is images
    # a low-pass resize keeps each image's mean brightness and a flat image flat
    assert (small.float().mean(dim=(2, 3)) - images.float().mean(dim=(2, 3))).abs().max() < 1.0
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(resize_batch(flat, 16), torch.full((1, 3, 16, 16), 77, dtype=torch.uint8))


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(x, mean=[0.0, 0.2, 0.5], std=[1.0, 0.5, 0.25])
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 2.0]))
