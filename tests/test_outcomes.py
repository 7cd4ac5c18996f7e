"""The per-prompt files committed under docs/outcomes/ rebuild the tables docs/results.md prints (issue 28 item 7)."""
import json
import os
import re
import shutil
import sys
import textwrap

import pytest

import ablation
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
                                    "51.7 % [41.0, 62.0]; +3.3 pts, Holm p 0.2"]),
    ("teacher-e3-students-e10-dev", ["80.7 % [72.7, 88.3]", "59.7 % [49.0, 70.7]; -21.0 pts, Holm p 0.0001",
                                     "63.0 % [51.7, 73.0]; +0.7 pts, Holm p 0.87"]),
    ("teacher-e3-students-e10-test", ["25.1 % [19.4, 31.4]", "19.3 % [14.0, 24.6]; -5.9 pts, Holm p 0.0001",
                                      "28.7 % [23.5, 33.7]; +0.8 pts, Holm p 0.45"]),
    # the main table (README): the best configuration first, the student and the SFT baseline against it
    ("main-e10-dev", ["59.7 % [49.0, 70.7]", "80.7 % [72.7, 88.3]; +21.0 pts, Holm p 0.0002",
                      "67.7 % [58.7, 76.0]; +4.7 pts, Holm p 0.086"]),
    ("main-e10-test", ["19.3 % [14.0, 24.6]", "25.1 % [19.4, 31.4]; +5.9 pts, Holm p 0.0002",
                       "19.1 % [15.1, 23.3]; -0.2 pts, Holm p 0.91", "27.2 % [21.9, 32.9]; -1.5 pts, Holm p 0.44"]),
    ("main-e10-heldout", ["21.1 % [16.5, 25.6]", "27.5 % [22.7, 32.2]; +6.4 pts, Holm p 0.0001",
                          "23.1 % [17.9, 28.4]; +2.0 pts, Holm p 0.13"]),
    ("main-e10-attack", ["56.3 % [46.0, 65.7]", "59.0 % [45.7, 70.7]; +2.7 pts, Holm p 0.37",
                         "57.3 % [46.0, 68.0]; +1.0 pts, Holm p 0.69"]),
    # issue 13's λ / lr and the pair filter re-checked on dev (README quotes the first comparison)
    ("lam-lr-dev", ["96.7 % [93.0, 100.0]", "59.7 % [47.0, 72.0]; -37.0 pts, Holm p 0.00025",
                    "71.3 % [62.0, 80.0]; +24.3 pts, Holm p 0.00025", "90.0 % [84.0, 96.0]; -6.7 pts, Holm p 0.016",
                    "60.7 % [50.7, 70.0]; +13.7 pts, Holm p 0.00025", "76.3 % [67.3, 85.0]; -20.3 pts, Holm p 0.00025",
                    "62.7 % [52.7, 72.3]; +15.7 pts, Holm p 1.1e-05"]),
    ("pair-filter-dev", ["47.0 % [37.0, 56.7]", "96.7 % [93.0, 100.0]; +0.0 pts, Holm p 1",
                         "47.7 % [37.3, 57.0]; +0.7 pts, Holm p 1"]),
    ("lam-lr-test", ["12.0 % [5.3, 19.3]; -38.3 pts, Holm p 0.00025", "54.7 % [44.0, 65.0]; +40.3 pts, Holm p 0.00025"]),
    ("rerun-dev", ["97.0 % [93.0, 100.0]; +0.0 pts, Holm p 1", "47.0 % [37.0, 57.0]; -1.0 pts, Holm p 1"]),
    ("student-vs-teacher-e3-dev", ["26.7 % [17.7, 37.0]; -33.0 pts, Holm p 0.0001",
                                   "67.3 % [56.0, 77.7]; +4.3 pts, Holm p 0.091"])])
def test_committed_outcomes_give_the_published_table(folder, cells):
    rows, from_file, model = compare_runs.rebuild(os.path.join(OUTCOMES, folder))
    table = re.sub(r" \(n \d+\)", "", compare_runs.compare(rows, model, from_file))
    for cell in cells:   # each as rebuilt and as docs/results.md prints it
        assert cell in table and cell in RESULTS
    if folder.startswith("main-"):   # the per-seed rates, as printed under the table
        assert table.splitlines()[-1] in RESULTS
    if folder in ("lam-lr-dev", "pair-filter-dev", "rerun-dev", "lam-lr-test"):   # printed whole: every row with its label
        printed = re.sub(r" \(n \d+\)", "", RESULTS).splitlines()
        for line in table.splitlines():
            assert not line.startswith(("|", "Per seed")) or line in printed
    if folder == "lam-lr-dev":   # README rounds the old defaults' differences
        hs, over = re.findall(r"([+-]\d+\.\d) pts, Holm p (\S+?) ?[|(]",
                              next(l for l in table.splitlines() if l.startswith("| lam1-lr3e-5 |")))
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = " ".join(f.read().split())
        assert (f"{-float(hs[0]):.0f} points fewer MaliciousInstruct requests at {float(over[0]):.0f} points more "
                f"PHTest-dev over-refusal (Holm p {hs[1]} each") in readme and hs[1] == over[1]


@pytest.mark.parametrize("curve_file,printed,published", [
    ("teacher-flags-dev", ["good-e3: mean over 3 seed(s): AUROC 0.441", "good-x4: mean over 3 seed(s): AUROC 0.433",
                           "AUROC -0.089 [-0.129, -0.048], p = 0.001, Holm p = 0.004"],
     "0.441 (0.536, 0.397, 0.391); +0.089 [+0.048, +0.129], Holm p 0.004"),
    ("teacher-e3-students-e10-test", ["e3-e10: mean over 3 seed(s): AUROC 0.851, HS 44.7%",
                                      "default-e10: mean over 3 seed(s): AUROC 0.814, HS 56.3%",
                                      "AUROC -0.037 [-0.061, -0.012], p = 0.002, Holm p = 0.004; HS +0.117 [-0.003, +0.180]"],
     "0.851 (0.844, 0.853, 0.857); +0.037 [+0.012, +0.061], Holm p 0.004"),
    # the matched point: as rebuilt (default − e3, fractions) and as published (e3 − default, points)
    ("teacher-e3-students-e10-test", ["HS +0.117 [-0.003, +0.180], p = 0.063, Holm p = 0.063"],
     "44.7 % (42, 46, 46); −11.7 [−18.0, +0.3], Holm p 0.063"),
    # the main table's curves: the best row first, Holm over 4 tests
    ("main-e10-test", ["sft-e10: mean over 3 seed(s): AUROC 0.863, HS 43.3%",
                       "e3-e10 - default-e10: AUROC +0.037 [+0.012, +0.061], p = 0.002, Holm p = 0.008; "
                       "HS -0.117 [-0.180, +0.003], p = 0.063, Holm p = 0.19",
                       "e3-e10 - sft-e10: AUROC -0.012 [-0.034, +0.008], p = 0.24, Holm p = 0.49"],
     "0.814 (0.861, 0.766, 0.815); −0.037 [−0.061, −0.012], Holm p 0.008")])
def test_committed_curves_recompute(curve_file, printed, published, capsys, tmp_path):
    tradeoff.rebuild(os.path.join(OUTCOMES, curve_file, "tradeoff.json"), str(tmp_path / "curves.png"))
    out = capsys.readouterr().out
    for line in printed:   # as rebuilt from the saved scores
        assert line in out
    assert published in RESULTS


def test_the_lam_lr_test_curves_print_as_their_file_gives_them(tmp_path):
    """docs/results.md's curve table of issue 13's settings (row − default) from tradeoff.json, which
    rebuild first recomputes from its per-prompt scores."""
    path = os.path.join(OUTCOMES, "lam-lr-test", "tradeoff.json")
    tradeoff.rebuild(path, str(tmp_path / "curves.png"))
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    against = {c["b"]: c for c in saved["comparisons"] if c["a"] == "default"}

    def cell(name, row, key, scale, digits, seed_digits, unit):
        mean = f"{row[key] * scale:.{digits}f}{unit} (" + ", ".join(f"{m[key] * scale:.{seed_digits}f}" for m in row["seeds"]) + ")"
        if name == "default":
            return mean
        t = against[name]["auroc" if key == "auroc" else "hs"]   # default − row: printed the other way round
        lo, hi = -t["ci"][1] * scale, -t["ci"][0] * scale
        return f"{mean}; {-t['difference'] * scale:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}], Holm p {t['p_holm']:.2g}"

    for name, row in saved["models"].items():
        line = (f"| {name} | {len(row['seeds'])} | {cell(name, row, 'auroc', 1, 3, 3, '')} | "
                f"{cell(name, row, 'hs_at_target', 100, 1, 0, ' %')} |")
        assert line in RESULTS, line
    worst = against["lam1-lr3e-5"]["hs"]
    assert (f"answers {-worst['difference'] * 100:.1f} points more harmful prompts at ≤ 10 % over-refusal, "
            f"[{-worst['ci'][1] * 100:+.1f}, {-worst['ci'][0] * 100:+.1f}], p {worst['p']:.2g}, Holm p {worst['p_holm']:.2g}"
            ) in " ".join(RESULTS.split())


QUICK_GRID = os.path.join(OUTCOMES, "ablation-quick")


def test_the_committed_quick_grid_rebuilds_from_its_per_prompt_files(tmp_path):
    """ablation.md / ablation.json were written from the cell folders; the compact per-prompt files
    committed beside them must give every number again, alone (issue 28 item 7)."""
    shutil.copytree(os.path.join(QUICK_GRID, "outcomes"), tmp_path / "outcomes")
    ablation.grid(str(tmp_path), "quick", "smollm2-135m", [0, 1, 2], 1, "cpu", run_missing=False)
    with open(os.path.join(QUICK_GRID, "ablation.json"), encoding="utf-8") as f:
        committed = json.load(f)
    with open(tmp_path / "ablation.json", encoding="utf-8") as f:
        rebuilt = json.load(f)
    for key in ("stats", "dev_stats", "lat_pick", "combination"):
        assert rebuilt[key] == committed[key], key
    with open(os.path.join(QUICK_GRID, "ablation.md"), encoding="utf-8") as f:
        assert (tmp_path / "ablation.md").read_text(encoding="utf-8") == f.read()
    # the per-seed rates again by plain counting, and each degenerate answer counted against the model
    checked = 0
    for row, st in committed["stats"].items():
        cells = dict(ablation.row_cells(str(tmp_path), "smollm2-135m", row, [0, 1, 2], committed["lat_pick"]))
        for key in ("hs", "xstest", "attack_before", "attack_p0", "attack_p0.1", "incontext"):
            # a one-model row's evaluations are its first cell's; its attacks, one cell a seed
            for i, seed in enumerate(st["seeds"][:len(st[key + "_per_seed"])]):
                with open(os.path.join(QUICK_GRID, "outcomes", cells[seed] + ".json"), encoding="utf-8") as f:
                    o = json.load(f)
                flags = o[key]   # None: the attack diverged
                want = None if flags is None else pytest.approx(100 * flags.count(True) / len(flags))
                assert st[key + "_per_seed"][i] == want
                checked += 1
                if key in ("hs", "xstest"):
                    assert all(f for f, d in zip(o[key], o[key + "_degenerate"]) if d)
    assert checked >= 6 * len(committed["stats"])


def test_the_full_size_bounds_give_the_published_table(capsys):
    """docs/results.md's re-read of the full-size tables: its command, run as printed, gives each
    cell of the table below it (difference, Holm-corrected bound, and a verdict only under 0.05)."""
    section = RESULTS[RESULTS.index("### Full size, re-read with a bound"):]
    command = re.search(r"<<'PY'\n(.*?)\n    PY\n", section, re.S).group(1)
    exec(textwrap.dedent(command), {})
    computed = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"(.+?)\s{2,}(HS|XSTest|after p=0\.1|after p=0)\s+([+-][\d.]+) pts  p <= \S+  Holm <= (\S+)", line)
        computed[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)))
    names = {"base − student (2 epochs)": "base vs student", "good teacher − student": "good teacher vs student",
             "SFT baseline − student": "SFT baseline vs student", "student 10 epochs − 2 epochs": "student 10 epochs vs 2",
             "SFT 10 epochs − student 10 epochs": "SFT 10 epochs vs student 10 epochs"}
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith(tuple(f"| {n} |" for n in names))]
    assert len(rows) == 5
    for row in rows:
        for key, cell in zip(("HS", "XSTest", "after p=0", "after p=0.1"), row[1:]):
            difference, holm = computed[(names[row[0].strip("| ")], key)]
            printed = re.match(r"([+−-][\d.]+), (?:Holm )?≤ ([\d.e-]+)( \((better|worse)\))?", cell.strip(" |"))
            assert float(printed.group(1).replace("−", "-")) == difference
            digits = len(printed.group(2).split("e")[0].replace(".", "").lstrip("0"))
            assert float(f"{holm:.{digits}g}") == float(printed.group(2)), (row[0], key)
            verdict = None if holm >= 0.05 else "better" if difference < 0 else "worse"
            assert printed.group(4) == verdict, (row[0], key)


def test_docs_print_the_quick_grid_as_its_committed_files_give_it():
    """docs/results.md prints the quick grid's tables row for row as ablation.md (rebuilt from the per-prompt
    files by the test above), and README's summary quotes its rates, intervals and Holm p-values."""
    with open(os.path.join(QUICK_GRID, "ablation.md"), encoding="utf-8") as f:
        rows = [line for line in f.read().splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    assert len(rows) > 3 * 14 and [r for r in rows if r not in RESULTS] == []
    with open(os.path.join(QUICK_GRID, "ablation.json"), encoding="utf-8") as f:
        grid = json.load(f)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = {line.split(" | ")[0][2:]: line for line in f.read().splitlines() if line.startswith("| ")}
    for row, st in grid["stats"].items():
        line = readme[ablation.row_label(row, st, grid["lat_pick"], grid["combination"])]
        for key in ("hs", "xstest", "attack_p0"):
            lo, hi = st[key + "_ci"]
            assert f"{st[key]:.1f} % [{lo:.1f}, {hi:.1f}]" in line, (row, key)
            test = st["paired"].get(key) if st.get("paired") else None
            if test:
                assert f"Holm p {test['p_holm']:.2g}" in line, (row, key)
        assert f"{st['curve']['auroc']:.3f} · {st['curve']['hs_at_target']:.1f} %" in line, row
