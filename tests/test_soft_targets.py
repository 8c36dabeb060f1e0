"""Stored teacher logits on re-rendered views: same pixels every time, right view per epoch, loud mismatches."""

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from edgekd.config import params_from_dict
from edgekd.data.batches import load_split
from edgekd.data.prepared import load_info
from edgekd.errors import UserError
from edgekd.train.augment import apply_augmentation, draw_augmentation
from edgekd.train.checkpoints import save_checkpoint
from edgekd.train.fit_setup import FitSetup
from edgekd.train.losses import confidence_weights, prepare_teachers
from edgekd.train.models import build_model
from edgekd.train.soft_targets import (
    RENDER_CHUNK,
    combine_teachers,
    compute_soft_targets,
    load_soft_targets,
    render_view,
    save_soft_targets,
    storage_rounding,
    view_batches,
    view_hash,
    view_parameters,
)

REPO = Path(__file__).resolve().parents[1]


def _params(seed=7, augment="dihedral", views=3, targets="views", ensemble="mean", precision="float32"):
    """The repo's params with the few keys the soft targets read set for the test."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seed"] = seed
    raw["train"].update(augment=augment, eval_batch_size=64, precision=precision)
    raw["kd"].update(views=views, targets=targets, ensemble=ensemble)
    return params_from_dict(raw)


def _render(images, seed, view, augment="dihedral"):
    """A whole view, for comparisons (the pipeline never holds one)."""
    return torch.cat(list(render_view(images, view_parameters(images, seed, view, augment), augment)))


class _MeanColour(nn.Module):
    """A deterministic 'teacher' whose logits depend on the pixels: per-channel means, then a fixed map."""

    def __init__(self, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def sample(prepared_small):
    info = load_info(prepared_small)
    images, labels = load_split(prepared_small, "train")
    targets = compute_soft_targets([_MeanColour(len(info.classes))], images, _params(), info, torch.device("cpu"))
    return info, images, labels, targets


def test_views_render_identically_and_differ_from_each_other(sample):
    _, images, _, _ = sample
    first = _render(images, seed=7, view=1)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, _render(images, seed=7, view=1))
    assert not torch.equal(first, _render(images, seed=7, view=2))
    assert not torch.equal(first, _render(images, seed=8, view=1))


@pytest.mark.parametrize("augment", ["dihedral", "crop_flip"])
def test_a_view_renders_the_same_pixels_in_any_batches(augment):
    """Rendered from its table, a batch of any rows in any order: the pixels of the view defined as
    fresh RENDER_CHUNK-image augmentations drawn from one generator (the definition stored hashes pin)."""
    images = torch.randint(
        0, 256, (2 * RENDER_CHUNK + 37, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    generator = torch.Generator().manual_seed(5 * 7_919 + 2)
    chunks = [images[start : start + RENDER_CHUNK] for start in range(0, len(images), RENDER_CHUNK)]
    defined = torch.cat(
        [apply_augmentation(c, draw_augmentation(len(c), 16, generator, augment), augment) for c in chunks]
    )
    params = view_parameters(images, seed=5, view=2, augment=augment)
    assert torch.equal(torch.cat(list(render_view(images, params, augment, batch_size=100))), defined)
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:150]
    batch = render_view(images[rows], {k: v[rows] for k, v in params.items()}, augment, batch_size=150)
    assert torch.equal(next(batch), defined[rows])
    assert view_hash(images, params, augment) == hashlib.sha256(defined.numpy()).hexdigest()[:16]


def test_targets_are_the_teachers_logits_of_each_view(sample):
    info, images, _, targets = sample
    assert targets["teacher_logits"].shape == (3, len(images), 1, len(info.classes))
    teacher = _MeanColour(len(info.classes)).eval()
    pixels = _render(images, seed=7, view=2)
    assert targets["view_hashes"][2] == hashlib.sha256(pixels.numpy()).hexdigest()[:16]
    x = (pixels.float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(targets["teacher_logits"][2, :, 0], teacher(x))


def test_mean_ensemble_of_one_teacher_is_its_logits_and_counts_its_hits(sample):
    info, images, labels, targets = sample
    logits, weights = combine_teachers(targets["teacher_logits"], labels, "mean")
    assert torch.equal(logits, targets["teacher_logits"][:, :, 0]) and weights.tolist() == [1.0]
    teacher = _MeanColour(len(info.classes)).eval()
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    hits = []
    with torch.no_grad():
        for view in range(3):
            x = (_render(images, seed=7, view=view).float() / 255 - mean) / std
            hits.append((teacher(x).argmax(1) == labels).tolist())
    assert len({sum(h) for h in hits}) > 1  # the views differ in how often the teacher is right
    assert (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(
        sum(map(sum, hits)) / (3 * len(images)), abs=1e-6
    )


def test_confidence_ensemble_weighs_each_teacher_per_sample_on_every_view(sample):
    info, images, labels, _ = sample
    good, bad = _MeanColour(len(info.classes)), _MeanColour(len(info.classes))
    with torch.no_grad():
        bad.head.weight.mul_(-1)  # a second teacher that disagrees with the first
    stored = compute_soft_targets([good, bad], images, _params(views=2), info, torch.device("cpu"))[
        "teacher_logits"
    ]  # (V, N, K, C)
    confident, confidence_mean = combine_teachers(stored, labels, "confidence")
    plain, plain_mean = combine_teachers(stored, labels, "mean")
    assert confident.shape == plain.shape == (2, len(images), len(info.classes))
    torch.testing.assert_close(plain, stored.mean(dim=2))
    torch.testing.assert_close(plain_mean, torch.tensor([0.5, 0.5]))
    for view in range(2):  # each view combined with its own per-sample weights
        w = confidence_weights(stored[view], labels)  # (N, K)
        torch.testing.assert_close(confident[view], (w.unsqueeze(-1) * stored[view]).sum(dim=1))
    assert not torch.allclose(confident, plain)
    assert confidence_mean.sum().item() == pytest.approx(1.0) and confidence_mean[0] != confidence_mean[1]


def test_epoch_e_trains_on_view_e_mod_v_with_matching_targets(sample):
    info, images, labels, targets = sample
    setup = FitSetup(epochs=5, batch_size=16, eval_batch_size=64, seed=7, mean=info.mean, std=info.std)
    batches = view_batches(images, labels, {**targets, "logits": targets["teacher_logits"][:, :, 0]}, setup)
    teacher = _MeanColour(len(info.classes)).eval()
    for epoch in (1, 4):  # 4 mod 3 = view 1 again
        batch = next(batches(epoch, torch.Generator().manual_seed(epoch)))
        assert batch.x.shape == (16, 3, info.image_size, info.image_size)
        with torch.no_grad():
            torch.testing.assert_close(batch.teacher_logits, teacher(batch.x))
        assert batch.y.dtype == torch.int64
    assert sum(1 for _ in batches(0, torch.Generator().manual_seed(0))) == len(images) // 16


def test_mismatches_fail_loudly(sample, tmp_path):
    info, images, labels, targets = sample
    path = tmp_path / "soft.pt"
    save_soft_targets(path, targets)
    loaded = load_soft_targets(path, (images, labels), _params(), len(info.classes))
    # stored as float16, read back as float32 for training
    assert loaded["teacher_logits"].dtype == torch.float16 and loaded["logits"].dtype == torch.float32
    assert torch.equal(loaded["logits"], targets["teacher_logits"][:, :, 0].half().float())
    with pytest.raises(UserError, match="soft.pt: soft targets were computed for other"):
        load_soft_targets(path, (images[:-1], labels[:-1]), _params(), len(info.classes))
    with pytest.raises(UserError, match="rerun the soft_targets stage"):
        load_soft_targets(path, (images, labels), _params(seed=8), len(info.classes))
    with pytest.raises(UserError, match="train.augment"):  # views rendered by another augmentation
        load_soft_targets(path, (images, labels), _params(augment="crop_flip"), len(info.classes))
    with pytest.raises(UserError, match="kd.targets"):  # views, not per-image flip means
        load_soft_targets(path, (images, labels), _params(targets="flip_mean"), len(info.classes))
    save_checkpoint(tmp_path / "float32.pt", targets)  # logits not in the stored format
    with pytest.raises(UserError, match="float32.pt: .* stored in another format"):
        load_soft_targets(tmp_path / "float32.pt", (images, labels), _params(), len(info.classes))
    setup = FitSetup(epochs=1, batch_size=16, eval_batch_size=64, seed=7, mean=info.mean, std=info.std)
    altered = images.clone()
    altered[0] = 255 - altered[0]  # one image changed: the re-rendered view no longer matches its targets
    with pytest.raises(UserError, match="view 0 renders differently"):
        next(view_batches(altered, labels, loaded, setup)(0, torch.Generator().manual_seed(0)))


def test_storage_rounding_reports_the_float16_error_and_flipped_top1():
    logits = torch.randn(2, 50, 3, 4, generator=torch.Generator().manual_seed(0)) * 8  # (V, N, K, C)
    labels = torch.arange(50) % 4
    # one image whose classes 0 and 1 differ by less than float16 resolves at 1.0: its top-1 flips
    logits[0, 0] = torch.tensor([1.0, 1.0001, -5.0, -5.0])
    report = storage_rounding(logits, labels, ["mean", "confidence"])
    assert report["stored_logit_max_error"] == pytest.approx(
        (logits.half().float() - logits).abs().max().item(), abs=1e-6
    )
    assert 0 < report["stored_logit_max_error"] <= logits.abs().max().item() * 2**-11
    assert report["stored_top1_changed"]["mean"] == pytest.approx(1 / 100)


def test_flip_mean_targets_are_each_images_mean_over_it_and_its_mirror_and_train_on_fresh_views(sample, tmp_path):
    """kd.targets: flip_mean: one teacher pass per image and per mirror, the students' batches fresh
    augmentations of each epoch carrying their images' targets; another image set fails loudly."""
    info, images, labels, _ = sample
    params = _params(augment="flip_translate", targets="flip_mean", views=5)
    targets = compute_soft_targets([_MeanColour(len(info.classes))], images, params, info, torch.device("cpu"))
    assert targets["teacher_logits"].shape == (1, len(images), 1, len(info.classes))  # kd.views not used
    teacher = _MeanColour(len(info.classes)).eval()
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(targets["teacher_logits"][0, :, 0], (teacher(x) + teacher(x.flip(-1))) / 2)
    save_soft_targets(tmp_path / "flip.pt", targets)
    loaded = load_soft_targets(tmp_path / "flip.pt", (images, labels), params, len(info.classes))
    setup = FitSetup(
        epochs=2, batch_size=16, eval_batch_size=64, seed=7, mean=info.mean, std=info.std, augment="flip_translate"
    )
    batches = view_batches(images, labels, loaded, setup)
    first = next(batches(0, torch.Generator().manual_seed(0)))
    again = next(batches(1, torch.Generator().manual_seed(1)))
    assert not torch.equal(first.x, again.x)  # each epoch its own augmentations
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:16]
    torch.testing.assert_close(first.teacher_logits, loaded["logits"][0][order])
    with pytest.raises(UserError, match="differ from those the soft targets were computed on"):
        next(view_batches(255 - images, labels, loaded, setup)(0, torch.Generator().manual_seed(0)))


def test_bfloat16_teachers_label_as_the_float32_ones_to_bfloat16_rounding(sample):
    """train.precision: bfloat16 runs the teachers' passes under autocast: float32 logits of the same
    shape that differ from the float32 pass by bfloat16 rounding only (same top-1 nearly everywhere),
    and the same every run."""
    info, images, _, _ = sample
    torch.manual_seed(0)
    teacher = build_model("convnet_d2_16_32_32", len(info.classes), stem="small")
    teachers = prepare_teachers([teacher])
    run = lambda precision: compute_soft_targets(  # noqa: E731
        teachers, images, _params(targets="flip_mean", precision=precision), info, torch.device("cpu")
    )["teacher_logits"]
    exact, fast = run("float32"), run("bfloat16")
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # the autocast pass ran
    # The flip mean is taken in float32: a mean of two bfloat16 values often needs a bit bfloat16 lacks.
    assert not torch.equal(fast, fast.bfloat16().float())
    scale = exact.abs().max().item()
    assert (fast - exact).abs().max().item() <= scale * 2**-5
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.95
    assert torch.equal(run("bfloat16"), fast)
