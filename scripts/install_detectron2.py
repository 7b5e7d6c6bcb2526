"""`make detectron2`: install detectron2 into this venv for ``distill.backend: detectron2``.

detectron2 is not on PyPI and its compiled ops are tied to one torch build. This installs a wheel from a local
folder (``--wheels``, default ``../shared/wheels``) when one matches this Python, platform and torch, then
its PyPI dependencies (``requirements-detectron2.txt``), checks that ``detectron2._C`` loads, and records the
torch it was installed against in ``<venv>/detectron2-build.json`` (named by the error if torch changes later).
Without a matching wheel it prints the official build-from-source command in one line and exits 1.
The torch a wheel was built for is read from the folder's README (``compiled against `torch==X` ``) when it says.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(sys.prefix) / "detectron2-build.json"
FROM_SOURCE = (
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
    "-r requirements-detectron2.txt "
    "(needs gcc and the installed torch)"
)


def wheel_tags() -> tuple[str, str]:
    """(python tag, platform tag) of this interpreter as wheel file names spell them: ('cp311', 'linux_x86_64')."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}", sysconfig.get_platform().replace("-", "_").replace(
        ".", "_"
    )


def matching_wheel(folder: Path) -> Path | None:
    python, platform = wheel_tags()
    for wheel in sorted(folder.glob("detectron2-*.whl")):
        parts = wheel.stem.split("-")  # name, version, python tag, abi tag, platform tag
        if len(parts) == 5 and parts[2] == python and parts[4] == platform:
            return wheel
    return None


def built_for_torch(folder: Path) -> str | None:
    readme = folder / "README.md"
    found = re.search(r"torch==([0-9][0-9.]*[0-9])", readme.read_text()) if readme.is_file() else None
    return found.group(1) if found else None


def installed_torch() -> str:
    import torch

    return torch.__version__.split("+")[0]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=ROOT.parent / "shared" / "wheels")
    args = ap.parse_args()
    torch_version = installed_torch()
    wheel = matching_wheel(args.wheels) if args.wheels.is_dir() else None
    if wheel is None:
        python, platform = wheel_tags()
        print(
            f"detectron2: no wheel for {python} {platform} in {args.wheels}; build it: {FROM_SOURCE}", file=sys.stderr
        )
        return 1
    built = built_for_torch(args.wheels)
    if built and built != torch_version:
        print(
            f"detectron2: {wheel.name} was built for torch {built}, this venv has torch {torch_version}; "
            f"build it: {FROM_SOURCE}",
            file=sys.stderr,
        )
        return 1
    pip("--no-deps", str(wheel))
    pip("-r", str(ROOT / "requirements-detectron2.txt"))
    check = subprocess.run([sys.executable, "-c", "import detectron2._C"], capture_output=True, text=True)
    if check.returncode:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "detectron2"], check=True)
        reason = (check.stderr.strip().splitlines() or ["?"])[-1]
        print(
            f"detectron2: {wheel.name} does not load with torch {torch_version} ({reason}); uninstalled it; "
            f"build it: {FROM_SOURCE}",
            file=sys.stderr,
        )
        return 1
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    RECORD.write_text(json.dumps({"wheel": wheel.name, "sha256": digest, "torch": torch_version}, indent=1) + "\n")
    print(f"detectron2: installed {wheel.name} (sha256 {digest[:12]}) for torch {torch_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
