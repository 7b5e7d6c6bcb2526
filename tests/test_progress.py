"""Progress bars only in a terminal; --quiet keeps warnings and errors only."""

import subprocess
import sys
from pathlib import Path

from unseg import progress as P

ROOT = Path(__file__).resolve().parents[1]


def test_bars_are_off_when_stderr_is_not_a_terminal_or_quiet(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv(P.QUIET_ENV, raising=False)
    assert not P.progress(range(3)).disable
    monkeypatch.setenv(P.QUIET_ENV, "1")
    assert P.progress(range(3)).disable
    monkeypatch.setenv(P.QUIET_ENV, "0")
    assert P.progress(range(3), disable=True).disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not P.progress(range(3)).disable  # off a terminal: log lines (next test)


def test_off_a_terminal_progress_is_plain_lines_at_most_every_interval(monkeypatch, capsys):
    monkeypatch.delenv(P.QUIET_ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    clock = iter(range(0, 10_000, 7))  # every tqdm time reading is 7 s later than the one before
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))
    for _ in P.progress(range(40), desc="train"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines) and all(line.startswith("train: ") for line in lines)
    assert lines[0].startswith("train: 0/40") and lines[-1].startswith("train: 40/40")
    # 40 steps 7 s apart = 280 s: a line every >= 30 s, so at most 280 / 30 + the first and the last
    assert 3 <= len(lines) <= 280 // 30 + 2


def test_a_piped_stage_log_has_no_redraws_and_quiet_keeps_errors_only(tmp_path):
    """A stage run as DVC runs it (stderr piped): plain lines only; --quiet: nothing but the error line."""
    cmd = [sys.executable, "-m", "stages.prepare", str(tmp_path / "prepared")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "\r" not in done.stderr and "[prepare] done in" in done.stderr
    quiet = subprocess.run([*cmd, "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""
    bad = subprocess.run(
        [*cmd, "--quiet", "--params", str(tmp_path / "none.yaml")], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no such params file" in bad.stderr
