"""Mask features for K-means (unseg.clustering): each input mode against its rule on a hand-made mask."""

import numpy as np
import pytest
import torch

from unseg.clustering import mask_features, whiten_l2
from unseg.data.transforms import geometry, vit_input
from unseg.models.vit import create_vit


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", patch_size=8, depth=2).eval()


def _items():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    geom = geometry(32, 48, 32, 8)  # a 4 x 6 token grid
    left = np.zeros((4, 6), bool)
    left[1:3, 0:2] = True
    right = np.zeros((4, 6), bool)
    right[0, 5] = True
    return image, geom, [(7, image, left, geom), (7, image, right, geom)]


@torch.no_grad()
def test_patch_mean_is_the_mean_of_the_patch_tokens_inside_the_mask(vit):
    image, geom, items = _items()
    feats, anns = mask_features(vit, items, "patch_mean", torch.device("cpu"))
    tokens = vit.forward_features(vit_input(image, geom)[None])[0, 1:].reshape(4, 6, -1)
    assert torch.allclose(torch.from_numpy(feats[0]), tokens[1:3, 0:2].reshape(-1, tokens.shape[-1]).mean(0), atol=1e-5)
    assert torch.allclose(torch.from_numpy(feats[1]), tokens[0, 5], atol=1e-5)
    assert [a["image_id"] for a in anns] == [7, 7] and feats.shape == (2, vit.embed_dim)


@torch.no_grad()
def test_masked_is_the_cls_token_of_the_image_zeroed_outside_the_mask(vit):
    image, geom, items = _items()
    feats, _ = mask_features(vit, items[:1], "masked", torch.device("cpu"))
    x = vit_input(image, geom)
    x[:, ~np.kron(items[0][2], np.ones((8, 8), bool))] = 0
    assert torch.allclose(torch.from_numpy(feats[0]), vit.forward_features(x[None])[0, 0], atol=1e-5)


def test_whiten_l2_divides_by_the_std_then_normalises():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])  # column stds 1 and 2
    out, std = whiten_l2(x)
    assert np.allclose(std, [1.0, 2.0])
    assert np.allclose(out, np.array([[1, 1], [3, 3]]) / np.sqrt([[2], [18]]), atol=1e-6)
