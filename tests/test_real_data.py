"""The whole chain on real images from ../shared/data (skipped when it is absent): COCO-MINI, CamVid frames with
the photos profile, and a folder of photos without labels as README's "Your own data" says. A file of its own so
that pytest-xdist (--dist loadfile) runs it beside test_pipeline.py's micro repo."""

import json
import shutil

import pytest
from test_pipeline import ROOT, make_repo, micro

COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"


@pytest.mark.slow
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini not present")
def test_the_whole_chain_runs_on_coco_mini(tmp_path):
    coco = micro(
        {
            "data": {"dataset": "coco", "root": str(COCO_MINI), "limit": 6},
            "cluster": {"classes": 2},
            "evaluate": {"crf": False},
        }
    )
    repo = make_repo(tmp_path, coco)
    table1 = json.loads((repo / "artifacts/metrics/table1.json").read_text())
    assert all(0 <= row["miou"] <= 1 and row["images"] == 6 for row in table1.values())
    preds = json.loads((repo / "artifacts/maskrcnn/predictions.json").read_text())
    index = json.loads((repo / "data/prepared/index.json").read_text())
    assert {p["image_id"] for p in preds} <= {e["id"] for e in index["images"]}


CAMVID = ROOT.parent / "shared" / "data" / "camvid"


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_the_photos_profile_runs_on_camvid_frames(tmp_path):
    # configs/photos.yaml with the micro budget: CrOC from scratch, training and evaluation on the same frames
    camvid = micro({"data": {"root": str(CAMVID), "limit": 6}, "cluster": {"classes": 3}, "evaluate": {"crf": False}})
    repo = make_repo(tmp_path, camvid, ROOT / "configs" / "photos.yaml")
    index = json.loads((repo / "data/prepared/index.json").read_text())
    assert len(index["images"]) == 6 and index["classes"][0] == "Sky" and len(index["classes"]) == 11
    labels = json.loads((repo / "artifacts/pseudo_labels/instances.json").read_text())
    assert {a["image_id"] for a in labels["annotations"]} == {e["id"] for e in index["images"]}
    table1 = json.loads((repo / "artifacts/metrics/table1.json").read_text())
    assert all(0 <= row["miou"] <= 1 and row["images"] == 6 for row in table1.values())


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_your_own_folder_as_the_readme_says(tmp_path):
    """README "Your own data": the photos profile with data.dataset folder and data.root set (micro budget)."""
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for f in sorted((CAMVID / "val" / "images").iterdir())[:6]:
        shutil.copy(f, photos / f.name)  # images only: no ground truth
    own = micro({"data": {"dataset": "folder", "root": str(photos)}, "cluster": {"classes": 3}})
    (tmp_path / "repo").mkdir()
    repo = make_repo(tmp_path / "repo", own, ROOT / "configs" / "photos.yaml")
    table1 = json.loads((repo / "artifacts/metrics/table1.json").read_text())
    assert "nothing to score" in table1["note"]
    health = json.loads((repo / "artifacts/metrics/health.json").read_text())
    assert health["mined_masks"]["images"] == 6 and sum(health["clusters"]["sizes"]) >= 6
    sheets = repo / "artifacts/plots/evaluate/sheets"
    assert [f.name for f in sheets.iterdir()] == ["random.png"]  # without labels: no worst or best
    assert 0 < health["mined_masks"]["mask_area_fraction"] <= 1
    # a 2-step CrOC mines whole images here: the verdict says the run did not find objects
    assert health["verdict"] == "failed" and any("mined masks cover" in line for line in health["failed"])
