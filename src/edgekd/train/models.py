"""Teacher and student architectures: stock torchvision modules, and a compact conv-BN-ReLU family.

Keeping torchvision's own classes (not hand-written copies) means FX quantization can trace the
students and a checkpoint rebuilds itself from `{"arch", "num_classes", "width", "stem"}`. torchvision
has no network shaped for a CPU-minute budget at CIFAR's 32 px, so `ConvNet` (the shape of the fastest
CIFAR-10 recipes, docs/recipe.md) is written here; its arch name carries its depth and widths.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3, _mobilenet_v3_conf
from torchvision.ops.misc import Conv2dNormActivation

from edgekd.config import STEMS, STUDENT_ARCHS, TEACHER_ARCHS, WHITEN_KERNEL, convnet_shape
from edgekd.data.batches import normalize, resize_batch
from edgekd.errors import UserError

# Parameter-name prefix of each teacher's classifier head: never taken from a local weights file,
# because its shape depends on the number of classes.
_TEACHER_HEADS = {"resnet18": "fc.", "mobilenet_v2": "classifier.", "densenet121": "classifier."}


def build_model(
    arch: str,
    num_classes: int,
    width: float = 1.0,
    weights: str | Path | None = None,
    stem: str = "imagenet",
    norm_after_pool: bool = False,
) -> nn.Module:
    """A freshly initialised network with a `num_classes` head.

    `width` scales the MobileNets' channels (their width multiplier); resnet18 and densenet121 have
    no such knob and require 1.0. `weights` optionally loads a local teacher backbone (head
    excluded), for users who have ImageNet weights on disk; nothing is ever downloaded. `stem`
    "small" replaces the ImageNet stem for small inputs (`small_input_stem`). `norm_after_pool`
    (train.norm_after_pool) is `ConvNet`'s training-time block order; other networks have none.
    """
    if (shape := convnet_shape(arch)) is not None:
        if stem != "small":
            raise ValueError(f"{arch} has one stem, a 2x2 whitening conv for small inputs: stem must be 'small'")
        if weights is not None:
            raise UserError(f"{weights}: a {arch} teacher trains from scratch (its first conv is fitted to the data)")
        depth, widths = shape
        return ConvNet(num_classes, scaled_widths(widths, width), depth, norm_after_pool)
    if norm_after_pool:
        raise UserError(f"params: train.norm_after_pool=true applies to convnet architectures only; got {arch!r}")
    if arch in ("resnet18", "densenet121") and width != 1.0:
        raise ValueError(f"{arch} has no width multiplier; got width={width}")
    if weights is not None and arch not in TEACHER_ARCHS:
        raise ValueError("local weights are supported for teachers only")
    if arch in ("resnet18", "densenet121"):
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    elif arch == "mobilenet_v2":
        model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width)
    elif arch == "mobilenet_v3_small":
        model = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, width_mult=width)
    elif arch == "mobilenet_v3_small_relu":
        # Hardswish -> ReLU only; squeeze-excite (with its Hardsigmoid gate) stays.
        model = _hardswish_to_relu(tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, width_mult=width))
    elif arch == "mobilenet_v3_small_minimal":
        model = _minimal_mobilenet_v3_small(num_classes, width)
    elif arch == "mobilenet_v3_small_fused":
        model = _fused_mobilenet_v3_small(num_classes, width)
    else:
        raise UserError(f"unknown architecture {arch!r}; valid: {sorted(set(TEACHER_ARCHS + STUDENT_ARCHS))}")
    if stem == "small":
        small_input_stem(model, arch)
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}; valid: {list(STEMS)}")
    if weights is not None:
        _load_backbone(model, arch, Path(weights))
    return model


def model_from_spec(spec: dict) -> nn.Module:
    """The untrained network a checkpoint's `model` entry describes (`checkpoints.model_payload`)."""
    return build_model(spec["arch"], int(spec["num_classes"]), float(spec["width"]), stem=spec["stem"])


def small_input_stem(model: nn.Module, arch: str) -> None:
    """Drop the ImageNet stem's early downsampling, in place, for inputs such as CIFAR's 32 px.

    torchvision's stems shrink the input 4x (resnet18, densenet121: stride-2 7x7 conv + max-pool) or
    2x (the MobileNets' stride-2 3x3 conv) before the first block, so a 32 px image reaches the last
    stage at 1x1. As in the CIFAR versions of these networks: resnet18 and densenet121 get a 3x3
    stride-1 conv and no max-pool (32 px -> 4x4 at the end), the MobileNets a stride-1 first conv
    (2x2 at the end), the fused student a 2x2 stride-2 patchify in place of its 4x4 stride-4 one
    (2x2 at the end, as MobileNetV3-Small).
    """
    if arch == "resnet18":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        model.maxpool = nn.Identity()
    elif arch == "densenet121":
        conv0 = nn.Conv2d(3, model.features.conv0.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv0.weight)  # as torchvision's
        model.features.conv0, model.features.pool0 = conv0, nn.Identity()
    elif arch == "mobilenet_v3_small_fused":
        model.features[0] = Conv2dNormActivation(
            3, model.features[0][0].out_channels, 2, stride=2, padding=0, activation_layer=nn.ReLU
        )
    else:  # the MobileNets: the first conv keeps its 3x3 kernel and weights, loses its stride
        model.features[0][0].stride = (1, 1)


WHITEN_IMAGES = 5000  # train images whose patches estimate the covariance: an evenly strided sample


def scaled_widths(widths: tuple[int, ...], width: float) -> tuple[int, ...]:
    """A convnet's stage widths times the width multiplier, to a multiple of 8 (at least 8)."""
    return tuple(max(8, int(round(w * width / 8)) * 8) for w in widths)


# airbench multiplies the logits by 1/9: large max-pooled features times a head at the high lr of the
# recipe would swamp the softmax. A multiply after the head would be a float op in the INT8 file, so
# the head is reparametrised instead: its initial weights times HEAD_SCALE (`logit_scale`), and
# engine.make_optimizer gives it the lr and weight decay under which it takes the same steps as the
# scaled logits of an unscaled head (lr x HEAD_SCALE^2 for SGD, x HEAD_SCALE for AdamW).
HEAD_SCALE = 1 / 9


class ConvNet(nn.Module):
    """Stages of `depth` 3x3 conv-BN-ReLU layers, a 2x2 max-pool after each stage's first conv (as
    airbench), after a frozen 2x2 conv that whitens the input patches; global max-pool and a linear
    head.

    The shape of airbench (Jordan 2024, arXiv:2404.00498) and Page's ResNet-9 without the residual
    adds: conv-BN-ReLU folds into one integer kernel and max-pool runs on integers, so nothing in the
    INT8 file is computed in float. Its first conv holds the whitening of the training split's 2x2
    patches (`fit_whitening`, computed by the stage that trains and stored with the weights), each
    direction and its negation so the ReLU keeps both signs; every other conv starts as an identity
    on its first channels (dirac init), and BN learns its biases only (airbench's choice: with BN after
    every conv a scale is redundant with the conv's weights), which is what lets the recipe's high
    learning rates work.

    `norm_after_pool` (train.norm_after_pool) trains each stage's first block as conv -> max-pool ->
    BN -> ReLU, airbench's order: BN and ReLU run on a quarter of the pixels, and BN's batch
    statistics are those of the pooled maps. In eval mode the order is always conv-BN-ReLU ->
    max-pool, the same function (BN with running statistics and its scale frozen at 1 is an
    increasing map per channel, as ReLU is, and both commute with max-pool), so QAT (which folds BN
    into the conv, its statistics frozen: `qat.freeze_bn_epoch` 0), export and the INT8 file see the
    order that fuses into one integer kernel.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...], depth: int, norm_after_pool: bool = False) -> None:
        super().__init__()
        self.norm_after_pool = norm_after_pool
        whiten_width = 2 * 3 * WHITEN_KERNEL**2
        self.whiten = nn.Sequential(nn.Conv2d(3, whiten_width, WHITEN_KERNEL, bias=True), nn.ReLU(inplace=True))
        self.whiten[0].weight.requires_grad_(False)
        layers, channels = [], whiten_width
        for stage_width in widths:
            for i in range(depth):
                layers.append(Conv2dNormActivation(channels, stage_width, 3, activation_layer=nn.ReLU))
                nn.init.dirac_(layers[-1][0].weight[: min(channels, stage_width)])
                layers[-1][1].weight.requires_grad_(False)  # BN scales stay 1: biases alone set each ReLU's threshold
                channels = stage_width
                if i == 0:
                    layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(channels, num_classes, bias=False)
        with torch.no_grad():
            self.classifier.weight.mul_(HEAD_SCALE)

    logit_scale = HEAD_SCALE  # the head's reparametrised logit scale (engine.make_optimizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.whiten(x)
        if self.training and self.norm_after_pool:
            x = self._pool_then_norm(x)
        else:
            x = self.features(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def _pool_then_norm(self, x: torch.Tensor) -> torch.Tensor:
        """`features` with each max-pool moved between the conv before it and that conv's BN."""
        layers = list(self.features)
        for layer, after in zip(layers, layers[1:] + [None]):
            if isinstance(layer, nn.MaxPool2d):
                continue  # applied inside the block before it
            if isinstance(after, nn.MaxPool2d):
                conv, norm, relu = layer
                x = relu(norm(after(conv(x))))
            else:
                x = layer(x)
        return x


def fit_whitening(model: nn.Module, images: torch.Tensor, mean, std, size: int | None = None) -> None:
    """Set a ConvNet's first conv to whiten the 2x2 patches of normalised training images, in place
    (no-op for other models): the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue),
    and their negations. Uses WHITEN_IMAGES of `images` (uint8 (N, 3, H, W)) evenly strided over the
    split, at the model's input side `size`: the prepared splits are sorted by class, so a prefix
    would whiten one or two classes' patches. The result is part of the weights, so every later stage
    reads it from the checkpoint."""
    if not isinstance(model, ConvNet):
        return
    sample = images[:: max(1, len(images) // WHITEN_IMAGES)][:WHITEN_IMAGES]
    x = normalize(resize_batch(sample, size), mean, std).double()
    patches = x.unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1)  # (N, 3, H', W', k, k)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * WHITEN_KERNEL**2)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat))
    kernels = (eigenvectors.T / torch.sqrt(eigenvalues + 5e-4)[:, None]).reshape(-1, 3, WHITEN_KERNEL, WHITEN_KERNEL)
    weight = model.whiten[0].weight
    with torch.no_grad():
        weight.copy_(torch.cat([kernels, -kernels]).to(weight.dtype))
        model.whiten[0].bias.zero_()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _minimal_mobilenet_v3_small(num_classes: int, width: float) -> nn.Module:
    """MobileNetV3-Small without squeeze-excite and with ReLU everywhere.

    INT8 runtimes execute conv+ReLU as one integer kernel, while SE (pool, mul, Hardsigmoid) and
    Hardswish stay float between quantize/dequantize pairs (see notes/quantization.md): this variant
    is about as fast in INT8 as in FP32. Built from torchvision's own block table.
    """
    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width)
    for block in setting:
        block.use_se = False
        block.use_hs = False  # "RE"
    model = MobileNetV3(setting, last_channel, num_classes=num_classes)
    return _hardswish_to_relu(model)  # the last conv and the classifier hard-code Hardswish


# Input channels per group of the fused blocks' 3x3 convs (see _FusedBlock).
FUSED_GROUP_CHANNELS = 8


class _FusedBlock(nn.Module):
    """An inverted-residual block whose 1x1 expand + depthwise pair is one grouped 3x3 conv.

    onnxruntime's integer depthwise kernels are 1.6-2.9x slower than its FP32 ones at these sizes,
    while its integer dense 3x3 and 1x1 convs are faster (reports/int8_layers.md); groups of 8
    channels and 3x3 in place of 5x5 kernels keep the INT8 file under 0.2 MB. No residual add: in
    FP32 onnxruntime fuses it into the conv, in INT8 it is a separate QLinearAdd (~3.5 us at 64 px).
    """

    def __init__(self, cnf: InvertedResidualConfig, norm_layer) -> None:
        super().__init__()
        groups = math.gcd(cnf.input_channels, cnf.expanded_channels) // FUSED_GROUP_CHANNELS or 1
        self.block = nn.Sequential(
            Conv2dNormActivation(
                cnf.input_channels,
                cnf.expanded_channels,
                3,
                stride=cnf.stride,
                groups=groups,
                norm_layer=norm_layer,
                activation_layer=nn.ReLU,
            ),
            Conv2dNormActivation(
                cnf.expanded_channels, cnf.out_channels, 1, norm_layer=norm_layer, activation_layer=None
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _fused_mobilenet_v3_small(num_classes: int, width: float) -> nn.Module:
    """MobileNetV3-Small's block table (channels, expansions, strides) built from integer-fast ops.

    Fused blocks (as MobileNetV4's FusedIB / EfficientNet-EdgeTPU), ReLU, no squeeze-excite, and a
    4x4 stride-4 patchify stem in place of the 3x3 stride-2 stem plus the first block's stride:
    a 3-channel 3x3 conv over the full-resolution image is the slowest integer kernel of the network.
    """
    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width)
    setting[0].stride = 1  # the patchify stem downsamples 4x at once
    model = MobileNetV3(setting, last_channel, num_classes=num_classes, block=_FusedBlock)
    model.features[0] = Conv2dNormActivation(
        3, setting[0].input_channels, 4, stride=4, padding=0, activation_layer=nn.ReLU
    )
    return _hardswish_to_relu(model)


def _hardswish_to_relu(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.Hardswish):
            setattr(model, name, nn.ReLU(inplace=True))
        elif isinstance(child, nn.Dropout):
            # ReLU's backward reads its output, which an in-place dropout right after it would
            # overwrite (harmless after Hardswish, whose backward reads its input).
            child.inplace = False
        else:
            _hardswish_to_relu(child)
    return model


WEIGHT_SUFFIXES = (".pt", ".pth")


def local_weights(folder: str | Path | None) -> Path | None:
    """The one weights file (`*.pt`/`*.pth`) in a teacher's init folder, or None to train from scratch.

    A folder rather than a path in params: `dvc.yaml` declares each teacher's folder as a dependency,
    so dropping a file in (or replacing it) reruns exactly that teacher.
    """
    if folder is None or not Path(folder).is_dir():
        return None
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(files) > 1:
        raise UserError(f"{folder}: holds {len(files)} weights files {[p.name for p in files]}; keep one")
    return files[0] if files else None


def _load_backbone(model: nn.Module, arch: str, path: Path) -> None:
    """Load a local state dict into everything but the head; refuse anything else that mismatches."""
    if not path.is_file():
        raise UserError(f"{path}: teacher weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable/unsafe file is the user's to fix
        raise UserError(f"{path}: not a loadable state dict with weights_only=True ({err})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors")
    head = _TEACHER_HEADS[arch]
    backbone = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as err:  # same names, other shapes
        raise UserError(f"{path}: does not match {arch}: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise UserError(f"{path}: does not match {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
