"""The per-prompt files committed under docs/outcomes/ rebuild the tables docs/results.md prints (issue 28 item 7)."""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare_runs  # noqa: E402
import tradeoff  # noqa: E402

OUTCOMES = os.path.join(ROOT, "docs", "outcomes")
with open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8") as f:
    RESULTS = f.read()


@pytest.mark.parametrize("folder,cells", [
    ("teacher-flags-dev", ["56.3 % [46.0, 66.3]", "26.7 % [17.7, 37.0]; -29.7 pts, Holm p 0.0002",
                           "67.3 % [56.0, 77.7]; +0.0 pts, Holm p 1", "42.7 % [30.3, 55.0]; -13.7 pts, Holm p 0.0002",
                           "61.7 % [50.0, 72.0]; -5.7 pts, Holm p 0.012"]),
    ("teacher-flags-students-dev", ["99.3 % [97.7, 100.0]", "97.0 % [93.3, 99.7]; -2.3 pts, Holm p 0.2",
                                    "51.7 % [41.0, 62.0]; +3.3 pts, Holm p 0.2"])])
def test_committed_outcomes_give_the_published_table(folder, cells):
    rows, from_file, model = compare_runs.rebuild(os.path.join(OUTCOMES, folder))
    table = compare_runs.compare(rows, model, from_file).replace(" (n 100)", "")
    for cell in cells:   # each as rebuilt and as docs/results.md prints it
        assert cell in table and cell in RESULTS


def test_committed_curves_recompute(capsys, tmp_path):
    tradeoff.rebuild(os.path.join(OUTCOMES, "teacher-flags-dev", "tradeoff.json"), str(tmp_path / "curves.png"))
    out = capsys.readouterr().out
    assert "good-e3: mean over 3 seed(s): AUROC 0.441" in out and "good-x4: mean over 3 seed(s): AUROC 0.433" in out
    assert "AUROC -0.089 [-0.129, -0.048], p = 0.001, Holm p = 0.004" in out
    assert "0.441 (0.536, 0.397, 0.391); +0.089 [+0.048, +0.129], Holm p 0.004" in RESULTS
