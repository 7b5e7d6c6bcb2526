"""The code deps of every DVC stage, computed from what its script imports (and written into dvc.yaml).

    python scripts/stage_deps.py          # show the stages whose code deps differ from their imports
    python scripts/stage_deps.py --write  # rewrite those deps in dvc.yaml and ceiling/dvc.yaml

A stage's code is the import closure of ``stages/<name>.py`` inside the project (imports inside functions
included, since a stage may run them). Package ``__init__`` files hold only a docstring and metadata, so
they are left out (tests/reliability/test_stage_deps.py checks that). A folder is listed when the stage
imports every module in it, else its files one by one. Data deps (anything outside ``stages`` and
``unseg``) are kept as they are.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("dvc.yaml", "ceiling/dvc.yaml", "hsg/dvc.yaml")
CODE = ("stages/", "unseg/")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (None outside ``stages`` / ``unseg``)."""
    if name.split(".")[0] not in ("stages", "unseg"):
        return None
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None


def imported(path: Path) -> set[Path]:
    """Project modules ``path`` imports (``from pkg import name`` counts ``pkg.name`` when it is a module)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {f for f in map(module_file, names) if f is not None and f.name != "__init__.py"}
    return found


def closure(script: Path) -> set[str]:
    """Every project module (path relative to the root) that running ``script`` may import."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += imported(f) - seen
    return {f.relative_to(ROOT).as_posix() for f in seen}


def modules_under(folder: str) -> set[str]:
    return {f.relative_to(ROOT).as_posix() for f in (ROOT / folder).rglob("*.py") if f.name != "__init__.py"}


def covered(deps: list[str]) -> set[str]:
    """The modules a list of deps covers (a folder covers every module under it)."""
    out: set[str] = set()
    for d in deps:
        if (ROOT / d).is_dir():
            out |= modules_under(d)
        elif d.endswith(".py"):
            out.add(d)
    return out


def compact(modules: set[str]) -> list[str]:
    """The stage script, then the folders whose every module is in ``modules`` and the remaining files, sorted."""
    folders = sorted({str(Path(m).parent) for m in modules if Path(m).parent.name not in ("", "stages", "unseg")})
    whole = [f for f in folders if modules_under(f) <= modules]
    rest = [m for m in modules if not any(m.startswith(f + "/") for f in whole)]
    return sorted(whole + rest, key=lambda d: (not d.startswith("stages/"), d))


def stage_script(stage: dict) -> Path:
    words = stage.get("do", stage)["cmd"].split()  # a foreach stage: every key runs the same script
    return module_file(words[words.index("-m") + 1])


def wanted_deps(stage: dict) -> list[str]:
    return compact(closure(stage_script(stage)))


def rewrite(text: str, stages: dict) -> str:
    """dvc.yaml text with each stage's code deps replaced by :func:`wanted_deps` (comments kept)."""
    lines, out, current, in_deps = text.splitlines(), [], None, False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 2 and ":" in stripped and not stripped.startswith(("-", "#")):
            current, in_deps = stripped.split(":")[0], False
        if in_deps and not stripped.startswith("- "):
            in_deps = False
        if in_deps and stripped[2:].startswith(CODE):
            continue  # an old code dep: dropped, the computed ones were written under "deps:"
        out.append(line)
        if stripped == "deps:" and current in stages:
            in_deps = True
            out += [f"{' ' * (indent + 2)}- {d}" for d in wanted_deps(stages[current])]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite the code deps in place")
    args = ap.parse_args()
    stale = 0
    for pipeline in PIPELINES:
        path = ROOT / pipeline
        stages = yaml.safe_load(path.read_text())["stages"]
        for name, stage in stages.items():
            have = [d for d in stage.get("do", stage).get("deps", []) if str(d).startswith(CODE)]
            if have != wanted_deps(stage):
                stale += 1
                print(f"{pipeline}:{name}: {have} -> {wanted_deps(stage)}")
        if args.write:
            path.write_text(rewrite(path.read_text(), stages))
    if stale and not args.write:
        sys.exit(1)


if __name__ == "__main__":
    main()
