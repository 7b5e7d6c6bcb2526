"""dvc.yaml's code deps are exactly what each stage imports, so the cache is never stale and never over-eager.

For every stage of both pipelines, the code its deps cover must equal the import closure of its script
(``scripts/stage_deps.py``, which also writes them: ``python scripts/stage_deps.py --write``). Training
stages never depend on ``unseg/evaluation``: editing a metric, a report or a markdown table never retrains
a model (the label-matching math that the reproduction-only switches share with evaluation lives in
``unseg/matching.py``).
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("stage_deps", ROOT / "scripts" / "stage_deps.py")
deps_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deps_tool)

TRAINING = {"pretrain_croc", "extract_features", "mine_masks", "pseudo_label", "distill_maskrcnn"}
TRAINING |= {"filter_confident", "train_deeplab", "ceiling_maskrcnn", "ceiling_deeplab", "ground_truth", "prepare"}


def stages():
    for pipeline in deps_tool.PIPELINES:
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            yield pytest.param(name, stage, id=f"{pipeline}:{name}")


@pytest.mark.parametrize(("name", "stage"), list(stages()))
def test_code_deps_are_the_import_closure(name, stage):
    needed = deps_tool.closure(deps_tool.stage_script(stage))
    deps = stage.get("do", stage).get("deps", [])  # a foreach stage: the same deps for every key
    covered = deps_tool.covered([d for d in deps if str(d).startswith(deps_tool.CODE)])
    assert not needed - covered, f"{name}: imports missing from its deps: {sorted(needed - covered)}"
    assert not covered - needed, f"{name}: deps it never imports: {sorted(covered - needed)}"
    if name in TRAINING:
        evaluation = sorted(f for f in needed if f.startswith("unseg/evaluation/"))
        assert not evaluation, f"{name} trains or labels, yet depends on evaluation code: {evaluation}"


def test_package_init_files_hold_no_code():
    """They are left out of every closure, which is sound only while they import and define nothing that a stage
    can reach. The one exception is the user's entry point ``unseg.load_model``, which imports on call and which
    no stage and no library module calls."""
    for init in [*ROOT.glob("unseg/**/__init__.py"), ROOT / "stages" / "__init__.py"]:
        for node in ast.parse(init.read_text()).body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            metadata = isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id.startswith("__") for t in node.targets
            )
            entry_point = init == ROOT / "unseg" / "__init__.py" and getattr(node, "name", "") == "load_model"
            assert docstring or metadata or entry_point, f"{init.relative_to(ROOT)} holds code: {ast.dump(node)[:80]}"
    for module in [*ROOT.glob("unseg/**/*.py"), *ROOT.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(module.read_text())):
            called = (
                isinstance(node, ast.Attribute)
                and node.attr == "load_model"
                and getattr(node.value, "id", "") == "unseg"
            )
            imported = (
                isinstance(node, ast.ImportFrom)
                and node.module == "unseg"
                and any(a.name == "load_model" for a in node.names)
            )
            assert not called and not imported, f"{module.relative_to(ROOT)} reaches unseg.load_model"


def test_the_closure_sees_imports_inside_functions(tmp_path):
    """A lazy import (as the detectron2 backend and the reproduction switches use) is a dependency too."""
    script = ROOT / "stages" / "pseudo_label.py"
    assert "unseg/matching.py" in deps_tool.closure(script)  # imported inside clustering.align_to_ground_truth
