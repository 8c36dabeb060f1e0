"""Every architecture name builds, runs forward at small inputs and matches config's lists."""

import pytest
import torch
from torch import nn

from edgekd.config import STUDENT_ARCHS, TEACHER_ARCHS
from edgekd.errors import UserError
from edgekd.train.models import build_model, count_params, fit_whitening, local_weights


@pytest.mark.parametrize("arch", TEACHER_ARCHS)
def test_teacher_forward(arch):
    model = build_model(arch, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("arch", STUDENT_ARCHS)
def test_student_forward_and_width(arch, width):
    model = build_model(arch, num_classes=5, width=width).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    base = 32 if arch == "mobilenet_v2" else 16  # first conv's channels at width 1
    assert model.features[0][0].out_channels == max(8, round(base * width / 8) * 8)


def test_width_scales_parameters():
    assert (
        count_params(build_model("mobilenet_v3_small", 5, 0.25))
        < count_params(build_model("mobilenet_v3_small", 5, 0.5))
        < count_params(build_model("mobilenet_v3_small", 5, 1.0))
    )


def _types(model):
    return {type(m) for m in model.modules()}


def test_relu_variant_keeps_squeeze_excite_but_has_no_hardswish():
    types = _types(build_model("mobilenet_v3_small_relu", 5, 0.25))
    assert nn.Hardswish not in types and nn.ReLU in types
    assert nn.Hardsigmoid in types  # the SE gate
    assert nn.Hardswish in _types(build_model("mobilenet_v3_small", 5, 0.25))


def test_minimal_variant_has_no_squeeze_excite_and_only_relu():
    model = build_model("mobilenet_v3_small_minimal", 5, 0.25)
    types = _types(model)
    assert nn.Hardswish not in types and nn.Hardsigmoid not in types
    assert not any("SqueezeExcitation" in t.__name__ for t in types)
    assert count_params(model) < count_params(build_model("mobilenet_v3_small_relu", 5, 0.25))


def test_fused_variant_has_no_depthwise_conv_no_residual_add_and_a_patchify_stem():
    model = build_model("mobilenet_v3_small_fused", 5, 0.25).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert min(c.in_channels // c.groups for c in convs[1:]) >= 8  # no depthwise (1 channel per group)
    assert convs[0].kernel_size == convs[0].stride == (4, 4) and convs[0].in_channels == 3
    ops = {n.target for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_function"}
    assert not any("add" in getattr(op, "__name__", str(op)) for op in ops), ops
    # same downsampling as MobileNetV3-Small: 64 px in, 2x2 before the pooling
    assert model.features(torch.zeros(1, 3, 64, 64)).shape[-2:] == (2, 2)


@pytest.mark.parametrize("arch", STUDENT_ARCHS)
def test_students_trace_with_fx(arch):
    # FX quantization (QAT) needs a symbolically traceable module.
    model = build_model(arch, 5, 0.25).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))


def _final_map(model: nn.Module, side: int) -> tuple[int, int]:
    """Spatial size of the feature map the classifier pools, for a `side` x `side` input."""
    body = model.features if hasattr(model, "features") else nn.Sequential(*list(model.children())[:-2])
    with torch.no_grad():
        return tuple(body(torch.zeros(1, 3, side, side)).shape[-2:])


# At 32 px (CIFAR): the ImageNet stems leave 1x1 maps; the small stems 4x4 (resnet18, densenet121:
# stride-1 3x3 conv, no max-pool) or 2x2 (the MobileNets: stride-1 first conv; fused: 2x2 patchify).
SMALL_STEM_MAPS = {
    "resnet18": (4, 4),
    "densenet121": (4, 4),
    "mobilenet_v2": (2, 2),
    "mobilenet_v3_small": (2, 2),
    "mobilenet_v3_small_relu": (2, 2),
    "mobilenet_v3_small_minimal": (2, 2),
    "mobilenet_v3_small_fused": (2, 2),
}


@pytest.mark.parametrize("arch", sorted(SMALL_STEM_MAPS))
def test_small_input_stem_keeps_maps_at_32px_and_the_parameters_but_the_stem(arch):
    width = 1.0 if arch in TEACHER_ARCHS else 0.5
    imagenet, small = (build_model(arch, 10, width, stem=stem).eval() for stem in ("imagenet", "small"))
    assert _final_map(imagenet, 32) == (1, 1) and _final_map(small, 32) == SMALL_STEM_MAPS[arch]
    first = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3 and first.stride == ((2, 2) if arch.endswith("fused") else (1, 1))
    # Only a 7x7 stem conv that became 3x3 (or the fused 4x4 patchify become 2x2) changes the count.
    removed = {
        "resnet18": (49 - 9) * 3 * 64,
        "densenet121": (49 - 9) * 3 * 64,
        "mobilenet_v3_small_fused": (16 - 4) * 3 * first.out_channels,
    }.get(arch, 0)
    assert count_params(imagenet) - count_params(small) == removed
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UserError, match="mobilenet_v3_small_minimal") as err:
        build_model("resnet50", 5)
    assert "densenet121" in str(err.value)


def test_only_the_mobilenets_have_a_width():
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", 5, width=0.5)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", 5, stem="tiny")
    # mobilenet_v2 is a teacher at width 1 and the seed's CIFAR-10 student at any width
    assert count_params(build_model("mobilenet_v2", 5, 0.5)) < count_params(build_model("mobilenet_v2", 5))


def test_local_teacher_weights_load_backbone_but_not_head(tmp_path):
    donor = build_model("resnet18", num_classes=10)  # e.g. other data set: different head
    path = tmp_path / "r18.pth"
    torch.save(donor.state_dict(), path)
    model = build_model("resnet18", 5, weights=path)
    torch.testing.assert_close(model.conv1.weight, donor.conv1.weight)
    assert model.fc.out_features == 5


def test_local_teacher_weights_missing_or_mismatched(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("resnet18", 5, weights=tmp_path / "nope.pth")
    path = tmp_path / "mnv2.pth"
    torch.save(build_model("mobilenet_v2", 5).state_dict(), path)
    with pytest.raises(UserError, match="does not match resnet18"):
        build_model("resnet18", 5, weights=path)


def test_a_teachers_init_folder_holds_at_most_one_weights_file(tmp_path):
    folder = tmp_path / "resnet18"
    assert local_weights(folder) is None  # no folder: from scratch
    folder.mkdir()
    (folder / ".gitkeep").touch()
    (folder / "notes.txt").write_text("not weights")
    assert local_weights(folder) is None
    (folder / "imagenet.pth").write_bytes(b"")
    assert local_weights(folder) == folder / "imagenet.pth"
    (folder / "other.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"resnet18: holds 2 weights files \['imagenet.pth', 'other.pt'\]; keep one"):
        local_weights(folder)


def test_a_convnet_name_is_its_shape():
    """convnet_d<convs per stage>_<widths>: stages of conv-BN-ReLU, each first conv followed by a
    max-pool, a 2x2 whitening conv (12 directions and their negations) in front, a bias-free head."""
    model = build_model("convnet_d3_16_32_48", 7, stem="small")
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16] * 3 + [32] * 3 + [48] * 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert not any(isinstance(m, (nn.Hardswish, nn.GELU, nn.SiLU)) for m in model.modules())
    assert model.whiten[0].out_channels == 24 and model.whiten[0].kernel_size == (2, 2)
    assert model.classifier.bias is None and model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert [
        c.out_channels
        for c in build_model("convnet_d1_32_64", 7, width=0.5, stem="small").modules()
        if isinstance(c, nn.Conv2d)
    ][1:] == [16, 32]  # the width multiplier scales every stage


def test_a_convnet_starts_as_identities_with_frozen_whitening_and_bn_scales():
    model = build_model("convnet_d2_8_8", 3, stem="small")
    second = model.features[2][0].weight  # the first stage's second conv: 8 -> 8 channels
    assert torch.equal(second, torch.nn.init.dirac_(torch.empty_like(second)))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "whiten.0.weight" in frozen and all(f"features.{i}.1.weight" in frozen for i in (0, 2, 3, 5))
    with pytest.raises(ValueError, match="stem must be 'small'"):
        build_model("convnet_d2_8_8", 3, stem="imagenet")


def test_norm_after_pool_trains_on_pooled_statistics_and_infers_the_fused_order():
    """train.norm_after_pool: in training mode BN normalises the max-pooled maps of each stage's
    first conv (its batch statistics are those of the pooled pixels); in eval mode the pool-first
    order and conv-BN-ReLU -> max-pool compute the same function, which is what lets QAT and export
    fold BN into the conv."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    pooled, fused = (build_model("convnet_d2_8_16", 3, stem="small", norm_after_pool=flag) for flag in (True, False))
    fused.load_state_dict(pooled.state_dict())
    for model in (pooled, fused):
        model.train()(x)
    first_bn = ("features.0.1.running_mean", "features.0.1.running_var")
    assert not any(torch.allclose(pooled.state_dict()[k], fused.state_dict()[k]) for k in first_bn)
    with torch.no_grad():  # trained-looking BN: biases of both signs, spread running statistics
        for bn in (m for m in pooled.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.1, 3.0)
    pooled.eval()
    features = pooled.features(pooled.whiten(x))
    assert torch.allclose(pooled._pool_then_norm(pooled.whiten(x)), features, atol=1e-5)
    assert torch.equal(pooled(x), pooled.classifier(torch.flatten(pooled.pool(features), 1)))
    with pytest.raises(UserError, match="train.norm_after_pool"):
        build_model("resnet18", 3, norm_after_pool=True)


def test_whitening_decorrelates_the_training_patches(prepared_small):
    """After fit_whitening the first conv's 12 directions see the normalised train split's 2x2 patches
    with unit variance and no correlation (to the eps that keeps flat directions finite)."""
    from edgekd.data.batches import load_split, normalize
    from edgekd.data.prepared import load_info

    info, (images, _) = load_info(prepared_small), load_split(prepared_small, "train")
    model = build_model("convnet_d1_8", 5, stem="small")
    fit_whitening(model, images, info.mean, info.std)
    with torch.no_grad():
        conv = model.whiten[0]
        out = torch.nn.functional.conv2d(normalize(images, info.mean, info.std), conv.weight[:12])
    flat = out.permute(1, 0, 2, 3).reshape(12, -1).double()
    covariance = flat @ flat.T / flat.shape[1]
    variance = covariance.diagonal()  # lambda / (lambda + eps) per direction: at most 1
    assert variance.max() <= 1.0 + 1e-6 and (variance > 0.9).sum() >= 3
    off = covariance - torch.diag(covariance.diagonal())
    assert off.abs().max() < 0.05
    torch.testing.assert_close(model.whiten[0].weight[12:], -model.whiten[0].weight[:12])


def test_whitening_is_fitted_on_every_class_of_a_class_sorted_split():
    """Prepared splits are sorted by class: a split larger than the whitening's sample whose first
    images are all dim (one class) and the rest full-range must still be whitened as a whole."""
    from edgekd.data.batches import normalize
    from edgekd.train.models import WHITEN_IMAGES

    g = torch.Generator().manual_seed(0)
    dim = torch.randint(0, 16, (WHITEN_IMAGES, 3, 6, 6), generator=g, dtype=torch.uint8)
    bright = torch.randint(0, 256, (WHITEN_IMAGES, 3, 6, 6), generator=g, dtype=torch.uint8)
    images, mean, std = torch.cat([dim, bright]), [0.5] * 3, [0.25] * 3
    model = build_model("convnet_d1_8", 2, stem="small")
    fit_whitening(model, images, mean, std)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(normalize(images, mean, std), model.whiten[0].weight[:12])
    variance = out.permute(1, 0, 2, 3).reshape(12, -1).double().var(dim=1)
    assert variance.max() < 1.2  # fitted on the dim class alone: ~100 (the bright images' variance is ~100x)
