"""Seeded runs with DVC's own machinery: one experiment per seed, then mean ± std of every metric.

    python scripts/seeds.py run [--seeds 0 1 2] [--jobs 1] [--no-ceiling]   # queue and run the experiments
    python scripts/seeds.py collect [--seeds 0 1 2]                          # seeds.json and seeds.md

``run`` queues ``dvc exp run --queue -n seed-<s> -S cluster.seed=<s> -S distill.seed=<s> -S deeplab.seed=<s>``
for each seed (the pipeline, and the supervised ceiling of ``ceiling/dvc.yaml`` unless ``--no-ceiling``)
and runs the queue (``dvc exp run --run-all``). Each experiment is a full, honest run in its own
temporary copy of the project; upstream stages that no seed touches (the backbone, features and masks)
come from DVC's run cache. ``collect`` reads the experiments' metrics from ``dvc exp show --json`` and
writes ``artifacts/metrics/seeds.json`` and ``artifacts/metrics/seeds.md``; ``dvc exp show`` lists them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from unseg.evaluation.seeds import aggregate, seeds_markdown

SEEDED = ("cluster.seed", "distill.seed", "deeplab.seed")  # K-means, Mask R-CNN, DeepLab
METRICS = ("table1", "instances", "linear", "baselines", "backbone", "ceiling")


def dvc(*args: str, capture: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], text=True, capture_output=capture)
    if proc.returncode:
        sys.exit(f"seeds: dvc {' '.join(args)} failed{': ' + proc.stderr.strip() if capture else ''}")
    return proc.stdout if capture else ""


def run(seeds: list[int], jobs: int, ceiling: bool) -> None:
    targets = ["dvc.yaml", "ceiling/dvc.yaml"] if ceiling else ["dvc.yaml"]
    for s in seeds:
        sets = [arg for key in SEEDED for arg in ("-S", f"{key}={s}")]
        dvc("exp", "run", "--queue", "-f", "-n", f"seed-{s}", *sets, *targets)
    dvc("exp", "run", "--run-all", "-j", str(jobs))


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


def collect(seeds: list[int], out: Path) -> None:
    names = {f"seed-{s}" for s in seeds}
    runs = experiment_metrics(json.loads(dvc("exp", "show", "--json", capture=True)), names)
    missing = sorted(names - set(runs))
    if missing:
        sys.exit(f"seeds: no finished experiment named {', '.join(missing)} (run: python scripts/seeds.py run)")
    agg = aggregate([runs[f"seed-{s}"] for s in seeds])
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"seeds": seeds, **agg}, indent=2) + "\n")
    (out / "seeds.md").write_text(seeds_markdown(agg, seeds))
    print((out / "seeds.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "collect"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="experiments run in parallel (run)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the supervised ceiling (run)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/metrics"))
    args = ap.parse_args()
    if args.command == "run":
        run(args.seeds, args.jobs, not args.no_ceiling)
    else:
        collect(args.seeds, args.out)


if __name__ == "__main__":
    main()
