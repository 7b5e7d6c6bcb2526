"""kill -9 in the middle of a training stage under `dvc repro`: nothing half-written is ever recorded,
and the rerun resumes to exactly the result of an uninterrupted run (same machine). The reruns pass -f:
the interrupted run had the params of the last finished one, whose outputs DVC would otherwise restore from
its cache ("is cached - skipping run"; a user who changed a param gets the resume without -f)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_pipeline import make_repo, micro, run, stale  # noqa: E402

LONGER = {"distill": {"steps": 6, "lr_steps": [4], "ckpt_every": 1}, "deeplab": {"epochs": 3, "ckpt_every": 1}}


def out_hashes(repo: Path, stage: str) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o.get("md5") for o in lock["outs"] if "scratch" not in o["path"]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("interrupt"), micro(LONGER))


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "scratch"), [("distill_maskrcnn", "maskrcnn"), ("train_deeplab", "deeplab")])
def test_kill_mid_training_then_rerun_equals_the_uninterrupted_run(repo, stage, scratch):
    reference = out_hashes(repo, stage)
    ckpt_dir = repo / "artifacts" / "scratch" / scratch
    subprocess.run(["rm", "-rf", str(ckpt_dir)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "dvc", "repro", "-f", "-s", stage]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not list(ckpt_dir.glob("step_*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage process with it
    proc.wait()
    assert list(ckpt_dir.glob("step_*.pt")), f"{stage} wrote no checkpoint before the kill"
    assert stage in stale(repo), f"{stage} was recorded as up to date after a kill"
    out = run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], repo, timeout=600)
    assert f"Running stage '{stage}'" in out
    assert out_hashes(repo, stage) == reference  # resumed, and equal to the uninterrupted run
    assert stage not in stale(repo)


def test_small_outputs_and_models_are_written_by_rename(tmp_path, monkeypatch):
    """A stage's metrics json and model file appear whole or not at all (temporary file, then rename)."""
    import torch

    from unseg.cli import write_text
    from unseg.models.checkpoint import read_checkpoint, save_checkpoint

    target = tmp_path / "m" / "metrics.json"
    write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n' and not list(tmp_path.rglob("*.tmp"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # dies while writing

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(2)}, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    monkeypatch.undo()
    save_checkpoint({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert torch.equal(read_checkpoint(tmp_path / "model.pt", "model")["w"], torch.ones(2))


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "scratch"), [("distill_maskrcnn", "maskrcnn"), ("train_deeplab", "deeplab")])
def test_ctrl_c_before_the_first_checkpoint_then_rerun_equals_the_uninterrupted_run(repo, stage, scratch):
    """Ctrl-C (SIGINT to dvc's process group, as a terminal sends it) while a training stage runs and before its
    first ``ckpt_every``: the stage finishes its step, writes a checkpoint and exits; `dvc repro` resumes there."""
    section = {"distill_maskrcnn": "distill", "train_deeplab": "deeplab"}[stage]
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[section]["ckpt_every"] = 1000  # no periodic checkpoint in this run
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        run([sys.executable, "-m", "dvc", "repro", "-s", stage], repo, timeout=600)
        reference = out_hashes(repo, stage)
        ckpt_dir = repo / "artifacts" / "scratch" / scratch
        subprocess.run(["rm", "-rf", str(ckpt_dir)], check=True)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "-f", "-s", stage],
            cwd=repo,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        log, deadline = ckpt_dir / "loss.csv", time.time() + 300
        while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode != 0, output[-2000:]
        assert "checkpoint written); rerun to resume" in output and "Traceback" not in output, output[-3000:]
        checkpoints = list(ckpt_dir.glob("step_*.pt"))
        assert len(checkpoints) == 1, checkpoints  # the interrupt's own, not a periodic one
        assert stage in stale(repo), f"{stage} was recorded as up to date after Ctrl-C"
        out = run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], repo, timeout=600)
        assert f"Running stage '{stage}'" in out
        assert (
            out_hashes(repo, stage) == reference
        )  # resumed from the interrupt's checkpoint, equal to the straight run
    finally:
        (repo / "params.yaml").write_text(original)
