"""HSG's math on hand-made tensors: the transition chain, SegSort+, DMoN modularity and collapse, the
centroid contrast, the kNN graph, level-0 segments and NFCovering, against values computed by hand."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unseg.hsg import grouping as G
from unseg.hsg import losses as L
from unseg.hsg.metrics import nf_covering


def test_coarser_levels_are_column_stochastic_and_equal_the_product_chain():
    torch.manual_seed(0)
    fine = torch.randn(8, 30).softmax(0)  # 30 segments over 8 fine groups
    c1, c2 = torch.randn(4, 8).softmax(0), torch.randn(2, 4).softmax(0)
    p1, p2, p3 = G.coarser_levels(fine, [c1, c2])
    for p in (p1, p2, p3):
        torch.testing.assert_close(p.sum(0), torch.ones(30))
    torch.testing.assert_close(p3, c2 @ c1 @ fine)
    # hard transitions: a coarse group is exactly the union of its fine groups
    hard = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4).T.float()
    onehot_fine = F.one_hot(torch.arange(30) % 8, 8).T.float()
    coarse = G.hard_groups(G.coarser_levels(onehot_fine, [hard])[1])
    assert torch.equal(coarse, (torch.arange(30) % 8) // 2)
    with pytest.raises(ValueError):
        G.coarser_levels(fine, [torch.ones(4, 5)])


def test_segsort_loss_equals_the_hand_computed_likelihood():
    kappa = 2.0
    pixels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    protos = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    pixel_segment = torch.tensor([0, 2])
    group = torch.tensor([7, 7, 9])  # segments 0 and 1: one region seen in two views; 2 alone
    # pixel 0 (segment 0): positives {1}, negatives {2}; pixel 1 (segment 2): no other positive -> {2}
    e = math.exp
    p0 = -math.log(e(kappa * 0.6) / (e(kappa * 0.6) + e(kappa * 0.0)))
    p1 = -math.log(e(kappa * 1.0) / (e(kappa * 1.0) + e(kappa * 0.0) + e(kappa * 0.8)))
    got = L.segsort_loss(pixels, pixel_segment, protos, group, kappa)
    assert got.item() == pytest.approx((p0 + p1) / 2, rel=1e-6)


def test_centroid_contrast_is_infonce_with_self_as_positive():
    c = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=1)
    sim = (c @ c.T) * 16
    expected = (torch.logsumexp(sim, 1) - sim.diag()).mean()
    assert L.centroid_contrast(c, 16).item() == pytest.approx(expected.item(), rel=1e-6)
    spread = L.centroid_contrast(F.normalize(torch.eye(3), dim=1))
    assert spread < L.centroid_contrast(F.normalize(torch.ones(3, 3) + 0.01 * torch.eye(3), dim=1))


def two_cliques(n: int = 6) -> torch.Tensor:
    a = torch.zeros(n, n)
    half = n // 2
    a[:half, :half] = 1
    a[half:, half:] = 1
    return a - torch.eye(n)


def test_modularity_and_collapse_on_two_cliques():
    adj = two_cliques(6)
    perfect = F.one_hot(torch.tensor([0, 0, 0, 1, 1, 1]), 2).float()
    collapsed = F.one_hot(torch.zeros(6, dtype=torch.long), 2).float()
    # two equal disconnected cliques: Q = sum_c (e_cc / m - (d_c / 2m)^2) = 2 (1/2 - 1/4) = 1/2
    assert L.modularity(perfect, adj).item() == pytest.approx(0.5)
    assert L.modularity(collapsed, adj).item() == pytest.approx(0.0, abs=1e-7)
    # collapse: sqrt(k)/n ||sum S|| - 1 = 0 balanced, sqrt(k) - 1 collapsed; released: no -1, padded n
    assert L.collapse(perfect).item() == pytest.approx(0.0, abs=1e-7)
    assert L.collapse(collapsed).item() == pytest.approx(math.sqrt(2) - 1)
    # released: ||(3, 3)|| sqrt(2) / 256 = 6 / 256
    assert L.collapse(perfect, n_nodes=256, minus_one=False).item() == pytest.approx(6 / 256)
    assert L.grouping_goodness(perfect, adj) < L.grouping_goodness(collapsed, adj)


def test_with_more_groups_than_clusters_dmon_prefers_the_uniform_assignment_and_the_released_term_does_not():
    """Why the tiny run's transformers sat at uniform with DMoN's term: two 6-node cliques, k = 8 groups.
    Uniform: Q = 0 and equal column sums, so 1 - Q + collapse = 1 exactly. The true two-clique partition has
    Q = 1/2 but column sums (6, 6, 0, ...): DMoN's collapse sqrt(8)/12 * 6 sqrt(2) - 1 = 1, total 1.5 > 1.
    The released term (/256, no -1) charges it sqrt(8) * 6 sqrt(2) / 256 = 24/256: total 0.59375 < uniform's
    1 + sqrt(8) * sqrt(8 * 1.5^2) / 256 = 1.046875."""
    adj = two_cliques(12)
    k = 8
    uniform = torch.full((12, k), 1 / k)
    truth = F.one_hot(torch.tensor([0] * 6 + [1] * 6), k).float()
    assert L.grouping_goodness(uniform, adj).item() == pytest.approx(1.0)
    assert L.grouping_goodness(truth, adj).item() == pytest.approx(1.5)
    assert L.grouping_goodness(uniform, adj, 256, False).item() == pytest.approx(1 + 12 / 256)
    assert L.grouping_goodness(truth, adj, 256, False).item() == pytest.approx(0.5 + 24 / 256)
    # with k = 2 groups (as many as clusters) DMoN's term prefers the truth too: 0.5 < 1
    assert L.grouping_goodness(truth[:, :2], adj).item() == pytest.approx(0.5)


def test_knn_graph_is_directed_within_views_without_self_loops():
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05], [0.1, 0.9]]), dim=1)
    views = torch.tensor([0, 0, 0, 1, 1])
    adj = L.knn_graph(protos, 1, views)
    expected = torch.zeros(5, 5)
    expected[0, 1] = expected[1, 0] = expected[2, 1] = 1  # view 0: nearest other segment
    expected[3, 4] = expected[4, 3] = 1  # view 1 has two segments
    assert torch.equal(adj, expected)
    assert not torch.equal(adj, adj.T) and torch.equal(L.knn_graph(protos, 1, views, symmetric=True),
                                                       torch.maximum(expected, expected.T))  # fmt: skip


def test_level0_segments_follow_the_embedding_and_never_cross_a_region():
    emb = torch.zeros(4, 6, 3)
    emb[:, :3, 0] = 1  # left half points one way
    emb[:, 3:, 1] = 1  # right half another
    feats = G.with_location(emb)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(24))
    labels = G.spherical_kmeans(feats, G.grid_labels(4, 6, 1, 2), 5).reshape(4, 6)
    assert len(torch.unique(labels[:, :3])) == 1 and len(torch.unique(labels[:, 3:])) == 1
    assert labels[0, 0] != labels[0, 5]
    regions = torch.zeros(4, 6, dtype=torch.long)
    regions[2:] = 1  # a horizontal border the embedding does not see
    seg = G.intersect(labels.reshape(-1), regions.reshape(-1)).reshape(4, 6)
    assert len(torch.unique(seg)) == 4 and torch.equal(torch.unique(seg), torch.arange(4))
    for s in range(4):
        assert len(torch.unique(regions[seg == s])) == 1
    protos = G.prototypes(emb.reshape(24, 3), seg.reshape(-1))
    torch.testing.assert_close(protos[seg[0, 0]], torch.tensor([1.0, 0.0, 0.0]))


def test_superpixels_cover_the_image():
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 200
    image = (image + rng.integers(0, 5, image.shape)).astype(np.uint8)
    sp = G.superpixels(image, scale=50)
    assert sp.shape == (32, 32) and len(np.unique(sp[:, :16])) >= 1
    assert not set(np.unique(sp[:, :14])) & set(np.unique(sp[:, 18:]))  # no region spans the edge


def test_tiny_superpixels_keep_generated_objects_whole_where_unsmoothed_ones_fragment_them():
    from unseg.data import generated
    from unseg.params import load_params

    h = load_params(Path(__file__).parents[1] / "params.yaml").hsg

    def covering(scale: float, sigma: float, min_size: int) -> float:
        scores = []
        for i in range(12):
            image, semantic, _ = generated.render_sample(i, 0, 4, 3, 112, 112)
            scores.append(nf_covering(semantic, G.superpixels(image, scale, sigma, min_size), 255))
        return float(np.mean([c for c in scores if c is not None]))

    assert covering(h.superpixel_scale, h.superpixel_sigma, h.superpixel_min_size) > 0.5  # measured 0.66
    assert covering(100.0, 0.8, 20) < 0.3  # scikit-image's default smoothing: textures shatter objects (0.15)


def test_hsg_learning_rate_one_schedule_or_one_per_stage():
    from unseg.hsg.trainer import HSGTraining, learning_rate

    one = HSGTraining(steps=100, stage1_steps=40, lr=0.1, warmup_steps=10, lr_milestones=(0.5,))
    assert [learning_rate(s, one) for s in (0, 5, 10, 49, 50, 99)] == pytest.approx([0.01, 0.055, 0.1, 0.1, 0.01, 0.01])
    two = HSGTraining(steps=100, stage1_steps=40, lr=0.1, stage2_lr=0.02, warmup_steps=10, lr_milestones=(0.5,))
    got = [learning_rate(s, two) for s in (0, 19, 20, 39, 40, 45, 50, 69, 70, 99)]
    assert got == pytest.approx([0.01, 0.1, 0.01, 0.01, 0.002, 0.011, 0.02, 0.02, 0.002, 0.002])


def test_head_lr_multiplier_groups_exactly_the_transformers_and_positions():
    from unseg.hsg.trainer import HSGTraining, build_models, param_groups

    models = build_models(HSGTraining(backbone="resnet18", dim=16, fine_groups=4, coarse_groups=2))
    every = [p for m in (models.net, models.fine, models.coarse) for p in m.parameters()]
    (one,) = param_groups(models, 1.0)
    assert [id(p) for p in one["params"]] == [id(p) for p in every] and one["mult"] == 1.0
    trunk, heads = param_groups(models, 10.0)
    expected = {id(p) for m in (models.fine, models.coarse, models.net.position) for p in m.parameters()}
    assert {id(p) for p in heads["params"]} == expected and heads["mult"] == 10.0
    assert {id(p) for p in trunk["params"]} == {id(p) for p in every} - expected and trunk["mult"] == 1.0
    assert len(trunk["params"]) + len(heads["params"]) == len(every)


def test_nf_covering_on_hand_made_partitions():
    gt = np.zeros((4, 4), np.int64)
    gt[:2, :2] = 1  # 4 px
    gt[2:, 2:] = 2  # 4 px
    gt[0, 3] = 255
    seg = np.zeros((4, 4), np.int64)
    seg[:2, :2] = 5  # exactly region 1
    seg[2:, 2] = 6  # half of region 2
    # region 1: IoU 1; region 2: best is segment 6 (2 px of 4, union 4) -> 0.5, or segment 0 (2 of 4 px, union 4+8-2)
    assert nf_covering(gt, seg) == pytest.approx((1.0 + 0.5) / 2)
    assert nf_covering(gt, gt) == pytest.approx(1.0)
    assert nf_covering(np.zeros((3, 3)), seg[:3, :3]) is None


def toy_batch(images: int = 2, size: int = 128):
    """Two views per image of two-coloured images, and the region ids of each view's embedding pixels."""
    torch.manual_seed(0)
    x = torch.zeros(images * 2, 3, size, size)
    regions = torch.zeros(images * 2, size // 16, size // 16, dtype=torch.long)
    for v in range(images * 2):
        x[v, :, :, : size // 2] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
        x[v, :, :, size // 2 :] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
        regions[v, :, size // 32 :] = 1
    return x + 0.05 * torch.rand_like(x), regions


def test_the_clustering_transformer_keeps_positions_out_of_the_values_and_starts_its_centroids_apart():
    """As released (DETR): positions enter the attention's queries and keys only, so a single segment's memory
    (attention over itself) does not depend on its position, while with several segments it does; BatchNorm
    over the C centroids makes each centroid feature zero-mean, unit-variance across the groups from step 0."""
    from unseg.hsg.model import ClusteringTransformer

    torch.manual_seed(0)
    t = ClusteringTransformer(4, 16, heads=2, ffn=32).eval()
    one = torch.randn(1, 16)
    first = t(one, torch.zeros(1, 16)).assign
    moved = t(one, 5 * torch.randn(1, 16)).assign
    torch.testing.assert_close(first, moved)
    many = torch.randn(6, 16)
    assert not torch.allclose(t(many, torch.zeros(6, 16)).assign, t(many, torch.randn(6, 16)).assign)
    out = t.decoder_norm(torch.randn(4, 16))
    c = t.centroid(out)
    torch.testing.assert_close(c.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)


def test_the_hsg_objective_backpropagates_to_every_part_and_decreases():
    from unseg.hsg.model import ClusteringTransformer, EmbeddingFCN
    from unseg.hsg.objective import HSGConfig, hsg_losses

    torch.manual_seed(0)
    net, fine, coarse = (
        EmbeddingFCN("resnet18", 32),
        ClusteringTransformer(4, 32, ffn=64),
        ClusteringTransformer(2, 32, ffn=64),
    )
    cfg = HSGConfig(kmeans_grid=(2, 2), kmeans_iters=3)
    x, regions = toy_batch()
    emb, pos = net(x)
    assert emb.shape == (4, 32, 8, 8) and pos.shape == (32, 8, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4, 8, 8))
    out = hsg_losses(emb, pos, regions, cfg, fine, coarse)
    assert all(torch.isfinite(v) for v in out.values()) and out["levels"] > 0 and out["centroid"] > 0
    out["loss"].backward()
    for name, module in (("resnet", net.resnet.layer1), ("head", net.conv_out), ("fine", fine), ("coarse", coarse)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    params = [*net.parameters(), *fine.parameters(), *coarse.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    # the toy's two images are the same picture, so the contrast between their centroids cannot fall: left out
    no_centroid = replace(cfg, weight_centroid=0.0)
    for _ in range(8):
        net.train(), fine.eval(), coarse.eval()  # no dropout noise in the comparison
        out = hsg_losses(*net(x), regions, no_centroid, fine, coarse)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    stage1 = hsg_losses(*net(x), regions, HSGConfig(kmeans_grid=(1, 1), kmeans_iters=1, hierarchy=False))
    assert stage1["levels"] == 0 and stage1["grouping"] == 0 and stage1["loss"] == stage1["region"]


def test_trained_at_stride_16_tested_at_8_doubles_the_grid_with_the_same_weights_and_positions():
    from unseg.hsg.trainer import HSGTraining, build_models, export_state, load_exported

    torch.manual_seed(0)
    t = HSGTraining(dim=32, fine_groups=4, coarse_groups=2)
    trained = build_models(t)
    test = load_exported(build_models(t, output_stride=8), export_state(trained, {}))
    x = torch.rand(1, 3, 64, 64)
    trained.net.eval(), test.net.eval()
    (emb16, pos16), (emb8, pos8) = trained.net(x), test.net(x)
    assert emb16.shape == (1, 32, 4, 4) and emb8.shape == (1, 32, 8, 8)
    # the released test net: same tensors, layer3 dilated instead of strided; positions read at the trained spacing
    torch.testing.assert_close(pos8, pos16.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(test.net.conv_out[0].weight, trained.net.conv_out[0].weight)
    assert not torch.allclose(emb8[..., ::2, ::2], emb16)  # a different computation (dilation), not a resize


@pytest.mark.slow
def test_pretrain_hsg_stage_trains_resumes_and_its_resnet_loads_into_deeplab(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from stages.prepare import generate
    from unseg.deeplab import build_deeplab
    from unseg.errors import UserError
    from unseg.models.resnet import create_resnet, load_resnet_weights, resolve_backbone_weights
    from unseg.params import overlay, parse_params, schema_defaults

    root = Path(__file__).resolve().parents[1]
    raw = {
        "data": {"n_train": 6, "n_val": 2, "min_side": 64, "max_side": 80},
        "hsg": {"steps": 4, "stage1_steps": 2, "batch_size": 2, "crop_size": 64, "dim": 16, "fine_groups": 3,
                "coarse_groups": 2, "kmeans_grid": [2, 2], "kmeans_iters": 2, "warmup_steps": 1, "ckpt_every": 2,
                "train": "auto"},
        "distill": {"backbone_weights": None}, "deeplab": {"backbone_weights": None},  # no consumer yet
    }  # fmt: skip
    params = parse_params(raw)
    generate(params.data, tmp_path / "prepared").save(tmp_path / "prepared/index.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overlay(schema_defaults(), raw)))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stages.pretrain_hsg", "prepared/index.json", "hsg.pth", "--ckpt", "scratch",
           "--log", "loss.csv"]  # fmt: skip
    unused = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)  # hsg.train: auto
    assert unused.returncode == 0 and "nothing trained, a placeholder written" in unused.stderr, unused.stderr[-3000:]
    assert not list((tmp_path / "scratch").iterdir())  # created empty, nothing trained
    with pytest.raises(UserError, match="deeplab.backbone_weights: hsg, but .*hsg.pth holds no trained HSG weights"):
        resolve_backbone_weights("hsg", tmp_path / "hsg.pth", "deeplab.backbone_weights")
    evaluate = [sys.executable, "-m", "stages.evaluate_hsg", "prepared/index.json", "hsg.pth", "hsg.json", "h.png"]
    refused = subprocess.run(evaluate, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "set hsg.train: always" in refused.stderr and "Traceback" not in refused.stderr
    raw["deeplab"] = {"backbone_weights": "hsg"}  # a consumer: pretrain_hsg trains
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overlay(schema_defaults(), raw)))
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5  # header + 4 steps
    assert len(list((tmp_path / "scratch").glob("superpixels_*/*.npy"))) == 6  # one cached region map per image
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "0 of 4 HSG steps run now" in again.stderr
    ckpt = torch.load(tmp_path / "hsg.pth", weights_only=True)
    assert ckpt["meta"]["steps"] == 4 and {"embedding_head", "transformers"} <= set(ckpt)
    raw["hsg"]["reuse"] = "hsg.pth"  # what a committed checkpoint does: used as is, nothing trained
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overlay(schema_defaults(), raw)))
    reuse = [*cmd[:4], "reused.pth", "--ckpt", "fresh_scratch", "--log", "reused.csv"]
    reused = subprocess.run(reuse, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert reused.returncode == 0 and "used as is" in reused.stderr, reused.stderr[-3000:]
    assert (tmp_path / "reused.pth").read_bytes() == (tmp_path / "hsg.pth").read_bytes()
    assert (tmp_path / "fresh_scratch").is_dir()  # the scratch folder exists though nothing trained
    report = load_resnet_weights(create_resnet("resnet18"), tmp_path / "hsg.pth")  # strict: every trunk tensor
    assert len(report.loaded) > 100
    key = "deeplab.backbone_weights"
    assert resolve_backbone_weights("hsg", tmp_path / "hsg.pth", key) == str(tmp_path / "hsg.pth")
    assert resolve_backbone_weights(None, tmp_path / "hsg.pth", key) is None
    build_deeplab(3, "resnet18", 16, [12, 24, 36], 0, str(tmp_path / "hsg.pth"))  # the backbone_weights path
    done = subprocess.run(evaluate, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    from PIL import Image

    scores = json.loads((tmp_path / "hsg.json").read_text())
    for net in ("hsg", "random_init"):
        assert set(scores[net]) == {"pixels", "segments", "fine", "coarse", "semi_supervised_knn_miou"}
        for level in ("pixels", "segments", "fine", "coarse"):
            assert 0 <= scores[net][level]["miou"] <= 1 and 0 < scores[net][level]["nf_covering"] <= 1
    assert Image.open(tmp_path / "h.png").size == (5 * 192, 2 * 208)  # 2 val images x 5 panels


@pytest.mark.slow
def test_pretrain_hsg_under_torchrun_runs_both_stages(tmp_path):
    """Two ranks (gloo): the SegSort-only steps (positions unused) and the full objective (transformers called
    once per image) both go through DDP; the ranks end with the same weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from stages.prepare import generate
    from unseg.params import overlay, parse_params, schema_defaults

    root = Path(__file__).resolve().parents[1]
    raw = {
        "data": {"n_train": 6, "n_val": 2, "min_side": 64, "max_side": 80},
        "hsg": {"steps": 4, "stage1_steps": 2, "batch_size": 2, "crop_size": 64, "dim": 16, "fine_groups": 3,
                "coarse_groups": 2, "kmeans_grid": [2, 2], "kmeans_iters": 2, "warmup_steps": 1, "train": "always"},
    }  # fmt: skip
    generate(parse_params(raw).data, tmp_path / "prepared").save(tmp_path / "prepared/index.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overlay(schema_defaults(), raw)))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "UNSEG_TORCHRUN": "--standalone --nproc_per_node 2"}  # fmt: skip
    cmd = [sys.executable, "-m", "stages.pretrain_hsg", "prepared/index.json", "hsg.pth", "--ckpt", "scratch",
           "--log", "loss.csv"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 of 4 HSG steps run now" in proc.stderr
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 5
