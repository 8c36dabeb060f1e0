"""Models on held-out images: logits and accuracy without augmentation, with fake-quant observers
frozen for the duration, and batch-norm statistics re-estimated before validation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantizeBase

from edgekd.data.batches import ModelInputs, normalize, resize_batch
from edgekd.train.batching import steps_per_epoch
from edgekd.train.fit_setup import FitSetup


@contextlib.contextmanager
def evaluation_mode(model: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """eval() with every fake-quant observer off for the duration; both restored afterwards.

    PyTorch's FakeQuantize updates its ranges on every forward pass while its observer is enabled,
    in eval mode too: evaluating a QAT model on val images would move its INT8 grid towards them
    (val leaking into the model) and make it a moving reference for export checks.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    flags = [m.observer_enabled.clone() for m in quantizers]
    model.eval()
    for m in quantizers:
        m.disable_observer()
    try:
        yield
    finally:
        for m, flag in zip(quantizers, flags):
            m.observer_enabled.copy_(flag)
        model.train(was_training)


def predict_logits(
    fn: Callable[[Tensor], Tensor],
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: torch.device,
    size: int | None = None,
) -> Tensor:
    """Logits (N, C) for uint8 images (N, 3, H, W), without augmentation, on CPU; each batch resized
    to the model's input side `size` on the device (None: as cached), so no resized split is held."""
    with evaluation_mode(fn), torch.inference_mode():
        return torch.cat([fn(x).float().cpu() for x in ModelInputs(images, size, mean, std, batch_size, device)])


def evaluate(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device = torch.device("cpu"),
    size: int | None = None,
) -> dict[str, float]:
    """Accuracy and plain (unsmoothed) cross-entropy of a model or any logits callable, on
    `images` resized to its input side `size` (None: as cached)."""
    logits = predict_logits(model, images, mean, std, batch_size, device, size)
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
    }


def recalibrate_bn(model: nn.Module, images: Tensor, setup: FitSetup, max_images: int = 512) -> None:
    """Recompute BN running statistics as a plain average over un-augmented training images.

    Short from-scratch runs take only tens of optimizer steps; the running averages (momentum
    0.01 in torchvision's MobileNetV3) then lag far behind the weights and an eval-mode model
    predicts one class for everything although train accuracy rises ("precise BN", Wu & Johnson
    2021, arXiv:2105.07576). Costs one forward pass over `max_images` images. Not for QAT models
    whose BN statistics are deliberately frozen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    # A seeded random subset in random order: the prepared splits are sorted by class, and
    # single-class batches would miss the between-class part of the variance.
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(setup.seed))[:max_images]
    with torch.no_grad():
        n = len(pick)
        batch = min(setup.batch_size, n)
        for step in range(steps_per_epoch(n, setup.batch_size)):  # full batches: BN needs > 1 value
            x = resize_batch(images[pick[step * batch : (step + 1) * batch]], setup.input_size)  # (B, 3, H, W) uint8
            model(normalize(x.to(setup.device), setup.mean, setup.std))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
