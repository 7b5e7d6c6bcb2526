"""unseg.deeplab: OHEM against a loop reference, frozen blocks, shapes and the released augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unseg.deeplab import (
    AtrousConv2d,
    atrous_conv,
    build_deeplab,
    check_labels,
    deeplab_train_step,
    frozen_stage_names,
    ohem_cross_entropy,
    predict_semantic,
    train_augment,
)
from unseg.errors import UserError
from unseg.models.resnet import create_resnet

# ---------------------------------------------------------------- OHEM


def reference_ohem(logits: np.ndarray, target: np.ndarray, fraction: float, ignore: int, count: str) -> float:
    """Per-pixel loops: CE by log-sum-exp, the k largest valid losses averaged."""
    b, c, h, w = logits.shape
    valid = []
    for n in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[n, y, x])
                if t == ignore:
                    continue
                z = [float(logits[n, j, y, x]) for j in range(c)]
                m = max(z)
                lse = m + math.log(sum(math.exp(v - m) for v in z))
                valid.append(lse - z[t])
    base = b * h * w if count == "all" else len(valid)
    k = min(int(fraction * base), len(valid))
    return float(np.mean(sorted(valid, reverse=True)[:k]))


def make_case(seed=0, ignore_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 5, 6, generator=g) * 2
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[torch.rand(2, 5, 6, generator=g) < ignore_fraction] = 255
    return logits, target


@pytest.mark.parametrize("count", ["all", "valid"])
@pytest.mark.parametrize("fraction", [0.2, 0.37, 0.5, 0.9])
def test_ohem_matches_loop_reference(count, fraction):
    for seed in range(3):
        logits, target = make_case(seed)
        got = float(ohem_cross_entropy(logits, target, fraction, 255, count))
        want = reference_ohem(logits.numpy(), target.numpy(), fraction, 255, count)
        assert got == pytest.approx(want, rel=1e-5)


def test_ohem_count_modes_differ_with_ignored_pixels():
    logits, target = make_case(0, ignore_fraction=0.5)
    n_all, n_valid = target.numel(), int((target != 255).sum())
    k_all, k_valid = int(0.5 * n_all), int(0.5 * n_valid)
    assert k_all != k_valid
    valid_losses = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255]
    top = valid_losses.sort(descending=True).values
    assert float(ohem_cross_entropy(logits, target, 0.5, count="all")) == pytest.approx(float(top[:k_all].mean()))
    assert float(ohem_cross_entropy(logits, target, 0.5, count="valid")) == pytest.approx(float(top[:k_valid].mean()))


@pytest.mark.parametrize("count", ["all", "valid"])
def test_ohem_full_fraction_is_plain_cross_entropy(count):
    logits, target = make_case(4)
    assert float(ohem_cross_entropy(logits, target, 1.0, count=count)) == pytest.approx(
        float(F.cross_entropy(logits, target, ignore_index=255)), rel=1e-6
    )


def test_ohem_gradient_only_on_the_hard_pixels():
    logits, target = make_case(5, ignore_fraction=0.0)
    logits.requires_grad_(True)
    ohem_cross_entropy(logits, target, 0.2).backward()
    touched = logits.grad.abs().sum(1) > 0
    losses = F.cross_entropy(logits.detach(), target, reduction="none")
    k = int(0.2 * target.numel())
    assert int(touched.sum()) == k
    assert float(losses[touched].min()) >= float(losses[~touched].max())


def test_ohem_all_ignored_is_zero_with_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = ohem_cross_entropy(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None


def test_ohem_bad_arguments():
    logits, target = make_case(0)
    with pytest.raises(UserError):
        ohem_cross_entropy(logits, target, 0.0)
    with pytest.raises(UserError):
        ohem_cross_entropy(logits, target, 0.2, count="some")


# ---------------------------------------------------------------- model


@pytest.fixture(scope="module")
def small_deeplab():
    torch.manual_seed(0)
    return build_deeplab(5, backbone="resnet18", output_stride=8, freeze_blocks=2)


def test_output_has_input_shape_and_stride_8(small_deeplab):
    x = torch.rand(2, 3, 40, 56)
    small_deeplab.eval()
    with torch.no_grad():
        assert small_deeplab(x).shape == (2, 5, 40, 56)
        assert small_deeplab.backbone(x)["out"].shape[-2:] == (5, 7)


def test_frozen_blocks_get_no_gradient_and_keep_bn_stats():
    torch.manual_seed(0)
    model = build_deeplab(4, backbone="resnet18", freeze_blocks=2, dropout=0.1)
    assert model.head[0].project[3].p == 0.1
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if k.split(".")[0] in model.frozen}
    layer3_bn = model.backbone.layer3[0].bn1.running_mean.clone()
    head_w = model.head[4].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    out = deeplab_train_step(model, opt, images, labels, torch.device("cpu"), top_fraction=0.2)
    assert math.isfinite(out["loss"])
    for name, p in model.backbone.named_parameters():
        if name.split(".")[0] in model.frozen:
            assert not p.requires_grad and p.grad is None, name
    after = model.backbone.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), k  # weights and BN running stats alike
    assert not torch.equal(model.backbone.layer3[0].bn1.running_mean, layer3_bn)
    assert not torch.equal(model.head[4].weight, head_w)
    assert not model.backbone.layer2.training and model.backbone.layer3.training


def test_frozen_stage_names():
    assert frozen_stage_names(0) == ()
    assert frozen_stage_names(2) == ("conv1", "bn1", "layer1", "layer2")
    with pytest.raises(UserError):
        frozen_stage_names(5)


def test_backbone_weights_are_loaded(tmp_path):
    torch.manual_seed(3)
    src = create_resnet("resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_deeplab(3, backbone="resnet18", backbone_weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_predict_semantic_is_argmax_at_input_resolution(small_deeplab):
    image = (torch.rand(3, 37, 45) * 255).to(torch.uint8)
    pred, logits = predict_semantic(small_deeplab, image, torch.device("cpu"), return_logits=True)
    assert pred.shape == (37, 45) and pred.dtype == torch.int64 and logits.shape == (5, 37, 45)
    with torch.no_grad():
        direct = small_deeplab.eval()(image.float()[None] / 255.0)[0]
    assert torch.equal(pred, direct.argmax(0))


def test_check_labels():
    check_labels(torch.tensor([[0, 3, 255]]), 4)
    with pytest.raises(UserError, match="class id 4"):
        check_labels(torch.tensor([[0, 4]]), 4)


# ---------------------------------------------------------------- augmentation


def test_augment_is_a_function_of_the_generator():
    image = (torch.rand(3, 30, 40) * 255).to(torch.uint8)
    label = torch.randint(0, 3, (30, 40))
    a = train_augment(image, label, torch.Generator().manual_seed(7), 24)
    b = train_augment(image, label, torch.Generator().manual_seed(7), 24)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 24, 24) and a[0].dtype == torch.float32 and a[1].shape == (24, 24)
    assert 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    assert set(a[1].unique().tolist()) <= {0, 1, 2, 255}


def test_augment_identity_warp_with_flip():
    image = (torch.rand(3, 20, 28) * 255).to(torch.uint8)
    label = torch.randint(0, 5, (20, 28))
    img, lab = train_augment(image, label, torch.Generator().manual_seed(0), (20, 28), (1.0, 1.0), 0.0, 1.0)
    assert torch.equal(lab, label.flip(-1))
    assert torch.allclose(img, image.flip(-1).float() / 255.0, atol=1e-6)


def test_augment_zoom_out_fills_label_border():
    label = torch.full((40, 40), 3)
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    _, lab = train_augment(image, label, torch.Generator().manual_seed(0), 40, (0.5, 0.5), 0.0, 0.0)
    assert lab[0, 0] == 255 and lab[20, 20] == 3 and lab[39, 39] == 255
    assert int((lab == 3).sum()) == 20 * 20
    _, lab0 = train_augment(image, label, torch.Generator().manual_seed(0), 40, (0.5, 0.5), 0.0, 0.0, label_fill=0)
    assert lab0[0, 0] == 0


def test_decoder_is_stride_4_and_absent_by_default():
    torch.manual_seed(0)
    plain = build_deeplab(3, backbone="resnet18", output_stride=16, freeze_blocks=0)
    assert plain.decoder is None and not any(k.startswith("decoder") for k in plain.state_dict())
    model = build_deeplab(3, backbone="resnet18", output_stride=16, freeze_blocks=0, decoder_channels=16).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert model.classifier_input(x).shape == (2, 16, 16, 24)  # stride 4, decoder width
        assert plain.eval().classifier_input(x).shape == (2, 256, 4, 6)  # stride 16, ASPP head width
        assert model(x).shape == (2, 3, 64, 96)
    assert model.head[4].in_channels == 16


def _fit_stripes(decoder_channels):
    """Pixel accuracy after fitting one image whose labels are 4-px vertical stripes (finer than stride 16)."""
    torch.manual_seed(0)
    model = build_deeplab(2, backbone="resnet18", output_stride=16, freeze_blocks=0, decoder_channels=decoder_channels)
    image = torch.rand(2, 3, 64, 64)  # two images: ASPP's image pooling needs a batch for BatchNorm
    labels = ((torch.arange(64) // 4) % 2).expand(2, 64, 64).clone()
    image[:, 0] += 0.5 * labels  # the stripes are visible in the red channel
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(25):
        deeplab_train_step(model, opt, image, labels, torch.device("cpu"), top_fraction=1.0)
    with torch.no_grad():
        return float((model.eval()(image).argmax(1) == labels).float().mean())


def test_decoder_resolves_what_stride_16_cannot():
    assert _fit_stripes(16) > 0.95
    assert _fit_stripes(None) < 0.8  # bilinear logits from a 4 x 4 grid cannot draw 16 stripes


def test_linear_protocol_features_batched_equal_one_image_at_a_time():
    from unseg.deeplab import deeplab_features

    torch.manual_seed(0)
    model = build_deeplab(3, backbone="resnet18", output_stride=16, freeze_blocks=0, decoder_channels=16).eval()
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 56), (64, 48), (48, 48))]
    batched = deeplab_features(model, images, torch.device("cpu"), input_size=64)  # one batch of three
    for i, image in enumerate(images):
        x = torch.nn.functional.interpolate(
            image.float()[None] / 255, size=(64, 64), mode="bilinear", align_corners=False, antialias=True
        )
        with torch.no_grad():
            backbone = model.backbone((x - model.mean) / model.std)["out"][0]
            head = model.classifier_input(x)[0]
        assert batched["backbone"][i].shape == (512, 4, 4) and batched["head"][i].shape == (16, 16, 16)
        torch.testing.assert_close(batched["backbone"][i], backbone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched["head"][i], head, rtol=1e-4, atol=1e-5)
    sizes = deeplab_features(model, images, torch.device("cpu"), kinds=("backbone",))  # own sizes: one at a time
    assert set(sizes) == {"backbone"} and [f.shape[-2:] for f in sizes["backbone"]] == [(3, 4), (4, 3), (3, 3)]


@pytest.mark.parametrize("size", [(8, 8), (8, 40), (40, 8), (40, 40), (12, 12)])
def test_atrous_conv_equals_the_full_kernel_and_its_gradient(size):
    torch.manual_seed(0)
    full = torch.nn.Conv2d(6, 4, 3, padding=12, dilation=12, bias=False)
    skip = atrous_conv(full)
    assert isinstance(skip, AtrousConv2d)
    x = torch.randn(2, 6, *size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, out2 = full(x), skip(x2)
    assert out.shape == out2.shape
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    out2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skip.weight.grad, full.weight.grad, rtol=1e-5, atol=1e-5)
    if size[0] <= 12:  # the taps of rows i +- 12 read padding only: their weights get exactly no gradient
        assert skip.weight.grad[:, :, [0, 2]].abs().max() == 0


def test_atrous_conv_rejects_a_strided_or_unpadded_conv():
    with pytest.raises(ValueError, match="stride-1"):
        atrous_conv(torch.nn.Conv2d(3, 3, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="stride-1"):
        atrous_conv(torch.nn.Conv2d(3, 3, 3, padding=0, dilation=2))


def test_aspp_branches_are_atrous_convs_and_load_a_plain_state_dict():
    model = build_deeplab(3, backbone="resnet18", output_stride=16, freeze_blocks=0)
    convs = [branch[0] for branch in model.head[0].convs[1:4]]
    assert all(isinstance(c, AtrousConv2d) for c in convs)
    assert [c.dilation for c in convs] == [(12, 12), (24, 24), (36, 36)]
    state = model.state_dict()  # torchvision's parameter names and shapes: older checkpoints load
    assert state["head.0.convs.1.0.weight"].shape == (256, 512, 3, 3)
    assert "head.0.convs.3.0.bias" not in state
