"""ViT q/k access by hook and the checkpoint loader (checkpoints made by the tests)."""

import pytest
import torch

from unseg.errors import UserError
from unseg.models.vit import create_vit, forward_with_qk, load_vit_weights, save_dino_checkpoint


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", patch_size=8, depth=2, img_size=32).eval()


def test_hooked_q_k_equal_a_manual_last_block(vit):
    x = torch.randn(2, 3, 24, 40)
    out = forward_with_qk(vit, x)
    # recompute the last block's q, k from its input by hand
    captured = {}
    h = vit.blocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    vit.forward_features(x)
    h.remove()
    blk = vit.blocks[-1]
    qkv = blk.attn.qkv(blk.norm1(captured["x"]))
    b, n, _ = qkv.shape
    q, k, _ = qkv.view(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    assert torch.allclose(out.q, q, atol=1e-6) and torch.allclose(out.k, k, atol=1e-6)
    assert out.grid == (3, 5) and out.patch_keys.shape == (2, 15, vit.embed_dim)
    # raw CLS logits: no 1/sqrt(d), no softmax
    want = torch.einsum("bhd,bhnd->bnh", q[:, :, 0], k[:, :, 1:])
    assert torch.allclose(out.cls_logits, want, atol=1e-5)


def test_official_dino_layouts_load(vit, tmp_path):
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    plain = tmp_path / "dino_plain.pth"
    torch.save(state, plain)  # official backbone release: a plain state dict
    training = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "teacher": {f"module.backbone.{k}": v for k, v in state.items()} | {"module.head.w": torch.ones(1)},
            "student": {},
        },
        training,
    )
    for path in (plain, training):
        other = create_vit("vit_tiny_patch16_224", patch_size=8, depth=2, img_size=32)
        load_vit_weights(other, path)
        for k, v in other.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_our_checkpoint_round_trips_and_pos_embed_is_interpolated(vit, tmp_path):
    path = tmp_path / "vit.pth"
    save_dino_checkpoint(vit, path, meta={"source": "test"})
    bigger = create_vit("vit_tiny_patch16_224", patch_size=8, depth=2, img_size=64)
    load_vit_weights(bigger, path)
    assert torch.equal(bigger.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert bigger.pos_embed.shape[1] == 1 + 64


def test_mismatches_are_clear_user_errors(vit, tmp_path):
    path = tmp_path / "vit.pth"
    save_dino_checkpoint(vit, path, meta={})
    with pytest.raises(UserError, match="patch size 8, backbone.patch_size is 16"):
        load_vit_weights(create_vit("vit_tiny_patch16_224", depth=2), path)
    with pytest.raises(UserError, match="2 blocks"):
        load_vit_weights(create_vit("vit_tiny_patch16_224", patch_size=8, depth=3), path)
    with pytest.raises(UserError, match="no such file"):
        load_vit_weights(vit, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_vit_weights(vit, tmp_path / "junk.pth")


def test_conv_stem_keeps_the_token_grid_and_round_trips(tmp_path):
    conv = create_vit("vit_tiny_patch16_224", patch_size=8, depth=2, stem="conv")
    out = forward_with_qk(conv.eval(), torch.randn(2, 3, 48, 64))
    assert out.grid == (6, 8) and out.patch_keys.shape[:2] == (2, 48)
    strided = [m for m in conv.patch_embed.proj if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3  # 8 = 2^3
    path = tmp_path / "conv.pth"
    save_dino_checkpoint(conv, path, meta={})
    again = create_vit("vit_tiny_patch16_224", patch_size=8, depth=2, stem="conv")
    load_vit_weights(again, path)
    assert all(torch.equal(a, b) for a, b in zip(conv.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(UserError, match="conv stem, backbone.stem is patch"):
        load_vit_weights(create_vit("vit_tiny_patch16_224", patch_size=8, depth=2), path)
    with pytest.raises(UserError, match="patch stem, backbone.stem is conv"):
        patch_path = tmp_path / "patch.pth"
        save_dino_checkpoint(create_vit("vit_tiny_patch16_224", patch_size=8, depth=2), patch_path, meta={})
        load_vit_weights(again, patch_path)
    with pytest.raises(UserError, match="power-of-two"):
        create_vit("vit_tiny_patch16_224", patch_size=6, depth=2, stem="conv")
