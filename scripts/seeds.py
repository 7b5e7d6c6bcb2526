"""Seeded runs with DVC's own machinery: one experiment per seed, then mean ± std of every metric.

    python scripts/seeds.py run [--seeds 0 1 2] [--ceiling] [--hsg]   # one DVC experiment per seed
    python scripts/seeds.py collect [--seeds 0 1 2] [--ceiling]  # seeds.json and seeds.md

A variant of the pipeline under the same seeds: ``--name hsg --set distill.backbone_weights=hsg --set
deeplab.backbone_weights=hsg`` runs experiments ``hsg-<s>`` with those params on top, and ``collect --name hsg``
writes ``seeds_hsg.json`` / ``.md`` (``make seeds-hsg``: Mask R-CNN and DeepLab from the HSG ResNet).

``run`` runs ``dvc exp run --temp -n seed-<s> -S cluster.seed=<s> -S distill.seed=<s> -S deeplab.seed=<s>``
for each seed, one after the other (the root pipeline, plus the supervised ceiling of ``ceiling/dvc.yaml``
with ``--ceiling``; ``evaluate_hsg`` of ``hsg/dvc.yaml`` with ``--hsg``, which seeds ``evaluate.seed`` too: the
random-init FCN and the K-means of its levels). Each experiment is a full, honest run in its own temporary copy of
the project; stages that no seed touches (the committed backbone, features, masks) are unchanged there and skipped,
and a seed equal to the workspace's params is the workspace run itself. Without ``--ceiling`` the
supervised ceiling is the workspace's one run (``make ceiling``), reported with n = 1. ``collect`` reads the
experiments' metrics from ``dvc exp show --json --all-commits`` and writes ``artifacts/metrics/seeds.json`` and
``artifacts/metrics/seeds.md``; ``dvc exp show`` lists them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from unseg.evaluation.seeds import aggregate, seeds_markdown

SEEDED = ("cluster.seed", "distill.seed", "deeplab.seed")  # K-means, Mask R-CNN, DeepLab
METRICS = ("table1", "instances", "linear", "baselines", "backbone", "ceiling", "hsg")


def dvc(*args: str, capture: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], text=True, capture_output=capture)
    if proc.returncode:
        sys.exit(f"seeds: dvc {' '.join(args)} failed{': ' + proc.stderr.strip() if capture else ''}")
    return proc.stdout if capture else ""


def run(seeds: list[int], ceiling: bool, hsg: bool, name: str = "seed", overrides: tuple[str, ...] = ()) -> None:
    targets = ["dvc.yaml", *(["ceiling/dvc.yaml"] if ceiling else []), *(["hsg/dvc.yaml"] if hsg else [])]
    seeded = (*SEEDED, "evaluate.seed") if hsg else SEEDED
    for s in seeds:
        sets = [arg for key in seeded for arg in ("-S", f"{key}={s}")] + [a for o in overrides for a in ("-S", o)]
        subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", f"{name}-{s}"], capture_output=True)
        print(f"seeds: experiment {name}-{s}", flush=True)
        dvc("exp", "run", "--temp", "-n", f"{name}-{s}", *sets, *targets)  # unchanged stages are skipped


def experiment_metrics(shown, names: set[str]) -> dict[str, dict]:
    """{experiment name: {metrics file stem: json}} for the named experiments in ``dvc exp show --json``."""
    found: dict[str, dict] = {}

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data = node.get("data")
            if node.get("name") in names and isinstance(data, dict) and data.get("metrics"):
                found[node["name"]] = {
                    Path(path).stem: m.get("data", {})
                    for path, m in data["metrics"].items()
                    if Path(path).stem in METRICS and isinstance(m, dict)
                }
            for value in node.values():
                walk(value)

    walk(shown)
    return found


def collect(seeds: list[int], out: Path, ceiling: bool, name: str = "seed") -> None:
    names = {f"{name}-{s}" for s in seeds}
    runs = experiment_metrics(json.loads(dvc("exp", "show", "--json", "--all-commits", capture=True)), names)
    missing = sorted(names - set(runs))
    if missing:
        sys.exit(f"seeds: no finished experiment named {', '.join(missing)} (run: python scripts/seeds.py run)")
    per_seed = [runs[f"{name}-{s}"] for s in seeds]
    if not ceiling:  # the experiments only carry the committed ceiling.json: count it once, not once per seed
        for run_metrics in per_seed:
            run_metrics.pop("ceiling", None)
    agg = aggregate(per_seed)
    workspace_ceiling = out / "ceiling.json"
    if not ceiling and workspace_ceiling.is_file():
        agg.update(aggregate([{"ceiling": json.loads(workspace_ceiling.read_text())}]))
    stem = "seeds" if name == "seed" else f"seeds_{name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"seeds": seeds, **agg}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(seeds_markdown(agg, seeds))
    print((out / f"{stem}.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "collect"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ceiling", action="store_true", help="the ceiling per seed too (default: once, make ceiling)")
    ap.add_argument("--hsg", action="store_true", help="run: evaluate_hsg per seed too (evaluate.seed seeded)")
    ap.add_argument("--name", default="seed", help="experiments <name>-<seed>; outputs seeds_<name>.* unless 'seed'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run: a param on top of the seeds")
    ap.add_argument("--out", type=Path, default=Path("artifacts/metrics"))
    args = ap.parse_args()
    if args.command == "run":
        run(args.seeds, args.ceiling, args.hsg, args.name, tuple(args.set))
    else:
        collect(args.seeds, args.out, args.ceiling, args.name)


if __name__ == "__main__":
    main()
