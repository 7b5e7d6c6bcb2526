"""unseg.models.resnet: dilation for every depth and checkpoint loading (files written by the tests)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from unseg.errors import UserError
from unseg.models.resnet import create_resnet, load_resnet_weights


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def seeded(name: str, seed: int, dilation=(False, False, False)) -> nn.Module:
    torch.manual_seed(seed)
    return create_resnet(name, dilation).eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize(("dilation", "stride"), [((False, True, True), 8), ((False, False, True), 16)])
def test_basicblock_dilation_gives_output_stride(name, dilation, stride):
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = features(seeded(name, 0, dilation), x)
        plain = features(seeded(name, 0), x)
    assert out.shape[-2:] == (64 // stride, 96 // stride)
    assert plain.shape[-2:] == (2, 3)


def test_dilation_keeps_the_weights():
    a, b = seeded("resnet18", 0), seeded("resnet18", 0, (False, True, True))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_basicblock_dilation_rule():
    m = create_resnet("resnet18", (False, True, True))
    # first block of a dilated stage: its strided 3x3 keeps the previous stage's dilation
    assert m.layer3[0].conv1.stride == (1, 1) and m.layer3[0].conv1.dilation == (1, 1)
    assert m.layer3[0].conv2.dilation == (2, 2) and m.layer3[0].conv2.padding == (2, 2)
    assert m.layer3[1].conv1.dilation == (2, 2)
    assert m.layer4[0].conv1.dilation == (2, 2) and m.layer4[0].conv1.padding == (2, 2)
    assert m.layer4[1].conv2.dilation == (4, 4) and m.layer4[1].conv2.padding == (4, 4)
    assert m.layer3[0].downsample[0].stride == (1, 1) and m.layer4[0].downsample[0].stride == (1, 1)
    assert m.layer2[0].conv1.stride == (2, 2)


def test_bottleneck_dilation_equals_torchvision():
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    ours = create_resnet("resnet50", (False, True, True)).eval()
    ours.load_state_dict(ref.state_dict())
    ref_convs = dict(ref.named_modules())
    for name, conv in ours.named_modules():
        if isinstance(conv, nn.Conv2d):
            other = ref_convs[name]
            assert (conv.stride, conv.dilation, conv.padding) == (other.stride, other.dilation, other.padding), name
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_unknown_name_is_user_error():
    with pytest.raises(UserError, match="resnet9"):
        create_resnet("resnet9")


# ---------------------------------------------------------------- loading


def assert_same_backbone(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not k.startswith("fc."):
            assert torch.equal(sa[k], sb[k]), k


def test_load_torchvision_state_dict(tmp_path):
    src, dst = seeded("resnet18", 1), seeded("resnet18", 2)
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    report = load_resnet_weights(dst, tmp_path / "tv.pth")
    assert_same_backbone(src, dst)
    assert report.prefix == "" and report.missing == []
    assert "fc.weight" in report.dropped and "conv1.weight" in report.loaded


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("module.encoder_q.", "module.encoder_k."),
        ("module.base_encoder.", "module.momentum_encoder."),
        ("encoder_q.", "encoder_k."),
    ],
)
def test_load_moco_checkpoint_takes_the_query_encoder(tmp_path, query, key):
    q, k, dst = seeded("resnet18", 1), seeded("resnet18", 3), seeded("resnet18", 2)
    fc_before = dst.fc.weight.clone()
    state = {key + n: v for n, v in k.state_dict().items()}  # key encoder listed first on purpose
    state.update({query + n: v for n, v in q.state_dict().items() if not n.startswith("fc.")})
    state[query + "fc.0.weight"] = torch.rand(2048, 512)  # MoCo v2 MLP head: other shape, must be dropped
    state["module.queue"] = torch.rand(128, 65536)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    report = load_resnet_weights(dst, tmp_path / "moco.pth.tar")
    assert report.prefix == query
    assert_same_backbone(q, dst)
    assert torch.equal(dst.fc.weight, fc_before)
    assert query + "fc.0.weight" in report.dropped and "module.queue" in report.dropped


@pytest.mark.parametrize("container", ["model", "embedding_model"])
def test_load_hsg_style_checkpoint(tmp_path, container):
    src, dst = seeded("resnet34", 1), seeded("resnet34", 2)
    nested = {"module.backbone." + n: v for n, v in src.state_dict().items()}
    nested["module.head.proj.weight"] = torch.rand(3, 3)
    torch.save({container: nested, "step": 5}, tmp_path / "hsg.pth")
    report = load_resnet_weights(dst, tmp_path / "hsg.pth")
    assert report.prefix == "module.backbone."
    assert_same_backbone(src, dst)


def test_shape_mismatch_is_user_error(tmp_path):
    torch.save(seeded("resnet50", 1).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="shape"):
        load_resnet_weights(seeded("resnet18", 2), tmp_path / "r50.pth")


def test_extra_blocks_are_user_error(tmp_path):
    torch.save(seeded("resnet34", 1).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match="do not exist"):
        load_resnet_weights(seeded("resnet18", 2), tmp_path / "r34.pth")


def test_missing_tensors_strict_and_lenient(tmp_path):
    src = seeded("resnet18", 1)
    partial = {n: v for n, v in src.state_dict().items() if not n.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="lacks"):
        load_resnet_weights(seeded("resnet18", 2), tmp_path / "partial.pth")
    dst = seeded("resnet18", 2)
    report = load_resnet_weights(dst, tmp_path / "partial.pth", strict=False)
    assert report.missing and all(n.startswith("layer4.") for n in report.missing)
    assert torch.equal(dst.layer3[1].conv2.weight, src.layer3[1].conv2.weight)


def test_missing_or_unreadable_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_resnet_weights(seeded("resnet18", 0), tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_resnet_weights(seeded("resnet18", 0), tmp_path / "junk.pth")
    torch.save({"weights": {"a.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="no ResNet weights"):
        load_resnet_weights(seeded("resnet18", 0), tmp_path / "other.pth")
