"""Mean ± std over seeded runs: hand-made metrics files against numbers computed by hand."""

import math

import pytest

from unseg.evaluation.seeds import aggregate, metric_rows, seeds_markdown, steps_that_earn_their_row


def run(mined, mrcnn, filt, deeplab, ceiling=None):
    out = {
        "table1": {
            "1 mined masks + K-means": {"miou": mined, "pixel_accuracy": 0.5, "images": 120},
            "2 + Mask R-CNN": {"miou": mrcnn, "pixel_accuracy": 0.6, "images": 120},
            "3 + confidence filter": {"miou": filt, "pixel_accuracy": 0.7, "images": 120},
            "4 + DeepLab-v3": {"miou": deeplab, "pixel_accuracy": 0.8, "images": 120},
            "5 + CRF": {"note": "skipped: pydensecrf is not installed"},
        },
        "instances": {"maskrcnn_multi": {"AP": 20.0, "AP50": 40.0}},
    }
    if ceiling is not None:
        out["ceiling"] = {"deeplab_miou": ceiling, "maskrcnn_ap50": 60.0, "images": 120}
    return out


def test_metric_rows_keep_numeric_rows_and_name_flat_files_after_themselves():
    rows = metric_rows("table1", run(0.2, 0.3, 0.4, 0.5)["table1"])
    assert set(rows) == {"1 mined masks + K-means", "2 + Mask R-CNN", "3 + confidence filter", "4 + DeepLab-v3"}
    assert metric_rows("ceiling", {"deeplab_miou": 0.7, "note": "x"}) == {"ceiling": {"deeplab_miou": 0.7}}


def test_aggregate_gives_the_mean_and_sample_std_of_each_row():
    agg = aggregate([run(0.2, 0.3, 0.4, 0.5, 0.7), run(0.3, 0.4, 0.5, 0.6, 0.8), run(0.1, 0.2, 0.3, 0.4, 0.6)])
    row = agg["table1"]["1 mined masks + K-means"]
    assert row["metric"] == "miou" and row["n"] == 3
    assert row["mean"] == pytest.approx(0.2) and row["std"] == pytest.approx(0.1)  # sample std of .2 .3 .1
    assert row["pixel_accuracy"] == {"mean": pytest.approx(0.5), "std": 0.0, "n": 3}
    assert agg["instances"]["maskrcnn_multi"]["metric"] == "AP50"
    assert agg["ceiling"]["ceiling"]["deeplab_miou"]["mean"] == pytest.approx(0.7)
    assert "5 + CRF" not in agg["table1"]


def test_a_row_missing_from_one_run_averages_the_runs_that_have_it():
    first, second = run(0.2, 0.3, 0.4, 0.5), run(0.4, 0.3, 0.4, 0.5)
    del second["table1"]["4 + DeepLab-v3"]
    agg = aggregate([first, second])
    assert agg["table1"]["4 + DeepLab-v3"]["n"] == 1 and agg["table1"]["4 + DeepLab-v3"]["std"] == 0.0
    assert agg["table1"]["1 mined masks + K-means"]["mean"] == pytest.approx(0.3)


def test_a_step_earns_its_row_only_when_its_gain_exceeds_both_stds():
    # gains 0.1 each; stds: row 1 and 2 vary by 0.2 (std 0.1414...), rows 3 and 4 are constant
    agg = aggregate([run(0.1, 0.2, 0.4, 0.5), run(0.3, 0.4, 0.4, 0.5)])
    steps = steps_that_earn_their_row(agg["table1"])
    assert [s["to"] for s in steps] == ["2 + Mask R-CNN", "3 + confidence filter", "4 + DeepLab-v3"]
    assert [s["earned"] for s in steps] == [False, False, True]
    assert steps[0]["gain"] == pytest.approx(0.1) and math.isclose(steps[2]["gain"], 0.1)


def test_markdown_shows_mean_std_and_percent_of_ceiling():
    agg = aggregate([run(0.2, 0.3, 0.4, 0.5, 0.8), run(0.2, 0.3, 0.4, 0.5, 0.8)])
    text = seeds_markdown(agg, [0, 1])
    assert "| 4 + DeepLab-v3 | 50.0 ± 0.0 | 80.0 ± 0.0 | – | 62 % | +10.0 |" in text
    assert "| maskrcnn_ap50 | 60.0 ± 0.0 |" in text


def test_a_single_run_says_so_instead_of_a_zero_std():
    agg = aggregate([run(0.2, 0.3, 0.4, 0.5), run(0.2, 0.3, 0.4, 0.5)])
    agg.update(aggregate([{"ceiling": {"deeplab_miou": 0.8, "maskrcnn_ap50": 60.0}}]))
    text = seeds_markdown(agg, [0, 1])
    assert "| **supervised ceiling** (DeepLab on ground truth) | 80.0 (1 run) |" in text
    assert "| 4 + DeepLab-v3 | 50.0 ± 0.0 |" in text and "| maskrcnn_ap50 | 60.0 (1 run) |" in text


def test_a_loss_larger_than_the_std_is_called_a_loss():
    agg = aggregate([run(0.3, 0.5, 0.40, 0.5), run(0.3, 0.5, 0.42, 0.5)])
    text = seeds_markdown(agg, [0, 1])
    assert "| 3 + confidence filter | 41.0 ± 1.4 |" in text and "-9.0 (a loss beyond the std)" in text


def test_nested_rows_of_the_hsg_metrics_are_named_by_path_and_tabled():
    def hsg(fine, knn):
        return {"hsg": {"fine": {"miou": fine, "nf_covering": 0.5}, "semi_supervised_knn_miou": knn},
                "random_init": {"fine": {"miou": 0.1, "nf_covering": None}}}  # fmt: skip

    assert metric_rows("hsg", hsg(0.4, 0.3)) == {
        "hsg": {"semi_supervised_knn_miou": 0.3},
        "hsg / fine": {"miou": 0.4, "nf_covering": 0.5},
        "random_init / fine": {"miou": 0.1},
    }
    agg = aggregate([{"hsg": hsg(0.4, 0.3)}, {"hsg": hsg(0.6, 0.5)}])
    assert agg["hsg"]["hsg / fine"]["mean"] == pytest.approx(0.5) and agg["hsg"]["hsg / fine"]["n"] == 2
    assert "| hsg / fine | 50.0 ± 14.1 | 50.0 ± 0.0 | – |" in seeds_markdown(agg, [0, 1])
