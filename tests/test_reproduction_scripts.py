"""tools/reproductions/: the arithmetic of the tables, and a smoke run of every study (``--tiny``).

The studies themselves (docs/reproductions.md) take minutes; ``--tiny`` runs the same code on a
fraction of an epoch with the first runs of each study, writes the markdown table to stdout and the
PNG to ``--out``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "reproductions"
sys.path.insert(0, str(TOOLS))

import _harness as H  # noqa: E402

SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py") if not p.name.startswith("_"))


def test_every_study_is_smoke_tested():
    assert set(SCRIPTS) == {"mb_lsr1_ablation.py", "rd_fig1.py", "smw_vs_hf.py", "soc_lenet.py", "sqn_toy.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_run_writes_table_and_figure(script, tmp_path):
    png = tmp_path / "fig.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(TOOLS / script), "--tiny", "--out", str(png)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    tables, cur = [], []  # blocks of consecutive table lines
    for ln in out.stdout.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            tables.append(cur)
            cur = []
    assert tables, out.stdout
    for lines in tables:
        assert len(lines) >= 3, lines  # header, rule, at least one row
        n = lines[0].count("|")
        assert all(ln.count("|") == n for ln in lines), f"ragged markdown table: {lines}"
        assert set(lines[1].replace("|", "")) <= {"-"}, lines[1]
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_spread_is_mean_and_half_range():
    assert H.mean_spread([0.46, 0.40, 0.52]) == pytest.approx((0.46, 0.06), rel=1e-12)
    assert H.mean_spread([2.0]) == (2.0, 0.0)
    m, s = H.mean_spread([1.0, math.nan, None, 3.0])  # non-finite and missing values are left out
    assert (m, s) == (2.0, 1.0)
    assert all(math.isnan(x) for x in H.mean_spread([math.nan]))


def test_fmt_ms():
    assert H.fmt_ms([0.1, 0.3], ".2g") == "0.2 ± 0.1"
    assert H.fmt_ms([7.0], ".3g") == "7"
    assert H.fmt_ms([None, math.nan]) == "–"


HIST = [{"epoch": 0.0, "time": 0.0, "step": 0, "train_loss": 2.3, "test_acc": 0.1},
        {"epoch": 0.5, "time": 1.0, "step": 5, "train_loss": 0.9, "test_acc": 0.8},
        {"epoch": 1.0, "time": 2.5, "step": 10, "train_loss": math.nan, "test_acc": 0.95},
        {"epoch": 1.5, "time": 4.0, "step": 15, "train_loss": 0.2, "test_acc": 0.93}]


def test_first_reaching_takes_the_first_record_at_or_past_the_threshold():
    assert H.first_reaching(HIST, "train_loss", 0.9) == 0.5  # ≤ includes equality
    assert H.first_reaching(HIST, "train_loss", 0.5) == 1.5  # the NaN record is skipped
    assert H.first_reaching(HIST, "train_loss", 0.5, x="time") == 4.0
    assert H.first_reaching(HIST, "test_acc", 0.95, "max", x="step") == 10
    assert H.first_reaching(HIST, "test_acc", 0.96, "max") is None
    assert H.first_reaching(HIST, "missing", 1.0) is None
    with pytest.raises(ValueError, match="mode"):
        H.first_reaching(HIST, "train_loss", 1.0, "least")


def test_per_epoch_and_count_reached():
    assert H.per_epoch(HIST, "time") == pytest.approx(4.0 / 1.5, rel=1e-15)
    rs = [H.RunResult("a", 0, HIST), H.RunResult("a", 1, HIST[:2])]
    assert H.count_reached(rs, "train_loss", 0.5) == "1 of 2"


def test_curve_on_grid_interpolates_and_stops_at_the_run_end():
    grid = numpy.array([0.0, 0.25, 0.5, 2.0])
    y = H.curve_on_grid(HIST[:2], "train_loss", grid)
    assert y[:3] == pytest.approx([2.3, 1.6, 0.9], rel=1e-14)
    assert math.isnan(y[3])


def test_markdown_table_refuses_ragged_rows():
    assert H.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n"
    with pytest.raises(ValueError, match="one cell per column"):
        H.markdown_table(["a", "b"], [[1]])


def test_rescaled_factor_matches_the_per_epoch_change():
    # 1.01 per step at 1000 steps/epoch changes λ by 1.01¹⁰⁰⁰ per epoch; so does the rescaled factor at 23.95
    f = H.rescaled_factor(1.01, 1000, 1437 / 60)
    assert f ** (1437 / 60) == pytest.approx(1.01 ** 1000, rel=1e-12)
    assert f == pytest.approx(1.5150715508092616, rel=1e-12)
    assert H.rescaled_factor(0.99, 10, 10) == 0.99
    with pytest.raises(ValueError, match="positive"):
        H.rescaled_factor(1.01, 0, 10)


def test_mb_lsr1_with_lssr1_values_is_lssr1(tmp_path):
    """The ablation's anchor: mb-lsr1 given L-SSR1-TR's five values ([MB] L218) runs lssr1-tr's trajectory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(TOOLS / "mb_lsr1_ablation.py"), "--tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |Δ final loss| = 0\n" in out.stdout, out.stdout
