"""Label propagation (DINO rule) on synthetic videos, the DAVIS J / F measures, and the DAVIS reader."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from unseg.errors import UserError
from unseg.evaluation.video import (
    boundary_f,
    boundary_map,
    disk,
    evaluate_sequence,
    neighbourhood_mask,
    propagate_labels,
    propagation_weights,
    read_annotation,
    read_davis_sequences,
    read_frame,
    region_j,
    summarize_davis,
)

# ---------------------------------------------------------------- J and F


def square(shape, top, left, size):
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def test_region_j_hand_cases():
    a = square((30, 30), 5, 5, 10)
    assert region_j(a, a) == 1.0
    assert region_j(a, square((30, 30), 18, 18, 10)) == 0.0
    assert region_j(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    # shifted by 2 columns: ∩ = 10·8 = 80, ∪ = 200 − 80 = 120
    assert region_j(a, square((30, 30), 5, 7, 10)) == pytest.approx(80 / 120)


def test_boundary_map_hand_case():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(boundary_map(m), expected)


def reference_boundary(m):
    """Loop version of the seg2bmap rule."""
    h, w = m.shape
    b = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            e = m[y, x + 1] if x + 1 < w else False
            s = m[y + 1, x] if y + 1 < h else False
            se = m[y + 1, x + 1] if (x + 1 < w and y + 1 < h) else False
            if y == h - 1 and x == w - 1:
                b[y, x] = False
            elif y == h - 1:
                b[y, x] = m[y, x] != e
            elif x == w - 1:
                b[y, x] = m[y, x] != s
            else:
                b[y, x] = (m[y, x] != e) or (m[y, x] != s) or (m[y, x] != se)
    return b


def reference_f(pred, gt, radius):
    """Boundary pixels matched when another boundary lies within Euclidean distance ``radius``."""
    bp, bg = np.argwhere(reference_boundary(pred)), np.argwhere(reference_boundary(gt))
    if len(bp) == 0 and len(bg) == 0:
        return 1.0
    if len(bp) == 0 or len(bg) == 0:
        return 0.0
    d2 = ((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1)
    precision = np.mean(d2.min(1) <= radius**2)
    recall = np.mean(d2.min(0) <= radius**2)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_f_hand_cases():
    # 20×20 image: tolerance ⌈0.008·√800⌉ = 1 px. Half-planes: the only boundary is one full row.
    top10 = np.repeat((np.arange(20) < 10)[:, None], 20, axis=1)
    top11 = np.repeat((np.arange(20) < 11)[:, None], 20, axis=1)
    top12 = np.repeat((np.arange(20) < 12)[:, None], 20, axis=1)
    assert boundary_f(top10, top10) == 1.0
    assert boundary_f(top10, top11) == 1.0  # rows 9 and 10: 1 px apart
    assert boundary_f(top10, top12) == 0.0  # rows 9 and 11: 2 px apart
    assert boundary_f(top10, top12, bound_th=2) == 1.0  # bound_th ≥ 1 is a radius in px
    assert boundary_f(np.zeros((20, 20)), top10) == 0.0
    assert boundary_f(np.zeros((20, 20)), np.zeros((20, 20))) == 1.0


@pytest.mark.parametrize("shift", [(0, 1), (2, 3), (4, 0), (7, 7)])
def test_boundary_f_matches_loop_reference(shift):
    rng = np.random.default_rng(sum(shift))
    shape = (37, 61)  # tolerance ⌈0.008·71.4⌉ = 1
    gt = square(shape, 8, 10, 15) | (rng.random(shape) < 0.02)
    pred = np.roll(gt, shift, axis=(0, 1))
    radius = math.ceil(0.008 * math.hypot(*shape))
    assert boundary_f(pred, gt) == pytest.approx(reference_f(pred, gt, radius))
    assert boundary_f(pred, gt, bound_th=3) == pytest.approx(reference_f(pred, gt, 3))


def test_disk_matches_skimage():
    from skimage.morphology import disk as sk_disk

    for r in range(6):
        np.testing.assert_array_equal(disk(r), sk_disk(r))


# ---------------------------------------------------------------- propagation rule


def test_neighbourhood_mask_matches_dino_loops():
    h, w, r = 4, 5, 1
    ref = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * r + 1):
                for q in range(2 * r + 1):
                    if 0 <= i - r + p < h and 0 <= j - r + q < w:
                        ref[i, j, i - r + p, j - r + q] = 1
    assert torch.equal(neighbourhood_mask(h, w, r), ref.reshape(h * w, h * w).bool())


def reference_weights(sim, valid, k, t):
    """DINO: exp(sim / t) · mask, keep values ≥ the k-th largest of the row, normalise."""
    aff = np.exp(sim / t) * valid
    out = np.zeros_like(aff)
    for i in range(len(aff)):
        kth = np.sort(aff[i])[::-1][min(k, aff.shape[1]) - 1]
        keep = aff[i] >= kth
        out[i] = np.where(keep, aff[i], 0) / np.sum(np.where(keep, aff[i], 0))
    return out


def test_propagation_weights_match_reference():
    rng = np.random.default_rng(0)
    sim = rng.uniform(-1, 1, size=(9, 14))
    valid = rng.random((9, 14)) < 0.6
    valid[:, 0] = True
    valid[0] = False
    valid[0, :3] = True  # fewer valid entries than k in row 0
    got = propagation_weights(torch.tensor(sim), torch.tensor(valid), topk=5, temperature=0.1).numpy()
    np.testing.assert_allclose(got, reference_weights(sim, valid, 5, 0.1), rtol=1e-6, atol=1e-12)
    assert np.all((got > 0).sum(1) == np.minimum(valid.sum(1), 5))


# ---------------------------------------------------------------- synthetic videos

GRID, SCALE, DIM = 12, 4, 4


def moving_objects_video(n_frames, step_1=(0, 1), step_2=(1, 0), size=3, noise=0.05, seed=0):
    """Token grid GRID×GRID; background tokens carry e0, object 1 e1, object 2 e2 (+ noise). Returns
    per-frame features (h, w, D) and GT id masks at SCALE× resolution."""
    rng = np.random.default_rng(seed)
    feats, masks = [], []
    for t in range(n_frames):
        ids = np.zeros((GRID, GRID), np.int64)
        ids[1 + step_1[0] * t : 1 + step_1[0] * t + size, 1 + step_1[1] * t : 1 + step_1[1] * t + size] = 1
        ids[6 + step_2[0] * t : 6 + step_2[0] * t + size, 7 + step_2[1] * t : 7 + step_2[1] * t + size] = 2
        f = np.eye(DIM)[ids] + noise * rng.standard_normal((GRID, GRID, DIM))
        feats.append(torch.tensor(f, dtype=torch.float32))
        masks.append(np.kron(ids, np.ones((SCALE, SCALE), np.int64)))
    return feats, masks


def test_propagation_tracks_moving_squares():
    feats, gts = moving_objects_video(6)
    preds = propagate_labels(feats, gts[0])
    assert len(preds) == 6 and np.array_equal(preds[0], gts[0])
    for t in range(1, 6):
        for obj in (1, 2):
            assert region_j(preds[t] == obj, gts[t] == obj) > 0.9
    res = evaluate_sequence(preds, gts)
    assert res["J"] > 0.9 and res["F"] > 0.9 and [o["id"] for o in res["objects"]] == [1, 2]


def test_neighbourhood_limits_how_far_labels_travel():
    # Object 1 jumps 4 tokens per frame: a radius-1 window cannot see it, a radius-12 one can.
    feats, gts = moving_objects_video(3, step_1=(0, 4), step_2=(0, 0))
    far = propagate_labels(feats, gts[0], neighborhood=12)
    near = propagate_labels(feats, gts[0], neighborhood=1)
    assert region_j(far[2] == 1, gts[2] == 1) > 0.9
    assert region_j(near[2] == 1, gts[2] == 1) < 0.1


def test_propagation_output_size_and_context_queue():
    feats, gts = moving_objects_video(4)
    preds = propagate_labels(feats, gts[0], out_size=(24, 24), n_last_frames=0)
    assert all(p.shape == (24, 24) for p in preds)
    # n_last_frames = 0 uses only frame 0 as context: still fine for small motions.
    assert region_j(preds[1] == 1, gts[1][::2, ::2] == 1) > 0.8
    # Processing target tokens in chunks changes nothing.
    whole = propagate_labels(feats, gts[0], n_last_frames=2)
    chunked = propagate_labels(feats, gts[0], n_last_frames=2, chunk=7)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))


# ---------------------------------------------------------------- sequence scores


def test_evaluate_sequence_excludes_first_and_last_frames():
    _, gts = moving_objects_video(5)
    preds = [g.copy() for g in gts]
    preds[0][:] = 0
    preds[-1][:] = 0
    assert evaluate_sequence(preds, gts)["JF"] == 1.0
    partial = evaluate_sequence(preds, gts, exclude_last=False)
    assert partial["J"] == pytest.approx(3 / 4)  # 3 perfect frames, 1 empty frame (J = 0) per object


def test_missing_object_scores_zero_and_summary_averages_objects():
    _, gts = moving_objects_video(4)
    preds = [np.where(g == 2, 0, g) for g in gts]
    res = evaluate_sequence(preds, gts)
    assert [(o["J"], o["F"]) for o in res["objects"]] == [(1.0, 1.0), (0.0, 0.0)]
    assert res["J"] == 0.5 and res["JF"] == 0.5
    one_object = {"objects": [{"id": 1, "J": 0.2, "F": 0.4}]}
    assert summarize_davis([res, one_object]) == pytest.approx({"J": 1.2 / 3, "F": 1.4 / 3, "JF": 1.3 / 3})


# ---------------------------------------------------------------- DAVIS layout


def write_davis(root, names, with_split):
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for name in names:
        (root / "JPEGImages/480p" / name).mkdir(parents=True)
        (root / "Annotations/480p" / name).mkdir(parents=True)
        for t in range(3):
            Image.fromarray(np.full((6, 8, 3), 10 * t, np.uint8)).save(root / f"JPEGImages/480p/{name}/{t:05d}.jpg")
            ann = Image.fromarray(np.array([[0, 1, 2, 0, 0, 0, 0, 0]] * 6, np.uint8), mode="P")
            ann.putpalette(palette)
            ann.save(root / f"Annotations/480p/{name}/{t:05d}.png")
    if with_split:
        (root / "ImageSets/2017").mkdir(parents=True)
        (root / "ImageSets/2017/val.txt").write_text(names[-1] + "\n")


def test_davis_reader(tmp_path):
    write_davis(tmp_path, ["bear", "car"], with_split=True)
    seqs = read_davis_sequences(tmp_path)
    assert [s.name for s in seqs] == ["car"] and len(seqs[0].frames) == 3
    assert read_frame(seqs[0].frames[1]).shape == (6, 8, 3)
    np.testing.assert_array_equal(read_annotation(seqs[0].annotations[0])[0], [0, 1, 2, 0, 0, 0, 0, 0])
    assert [s.name for s in read_davis_sequences(tmp_path, split_file=None)] == ["bear", "car"]


def test_davis_reader_errors(tmp_path):
    write_davis(tmp_path, ["bear"], with_split=False)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "Annotations/480p/bear/00001.png")
    with pytest.raises(UserError, match="RGB"):
        read_annotation(tmp_path / "Annotations/480p/bear/00001.png")
    (tmp_path / "Annotations/480p/bear/00000.png").unlink()
    with pytest.raises(UserError, match="first frame"):
        read_davis_sequences(tmp_path)
