"""Stored teacher logits on re-rendered views: same pixels every time, right view per epoch, loud mismatches."""

import pytest
import torch
from torch import nn

from edgekd.data.prepared import load_info, load_split
from edgekd.errors import UserError
from edgekd.train.engine import FitSetup
from edgekd.train.soft_targets import (
    compute_soft_targets,
    load_soft_targets,
    pixel_hash,
    render_view,
    save_soft_targets,
    view_batches,
)


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
    targets = compute_soft_targets([_MeanColour(len(info.classes))], images, labels, views=3, seed=7,
                                   mean=info.mean, std=info.std, batch_size=64, device=torch.device("cpu"))
    return info, images, labels, targets


def test_views_render_identically_and_differ_from_each_other(sample):
    _, images, _, _ = sample
    first = render_view(images, seed=7, view=1)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, render_view(images, seed=7, view=1))
    assert not torch.equal(first, render_view(images, seed=7, view=2))
    assert not torch.equal(first, render_view(images, seed=8, view=1))


def test_targets_are_the_teachers_logits_of_each_view(sample):
    info, images, _, targets = sample
    assert targets["logits"].shape == (3, len(images), len(info.classes))
    teacher = _MeanColour(len(info.classes)).eval()
    pixels = render_view(images, seed=7, view=2)
    assert targets["view_hashes"][2] == pixel_hash(pixels)
    x = (pixels.float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(targets["logits"][2], teacher(x))


def test_ensemble_accuracy_counts_the_teachers_hits_over_every_view(sample):
    info, images, labels, targets = sample
    teacher = _MeanColour(len(info.classes)).eval()
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    hits = []
    with torch.no_grad():
        for view in range(3):
            x = (render_view(images, seed=7, view=view).float() / 255 - mean) / std
            hits.append((teacher(x).argmax(1) == labels).tolist())
    per_view = [sum(h) / len(h) for h in hits]
    assert len(set(per_view)) > 1  # the views differ in how often the teacher is right
    assert targets["ensemble_accuracy"] == pytest.approx(sum(map(sum, hits)) / (3 * len(images)), abs=1e-6)
    # stored logits and accuracy agree (argmax of the (V, N, C) targets against the labels)
    assert targets["ensemble_accuracy"] == pytest.approx(
        (targets["logits"].argmax(-1) == labels).float().mean().item(), abs=1e-6)


def test_confidence_ensemble_weighs_each_teacher_per_sample_on_every_view(sample):
    info, images, labels, mean_targets = sample
    good, bad = _MeanColour(len(info.classes)), _MeanColour(len(info.classes))
    with torch.no_grad():
        bad.head.weight.mul_(-1)  # a second teacher that disagrees with the first
    kwargs = dict(views=2, seed=7, mean=info.mean, std=info.std, batch_size=64, device=torch.device("cpu"))
    targets = compute_soft_targets([good, bad], images, labels, ensemble="confidence", **kwargs)
    plain = compute_soft_targets([good, bad], images, labels, ensemble="mean", **kwargs)
    assert targets["ensemble"] == "confidence" and plain["ensemble"] == "mean"
    assert targets["logits"].shape == plain["logits"].shape == (2, len(images), len(info.classes))
    assert not torch.allclose(targets["logits"], plain["logits"])
    torch.testing.assert_close(plain["teacher_weights"], torch.tensor([0.5, 0.5]))
    assert targets["teacher_weights"].sum().item() == pytest.approx(1.0)
    assert targets["view_hashes"] == plain["view_hashes"]  # same views, other weights


def test_epoch_e_trains_on_view_e_mod_v_with_matching_targets(sample):
    info, images, labels, targets = sample
    setup = FitSetup(epochs=5, batch_size=16, eval_batch_size=64, seed=7, mean=info.mean, std=info.std)
    batches = view_batches(images, labels, targets, setup)
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
    assert torch.equal(load_soft_targets(path, images, 7, len(info.classes))["logits"], targets["logits"])
    with pytest.raises(UserError, match="soft.pt: soft targets were computed for other"):
        load_soft_targets(path, images[:-1], 7, len(info.classes))
    with pytest.raises(UserError, match="rerun the soft_targets stage"):
        load_soft_targets(path, images, 8, len(info.classes))
    setup = FitSetup(epochs=1, batch_size=16, eval_batch_size=64, seed=7, mean=info.mean, std=info.std)
    altered = images.clone()
    altered[0] = 255 - altered[0]  # one image changed: the re-rendered view no longer matches its targets
    with pytest.raises(UserError, match="view 0 renders differently"):
        next(view_batches(altered, labels, targets, setup)(0, torch.Generator().manual_seed(0)))
