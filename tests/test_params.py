"""params.yaml validation: unknown keys, wrong types and out-of-range values stop with one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unseg.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_files_are_valid():
    tiny = load_params(ROOT / "params.yaml")
    assert tiny.data.dataset == "generated"
    paper = load_params(ROOT / "configs" / "paper.yaml")
    assert paper.mining.topk_fraction == 0.4 and paper.backbone.patch_size == 16 and paper.features.short_side == 640


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mining": {"topk_fraction": 1.5}}, "mining.topk_fraction = 1.5: must be in (0, 1]"),
        ({"mining": {"topk_fraction": 0}}, "mining.topk_fraction = 0: must be in (0, 1]"),
        ({"cluster": {"classes": 0}}, "cluster.classes = 0: must be >= 1"),
        ({"mining": {"topk": 0.4}}, "unknown key mining.topk"),
        ({"minning": {}}, "unknown section 'minning'"),
        ({"mining": {"heads": "five"}}, "mining.heads = 'five': must be an int or null"),
        ({"mining": {"keep_component": 1}}, "mining.keep_component = 1: must be a bool"),
        ({"features": {"fit": "stretch"}}, "features.fit = 'stretch': must be one of pad, crop"),
        ({"features": {"short_side": None}}, "features.short_side = null: must be an int"),
        ({"data": {"dataset": "voc"}}, "data.root is null"),
        ({"data": {"min_side": 200, "max_side": 100}}, "data.min_side = 200: must be <= data.max_side"),
        ({"mining": {"topk_fraction": "4e1"}}, "mining.topk_fraction = 40.0: must be in (0, 1]"),
        ({"mining": {"topk_fraction": "nan"}}, "mining.topk_fraction = 'nan': must be a float"),
        ({"backbone": {"patch_size": 7}}, "croc.crop_size = 64: must be a multiple of backbone.patch_size (7)"),
        ({"features": {"short_side": 16}, "backbone": {"patch_size": 32}}, "features.short_side = 16: must be >= "),
    ],
)
def test_errors_name_the_key_and_the_allowed_range(raw, message):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_exponent_without_a_dot_is_a_float():
    """YAML 1.1 (PyYAML) reads 4e-1 as the string '4e-1'; it is the float 0.4."""
    import yaml

    raw = yaml.safe_load("mining:\n  topk_fraction: 4e-1\nfilter:\n  tau: 9E-1\n")
    assert isinstance(raw["mining"]["topk_fraction"], str)
    p = parse_params(raw)
    assert p.mining.topk_fraction == 0.4 and p.filter.tau == 0.9


def test_ints_are_accepted_for_floats_and_null_where_allowed():
    p = parse_params({"mining": {"topk_fraction": 1, "cls_mass": None, "heads": 5}})
    assert p.mining.topk_fraction == 1.0 and isinstance(p.mining.topk_fraction, float)
    assert p.mining.cls_mass is None and p.mining.heads == 5


def test_a_stage_reports_bad_params_in_one_line_before_any_work(tmp_path):
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["mining"]["topk_fraction"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "masks.zarr"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.mine_masks",
            str(tmp_path / "missing.zarr"),
            str(out),
            "--params",
            str(tmp_path / "params.yaml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mine_masks: error: params.yaml: mining.topk_fraction = 1.5: must be in (0, 1]"
    assert not out.exists()


def test_every_schema_key_is_written_in_the_shipped_params_files():
    # DVC tracks params by the keys present in the file, and users read their comments there.
    import dataclasses

    from unseg.params import SECTIONS

    for path in (ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"):
        raw = yaml.safe_load(path.read_text())
        assert set(raw) == set(SECTIONS), path
        for name, cls in SECTIONS.items():
            assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, f"{path}: {name}"


def test_schema_defaults_are_the_tiny_profile():
    # a key deleted from params.yaml falls back to the same value (croc.reuse and hsg.reuse default to training)
    import dataclasses

    defaults, tiny = parse_params({}), load_params(ROOT / "params.yaml")
    for section in dataclasses.fields(defaults):
        want = dataclasses.asdict(getattr(tiny, section.name))
        got = dataclasses.asdict(getattr(defaults, section.name))
        if section.name in ("croc", "hsg"):
            want.pop("reuse"), got.pop("reuse")
        assert got == want, section.name


def test_relative_paths_reach_the_project_from_a_dvc_experiment_copy(tmp_path, monkeypatch):
    # `dvc exp run --temp` and queued experiments run in <project>/.dvc/tmp/exps/...: a relative data.root
    # beside the project (../shared/data/camvid) is not in that copy, so it resolves against the project.
    from unseg.params import experiment_workspace, load_params

    project = tmp_path / "work" / "project"
    (tmp_path / "work" / "photos").mkdir(parents=True)
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "vit.pth").write_bytes(b"")
    copy = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "vit.pth").write_bytes(b"")  # tracked files are in the copy: kept relative
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(dataset="folder", root="../photos")
    raw["croc"]["reuse"], raw["hsg"]["reuse"] = "checkpoints/vit.pth", "missing.pth"
    raw["distill"]["backbone_weights"] = "hsg"
    for where in (project, copy):
        (where / "params.yaml").write_text(yaml.safe_dump(raw))
    assert experiment_workspace(copy) == project and experiment_workspace(project) is None

    monkeypatch.chdir(copy)
    p = load_params("params.yaml")
    assert p.data.root == str(tmp_path / "work" / "photos")
    assert p.croc.reuse == "checkpoints/vit.pth"
    assert p.hsg.reuse == "missing.pth"  # found nowhere: left as written, for the stage's own error
    assert p.distill.backbone_weights == "hsg"  # a value, not a path (and no file of that name): as written
    monkeypatch.chdir(project)
    assert load_params("params.yaml").data.root == "../photos"
