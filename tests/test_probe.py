"""Linear probe: learns a linearly separable dense toy problem, fails on shuffled labels, is deterministic."""

import numpy as np
import pytest
import torch

from unseg.errors import UserError
from unseg.evaluation.probe import predict_probe, train_linear_probe

N_CLASSES, DIM, GRID, SCALE = 3, 8, 8, 4


def toy_problem(n_images: int = 12, seed: int = 0):
    """Token class maps made of 2×2-token blocks; a token's feature is 2·e_class + noise; labels are the
    class maps upsampled ×SCALE (nearest), so every pixel's class is the class of the token it lies in."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for _ in range(n_images):
        blocks = rng.integers(0, N_CLASSES, size=(GRID // 2, GRID // 2))
        classes = np.kron(blocks, np.ones((2, 2), dtype=np.int64))
        f = 0.3 * rng.standard_normal((GRID, GRID, DIM))
        f[..., :N_CLASSES] += 2.0 * np.eye(N_CLASSES)[classes]
        feats.append(torch.tensor(f.transpose(2, 0, 1), dtype=torch.float32))
        labels.append(np.kron(classes, np.ones((SCALE, SCALE), dtype=np.int64)))
    return feats, labels


def pixel_accuracy(conv, feats, labels) -> float:
    hits = [np.mean(predict_probe(conv, f, y.shape) == y) for f, y in zip(feats, labels, strict=True)]
    return float(np.mean(hits))


KW = dict(epochs=12, batch_size=4, milestones=(8,), seed=0)


def token_accuracy(conv, feats, labels) -> float:
    """Accuracy at feature resolution (no upsampling): the token class is the label at the token's cell."""
    hits = [
        np.mean(predict_probe(conv, f, (GRID, GRID)) == y[::SCALE, ::SCALE]) for f, y in zip(feats, labels, strict=True)
    ]
    return float(np.mean(hits))


def test_probe_learns_separable_problem():
    feats, labels = toy_problem()
    conv = train_linear_probe(feats, labels, N_CLASSES, **KW)
    test_feats, test_labels = toy_problem(seed=1)
    assert token_accuracy(conv, feats, labels) == 1.0
    assert token_accuracy(conv, test_feats, test_labels) == 1.0
    # At pixel level only pixels near block corners, where bilinear weights mix classes, can be missed.
    assert pixel_accuracy(conv, feats, labels) >= 0.98
    assert pixel_accuracy(conv, test_feats, test_labels) >= 0.98


def test_probe_fails_on_shuffled_labels():
    feats, labels = toy_problem()
    rng = np.random.default_rng(5)
    shuffled = [rng.permutation(y.ravel()).reshape(y.shape) for y in labels]
    conv = train_linear_probe(feats, shuffled, N_CLASSES, **KW)
    assert pixel_accuracy(conv, feats, shuffled) < 0.45  # chance is ~1/3


def test_ignored_pixels_do_not_train():
    feats, labels = toy_problem()
    # Every pixel of class 2 is set to ignore: the probe never sees class 2 and never predicts it.
    masked = [np.where(y == 2, 255, y) for y in labels]
    conv = train_linear_probe(feats, masked, N_CLASSES, **dict(KW, epochs=4))
    preds = np.concatenate([predict_probe(conv, f, y.shape).ravel() for f, y in zip(feats, labels, strict=True)])
    assert not np.any(preds == 2)


def test_probe_is_deterministic_given_seed():
    feats, labels = toy_problem(n_images=6)
    kw = dict(KW, epochs=2)
    a = train_linear_probe(feats, labels, N_CLASSES, **kw)
    b = train_linear_probe(feats, labels, N_CLASSES, **kw)
    c = train_linear_probe(feats, labels, N_CLASSES, **dict(kw, seed=1))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_label_size_and_mixed_grids():
    feats, labels = toy_problem(n_images=8)
    # Half the images get a different grid and label size: the batch is processed in shape groups.
    for i in range(0, 8, 2):
        feats[i] = torch.nn.functional.interpolate(feats[i][None], size=(4, 4), mode="nearest")[0]
        labels[i] = labels[i][::2, ::2]
    conv = train_linear_probe(feats, labels, N_CLASSES, label_size=(16, 16), **KW)
    assert pixel_accuracy(conv, feats[1::2], labels[1::2]) >= 0.97
    assert predict_probe(conv, feats[0], (21, 13)).shape == (21, 13)


def test_probe_user_errors():
    feats, labels = toy_problem(n_images=2)
    with pytest.raises(UserError, match="2 feature maps but 1 label"):
        train_linear_probe(feats, labels[:1], N_CLASSES)
    with pytest.raises(UserError, match="class 3"):
        train_linear_probe(feats, [np.full((32, 32), 3), labels[1]], N_CLASSES)
    with pytest.raises(UserError, match="same D"):
        train_linear_probe([feats[0], feats[1][:4]], labels, N_CLASSES)


def test_images_within_budget_keeps_all_or_a_seeded_subset_in_order():
    from unseg.evaluation.probe import images_within_budget

    pixels = [100, 200, 100, 400, 100]
    assert images_within_budget(pixels, 2.0, 1800, seed=0) == [0, 1, 2, 3, 4]  # 1800 bytes: all fit
    kept = images_within_budget(pixels, 2.0, 700, seed=0)
    assert kept == sorted(kept) and sum(2 * pixels[i] for i in kept) <= 700 and len(kept) < 5
    assert kept == images_within_budget(pixels, 2.0, 700, seed=0)
