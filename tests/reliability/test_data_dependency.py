"""The dataset folder is a dependency, and every params section is checked whichever stage is targeted.

A DVC project holding the real ``check_inputs`` and ``prepare`` stages of dvc.yaml over a folder of images:
adding, replacing or deleting an image reruns ``prepare``; an unchanged folder reruns nothing; a typo in a
section that ``prepare`` does not track stops ``dvc repro prepare`` with one line naming the key.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def dvc(repo: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def indexed(repo: Path) -> list[str]:
    index = json.loads((repo / "data/prepared/index.json").read_text())
    return sorted(Path(e["file"]).name for e in index["images"])


@pytest.fixture
def folder_repo(tmp_path):
    repo, photos = tmp_path / "repo", tmp_path / "photos"
    repo.mkdir()
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (60 * i, 10, 10)).save(photos / f"img{i}.png")
    for name in ("stages", "unseg"):
        shutil.copytree(ROOT / name, repo / name)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k in ("check_inputs", "prepare")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="folder", root=str(photos))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    assert ran(dvc(repo, "repro")) == {"check_inputs", "prepare"}
    return repo, photos


@pytest.mark.slow
def test_adding_replacing_and_deleting_images_rerun_prepare(folder_repo):
    repo, photos = folder_repo
    assert indexed(repo) == ["img0.png", "img1.png", "img2.png"]
    assert ran(dvc(repo, "repro")) == {"check_inputs"}  # nothing changed: prepare is skipped
    Image.new("RGB", (40, 32), (0, 200, 0)).save(photos / "img3.png")
    assert ran(dvc(repo, "repro")) == {"check_inputs", "prepare"}
    assert indexed(repo) == ["img0.png", "img1.png", "img2.png", "img3.png"]
    Image.new("RGB", (48, 32), (0, 0, 200)).save(photos / "img1.png")  # replaced in place
    assert ran(dvc(repo, "repro")) == {"check_inputs", "prepare"}
    widths = {
        Path(e["file"]).name: e["width"] for e in json.loads((repo / "data/prepared/index.json").read_text())["images"]
    }
    assert widths["img1.png"] == 48
    (photos / "img0.png").unlink()
    assert ran(dvc(repo, "repro")) == {"check_inputs", "prepare"}
    assert indexed(repo) == ["img1.png", "img2.png", "img3.png"]


@pytest.mark.slow
def test_a_typo_in_an_untracked_section_stops_any_target(folder_repo):
    repo, _ = folder_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mining"]["topk_fracton"] = 0.3  # prepare tracks only `data`
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(repo, "repro", "prepare", ok=False)
    assert proc.returncode != 0
    assert "check_inputs: error: params.yaml: unknown key mining.topk_fracton" in proc.stderr
    assert "Traceback" not in proc.stderr
