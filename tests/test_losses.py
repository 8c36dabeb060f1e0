"""KD loss against closed-form values and its alpha / temperature edge cases; teacher ensembling."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.data.batches import normalize
from edgekd.train.batching import Batch
from edgekd.train.evaluation import predict_logits
from edgekd.train.losses import (
    FlipAveraged,
    confidence_ensemble,
    confidence_weights,
    ensemble_logits,
    kd_loss,
    kd_loss_fn,
    prepare_teachers,
    teacher_logits,
)
from edgekd.train.models import build_model


def test_kd_loss_hand_computed():
    # T = 2; teacher logits / T = [0, ln 3] -> p_t = [1/4, 3/4]; student [0, 0] -> p_s = [1/2, 1/2].
    T, alpha = 2.0, 0.3
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, T * math.log(3)]])
    target = torch.tensor([1])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.13081...
    ce = math.log(2)
    out = kd_loss(student, teacher, target, temperature=T, alpha=alpha, label_smoothing=0.0)
    assert out["kd"].item() == pytest.approx(T**2 * kl, rel=1e-6)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(alpha * T**2 * kl + (1 - alpha) * ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.3 * 4 * 0.1308120 + 0.7 * 0.6931472, rel=1e-5)


def _logits(seed=0, b=8, c=5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, generator=g) * 3,
        torch.randn(b, c, generator=g) * 3,
        torch.randint(0, c, (b,), generator=g),
    )


def test_alpha_zero_is_plain_label_smoothed_cross_entropy():
    s, t, y = _logits()
    out = kd_loss(s, t, y, temperature=4.0, alpha=0.0, label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], F.cross_entropy(s, y, label_smoothing=0.1))
    # the teacher does not matter at alpha = 0
    torch.testing.assert_close(out["loss"], kd_loss(s, -t, y, 4.0, 0.0, 0.1)["loss"])


def test_alpha_one_is_pure_kd_and_ignores_labels():
    s, t, y = _logits()
    out = kd_loss(s, t, y, temperature=4.0, alpha=1.0, label_smoothing=0.1)
    kl = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
    torch.testing.assert_close(out["loss"], 16 * kl)
    torch.testing.assert_close(out["loss"], kd_loss(s, t, (y + 1) % 5, 4.0, 1.0, 0.1)["loss"])


def test_identical_logits_give_zero_kd_and_zero_gradient():
    s, _, y = _logits()
    s.requires_grad_(True)
    out = kd_loss(s, s.detach().clone(), y, temperature=3.0, alpha=1.0)
    out["loss"].backward()
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert s.grad.abs().max().item() < 1e-6


def test_temperature_one_is_plain_kl():
    s, t, y = _logits()
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, t, y, 1.0, 1.0)["kd"], kl)


def test_high_temperature_matches_logit_matching():
    # Hinton et al.: for T >> |logits|, T^2 KL -> mean_b sum_c ((s - mean s) - (t - mean t))^2 / (2C).
    s, t, y = _logits()
    d = (s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))
    expected = (d**2).sum(1).mean() / (2 * s.shape[1])
    got = kd_loss(s.double(), t.double(), y, temperature=1000.0, alpha=1.0)["kd"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)


def test_low_temperature_stays_finite():
    s, t, y = _logits()
    out = kd_loss(s, t, y, temperature=0.01, alpha=0.5)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("temperature,alpha", [(0.0, 0.5), (-1.0, 0.5), (2.0, -0.1), (2.0, 1.5)])
def test_invalid_temperature_or_alpha(temperature, alpha):
    s, t, y = _logits()
    with pytest.raises(ValueError):
        kd_loss(s, t, y, temperature, alpha)


class _Const(nn.Module):
    """A 'teacher' with fixed logits plus a dropout that would change them in train mode."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        return self.drop(self.logits.expand(x.shape[0], -1))


def test_ensemble_is_mean_of_teacher_logits_in_eval_mode():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 0.0, -3.0]])
    teachers = [_Const(a).train(), _Const(b).train()]
    out = ensemble_logits(teachers, torch.zeros(4, 3, 8, 8))
    torch.testing.assert_close(out, ((a + b) / 2).expand(4, -1))
    assert not out.requires_grad and not out.is_inference()  # usable as a loss target


def test_confidence_weights_hand_computed_for_3_teachers_and_2_samples():
    # sample 0 (label 0): A is sure and right, B undecided, C sure and wrong; sample 1: all alike
    logits = torch.tensor(
        [[[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]], [[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]]]
    )  # (N=2, K=3, C=2)
    labels = torch.tensor([0, 1])
    ce = [math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2))]  # -log p(label) per teacher
    softmax = [math.exp(c) / sum(math.exp(d) for d in ce) for c in ce]
    expected = torch.tensor([[(1 - s) / 2 for s in softmax], [1 / 3] * 3])  # CA-MKD: (1 - softmax_k) / (K - 1)
    weights = confidence_weights(logits, labels)
    torch.testing.assert_close(weights, expected)
    assert weights[0, 0] > weights[0, 1] > weights[0, 2]  # the right teacher counts most
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    expected_logits = expected[0, 0] * logits[0, 0] + expected[0, 1] * logits[0, 1] + expected[0, 2] * logits[0, 2]
    combined = confidence_ensemble(logits, labels)
    torch.testing.assert_close(combined[0], expected_logits)
    torch.testing.assert_close(combined[1], logits[1, 0])  # equal weights of equal teachers
    with pytest.raises(ValueError, match="compare teachers"):
        confidence_weights(logits[:, :1], labels)


def test_teacher_logits_stand_side_by_side_and_average_to_the_ensemble():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 0.0, -3.0]])
    teachers, x = [_Const(a).train(), _Const(b).train()], torch.zeros(4, 3, 8, 8)
    side_by_side = teacher_logits(teachers, x)
    assert side_by_side.shape == (4, 2, 3) and not side_by_side.is_inference()
    torch.testing.assert_close(side_by_side[:, 1], b.expand(4, -1))
    torch.testing.assert_close(side_by_side.mean(1), ensemble_logits(teachers, x))


def test_kd_closure_trains_student_against_stored_teacher_logits():
    torch.manual_seed(0)
    student = build_model("mobilenet_v3_small", 5, 0.25)
    x, y, teacher = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)), torch.randn(4, 5)
    out = kd_loss_fn(4.0, 0.7, 0.1)(student, Batch(x, y, teacher))
    out["loss"].backward()
    assert out["logits"].shape == (4, 5)
    torch.testing.assert_close(out["loss"], kd_loss(out["logits"], teacher, y, 4.0, 0.7, 0.1)["loss"])
    assert student.classifier[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss_fn(4.0, 0.7, 0.1)(student, Batch(x, y))


def test_prepared_teachers_give_the_same_logits():
    torch.manual_seed(0)
    teacher = build_model("mobilenet_v2", 5)
    teacher.train()(torch.randn(8, 3, 32, 32))  # non-trivial BN running statistics
    teacher.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = teacher(x)
    fast = prepare_teachers([teacher])[0]
    torch.testing.assert_close(ensemble_logits([fast], x), expected, rtol=1e-4, atol=1e-4)


def test_flip_averaging_runs_the_wrapped_model_in_eval_mode_and_restores_it():
    """The mean over each image and its mirror, of the model in eval mode (BN running statistics, no
    observer moving), even when the caller hands over a model in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    model(torch.randn(8, 3, 8, 8))  # running statistics that differ from any one batch's
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    averaged = predict_logits(FlipAveraged(model), images, mean, std, 4, torch.device("cpu"))
    assert model.training  # restored
    x = normalize(images, mean, std)
    with torch.no_grad():
        expected = (model.eval()(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(averaged, expected)
    predict_logits(FlipAveraged(model), images, mean, std, 4, torch.device("cpu"))
    assert not model.training  # a model handed over in eval mode stays in it
