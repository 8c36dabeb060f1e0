"""Quantization-aware training that simulates exactly what onnxruntime executes.

Scheme (the one onnxruntime runs fastest on x86, see ../shared/notes/quantization.md):
- activations: uint8, per-tensor affine, full range 0..255 (no reduce_range);
- weights: int8 storage with 7-bit values -64..63, per-channel symmetric (zero point 0), which
  depthwise convs need. x86 CPUs without VNNI (AVX2 only) multiply uint8 by int8 in pairs summed
  into int16 with saturation (vpmaddubsw): 255 * 127 * 2 overflows, 255 * 64 * 2 does not. On such a
  CPU (AMD EPYC Zen 3), a rice student after QAT with 8-bit weights scored 97.08 % on val in
  onnxruntime against 99.20 % for its fake-quant model (top-1 agreement 0.976); with 7-bit weights
  99.07 % for both (agreement 1.000), so the file gives the same answers with and without VNNI;
- BatchNorm folded into the conv weights *before* weight fake-quant (FX ConvBn QAT modules,
  Krishnamoorthi 2018, arXiv:1806.08342), so the quantized weights are the ones exported.
FX graph mode (`prepare_qat_fx` -> `convert_fx`) is used because its converted model exports with
`torch.onnx.export(dynamo=False)` to a QDQ graph in which onnxruntime runs every Conv as QLinearConv,
and the converted torch model and the ONNX file produce identical logits.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from edgekd.errors import UserError
from edgekd.train.checkpoints import load_checkpoint
from edgekd.train.models import model_from_spec

# The converted torch model's kernels. Not "x86": on CPUs with VNNI or AMX it hands some convs to
# oneDNN, whose integers differed from the fake-quant model by up to 169 output steps on an Intel
# Xeon (AMX) where fbgemm's differ by 1 and onnxruntime's by 6: fbgemm is the same engine on every
# x86 CPU, so the integer reference of the export gates does not depend on the machine.
BACKEND = "fbgemm"

ACTIVATION_FQ = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver,
    quant_min=0,
    quant_max=255,
    dtype=torch.quint8,
    qscheme=torch.per_tensor_affine,
    reduce_range=False,
)
# Weight values a uint8 x int8 pair product sum can take without saturating int16 on AVX2 (see above).
INT8_WEIGHT_RANGE = (-64, 63)
WEIGHT_FQ = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver,
    quant_min=INT8_WEIGHT_RANGE[0],
    quant_max=INT8_WEIGHT_RANGE[1],
    dtype=torch.qint8,
    qscheme=torch.per_channel_symmetric,
    reduce_range=False,
    ch_axis=0,
)


# Per-layer bit widths of mixed precision (edgekd.train.mixed_precision chooses them): 4-bit weights
# per-channel symmetric -7..7 (the max maps to 7 exactly, so torch's integer weights and the ONNX
# INT4 initializers hold the same values), 16-bit activations unsigned.
WEIGHT_RANGES = {8: INT8_WEIGHT_RANGE, 4: (-7, 7)}  # weight bits -> stored integer range (symmetric)
ACTIVATION_RANGES = {8: (0, 255), 16: (0, 65535)}  # activation bits -> unsigned range


def quantized_layers(model: torch.fx.GraphModule) -> list[str]:
    """Names of the layers with quantized weights (convs, linear), in graph order."""
    return [
        n.target
        for n in model.graph.nodes
        if n.op == "call_module" and hasattr(model.get_submodule(n.target), "weight_fake_quant")
    ]


def layer_weights(model: torch.fx.GraphModule) -> dict[str, int]:
    return {name: model.get_submodule(name).weight.numel() for name in quantized_layers(model)}


def output_fake_quant(model: torch.fx.GraphModule, layer: str) -> FakeQuantizeBase:
    """The fake-quant module that quantizes `layer`'s output (the next node in the FX graph)."""
    node = next(n for n in model.graph.nodes if n.op == "call_module" and n.target == layer)
    users = [
        u for u in node.users if u.op == "call_module" and isinstance(model.get_submodule(u.target), FakeQuantizeBase)
    ]
    if len(users) != 1:
        raise ValueError(f"{layer}: expected one output fake-quant, found {len(users)}")
    return model.get_submodule(users[0].target)


def set_range(fake_quant: FakeQuantizeBase, quant_min: int, quant_max: int) -> None:
    """Give a fake-quant module another integer range; its scale and zero point are re-derived from
    the ranges its observer has seen (or at its first observation)."""
    observer = fake_quant.activation_post_process
    fake_quant.quant_min, fake_quant.quant_max = quant_min, quant_max
    observer.quant_min, observer.quant_max = quant_min, quant_max
    if not (observer.min_val.numel() and torch.isfinite(observer.min_val).all()):
        return  # nothing observed yet: the next observation derives the grid in the new range
    scale, zero_point = observer.calculate_qparams()
    fake_quant.scale.resize_(scale.shape).copy_(scale)
    fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point)


def set_layer_bits(
    model: torch.fx.GraphModule, layer: str, weight_bits: int | None = None, activation_bits: int | None = None
) -> None:
    """Requantize one layer of a calibrated fake-quant model with other bit widths."""
    if weight_bits is not None:
        set_range(model.get_submodule(layer).weight_fake_quant, *WEIGHT_RANGES[weight_bits])
    if activation_bits is not None:
        set_range(output_fake_quant(model, layer), *ACTIVATION_RANGES[activation_bits])


def apply_bits(
    model: torch.fx.GraphModule, weight_bits: dict[str, int], activation_bits: dict[str, int] | None = None
) -> torch.fx.GraphModule:
    """Every layer's weights and outputs at their assigned bits (layers not named keep theirs)."""
    for layer, bits in weight_bits.items():
        set_layer_bits(model, layer, weight_bits=bits)
    for layer, bits in (activation_bits or {}).items():
        set_layer_bits(model, layer, activation_bits=bits)
    return model


def wide_outputs(model: torch.fx.GraphModule) -> list[str]:
    """The layers whose outputs are quantized with more than 8 bits (16-bit activations)."""
    return [layer for layer in quantized_layers(model) if output_fake_quant(model, layer).quant_max > 255]


def qconfig_mapping() -> QConfigMapping:
    """U8 per-tensor activations, 7-bit S8 per-channel symmetric weights, everywhere."""
    return QConfigMapping().set_global(QConfig(activation=ACTIVATION_FQ, weight=WEIGHT_FQ))


def prepare_qat(model: nn.Module, image_size: int) -> torch.fx.GraphModule:
    """Trace an FP32 model and insert fake-quant modules; BN is fused into ConvBn QAT modules."""
    torch.backends.quantized.engine = BACKEND
    model = copy.deepcopy(model).cpu().train()
    example = torch.zeros(2, 3, image_size, image_size)  # (B, 3, H, W)
    # torch.ao.quantization warns that it is deprecated in favour of torchao's pt2e; pt2e's ONNX
    # graphs leave convs in float here (quantization notes), so FX stays the path for now.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model, qconfig_mapping(), (example,))
    if hasattr(model, "logit_scale"):  # a reparametrised head (models.ConvNet) keeps its lr scaling
        prepared.logit_scale = model.logit_scale
    return prepared


def set_qat_phase(model: nn.Module, epoch: int, freeze_bn_epoch: int, freeze_observer_epoch: int) -> None:
    """From `freeze_bn_epoch` on BN running stats stay fixed, from `freeze_observer_epoch` the ranges.

    Freezing both late in QAT lets the weights adapt to fixed quantization grids (torchvision's
    MobileNetV3 QAT recipe); calling this for every epoch makes the phase a pure function of epoch,
    so a resumed run behaves like an uninterrupted one.
    """
    model.apply(enable_observer if epoch < freeze_observer_epoch else disable_observer)
    model.apply(nniqat.update_bn_stats if epoch < freeze_bn_epoch else nniqat.freeze_bn_stats)


def freeze_qat(model: nn.Module) -> nn.Module:
    """Observers off and BN statistics fixed for good: the state that is saved, converted, exported.

    A model in this state gives the same logits on every call, whatever it has seen before.
    """
    model.apply(disable_observer)
    model.apply(nniqat.freeze_bn_stats)
    return model


@torch.no_grad()
def calibrate(model: torch.fx.GraphModule, batches: Iterable[torch.Tensor]) -> torch.fx.GraphModule:
    """Post-training static quantization of a `prepare_qat` model: the PTQ control for QAT.

    The observers record the ranges of the float model's activations and its BN-folded weights
    (fake-quant off while they look, BN on its running statistics, no gradient step), then the model
    is frozen: same scheme, same frozen state as a model after QAT, so the two compare what QAT buys.
    Each activation range is the min/max over every calibration image (onnxruntime's default
    calibration): the training observers are moving averages (constant 0.01) whose first batch sets
    the range, which would calibrate on whatever classes the first batch holds. Weight observers
    see the same constant weights on every batch, so theirs are exact. `batches`: normalised float
    (B, 3, H, W).
    """
    model.eval()
    model.apply(disable_fake_quant)
    model.apply(enable_observer)
    weights = {id(m.weight_fake_quant) for m in model.modules() if hasattr(m, "weight_fake_quant")}
    activations = [m for m in model.modules() if isinstance(m, FakeQuantize) and id(m) not in weights]
    training_observers = [fq.activation_post_process for fq in activations]
    for fq in activations:
        fq.activation_post_process = _min_max_like(fq.activation_post_process)
    for x in batches:
        model(x)
    for fq, observer in zip(activations, training_observers):
        # The training observer keeps the whole-set range: the checkpoint's state dict is the same as
        # after QAT, and a later re-grid (mixed precision's set_range) starts from these ranges.
        observer.min_val.resize_(()).copy_(fq.activation_post_process.min_val)
        observer.max_val.resize_(()).copy_(fq.activation_post_process.max_val)
        fq.activation_post_process = observer
    model.apply(enable_fake_quant)
    return freeze_qat(model)


def _min_max_like(observer: MinMaxObserver) -> MinMaxObserver:
    """A plain min/max observer with `observer`'s integer grid (16-bit ranges included)."""
    plain = MinMaxObserver(dtype=observer.dtype, qscheme=observer.qscheme)
    plain.quant_min, plain.quant_max = observer.quant_min, observer.quant_max
    return plain


def convert(qat_model: nn.Module) -> torch.fx.GraphModule:
    """Integer torch model (quantized kernels) from a fake-quant model; the input is left untouched.
    PyTorch's quantized kernels are 8-bit: a model with 16-bit activations converts with
    `convert_for_export` instead."""
    wide = wide_outputs(qat_model)
    if wide:
        raise ValueError(f"16-bit activations ({', '.join(wide)}) have no integer torch kernels")
    return _convert(copy.deepcopy(qat_model).cpu().eval())


def convert_for_export(qat_model: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, tuple]]:
    """The integer model to export, and for each layer with 16-bit outputs its (placeholder scale,
    scale, zero point). Those layers convert on an 8-bit grid whose output scale is then set to a
    placeholder that no other tensor of the graph has, so that the export's QuantizeLinear of that
    layer can be found and given the 16-bit grid (deploy.onnx_rewrite.store_int16_activations). The
    returned torch model computes those layers on the 8-bit placeholder grid: it is a vehicle for the
    export, not a reference for its answers (the fake-quant model is)."""
    model = copy.deepcopy(qat_model).cpu().eval()
    wide = {}
    for layer in wide_outputs(model):
        fake_quant = output_fake_quant(model, layer)
        wide[layer] = (float(fake_quant.scale), int(fake_quant.zero_point))
        set_range(fake_quant, *ACTIVATION_RANGES[8])
    integer = _convert(model)
    taken = {float(m.scale) for m in integer.modules() if hasattr(m, "scale") and isinstance(m.scale, float)}
    grids = {}
    for i, (layer, (scale, zero_point)) in enumerate(wide.items()):
        module = integer.get_submodule(layer)
        placeholder = float(np.float32(module.scale * (1 + (i + 1) * 2.0**-10)))
        if placeholder in taken:
            raise ValueError(f"{layer}: placeholder scale {placeholder} is taken; cannot mark its output")
        taken.add(placeholder)
        module.scale = placeholder
        grids[layer] = (placeholder, scale, zero_point)
    return integer, grids


def _convert(model: nn.Module) -> torch.fx.GraphModule:
    """convert_fx of a fake-quant model the caller owns (a CPU copy in eval mode), weights clamped."""
    torch.backends.quantized.engine = BACKEND
    ranges = {
        name: (m.weight_fake_quant.quant_min, m.weight_fake_quant.quant_max)
        for name, m in model.named_modules()
        if hasattr(m, "weight_fake_quant")
    }
    with warnings.catch_warnings():  # "quantized tensor creation is deprecated" per layer
        warnings.simplefilter("ignore")
        integer = convert_fx(model)
        for name, (low, high) in ranges.items():
            _clamp_weights(integer.get_submodule(name), low, high)
    integer.register_forward_pre_hook(_determinism_alerts_off)
    integer.register_forward_hook(_determinism_alerts_back, always_call=True)
    return integer


def _clamp_weights(module: nn.Module, low: int, high: int) -> None:
    """Integer weights clamped to the layer's fake-quant range, as the fake-quant model clamps them.

    convert_fx rounds weight / scale and clamps to the storage type (-128..127) only. A symmetric
    grid maps the largest weight to 63.5 (7 bits) or 7.5 (4 bits) steps, which rounds to 64 or 8,
    and weights that grew after the ranges froze land further out: without this clamp an exported
    "7-bit" layer held values up to +-70 (saturating AVX2's int16 pair sums), a 4-bit one left -8..7.
    """
    weight = module.weight()
    ints = weight.int_repr()
    if int(ints.min()) >= low and int(ints.max()) <= high:
        return
    clamped = torch._make_per_channel_quantized_tensor(
        ints.clamp(low, high),
        weight.q_per_channel_scales(),
        weight.q_per_channel_zero_points(),
        weight.q_per_channel_axis(),
    )
    module.set_weight_bias(clamped, module.bias())


def _determinism_alerts_off(module: nn.Module, args: tuple) -> None:
    """The quantized kernels allocate their outputs with `quantized_resize_cpu_`, which PyTorch flags
    under `use_deterministic_algorithms` for want of a deterministic variant although it computes
    nothing. The alert comes from intra-op worker threads, where no Python warning filter reaches
    it: hundreds of stderr lines per stage. Alerts are off while the integer model runs, only."""
    module._determinism = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(False)


def _determinism_alerts_back(module: nn.Module, args: tuple, output: object) -> None:
    enabled, warn_only = module._determinism
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def rebuild_qat(
    fp32_model: nn.Module,
    image_size: int,
    state_dict: dict,
    weight_bits: dict[str, int] | None = None,
    activation_bits: dict[str, int] | None = None,
) -> torch.fx.GraphModule:
    """Frozen fake-quant model from an architecture and a saved QAT state dict (ranges included);
    `weight_bits`, `activation_bits`: the layers a mixed-precision model quantizes with other than 8 bits."""
    model = apply_bits(prepare_qat(fp32_model, image_size), weight_bits or {}, activation_bits)
    model.load_state_dict(state_dict)
    return freeze_qat(model).eval()


def load_qat_model(path: str | Path) -> tuple[torch.fx.GraphModule, dict]:
    """Fake-quant model from a `qat` checkpoint (weights_only load; the arch kwargs rebuild it)."""
    payload = load_checkpoint(path)
    try:
        model = rebuild_qat(
            model_from_spec(payload["model"]),
            int(payload["image_size"]),
            payload["state_dict"],
            payload.get("weight_bits"),
            payload.get("activation_bits"),
        )
    except (KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{path}: not a QAT checkpoint of this project ({type(err).__name__}: {err})") from None
    return model, payload
