"""Knowledge-distillation loss and the teacher ensemble whose averaged logits the student learns."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from edgekd.train.batching import Batch, LossFn


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).

        loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when
    T changes. KL is averaged over the batch; CE uses label smoothing. Returns the parts too:
    `kd` is the T^2-scaled KL term, `ce` the cross-entropy, so both can be logged.
    Shapes: logits (B, C), targets (B,) int64.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)  # (B, C)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    kd = temperature**2 * kl
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return {"loss": alpha * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}


def prepare_teachers(teachers: Sequence[nn.Module]) -> list[nn.Module]:
    """Make frozen teachers cheap to run; their outputs stay the same up to float rounding.

    Eval mode (running BN statistics), conv+BN folded into one conv (torch.fx `fuse`: ~2x on
    MobileNetV2), channels-last memory (faster oneDNN kernels on CPU) and no gradients.
    """
    ready = []
    for teacher in teachers:
        teacher = fuse(copy.deepcopy(teacher).eval()).to(memory_format=torch.channels_last)
        teacher.requires_grad_(False)
        ready.append(teacher)
    return ready


def ensemble_logits(teachers: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Mean of the teachers' logits for the same input batch: (B, 3, H, W) -> (B, C).

    Eval mode and `torch.inference_mode` (no autograd bookkeeping): teachers are never trained here.
    The result is cloned outside inference mode so it can serve as a loss target.
    """
    with torch.inference_mode():
        x = x.contiguous(memory_format=torch.channels_last)
        logits = torch.stack([t.eval()(x) for t in teachers])  # (K, B, C)
        mean = logits.mean(dim=0)
    return mean.clone()


def teacher_logits(teachers: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Every teacher's logits for the same input batch, side by side: (B, 3, H, W) -> (B, K, C)."""
    with torch.inference_mode():
        x = x.contiguous(memory_format=torch.channels_last)
        logits = torch.stack([t.eval()(x) for t in teachers], dim=1)  # (B, K, C)
    return logits.clone()


class FlipAveraged(nn.Module):
    """Test-time flip averaging: `fn`'s outputs on a batch and on its left-right mirror, averaged.
    For upright photos (CIFAR-10) a mirror is as likely a scene as the original; a model's errors on
    the two differ, and their mean is the better answer (airbench's TTA, docs/recipe.md). A module
    holding `fn` (when `fn` is one), so that evaluation_mode puts it in eval mode with its observers
    off, as it does `fn` alone."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.training = getattr(fn, "training", False)  # the mode evaluation_mode restores: fn's own

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + self.fn(x.flip(-1))) / 2


def confidence_weights(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample teacher weights (N, K) from their logits (N, K, C) and the true labels (N,).

    CA-MKD (Zhang, Chen & Wang 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation",
    arXiv:2201.00007): w_k = (1 - softmax_k(CE_k)) / (K - 1), where CE_k is teacher k's
    cross-entropy on the sample's label. A teacher that fits the sample well weighs more, one that
    is wrong on it less; the weights of a sample sum to 1 and equal 1/K when all teachers fit alike.
    """
    n, k, c = logits.shape
    if k < 2:
        raise ValueError(f"confidence weights compare teachers; got {k}")
    ce = F.cross_entropy(logits.reshape(n * k, c), labels.repeat_interleave(k), reduction="none").view(n, k)
    return (1 - ce.softmax(dim=1)) / (k - 1)


def confidence_ensemble(logits: Tensor, labels: Tensor) -> Tensor:
    """Teacher logits (N, K, C) combined with their confidence weights: (N, C)."""
    return (confidence_weights(logits, labels).unsqueeze(-1) * logits).sum(dim=1)


def ce_loss_fn(label_smoothing: float) -> LossFn:
    """Training closure for `engine.fit`: plain (label-smoothed) cross-entropy."""

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch.x).float()  # (B, C); float32 under bfloat16 autocast too
        return {"loss": F.cross_entropy(logits, batch.y, label_smoothing=label_smoothing), "logits": logits}

    return loss_fn


def kd_loss_fn(temperature: float, alpha: float, label_smoothing: float) -> LossFn:
    """Training closure for `engine.fit`: KD against the batch's stored teacher logits (soft_targets)."""

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        if batch.teacher_logits is None:
            raise ValueError("kd_loss_fn needs batches with teacher_logits (soft_targets.view_batches)")
        logits = model(batch.x).float()
        return {**kd_loss(logits, batch.teacher_logits, batch.y, temperature, alpha, label_smoothing), "logits": logits}

    return loss_fn
