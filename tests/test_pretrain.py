"""CrOC training on the harness: exact resume after an interruption, and DDP agreement."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unseg.pretrain.trainer as trainer

sys.path.insert(0, str(Path(__file__).parent))
import _croc_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    worker.run(tmp_path / "a", tmp_path / "straight.pt", alpha_s=1.0, steps=5, ckpt_every=2)

    calls = {"n": 0}
    real = trainer.croc_forward_loss

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "croc_forward_loss", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        worker.run(tmp_path / "b", tmp_path / "resumed.pt", alpha_s=1.0, steps=5, ckpt_every=2)
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt_1").glob("step_*.pt")) == ["step_00000002.pt"]
    monkeypatch.setattr(trainer, "croc_forward_loss", real)
    worker.run(tmp_path / "b", tmp_path / "resumed.pt", alpha_s=1.0, steps=5, ckpt_every=2)

    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # and training did change the weights
    torch.manual_seed(0)
    init = trainer.build_models("vit_tiny_patch16_224", 8, 2, trainer.CrOCTraining(steps=1, crop_size=32))
    assert not torch.equal(init.teacher.blocks[0].attn.qkv.weight, straight["blocks.0.attn.qkv.weight"])


def test_a_longer_schedule_stops_early_on_it(tmp_path):
    # croc.schedule_steps > croc.steps: the first 2 steps of a 4-step schedule, bit for bit, not a 2-step schedule
    worker.run(tmp_path / "a", tmp_path / "four.pt", steps=4, ckpt_every=2)
    worker.run(tmp_path / "b", tmp_path / "two_of_four.pt", steps=2, schedule_steps=4, ckpt_every=2)
    worker.run(tmp_path / "c", tmp_path / "two.pt", steps=2, ckpt_every=2)
    at_two = torch.load(tmp_path / "a" / "ckpt_1" / "step_00000002.pt")["parts"]["teacher"]
    early, short = torch.load(tmp_path / "two_of_four.pt"), torch.load(tmp_path / "two.pt")
    assert all(torch.equal(at_two[k], early[k]) for k in early)
    assert not all(torch.equal(short[k], early[k]) for k in early)


@pytest.mark.slow
@pytest.mark.parametrize("alpha_s", [0.0, 1.0])  # 1.0: the CrOC centroid term on (the DINO term alone at 0)
def test_two_process_gloo_ddp_agrees_with_one_process(tmp_path, alpha_s):
    worker.run(tmp_path, tmp_path / "single.pt", alpha_s=alpha_s)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).parent / "_croc_worker.py"),
        str(tmp_path),
        str(tmp_path / "ddp.pt"),
        str(alpha_s),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    init = trainer.build_models("vit_tiny_patch16_224", 8, 2, trainer.CrOCTraining(steps=1, crop_size=32))
    # the student takes the optimiser's steps; the EMA teacher moves by (1 - momentum) of that
    for name, start in (("student", init.student), ("", init.teacher)):
        suffix = f".{name}.pt" if name else ".pt"
        single, ddp = torch.load(tmp_path / f"single{suffix}"), torch.load(tmp_path / f"ddp{suffix}")
        worst = max(float((single[k] - ddp[k]).abs().max()) for k in single)
        assert worst < 1e-4, f"DDP and single-process {name or 'teacher'} weights differ by {worst}"
        # over the whole weight vector: the steps moved the student 1000x more than DDP differs from one process
        # (element-wise, AdamW's m / sqrt(v) turns float noise on a near-zero gradient into an lr-sized step)
        moved = sum(float((single[k] - v).square().sum()) for k, v in start.state_dict().items()) ** 0.5
        apart = sum(float((single[k] - ddp[k]).square().sum()) for k in single) ** 0.5
        assert name == "" or moved > 1000 * apart, f"training moved the student by {moved}, DDP differs by {apart}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_stage_resumes_on_rerun_to_the_uninterrupted_result(tmp_path, sig):
    """SIGKILL the pretrain_croc stage after a periodic checkpoint, or SIGINT / SIGTERM it before its first
    one (``ckpt_every`` beyond the steps): the rerun resumes and ends with identical weights."""
    import signal
    import time

    import yaml

    from unseg.data.index import prepare_generated

    index = prepare_generated(tmp_path / "data", 8, 0, 3, 2, 48, 48, seed=0)
    index.save(tmp_path / "data" / "index.json")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["backbone"]["depth"] = 2
    params["croc"].update(
        reuse=None,
        steps=12,
        batch_size=4,
        crop_size=32,
        out_dim=64,
        out_dim_c=32,
        head_hidden=32,
        head_bottleneck=16,
        ckpt_every=2 if sig == "SIGKILL" else 1000,
        drop_path=0.0,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def stage(name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stages.pretrain_croc",
            str(tmp_path / "data" / "index.json"),
            str(tmp_path / f"{name}.pth"),
            "--ckpt",
            str(tmp_path / f"ckpt_{name}"),
            "--log",
            str(tmp_path / f"{name}.csv"),
            "--params",
            str(tmp_path / "params.yaml"),
        ]

    subprocess.run(stage("straight"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(stage("killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240

    def steps_logged() -> int:
        log = tmp_path / "ckpt_killed" / "loss.csv"  # the per-step log (copied to --log at the end)
        return len(log.read_text().splitlines()) - 1 if log.exists() else 0

    while time.time() < deadline and not (
        list((tmp_path / "ckpt_killed").glob("step_00000004.pt")) if sig == "SIGKILL" else steps_logged() >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    stderr = proc.communicate()[1].decode()
    assert not (tmp_path / "killed.pth").exists(), "the stage finished before it could be killed"
    if sig != "SIGKILL":  # the step under way is finished and checkpointed, then the stage exits cleanly
        assert proc.returncode == 130 and "checkpoint written); rerun to resume" in stderr, stderr[-2000:]
        assert len(stderr.splitlines()) <= 4  # start, the first progress line, maybe one more, the interrupt
        assert "Traceback" not in stderr
        assert len(list((tmp_path / "ckpt_killed").glob("step_*.pt"))) == 1
    rerun = subprocess.run(stage("killed"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    first_logged = int((tmp_path / "killed.csv").read_text().splitlines()[1].split(",")[0])
    assert first_logged == 0  # the log kept the steps run before the kill
    straight = torch.load(tmp_path / "straight.pth", weights_only=False)["teacher"]
    resumed = torch.load(tmp_path / "killed.pth", weights_only=False)["teacher"]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert "CrOC steps run now" in rerun.stderr and "12 of 12" not in rerun.stderr  # it did not start over


def test_committed_tiny_checkpoint_matches_the_tiny_params_and_data(tmp_path):
    """checkpoints/croc_tiny.pth is reused only when its digest matches; this guards the tiny profile
    against a params or generator change that would leave the committed file stale."""
    import yaml

    from stages.prepare import generate
    from unseg.params import load_params
    from unseg.pretrain.reuse import reuse_checkpoint, training_digest

    params = load_params(ROOT / "params.yaml")
    d = params.data
    index = generate(d, tmp_path / "data")
    digest = training_digest(params.backbone, params.croc, index.split(d.train_split))
    warnings = []
    assert reuse_checkpoint(str(ROOT / params.croc.reuse), digest, tmp_path / "vit.pth", warnings.append)
    assert (tmp_path / "vit.pth").read_bytes() == (ROOT / params.croc.reuse).read_bytes()
    other = yaml.safe_load((ROOT / "params.yaml").read_text())
    other["croc"]["lr"] = 0.03
    from unseg.params import parse_params

    changed = parse_params(other)
    used = reuse_checkpoint(
        str(ROOT / params.croc.reuse),
        training_digest(changed.backbone, changed.croc, index.split(d.train_split)),
        tmp_path / "vit2.pth",
        warnings.append,
    )
    assert not used and not (tmp_path / "vit2.pth").exists()  # the stage trains instead
    assert len(warnings) == 1 and "trained with other params or data" in warnings[0]
