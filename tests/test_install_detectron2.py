"""scripts/install_detectron2.py (`make detectron2`): which wheel matches this venv, and the one-line refusals
when none does or when the folder says the wheel was built for another torch (nothing is installed then)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_detectron2.py"
spec = importlib.util.spec_from_file_location("install_detectron2", SCRIPT)
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


def wheel_folder(tmp_path: Path, *names: str, readme: str | None = None) -> Path:
    for name in names:
        (tmp_path / name).write_bytes(b"not a real wheel")
    if readme is not None:
        (tmp_path / "README.md").write_text(readme)
    return tmp_path


def test_only_a_wheel_for_this_python_and_platform_matches(tmp_path):
    python, platform = installer.wheel_tags()
    assert python == f"cp{sys.version_info.major}{sys.version_info.minor}"
    folder = wheel_folder(
        tmp_path, "detectron2-0.6-cp39-cp39-linux_x86_64.whl", f"detectron2-0.6-{python}-{python}-other_arch.whl"
    )
    assert installer.matching_wheel(folder) is None
    good = f"detectron2-0.6-{python}-{python}-{platform}.whl"
    wheel_folder(tmp_path, good)
    assert installer.matching_wheel(folder).name == good


def test_the_torch_a_wheel_was_built_for_is_read_from_the_folders_readme(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert installer.built_for_torch(empty) is None
    folder = wheel_folder(tmp_path, readme="compiled against `torch==2.14.1` (the project's pin)\n")
    assert installer.built_for_torch(folder) == "2.14.1"


def run_main(monkeypatch, capsys, folder: Path) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["install_detectron2.py", "--wheels", str(folder)])
    installed = []
    monkeypatch.setattr(installer, "pip", lambda *args: installed.append(args))
    status = installer.main()
    assert not installed, "nothing may be installed when the wheel does not fit"
    return status, capsys.readouterr().err


def test_no_matching_wheel_prints_the_build_command_in_one_line(tmp_path, monkeypatch, capsys):
    status, err = run_main(monkeypatch, capsys, wheel_folder(tmp_path, "detectron2-0.6-cp39-cp39-linux_x86_64.whl"))
    assert status == 1 and err.count("\n") == 1
    assert "no wheel for" in err and "git+https://github.com/facebookresearch/detectron2.git" in err


def test_a_wheel_built_for_another_torch_is_refused_naming_both_versions(tmp_path, monkeypatch, capsys):
    python, platform = installer.wheel_tags()
    folder = wheel_folder(tmp_path, f"detectron2-0.6-{python}-{python}-{platform}.whl", readme="`torch==2.9.1`\n")
    status, err = run_main(monkeypatch, capsys, folder)
    ours = torch.__version__.split("+")[0]
    assert ours != "2.9.1"
    assert status == 1 and err.count("\n") == 1 and "built for torch 2.9.1" in err and f"torch {ours}" in err


@pytest.mark.skipif(not (SCRIPT.parents[2] / "shared" / "wheels").is_dir(), reason="no ../shared/wheels here")
def test_the_shared_wheel_matches_this_venv():
    folder = SCRIPT.parents[2] / "shared" / "wheels"
    wheel = installer.matching_wheel(folder)
    assert wheel is not None and installer.built_for_torch(folder) in (None, torch.__version__.split("+")[0])
