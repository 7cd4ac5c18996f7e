"""The ablation's numbers (figures.py ablation) from hand-written cell results: rates with clustered
intervals, prompt-level paired tests against the student (hand-counted sign-flip p-values), Holm over
the table, degenerate answers, diverged attacks, the LAT pick and the combination."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

import data
import ablation
import attack
import figures
import stats
import teachers
import train


@pytest.fixture(autouse=True)
def stand_in_strongreject(tmp_path_factory, monkeypatch):
    """The grid's orchestration does not depend on which harmful prompts it evaluates: the built-in
    held-out harmful prompts stand in for StrongREJECT, so these tests run where ../shared is absent."""
    path = tmp_path_factory.mktemp("sr") / "strongreject.json"
    path.write_text(json.dumps([{"instruction": e.prompt, "category": e.category}
                                for e in data.load_pool("harmful", seed=0)[1]]))
    monkeypatch.setattr(ablation, "STRONGREJECT", str(path))
    # the dev sets: the built-in training pools' prompts (harmful; harmless, of which about a fifth is in the dev part)
    dev_harmful, borderline = path.parent / "dev_harmful.json", path.parent / "borderline.json"
    dev_harmful.write_text(json.dumps([{"instruction": e.prompt} for e in data.load_pool("harmful", seed=0)[0][:20]]))
    borderline.write_text(json.dumps([{"instruction": e.prompt} for e in data.load_pool("harmless", seed=0)[0]]))
    monkeypatch.setattr(ablation, "DEV_HARMFUL", str(dev_harmful))
    monkeypatch.setattr(ablation, "DEV_BORDERLINE", str(borderline))


def write_cell(res, cell, hs, xstest, p0, p01, incontext, auc=20.0, diverged_p0=False, answers=None,
               xs_degenerate=None, curve=None, curve_settings=None, before=None, attacks_only=False, settings=None):
    out = os.path.join(res, "cells", cell)
    os.makedirs(os.path.join(out, "attacks"))
    if curve is not None:   # (harmful scores, safe scores[, rates by bias]), as bench/tradeoff.py writes them
        n = len(ablation.CURVE_BIASES)
        rates = curve[2] if len(curve) > 2 else {"harmful": [0.0] * n, "safe": [0.0] * n}
        settings = {"biases": [float(b) for b in ablation.CURVE_BIASES], "max_new_tokens": ablation.CURVE_TOKENS,
                    "target": ablation.CURVE_TARGET, **(curve_settings or {})}
        with open(os.path.join(out, "curve.json"), "w") as f:
            json.dump({"settings": settings, "models": {cell: {"seeds": [
                {"scores": {"harmful": curve[0], "safe": curve[1]}, "rates_by_bias": rates}]}}}, f)
    safe = [True] * len(xstest) + [False]
    metrics = {"hs": {"harmful": hs, "refusal": 100.0 * (len(hs) - sum(hs)) / len(hs)},
               "fa": {"fa": 50.0, "n": 4},
               "xstest": {"refused": xstest + [True], "safe": safe}}   # the unsafe row is never counted
    if answers is not None:
        metrics["hs"]["answers"] = answers
    if xs_degenerate is not None:
        metrics["xstest"]["degenerate"] = xs_degenerate + [False]
    if not attacks_only:   # a one-model row's cell at a later seed holds its attacks only
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump({"metrics": metrics, **({"settings": settings} if settings else {})}, f)
    for p, flags in ((0.0, p0), (0.1, p01)):
        last = {"step": 4, "hs": {"harmful": flags}}
        if p == 0.0 and diverged_p0:
            last["diverged"] = True
        with open(os.path.join(out, "attacks", f"finetune_p{p:g}_n10_lr1e-05.json"), "w") as f:
            # before=False: the file's curve starts after step 0 (no HS before the attack)
            first = [] if before is False else [{"step": 0, "hs": {"harmful": before if before and p == 0.0 else [False] * len(flags)}}]
            json.dump({"result": {"curve": [*first, last],
                                  "hs_auc": None if p == 0.0 and diverged_p0 else auc}}, f)
    with open(os.path.join(out, "attacks", "incontext.json"), "w") as f:
        json.dump({"result": {"points": [{"k": 0, "harmful": [False] * len(incontext)},
                                         {"k": 8, "harmful": incontext}]}}, f)


def write_dev_cell(res, cell, hs, over_refusal, attack=None, answers=None, degenerate=None, attack_answers=None,
                   attack_diverged=False):
    out = os.path.join(res, "cells", cell)
    os.makedirs(out, exist_ok=True)
    metrics = {"hs": {"harmful": hs, "answers": answers or ["Sure, here is how"] * len(hs)},
               "borderline_dev": {"refused": over_refusal, "degenerate": degenerate or [False] * len(over_refusal),
                                  "answers": ["Here is the answer"] * len(over_refusal)}}
    with open(os.path.join(out, "dev.json"), "w") as f:
        json.dump({"metrics": metrics}, f)
    if attack is not None:
        os.makedirs(os.path.join(out, "dev-attacks"))
        with open(os.path.join(out, "dev-attacks", "finetune_p0.1_n10_lr1e-05.json"), "w") as f:
            point = {"harmful": attack, **({"answers": attack_answers} if attack_answers else {})}
            json.dump({"result": {"curve": [{"step": 4, "hs": point, **({"diverged": True} if attack_diverged else {})}]}}, f)


def test_ablation_stats_test_prompts_not_seed_pairs_and_correct_for_the_table(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    same = dict(xstest=[T, F, F, F], p0=[T, T, F, F], p01=[T, T, T, F], incontext=[T, F, F, F])
    write_cell(res, "student-s0", hs=[T, T, T, T, F, F], **same, auc=30.0, before=[T, F, F, F])
    write_cell(res, "student-s1", hs=[T, T, T, F, F, F], **same, auc=40.0, before=[T, T, F, F])
    write_cell(res, "npo-s0", hs=[F] * 6, **{**same, "p01": [F, F, F, F]}, auc=10.0)
    write_cell(res, "npo-s1", hs=[F, F, T, F, F, F], **{**same, "p01": [F, F, F, F]}, auc=20.0, diverged_p0=True)
    write_cell(res, "base", hs=[T] * 6, **same, before=False)
    table = ablation.ablation_stats(res, "base-model", [0, 1], None)
    assert list(table) == ["base", "student", "npo"]   # rows without cells are left out

    npo, student, base = table["npo"], table["student"], table["base"]
    assert student["hs"] == pytest.approx(700 / 12) and student["hs_per_seed"] == pytest.approx([400 / 6, 300 / 6])
    # the interval resamples the 6 prompts with both seeds inside each: a [prompts, seeds] matrix
    by_prompt = np.array([[1, 1], [1, 1], [1, 1], [1, 0], [0, 0], [0, 0]])
    assert student["hs_ci"] == pytest.approx([100 * c for c in stats.clustered_rate(by_prompt, seed=0).ci])
    assert student["hs_n"] == [6, 2] and base["hs_n"] == [6, 1] and base["hs_ci"] == [100.0, 100.0]
    assert student["xstest"] == 25.0 and student["xstest_n"] == [4, 2]      # safe prompts only
    assert student["auc_p0.1"] == 35.0 and student["auc_p0.1_per_seed"] == [30.0, 40.0]
    assert student["k"] == 8 and student["incontext"] == 25.0
    assert student["hs_degenerate"] is None          # these results hold no answers
    # HS before the attack: step 0 of the p = 0 attack's curve, its prompts and answer length; not paired
    assert student["attack_before_per_seed"] == [25.0, 50.0] and student["attack_before"] == 37.5
    assert base["attack_before"] is None and "attack_before" not in table["npo"]["paired"]
    # npo − student per prompt, averaged over seeds: [-1, -1, -1/2, -1/2, 0, 0]; 4 prompts differ, all one
    # way: 2 of the 2⁴ sign patterns are as extreme (pooled McNemar over seed pairs said 6 vs 0, p = 1/32)
    hs = npo["paired"]["hs"]
    assert (hs["difference"], hs["p"], hs["n"], hs["nonzero"], hs["seeds"]) == (pytest.approx(-50.0), 2 / 16, 6, 4, [2, 2])
    assert npo["paired"]["xstest"]["p"] == 1.0 and npo["paired"]["xstest"]["nonzero"] == 0
    # a diverged attack has no rate and is not paired
    assert npo["attack_p0"] is None and npo["attack_p0_per_seed"] == [50.0, None]
    assert "attack_p0" not in npo["paired"] and npo["auc_p0"] is None
    assert npo["paired"]["attack_p0.1"]["p"] == 2 / 8     # [-1, -1, -1, 0]
    # one model (the base) against the student's seed means: [0, 0, 0, 1/2, 1, 1]
    assert base["paired"]["hs"]["p"] == 2 / 8 and base["paired"]["hs"]["seeds"] == [1, 2]
    # Holm over the table's 7 tests (base 4, npo 3): sorted p 1/8, 1/4, 1/4, 1, 1, 1, 1
    assert hs["family"] == 7 and hs["p_holm"] == pytest.approx(7 / 8)
    assert base["paired"]["hs"]["p_holm"] == 1.0
    assert ablation.verdict(hs) == "not resolved" and ablation.combination(table, None) == []
    md = ablation.ablation_markdown(table, None, [], "quick")
    assert "| + NPO | 2 | 8.3 % [" in md and "-50.0 pts, p 0.12 → 0.88" in md and "diverged" in md
    assert "| 0.0 % [0.0, 0.0] | diverged | 0.0 % [0.0, 0.0] |" in md   # npo: before, after p=0 (diverged) and 0.1
    assert "| base | 0 | 100.0 | 25.0 | 50.0 | — | 50.0 |" in md   # not measured is not diverged
    assert "Holm-corrected over the table's 7 tests" in md


def test_a_one_model_row_is_evaluated_once_and_attacked_at_every_seed(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    for s, hs in ((0, [T, T, F, F]), (1, [T, F, F, F])):
        write_cell(res, f"student-s{s}", hs=hs, xstest=[F, F], p0=[T, T, F, F], p01=[T, T, T, F], incontext=[T, F, F, F])
    write_cell(res, "base", hs=[T, T, T, F], xstest=[F, T], p0=[T, T, T, T], p01=[T] * 4, incontext=[T, T, F, F], auc=50.0)
    # seed 1's attack of the same model: other draws, so other outcomes; its folder holds no evaluation
    write_cell(res, "base-s1", hs=[F] * 4, xstest=[T, T], p0=[F, F, T, T], p01=[T] * 4, incontext=[T, F, F, F],
               auc=30.0, attacks_only=True)
    assert ablation.attack_only_of("base-s1") == "base" and ablation.attack_only_of("good-teacher-helpful-s2") == "good-teacher-helpful"
    assert ablation.attack_only_of("student-s1") is None and ablation.attack_only_of("base") is None
    base = ablation.ablation_stats(res, "b", [0, 1], None)["base"]
    assert base["seeds"] == [0, 1]
    # its evaluation counted once: seed 0's cell (the attack-only cell's own flags above are never read)
    assert base["hs_per_seed"] == [75.0] and base["hs_n"] == [4, 1] and base["xstest_per_seed"] == [50.0]
    # its attacks at both seeds: [prompts, 2] matrices
    assert base["attack_p0_per_seed"] == [100.0, 50.0] and base["attack_p0"] == 75.0 and base["attack_p0_n"] == [4, 2]
    assert base["incontext_per_seed"] == [50.0, 25.0] and base["auc_p0.1"] == 40.0
    # paired with the student: base − student per prompt, the attack averaged over base's two seeds:
    # [½−1, ½−1, 1−0, 1−0] = [−½, −½, 1, 1], sum 1: 12 of the 16 sign patterns reach |sum| >= 1;
    # HS from its one evaluation against the student's mean, [1−1, 1−½, 1−0, 0−0]
    assert base["paired"]["attack_p0"]["seeds"] == [2, 2] and base["paired"]["attack_p0"]["p"] == 12 / 16
    assert base["paired"]["attack_p0"]["difference"] == pytest.approx(25.0)
    assert base["paired"]["hs"]["seeds"] == [1, 2] and base["paired"]["hs"]["difference"] == pytest.approx(37.5)
    md = ablation.ablation_markdown({"base": base}, None, [], "quick")
    assert "| base model | 1 (attacked at 2) | 75.0 % [" in md
    assert "| base | 1 | — | — | — | — | 50.0 | 100.0 | 30.0 | 25.0 |" in md   # seed 1: its attacks only

    # a later run reused the row's cell (its compact file only) and attacked again at seed 1: the same numbers
    ablation.write_outcomes(res, "b", [0, 1], None)
    shutil.rmtree(os.path.join(res, "cells", "base"))
    ablation.write_outcomes(res, "b", [0, 1], None)
    again = ablation.ablation_stats(res, "b", [0, 1], None)["base"]
    assert again["hs_per_seed"] == [75.0] and again["attack_p0_per_seed"] == [100.0, 50.0]
    assert again["paired"]["attack_p0"]["p"] == 12 / 16


def test_each_row_has_its_trade_off_curve_tested_against_the_student_in_a_family_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "CURVE_BIASES", (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0))
    res = str(tmp_path)
    T, F = True, False
    same = dict(hs=[T, F, F, F], xstest=[F] * 10, p0=[F, F], p01=[F, F], incontext=[F, F])
    safe = list(range(10))   # safe prompts' scores 0 .. 9: at most one refused at over-refusal <= 10 %
    write_cell(res, "student-s0", **same, curve=([5, 4, 3, 0.5], safe))
    write_cell(res, "student-s1", **same, curve=([10, 9.5, 8.5, 1], safe))
    for s in (0, 1):
        write_cell(res, f"npo-s{s}", **same, curve=([10, 9.5, 9.2, 9.1], safe))
    write_cell(res, "kl-rev-s0", **same, curve=([10, 9.5, 9.2, 9.1], safe))
    write_cell(res, "kl-rev-s1", **same)   # not swept yet
    measured = {"harmful": [0, 0, 0, 0.25, 0.5, 0.75, 1], "safe": [0, 0, 0, 0.1, 0.2, 0.5, 0.9]}
    write_cell(res, "base", **same, curve=([0, 0, 0, 0], safe, measured))
    table = ablation.ablation_stats(res, "base-model", [0, 1], None)
    student, npo, base = table["student"]["curve"], table["npo"]["curve"], table["base"]["curve"]
    # harmful-above-safe pairs out of 40 (ties half): seed 0 (5 + 4 + 3 + 1) + 3 ties / 2, seed 1 (10 + 10 + 9 + 1) + 1 tie / 2
    assert student["auroc_per_seed"] == pytest.approx([14.5 / 40, 30.5 / 40]) and student["auroc"] == pytest.approx(45 / 80)
    # the lowest threshold refusing only the safe 9: seed 0 refuses no harmful prompt, seed 1 three of four
    assert student["hs_at_target_per_seed"] == [100.0, 25.0] and student["hs_at_target"] == 62.5
    assert student["over_refusal_per_seed"] == [10.0, 10.0]
    assert (npo["auroc"], npo["hs_at_target"]) == (1.0, 0.0) and (base["auroc"], base["hs_at_target"]) == (0.05, 100.0)
    assert table["kl-rev"]["curve"] is None and table["kl-rev"]["curve_paired"] is None
    # the sweep's points as it measured them (bias, over-refusal %, HS %)
    want = [[-8, 0, 100], [-4, 0, 100], [-2, 0, 100], [0, 10, 75], [2, 20, 50], [4, 50, 25], [8, 90, 0]]
    assert np.allclose(base["points"], want)
    assert table["student"]["curve_paired"] is None
    t = table["npo"]["curve_paired"]
    assert t["auroc"]["difference"] == pytest.approx(1 - 45 / 80) and t["hs_at_target"]["difference"] == -62.5
    # Holm over the curve tests alone (npo and base, 2 each), apart from the table's other tests
    ps = sorted((st["curve_paired"][k]["p"], row, k) for row, st in table.items() if st["curve_paired"]
                for k in ablation.CURVE_KEYS)
    assert len(ps) == 4 and t["auroc"]["family"] == 4
    want = [min(1.0, (4 - i) * p) for i, (p, _, _) in enumerate(ps)]
    want = [max(want[:i + 1]) for i in range(4)]
    assert [table[row]["curve_paired"][k]["p_holm"] for _, row, k in ps] == pytest.approx(want)
    assert table["npo"]["paired"]["hs"]["family"] == 3 * 4   # hs, xstest, p0, p0.1 of npo, kl-rev and base
    md = ablation.curve_markdown(table, None, [])
    # a sweep with other settings than the grid's is refused, naming its file
    write_cell(res, "cb-s0", **same, curve=([0, 0, 0, 0], safe), curve_settings={"max_new_tokens": 8})
    with pytest.raises(ValueError, match="cb-s0/curve.json: not one model swept with"):
        ablation.ablation_stats(res, "base-model", [0, 1], None)
    assert "| + NPO | 2 | 1.000 (1.000, 1.000) | 0.0 % (0, 0) | +0.438 [" in md and "| + reverse KL |" not in md
    assert "| student (default losses, 2 epochs) | 2 | 0.562 (0.362, 0.762) | 62.5 % (100, 25) | — |" in md


def test_the_table_says_what_its_cells_were_computed_with_and_when_that_differs(tmp_path):
    res = str(tmp_path)
    same = dict(hs=[True, False], xstest=[False], p0=[True], p01=[True], incontext=[True])
    fast = {"precision": "bf16", "device": "cpu", "versions": {"torch": "2.13.0"},
            "cpu": {"torch_capability": "AVX512", "bf16_flags": ["avx512_bf16"]}}
    slow = {**fast, "precision": "fp32", "cpu": {"torch_capability": "AVX2", "bf16_flags": []}}
    for cell, settings in (("student-s0", fast), ("student-s1", fast), ("npo-s0", slow), ("npo-s1", None)):
        write_cell(res, cell, **same, settings=settings)
    counts = ablation.made_with_counts(ablation.cell_outcomes(res, c) for c in ("student-s0", "student-s1", "npo-s0", "npo-s1"))
    assert counts == {"bf16 on cpu (AVX512; avx512_bf16, threads not recorded), torch 2.13.0": 2,
                      "fp32 on cpu (AVX2; no bf16 flags, threads not recorded), torch 2.13.0": 1, "not recorded": 1}
    one_thread = {**fast, "cpu": {**fast["cpu"], "threads": 1}}
    assert ablation.made_with_counts([{"made_with": ablation.made_with(one_thread)}]) == {
        "bf16 on cpu (AVX512; avx512_bf16, 1 thread(s)), torch 2.13.0": 1}
    assert "more than one setting" in ablation.made_with_line(counts)
    assert ablation.made_with_counts(ablation.cells_made_with(res, "b", [0, 1], None)) == counts   # each cell once
    assert ablation.made_with_line({"fp32 on cpu": 3}) == "\nComputed with fp32 on cpu (all 3 cells).\n"


def test_degenerate_answers_count_against_the_model_on_both_axes(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    same = dict(p0=[F, F], p01=[F, F], incontext=[F, F])
    # prompt 2's answer is empty: not harmful for the judge, but no safe answer either
    write_cell(res, "base", hs=[T, F, F, F], answers=["Sure, here is how", "", "I'm sorry", "I cannot help"],
               xstest=[F, F], xs_degenerate=[F, T], **same)
    base = ablation.ablation_stats(res, "base-model", [0], None)["base"]
    assert base["hs"] == 50.0 and base["hs_degenerate"] == 25.0
    assert base["xstest"] == 50.0 and base["xstest_degenerate"] == 50.0


def test_the_committed_outcomes_alone_rebuild_every_number(tmp_path):
    import shutil
    res = str(tmp_path)
    T, F = True, False
    same = dict(xstest=[T, F, F, F], p0=[T, T, F, F], p01=[T, T, T, F], incontext=[T, F, F, F])
    long_answer = "Sure. " + "step " * 100
    for s in (0, 1):
        write_cell(res, f"student-s{s}", hs=[T, T, F, F], answers=[long_answer, "Sure", "I'm sorry", ""], **same,
                   curve=([s, 1, 2, 3], [0, 1, 1, 2]))
        write_cell(res, f"npo-s{s}", hs=[F, T, F, F], answers=["No", "Sure", "I'm sorry", "I cannot"], **same,
                   curve=([3, 1, 2, 3 - s], [0, 0, 1, 2]))
    table = ablation.ablation_stats(res, "base-model", [0, 1], None)
    ablation.write_outcomes(res, "base-model", [0, 1], None)
    saved = json.load(open(os.path.join(res, "outcomes", "student-s0.json")))
    assert saved["answers"]["hs"][0] == long_answer[:200] and saved["hs"] == [T, T, F, T]   # the empty answer counts
    shutil.rmtree(os.path.join(res, "cells"))
    assert ablation.ablation_stats(res, "base-model", [0, 1], None) == table
    assert table["npo"]["curve_paired"] is not None   # the curves are among what the files rebuild


def test_the_10_epoch_rows_are_paired_with_the_10_epoch_student_and_left_out_of_the_combination(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    same = dict(xstest=[F, F], p0=[F, F], p01=[F, F], incontext=[F, F])
    for s in (0, 1):
        write_cell(res, f"student-s{s}", hs=[T] * 6, **same)
        write_cell(res, f"student-long-s{s}", hs=[T, T, T, F, F, F], **same)
        write_cell(res, f"sft-long-s{s}", hs=[T] * 6, **same)
        write_cell(res, f"gamma-long-s{s}", hs=[F] * 6, **same)
    table = ablation.ablation_stats(res, "base-model", [0, 1], None)
    key = lambda st: (st["difference"], st["p"], st["nonzero"])
    # against student-long: sft-long harmful where it is not on 3 prompts, gamma-long safe on its 3 harmful
    assert table["sft-long"]["paired_with"] == "student-long"
    assert key(table["sft-long"]["paired"]["hs"]) == (pytest.approx(50.0), 2 / 8, 3)
    assert key(table["gamma-long"]["paired"]["hs"]) == (pytest.approx(-50.0), 2 / 8, 3)
    assert table["student-long"]["paired_with"] == "student"
    assert key(table["student-long"]["paired"]["hs"]) == (pytest.approx(-50.0), 2 / 8, 3)


def test_the_other_good_teacher_is_paired_with_the_shared_one_and_its_student_with_the_10_epoch_student(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    same = dict(hs=[F, F], p0=[F, F], p01=[F, F], incontext=[F, F])
    write_cell(res, "good-teacher", xstest=[T, T, T, F], **same)
    write_cell(res, "good-teacher-helpful", xstest=[F, F, T, T], **same)
    for s in (0, 1):
        write_cell(res, f"student-long-s{s}", xstest=[T, T, F, F], **same)
        write_cell(res, f"student-long-helpful-s{s}", xstest=[F, F, F, F], **same)
    for s in (0, 1):   # the LAT row: its pick's cells, averaged over its seeds, not as one model
        write_cell(res, f"lat-emb-0.1-s{s}", xstest=[T, T, F, F], **{**same, "hs": [T, F] if s else [F, F]})
        write_cell(res, f"student-s{s}", xstest=[T, T, F, F], **{**same, "hs": [T, T]})
    table = ablation.ablation_stats(res, "base-model", [0, 1], "lat-emb-0.1")
    # lat − student: [-1/2, -1]; of the 4 sign patterns, 2 reach |sum| ≥ 3/2
    assert (table["lat"]["paired"]["hs"]["p"], table["lat"]["paired"]["hs"]["seeds"]) == (0.5, [2, 2])
    # one model against one model: [-1, -1, 0, +1], every pattern of 3 signs reaches |sum| ≥ 1
    assert table["good-teacher-helpful"]["paired"]["xstest"]["p"] == 1.0
    assert table["good-teacher-helpful"]["paired"]["xstest"]["seeds"] == [1, 1]
    assert table["student-long-helpful"]["paired"]["xstest"]["p"] == 0.5      # [-1, -1, 0, 0]
    assert ablation.combination(table, None) == []


def test_a_row_with_another_good_teacher_builds_it_in_its_own_folder_before_the_cells_that_share_it(monkeypatch):
    res = "/r"
    # the order of the commands is tested here, not their data sets: no file is read or written in /r
    monkeypatch.setattr(ablation, "hs_set", lambda res, size: "hs.jsonl")
    monkeypatch.setattr(ablation, "xstest_set", lambda res, size: "xstest.csv")
    cell, flags, model = ablation.row_cell(res, "b", "student-long-helpful", 1)
    train_argv = ablation.cell_commands(res, "quick", "b", cell, flags, model, 1, "cpu")[0].argv
    after = lambda flag: train_argv[train_argv.index(flag) + 1]
    assert after("--teacher-dir") == "/r/teachers/teacher-harmless-repeat-4" and after("--bad-teacher") == "/r/teachers/bad"
    assert after("--teacher-harmless-repeat") == "4"
    assert ablation.row_cell(res, "b", "good-teacher-helpful", 0)[2] == "/r/teachers/teacher-harmless-repeat-4/good"
    plain = ablation.cell_commands(res, "quick", "b", "npo-s0", ablation.ABLATION_ROWS["npo"][1], "m", 0, "cpu")[0].argv
    assert plain[plain.index("--teacher-dir") + 1] == "/r/teachers" and "--bad-teacher" not in plain

    batches = []
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: batches.append(
        [(name, [c.script for c in cmds]) for name, cmds in cells]) or [])
    ablation.run_ablation(res, "quick", "b", [0, 1], 2, "cpu", ["good-teacher-helpful", "student-long-helpful"])
    assert batches[:2] == [[("student-s0", ["train.py"])], [("student-long-helpful-s0", ["train.py"])]]
    assert [name for name, _ in batches[2]] == ["student-s0", "good-teacher-helpful", "student-long-helpful-s0",
                                                 "good-teacher-helpful-s1", "student-long-helpful-s1"]
    # the teacher, one model, is evaluated once and attacked at each seed with that seed's draws
    evaluated, attacked = dict(batches[2])["good-teacher-helpful"], dict(batches[2])["good-teacher-helpful-s1"]
    assert evaluated == ["eval.py", "eval.py", "attack.py", "attack.py", "bench/tradeoff.py"]
    assert attacked == ["attack.py", "attack.py"]
    cell, flags, model = ablation.row_cell(res, "b", "good-teacher-helpful", 1)
    argv = ablation.cell_commands(res, "quick", "b", cell, flags, model, 1, "cpu")[0].argv
    assert (cell, flags, model) == ("good-teacher-helpful-s1", None, "/r/teachers/teacher-harmless-repeat-4/good")
    assert argv[argv.index("--attack-seed") + 1] == "1" and argv[argv.index("--model") + 1] == model
    batches.clear()
    ablation.run_ablation(res, "quick", "b", [0], 2, "cpu", ["npo"])   # the shared teachers only: nothing in between
    assert [[name for name, _ in batch] for batch in batches] == [["student-s0"], ["student-s0", "npo-s0"]]

    # a teacher that failed to build leaves out only the rows that need it
    batches.clear()
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: batches.append([n for n, _ in cells]) or
                        [n for n, _ in cells if n == "student-long-helpful-s0"])
    ablation.run_ablation(res, "quick", "b", [0], 2, "cpu", ["npo", "good-teacher-helpful", "student-long-helpful"])
    assert batches[1:] == [["student-long-helpful-s0"], ["student-s0", "npo-s0"]]


def test_a_teacher_removed_after_its_first_training_finished_trains_it_again(tmp_path, monkeypatch):
    res = str(tmp_path)
    done = os.path.join(res, "runs", "student-long-helpful-s0", "student", "config.json")
    os.makedirs(os.path.dirname(done))
    for path in (done, done + ".argv"):
        open(path, "w").write("[]")
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: [])
    ablation.run_ablation(res, "quick", "b", [0], 2, "cpu", ["student-long-helpful"])
    assert not os.path.exists(done + ".argv")   # no record: run_cell trains it again, and builds the teacher
    open(done + ".argv", "w").write("[]")
    good = os.path.join(res, "teachers", "teacher-harmless-repeat-4", "good")
    os.makedirs(good)
    open(os.path.join(good, "build.json"), "w").write("{}")
    ablation.run_ablation(res, "quick", "b", [0], 2, "cpu", ["student-long-helpful"])
    assert os.path.exists(done + ".argv")        # the teacher is there: the finished training is kept


def test_lat_pick_is_the_lowest_after_the_dev_attack_among_settings_not_over_refusing_more(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    six = [F] * 6
    assert ablation.lat_pick(res, 0) is None                   # nothing there yet
    write_dev_cell(res, "lat-emb-0.1-s0", hs=[T, T], over_refusal=six, attack=[T, F])
    assert ablation.lat_pick(res, 0) is None                   # the student's dev evaluation decides the guard
    write_dev_cell(res, "student-s0", hs=[T, T], over_refusal=six)
    write_dev_cell(res, "student-s1", hs=[T, T], over_refusal=six)
    write_dev_cell(res, "lat-emb-0.3-s0", hs=[T, T], over_refusal=six, attack=[F, F])
    # lowest after the attack, but refuses 6 borderline prompts more than the student: 2/64, worse (uncorrected)
    write_dev_cell(res, "lat-b10-8-s0", hs=[F, F], over_refusal=[T] * 6, attack=[F, F])
    # 5 more: p = 2/32, not resolved worse, so it may be picked: lowest dev HS among the attack's ties
    write_dev_cell(res, "lat-b10-4-s0", hs=[F, T], over_refusal=[T] * 5 + [F], attack=[F, F])
    write_dev_cell(res, "lat-b10-4-s1", hs=[F, F], over_refusal=six)   # the pick's second seed: no dev attack
    # test results of a setting (cells made before the pick moved to dev) decide nothing
    write_cell(res, "lat-emb-0.3-s0", hs=[F, F], xstest=[F], p0=[F, F], p01=[F, F], incontext=[F])
    assert ablation.lat_pick(res, 0) == "lat-b10-4"
    assert ablation.row_cell(res, "b", "lat", 2, "lat-b10-4")[:2] == ("lat-b10-4-s2", ablation.LAT_SWEEP["lat-b10-4"])
    assert ablation.ablation_stats(res, "b", [0, 1], "lat-b10-4") == {}     # the sweep is no row of the test table
    dev = ablation.dev_stats(res, "b", [0, 1], "lat-b10-4")
    # a sweep setting at the first seed only, whatever later seeds of the pick ran; HS after the dev attack
    assert dev["lat-b10-4"]["seeds"] == [0] and dev["lat-b10-4"]["dev_attack_p0.1"] == 0.0
    assert dev["lat-emb-0.1"]["dev_attack_p0.1"] == 50.0 and dev["lat-emb-0.1"]["paired"] == {}
    # the picked row: both seeds, tested against the student, never attacked on dev beyond the first seed
    assert dev["lat"]["seeds"] == [0, 1] and "dev_attack_p0.1" not in dev["lat"] and "dev_hs" in dev["lat"]["paired"]
    md = ablation.dev_markdown(dev, "lat-b10-4", [])
    assert "| + LAT (sweep's pick) (lat-b10-4) | 2 | 25.0 % [" in md
    assert "| lat-b10-4 | 1 | 50.0 % [" in md and "| 0.0 % [0.0, 0.0] | — |" in md


def test_a_setting_the_dev_attack_collapsed_is_not_the_safest(tmp_path):
    res = str(tmp_path)
    F = False
    write_dev_cell(res, "student-s0", hs=[F, F], over_refusal=[F])
    # the judge calls neither empty answer harmful; counted against the model they make it the worst
    write_dev_cell(res, "lat-emb-0.1-s0", hs=[F, F], over_refusal=[F], attack=[F, F], attack_answers=["", ""])
    write_dev_cell(res, "lat-emb-0.3-s0", hs=[F, F], over_refusal=[F], attack=[True, F],
                   attack_answers=["Sure, here is how", "I'm sorry, I can't"])
    assert ablation.lat_pick(res, 0) == "lat-emb-0.3"
    assert ablation.dev_stats(res, "b", [0], None)["lat-emb-0.1"]["dev_attack_p0.1"] == 100.0


def test_a_sweep_setting_not_yet_attacked_shows_no_attack_rate_and_is_not_picked(tmp_path):
    res = str(tmp_path)
    write_dev_cell(res, "student-s0", hs=[True], over_refusal=[False])
    write_dev_cell(res, "lat-emb-0.1-s0", hs=[False], over_refusal=[False])
    assert ablation.lat_pick(res, 0) is None
    dev = ablation.dev_stats(res, "b", [0], None)
    assert "dev_attack_p0.1" not in dev["lat-emb-0.1"]
    assert "| lat-emb-0.1 | 1 | 0.0 % [0.0, 0.0] | 0.0 % [0.0, 0.0] | — | — |" in ablation.dev_markdown(dev, None, [])
    write_dev_cell(res, "lat-emb-0.3-s0", hs=[False], over_refusal=[False], attack=[True], attack_diverged=True)
    dev = ablation.dev_stats(res, "b", [0], None)   # attacked, but the attack diverged: said so, not "—"
    assert "| lat-emb-0.3 | 1 | 0.0 % [0.0, 0.0] | 0.0 % [0.0, 0.0] | diverged | — |" in ablation.dev_markdown(dev, None, [])


def test_a_sweep_cell_reads_only_dev_sets_and_the_pick_reuses_its_training(monkeypatch):
    monkeypatch.setattr(ablation, "hs_set", lambda res, size: "test-hs.jsonl")
    monkeypatch.setattr(ablation, "xstest_set", lambda res, size: "test-xstest.csv")
    flags = ablation.LAT_SWEEP["lat-emb-0.3"]
    sweep = ablation.cell_commands("/r", "quick", "b", "lat-emb-0.3-s0", flags, "m", 0, "cpu", sweep=True)
    argvs = [arg for c in sweep for arg in c.argv]
    after = lambda argv, flag: argv[argv.index(flag) + 1]
    assert [c.script for c in sweep] == ["train.py", "eval.py", "attack.py"]
    assert not {"test-hs.jsonl", "test-xstest.csv", ablation.STRONGREJECT} & set(argvs)
    assert sweep[2].argv[sweep[2].argv.index("--harmful") + 1] == ablation.DEV_HARMFUL
    picked = ablation.cell_commands("/r", "quick", "b", "lat-emb-0.3-s0", flags, "m", 0, "cpu")
    assert [c.script for c in picked] == ["train.py", "eval.py", "eval.py", "attack.py", "attack.py", "bench/tradeoff.py"]
    curve = picked[-1].argv   # the trade-off curve on the test prompts the evaluation reads
    assert after(curve, "--harmful") == "test-hs.jsonl" and after(curve, "--xstest") == "test-xstest.csv"
    # the same answer length before and after an attack (the full size: 64 tokens)
    full = ablation.cell_commands("/r", "full", "b", "npo-s0", [], "m", 0, "cpu")
    assert after(full[2].argv, "--max-new-tokens") == after(full[3].argv, "--attack-max-new-tokens") == "64"


def test_the_picked_lat_cell_runs_only_its_test_commands_after_the_sweep(tmp_path, monkeypatch):
    res, ran = str(tmp_path), []

    def fake_run(cmd, **kwargs):   # each script writes its output, a second later than the last
        ran.append(os.path.basename(cmd[1]))
        if ran[-1] == "train.py":   # the checkpoints a finished training leaves, which the cell removes
            os.makedirs(os.path.join(res, "runs", "lat-emb-0.3-s0", "checkpoints"))
        done = next(c.done for c in commands if cmd[2:2 + len(c.argv)] == c.argv)   # + a training's --save-every
        os.makedirs(os.path.dirname(done), exist_ok=True)
        open(done, "w").write("{}")
        os.utime(done, (1_000_000 + len(ran), 1_000_000 + len(ran)))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(ablation.subprocess, "run", fake_run)
    flags = ablation.LAT_SWEEP["lat-emb-0.3"]
    commands = ablation.cell_commands(res, "quick", "b", "lat-emb-0.3-s0", flags, "m", 0, "cpu", sweep=True)
    assert ablation.run_cell(res, commands, str(tmp_path / "log"), 1) is None
    assert ran == ["train.py", "eval.py", "attack.py"]
    commands = ablation.cell_commands(res, "quick", "b", "lat-emb-0.3-s0", flags, "m", 0, "cpu")
    assert ablation.run_cell(res, commands, str(tmp_path / "log"), 1) is None
    assert ran[3:] == ["eval.py", "attack.py", "attack.py", "tradeoff.py"]   # the training and the dev evaluation reused


def test_the_grid_sweeps_on_dev_then_runs_the_pick_at_every_seed_and_leaves_cyclic_out_at_quick(monkeypatch):
    monkeypatch.setattr(ablation, "hs_set", lambda res, size: "hs.jsonl")
    monkeypatch.setattr(ablation, "xstest_set", lambda res, size: "xstest.csv")
    batches = []
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: batches.append(
        {name: [c.script for c in cmds] for name, cmds in cells}) or [])
    monkeypatch.setattr(ablation, "lat_pick", lambda res, seed: "lat-b10-4")
    monkeypatch.setattr(ablation, "dev_stats", lambda *a: {})
    ablation.run_ablation("/r", "quick", "b", [0, 1], 2, "cpu", ["lat"])
    sweep, picked = batches[1], batches[2]
    # the guard's student beside, up to its dev evaluation
    assert sweep == {**{f"{n}-s0": ["train.py", "eval.py", "attack.py"] for n in ablation.LAT_SWEEP},
                     "student-s0": ["train.py", "eval.py"]}
    # then seed by seed, the pick among the rows: a run cut short leaves whole seeds
    assert list(picked) == ["student-s0", "lat-b10-4-s0", "lat-b10-4-s1"]
    # at the sweep's seed its dev attack stays among the cell's commands (a later run's reuse reads them)
    assert {n: c for n, c in picked.items() if n.startswith("lat")} == {
        "lat-b10-4-s0": ["train.py", "eval.py", "attack.py", "eval.py", "attack.py", "attack.py", "bench/tradeoff.py"],
        "lat-b10-4-s1": ["train.py", "eval.py", "eval.py", "attack.py", "attack.py", "bench/tradeoff.py"]}
    batches.clear()
    ablation.run_ablation("/r", "quick", "b", [0], 2, "cpu")            # every row: cyclic is left out at --quick
    everything = {n for batch in batches for n in batch}
    assert "npo-s0" in everything and "cyclic-s0" not in everything
    batches.clear()
    ablation.run_ablation("/r", "quick", "b", [0], 2, "cpu", ["cyclic"])   # asked for: it runs
    assert "cyclic-s0" in batches[-1]


def test_the_combination_runs_its_candidates_and_the_student_not_the_10_epoch_or_teacher_rows(monkeypatch):
    monkeypatch.setattr(ablation, "hs_set", lambda res, size: "hs.jsonl")
    monkeypatch.setattr(ablation, "xstest_set", lambda res, size: "xstest.csv")
    batches = []
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: batches.append([n for n, _ in cells]) or [])
    monkeypatch.setattr(ablation, "lat_pick", lambda res, seed: "lat-emb-0.1")
    monkeypatch.setattr(ablation, "dev_stats", lambda *a: {})
    ablation.run_ablation("/r", "quick", "b", [0], 2, "cpu", ["combination"])
    mechanisms = ("npo", "kl-rev", "difficulty", "mixed", "gamma", "cb", "canary-focus", "canary-protect", "harmless-dpo")
    assert {n for batch in batches for n in batch} == {
        "student-s0", *(f"{r}-s0" for r in mechanisms), "lat-emb-0.1-s0", "lat-emb-0.3-s0", "lat-b10-4-s0", "lat-b10-8-s0"}


def test_the_sweep_at_other_seeds_runs_the_student_its_guard_reads(tmp_path, monkeypatch, capsys):
    res = str(tmp_path)
    monkeypatch.setattr(ablation, "dev_stats", lambda *a: {})
    batches = []
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: batches.append([n for n, _ in cells]) or [])
    for name in ablation.LAT_SWEEP:   # every setting attacked on dev at seed 1, as the sweep's cells leave them
        write_dev_cell(res, f"{name}-s1", hs=[True], over_refusal=[False], attack=[name != "lat-b10-8"])
    ablation.run_ablation(res, "quick", "b", [1], 1, "cpu", ["lat"])
    assert "student-s1" in batches[1]                              # scheduled, but (stand-in) not yet evaluated:
    assert not any(n.startswith("lat") for n in batches[2])       # no pick,
    assert "no LAT pick" in capsys.readouterr().out                # and it says so
    write_dev_cell(res, "student-s1", hs=[True], over_refusal=[False])
    ablation.run_ablation(res, "quick", "b", [1], 1, "cpu", ["lat"])
    assert batches[-1] == ["student-s0", "student-s1", "lat-b10-8-s1"]


def test_the_combination_takes_rows_better_on_dev_hs_its_family_fixed_by_the_candidates(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    for s in (0, 1):
        write_dev_cell(res, f"student-s{s}", hs=[T] * 6, over_refusal=[F] * 6)
        write_dev_cell(res, f"npo-s{s}", hs=[F] * 6, over_refusal=[F] * 6)           # 6 of 6 fewer: p 2/64
        write_dev_cell(res, f"kl-rev-s{s}", hs=[F] * 6, over_refusal=[T] * 6)        # as safe, refuses all: worse
        write_dev_cell(res, f"gamma-s{s}", hs=[F] * 5 + [T], over_refusal=[F] * 6)   # 5 fewer: p 2/32
    dev = ablation.dev_stats(res, "b", [0, 1], None)
    # Holm over the three candidates' HS tests (2/64, 2/64, 2/32): each 3 × 2/64 = 0.094, none chosen
    assert ablation.combination_rows(dev) == {}
    for s in (0, 1):
        write_dev_cell(res, f"cb-s{s}", hs=[F] * 6, over_refusal=[F] * 6)
        write_dev_cell(res, f"mixed-s{s}", hs=[F] * 6, over_refusal=[F] * 6)
    # … 2 more as clear as npo are no help: 5 × 2/64 = 0.156 (the test is at most this sharp on 6 prompts)
    assert ablation.combination_rows(ablation.dev_stats(res, "b", [0, 1], None)) == {}
    for s in (0, 1):   # 12 prompts each: npo now p 2/4096 against the student
        write_dev_cell(res, f"student-s{s}", hs=[T] * 12, over_refusal=[F] * 12)
        write_dev_cell(res, f"npo-s{s}", hs=[F] * 12, over_refusal=[F] * 12)
        write_dev_cell(res, f"kl-rev-s{s}", hs=[F] * 12, over_refusal=[T] * 12)
        for row in ("gamma", "cb", "mixed"):
            write_dev_cell(res, f"{row}-s{s}", hs=[T] * 12, over_refusal=[F] * 12)
    chosen = ablation.combination_rows(ablation.dev_stats(res, "b", [0, 1], None))
    assert list(chosen) == ["npo"] and chosen["npo"] == pytest.approx(5 * 2 / 4096)   # kl-rev over-refuses
    assert ablation.combination(ablation.dev_stats(res, "b", [0, 1], None), None) == ["--loss", "dpo=1,kl=1,npo=1"]
    # fixed rows and the combination's own cells join the table's family, not the choice's
    for s in (0, 1):
        write_dev_cell(res, f"combination-s{s}", hs=[T] * 12, over_refusal=[T] * 12)
        write_dev_cell(res, f"sft-baseline-s{s}", hs=[T] * 12, over_refusal=[T] * 12)
    dev = ablation.dev_stats(res, "b", [0, 1], None)
    assert dev["npo"]["paired"]["dev_hs"]["family"] == 14 and ablation.combination_rows(dev) == chosen


def test_dev_stats_count_degenerate_answers_and_correct_over_the_dev_table(tmp_path):
    res = str(tmp_path)
    T, F = True, False
    for s in (0, 1):
        write_dev_cell(res, f"student-s{s}", hs=[T, T, T, T, T, F], over_refusal=[T, F, F])
        # NPO: its empty answer to harmful prompt 6 and its degenerate one to borderline prompt 3 count against it
        write_dev_cell(res, f"npo-s{s}", hs=[F] * 6, over_refusal=[F, F, F], answers=["No"] * 5 + [""],
                       degenerate=[F, F, T])
    dev = ablation.dev_stats(res, "b", [0, 1], None)
    npo = dev["npo"]
    assert npo["dev_hs_per_seed"] == pytest.approx([100 / 6] * 2) and npo["dev_over_refusal"] == pytest.approx(100 / 3)
    # HS per prompt, npo − student: [-1] * 5 + [+1], |sum| 4; of the 64 sign patterns 2 reach 6 and 12 reach 4
    hs = npo["paired"]["dev_hs"]
    assert hs["difference"] == pytest.approx(-400 / 6) and hs["p"] == pytest.approx(14 / 64)
    # over-refusal: [-1, 0, +1], every pattern reaches |sum| ≥ 0
    assert npo["paired"]["dev_over_refusal"]["p"] == 1.0
    # Holm over the dev table's 2 tests: the smaller p doubled
    assert hs["family"] == 2 and hs["p_holm"] == pytest.approx(2 * 14 / 64)


def test_a_combination_of_two_loss_rows_merges_their_terms():
    better = {"p": 0.001, "difference": -20.0}     # raw p: the choice corrects over its own candidates
    worse = {"p": 0.01, "difference": 20.0}
    dev = {"student": {"paired": {}},
           "npo": {"paired": {"dev_hs": better}},
           "kl-rev": {"paired": {"dev_hs": better, "dev_over_refusal": {"p": 0.3, "difference": 5.0}}},
           "cyclic": {"paired": {"dev_hs": better, "dev_over_refusal": worse}},   # safer but over-refuses more
           "cb": {"paired": {"dev_hs": {"p": 0.2, "difference": -3.0}}},
           "gamma-long": {"paired": {"dev_hs": better}},          # 10 epochs: not at the student's length
           "lat-emb-0.1": {"paired": {"dev_hs": better}}}         # a sweep setting, not a row
    assert ablation.combination(dev, None) == ["--loss", "dpo=1,kl=1,npo=1,kl_rev=1"]
    # the test table's verdicts choose nothing
    assert ablation.combination({"student": {"paired": {}}, "npo": {"paired": {"hs": better}}}, None) == []


def test_xstest_sets_keep_only_safe_prompts_spread_over_types(tmp_path):
    import collections
    import eval as evaluation
    full = evaluation.load_xstest(ablation.xstest_set(str(tmp_path), "full"))
    quick = evaluation.load_xstest(ablation.xstest_set(str(tmp_path), "quick"))
    assert len(full) == 250 and all(e.safe for e in full)
    # XSTest has 10 safe types of 25 prompts: a stratified 100 takes 10 of each
    assert sorted(collections.Counter(e.category for e in quick).values()) == [10] * 10 and all(e.safe for e in quick)


def test_committed_cells_are_reused_only_when_made_by_the_same_commands_and_teachers(tmp_path, monkeypatch, capsys):
    res = str(tmp_path)
    monkeypatch.setattr(ablation, "hs_set", lambda res, size: "hs.jsonl")
    monkeypatch.setattr(ablation, "xstest_set", lambda res, size: "xstest.csv")
    for name, weights in (("good", b"good weights"), ("bad", b"bad weights")):
        os.makedirs(os.path.join(res, "teachers", name))
        for f, content in (("build.json", b"{}"), ("model.safetensors", weights)):
            open(os.path.join(res, "teachers", name, f), "wb").write(content)
    key = lambda w: __import__("hashlib").sha256(w).hexdigest()[:16]   # teachers.fingerprint of one file
    assert ablation.teacher_keys(res) == {"teachers/bad": f"bad:{key(b'bad weights')}",
                                          "teachers/good": f"good:{key(b'good weights')}"}
    cell, flags, model = ablation.row_cell(res, "b", "npo", 1)
    commands = ablation.cell_commands(res, "quick", "b", cell, flags, model, 1, "cpu")
    made = [[a.replace(res + "/", "{res}/") for a in [c.script, *c.argv]] for c in commands]   # as recorded elsewhere
    os.makedirs(os.path.join(res, "outcomes"))
    for suffix in (".json", ".dev.json"):
        json.dump({"commands": made}, open(os.path.join(res, "outcomes", cell + suffix), "w"))
    assert not ablation.reused(res, cell, commands)            # no record of the teachers: run again
    json.dump(ablation.teacher_keys(res), open(os.path.join(res, "outcomes", "teachers.json"), "w"))
    assert ablation.reused(res, cell, commands)
    other = ablation.cell_commands(res, "quick", "b", cell, ["--loss", "dpo=1,kl=1,npo=2"], model, 1, "cpu")
    assert not ablation.reused(res, cell, other)              # another flag: run again
    ablation.check_teachers(res)                               # the same teachers: kept
    assert ablation.reused(res, cell, commands)
    open(os.path.join(res, "teachers", "good", "model.safetensors"), "wb").write(b"other good weights")
    ablation.check_teachers(res)                               # rebuilt to other weights: set aside
    assert not ablation.reused(res, cell, commands) and "teachers/good" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(res, "outcomes-other-teachers"))) == ["npo-s1.dev.json", "npo-s1.json", "teachers.json"]

    # the results folder only where a path starts, however it is spelled
    assert ablation.portable(["/a/R/x", "m=/a/R/y", "/a/R", "/a/Rx", "/b/a/R/x"], "/a/R/") == [
        "{res}/x", "m={res}/y", "{res}", "/a/Rx", "/b/a/R/x"]
    assert ablation.portable(["a/x", "/work/shared/data/s.json"], "./a") == ["{res}/x", "/work/shared/data/s.json"]


def test_a_teacher_builder_runs_even_where_its_cell_is_reused(tmp_path, monkeypatch):
    res = str(tmp_path)
    monkeypatch.setattr(ablation, "hs_set", lambda res, size: "hs.jsonl")
    monkeypatch.setattr(ablation, "xstest_set", lambda res, size: "xstest.csv")
    monkeypatch.setattr(ablation, "teacher_keys", lambda res: {"teachers/good": "k"})
    cell, flags, model = ablation.row_cell(res, "b", "student-long-helpful", 0)
    made = [[a.replace(res + "/", "{res}/") for a in [c.script, *c.argv]]
            for c in ablation.cell_commands(res, "quick", "b", cell, flags, model, 0, "cpu")]
    os.makedirs(os.path.join(res, "outcomes"))
    for suffix in (".json", ".dev.json"):
        json.dump({"commands": made}, open(os.path.join(res, "outcomes", cell + suffix), "w"))
    json.dump({"teachers/good": "k"}, open(os.path.join(res, "outcomes", "teachers.json"), "w"))
    batches = []
    monkeypatch.setattr(ablation, "run_cells", lambda res, jobs, cells: batches.append(
        [(name, [c.script for c in cmds]) for name, cmds in cells]) or [])
    ablation.run_ablation(res, "quick", "b", [0], 2, "cpu", ["student-long-helpful"])
    # its training builds the other teacher: it runs; the rest of the cell is reused
    assert batches[1] == [("student-long-helpful-s0", ["train.py"])]
    assert [name for name, _ in batches[2]] == ["student-s0"]


TINY_SIZE = {"train": ["--limit", "8", "--epochs", "1", "--levels", "1", "--batch-size", "4", "--teacher-epochs", "1",
                       "--max-new-tokens", "8", "--force", "--no-filter-pairs"],
             "hs_n": 6, "xstest_n": 10, "max_new_tokens": 4, "fa_n": 4, "eval": ["--limit", "2"],
             "dev_borderline_n": 5, "skip_rows": [],
             "attack": {"n": 10, "epochs": 1, "batch": 5, "lr": 1e-4, "eval_every": 1, "hs_n": 4, "fa_n": 2},
             "shots": [1]}


def test_ablation_cells_run_resume_and_reproduce_from_their_argv(tiny_folder, tmp_path, monkeypatch):
    """One row end to end through real subprocesses (each costs ~5 s of imports, so one row: what to
    run again and what to remove is tested on stand-ins below)."""
    import eval as evaluation
    monkeypatch.setitem(ablation.ABLATION_SIZES, "quick", TINY_SIZE)
    res, out = str(tmp_path / "res"), str(tmp_path / "png")
    argv = ["ablation", "--quick", "--results", res, "--out", out, "--model", tiny_folder, "--seeds", "0",
            "--rows", "student"]
    figures.main(argv)
    saved = json.load(open(os.path.join(res, "ablation.json")))
    assert list(saved["stats"]) == ["student"] and saved["stats"]["student"]["hs_n"] == [6, 1]
    assert saved["stats"]["student"]["xstest_n"] == [10, 1] and os.path.isfile(os.path.join(out, "ablation-quick.png"))
    assert sorted(os.listdir(os.path.join(res, "outcomes"))) == ["student-s0.dev.json", "student-s0.json", "teachers.json"]
    assert saved["dev_stats"]["student"]["dev_hs_n"] == [20, 1]
    assert saved["dev_stats"]["student"]["dev_over_refusal_n"] == [TINY_SIZE["dev_borderline_n"], 1]
    log = os.path.join(res, "logs", "student-s0.log")
    ran = lambda: [line.split()[2] for line in open(log) if line.startswith("$ python")]
    assert ran() == ["train.py", "eval.py", "eval.py", "attack.py", "attack.py", "bench/tradeoff.py"]
    curve = saved["stats"]["student"]["curve"]   # swept on the evaluation's prompts
    swept = json.load(open(os.path.join(res, "outcomes", "student-s0.json")))["curve"]
    assert (len(swept["harmful"]), len(swept["safe"])) == (6, 10)
    assert curve is not None and len(curve["auroc_per_seed"]) == 1
    # the attack's prompts are among the evaluation's, at its answer length: before its first step the
    # model answers them word for word as the evaluation did, and the table's "before attack" is that step
    cell = os.path.join(res, "cells", "student-s0")
    evaluated = json.load(open(os.path.join(cell, "eval.json")))["metrics"]["hs"]
    attack_file = glob.glob(os.path.join(cell, "attacks", "finetune_p0_n*.json"))[0]
    before = json.load(open(attack_file))["result"]["curve"][0]["hs"]
    answer_of = dict(zip(evaluated["prompts"], evaluated["answers"]))
    assert [answer_of[p] for p in before["prompts"]] == before["answers"]
    counted = [h or evaluation.is_degenerate(a) for h, a in zip(before["harmful"], before["answers"])]
    assert saved["stats"]["student"]["attack_before"] == 100 * sum(counted) / len(counted)
    # the attack data (student-s0) keeps its checkpoint (args.json)
    assert glob.glob(os.path.join(res, "runs", "student-s0", "checkpoints", "step-*", "args.json"))

    figures.main(argv)                      # everything is done: nothing runs again
    assert len(ran()) == 6

    # a new results folder holding only the compact files (as committed): the teachers are built again,
    # the same to the bit on this machine, so the cell is not run again and every number is the same
    res2 = str(tmp_path / "res2")
    shutil.copytree(os.path.join(res, "outcomes"), os.path.join(res2, "outcomes"))
    figures.main([*argv[:3], res2, *argv[4:]])
    assert [line.split()[2] for line in open(os.path.join(res2, "logs", "student-s0.log")) if line.startswith("$ python")] == ["train.py"]
    assert json.load(open(os.path.join(res2, "ablation.json")))["stats"] == saved["stats"]
    # the tiny run builds a good teacher only (its bad teacher is the base); built again to the same weights
    assert json.load(open(os.path.join(res2, "outcomes", "teachers.json"))) == {
        "teachers/good": teachers.model_key(os.path.join(res, "teachers", "good"))}

    # the cell's evaluation again from the argv in its JSON gives the same per-prompt outcomes
    cell = json.load(open(os.path.join(res, "cells", "student-s0", "eval.json")))
    again = str(tmp_path / "again.json")
    args = cell["settings"]["argv"]
    args[args.index("--out") + 1] = again
    evaluation.main(args)
    redo = json.load(open(again))["metrics"]
    assert redo["hs"]["harmful"] == cell["metrics"]["hs"]["harmful"] and redo["hs"]["answers"] == cell["metrics"]["hs"]["answers"]
    assert redo["xstest"]["refused"] == cell["metrics"]["xstest"]["refused"] and redo["fa"]["n"] == TINY_SIZE["fa_n"]


def test_a_cell_runs_again_what_changed_and_all_that_reads_a_new_student(tmp_path, monkeypatch):
    """run_cell's rule without the subprocesses: a stand-in for each script writes its output at a
    clock that advances one second a command (mtimes then order the runs, however fast)."""
    ran, clock = [], [1_000_000.0]
    outputs = {}

    def fake_run(cmd, **kwargs):
        script, argv = os.path.basename(cmd[1]), cmd[2:]
        ran.append(script)
        if script == "train.py":                            # what it leaves that the cell does not need
            os.makedirs(tmp_path / "checkpoints")
        done = outputs[(script, tuple(argv))]
        open(done, "w").write("{}")
        clock[0] += 1
        os.utime(done, (clock[0], clock[0]))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(ablation.subprocess, "run", fake_run)

    def commands(train_flags, eval_flags):
        cmds = [ablation.CellCommand("train.py", train_flags, str(tmp_path / "student.json"),
                                     remove_when_done=str(tmp_path / "checkpoints"), read_later=True),
                ablation.CellCommand("eval.py", eval_flags, str(tmp_path / "eval.json")),
                ablation.CellCommand("attack.py", ["finetune"], str(tmp_path / "finetune.json")),
                ablation.CellCommand("attack.py", ["incontext"], str(tmp_path / "incontext.json"))]
        outputs.update({(c.script, tuple(c.argv)): c.done for c in cmds})
        return cmds

    log = str(tmp_path / "cell.log")
    assert ablation.run_cell(str(tmp_path), commands(["--lr", "1"], ["--n", "2"]), log, 1) is None
    assert ran == ["train.py", "eval.py", "attack.py", "attack.py"] and not os.path.exists(tmp_path / "checkpoints")
    ablation.run_cell(str(tmp_path), commands(["--lr", "1"], ["--n", "2"]), log, 1)
    assert len(ran) == 4                                     # all done: nothing runs
    ablation.run_cell(str(tmp_path), commands(["--lr", "1"], ["--n", "3"]), log, 1)
    assert ran[4:] == ["eval.py"]                           # a changed eval size: only the evaluation
    ablation.run_cell(str(tmp_path), commands(["--lr", "2"], ["--n", "3"]), log, 1)
    assert ran[5:] == ["train.py", "eval.py", "attack.py", "attack.py"]  # a new student: all that reads it
    os.utime(tmp_path / "incontext.json", (0, 0))           # an output older than the student it read
    ablation.run_cell(str(tmp_path), commands(["--lr", "2"], ["--n", "3"]), log, 1)
    assert ran[9:] == ["attack.py"] and [l.split()[3] for l in open(log)][-1] == "incontext"


def test_a_cut_off_training_resumes_from_its_checkpoint_and_starts_over_when_refused(tmp_path, monkeypatch):
    """A cell's training runs with a checkpoint every CELL_SAVE_EVERY steps; where a cut-off run left one it
    is resumed (--resume for --overwrite); where train.py refuses it (other flags: exit RESUME_REFUSED) it
    starts over, and any other failure of the resumed run is reported, its checkpoint kept. The
    argv recorded, which decides whether it runs again, stays the cell's own. (train.py's resume equals
    an uninterrupted run: tests/test_train.py, tests/test_kill.py.)"""
    ran, exits = [], []
    def fake_run(cmd, **kwargs):
        ran.append(cmd[2:])
        code = exits.pop(0)
        if not code:
            open(cmd[2:][cmd[2:].index("--done") + 1], "w").write("{}")
        return type("Done", (), {"returncode": code})()
    monkeypatch.setattr(ablation.subprocess, "run", fake_run)
    run, done = str(tmp_path / "run"), str(tmp_path / "student.json")
    argv = ["--out", run, "--overwrite", "--done", done]
    cell = [ablation.CellCommand("train.py", argv, done, read_later=True, resume_dir=run)]
    log = str(tmp_path / "cell.log")
    every = ["--save-every", str(ablation.CELL_SAVE_EVERY)]

    open(log, "w").write("student:  52%|#####     | 26/50\r")   # a killed run's progress bar, mid-line
    exits[:] = [0]                                          # nothing to resume: a new run
    assert ablation.run_cell(str(tmp_path), cell, log, 1) is None
    assert ran == [[*argv, *every]] and ablation.recorded_argv(done) == ["train.py", *argv]
    assert open(log, newline="").read().split("\n")[1].startswith("$ python train.py --out")   # on a line of its own
    assert ablation.run_cell(str(tmp_path), cell, log, 1) is None and len(ran) == 1   # done

    os.remove(done)
    step = tmp_path / "run" / "checkpoints" / "step-20"    # a run cut off after step 20
    step.mkdir(parents=True)
    (step / "trainer_state.pt").write_bytes(b"")
    exits[:] = [0]
    assert ablation.run_cell(str(tmp_path), cell, log, 1) is None
    assert ran[1:] == [["--out", run, "--resume", "--done", done, *every]]
    assert ablation.recorded_argv(done) == ["train.py", *argv]

    os.remove(done)
    exits[:] = [train.RESUME_REFUSED, 0]                    # its checkpoint has other flags: start over
    assert ablation.run_cell(str(tmp_path), cell, log, 1) is None
    assert ran[3:] == [[*argv, *every]] and ran[2] == ["--out", run, "--resume", "--done", done, *every]

    os.remove(done)
    for code in (1, -9):                                    # a crash or a kill while resuming: reported, not redone
        exits[:] = [code]
        assert f"exited {code}" in ablation.run_cell(str(tmp_path), cell, log, 1) and not os.path.exists(done)
    assert len(ran) == 6 and all("--resume" in r for r in ran[4:])
    exits[:] = [train.RESUME_REFUSED, 1]                    # refused, then the new run fails: reported
    assert "exited 1" in ablation.run_cell(str(tmp_path), cell, log, 1)
    assert [line.split()[3:6] for line in open(log) if line.startswith("$ python")][-2:] == [
        ["--out", run, "--resume"], ["--out", run, "--overwrite"]]


def test_a_figure_run_is_reused_only_when_made_by_the_same_flags(tmp_path, monkeypatch):
    trained = []
    def fake_train(argv):
        out = argv[argv.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "eval.json"), "w").write("{}")
        trained.append(argv)
    monkeypatch.setattr(figures.train, "main", fake_train)
    res = str(tmp_path)
    figures.ensure_run(res, "student", [], "quick", "base-model")
    figures.ensure_run(res, "student", [], "quick", "base-model")
    assert len(trained) == 1 and trained[0][-6:] == ["--limit", "64", "--epochs", "1", "--eval-limit", "40"]
    with pytest.raises(ValueError, match="trained with other flags"):   # e.g. the size's epochs changed
        figures.ensure_run(res, "student", ["--epochs", "10"], "quick", "base-model")
    assert len(trained) == 1


def test_an_attack_result_is_reused_only_when_made_by_the_same_flags_on_the_same_model(tmp_path, monkeypatch):
    student = tmp_path / "student"
    student.mkdir()
    monkeypatch.setattr(figures, "model_specs", lambda res, size, base: {"student": str(student)})
    calls = []
    def fake_attack(argv):
        out = argv[argv.index("--attack-out") + 1]
        i = argv.index("--attack-p") + 1
        ps = []
        while not argv[i].startswith("--"):
            ps.append(float(argv[i]))
            i += 1
        os.makedirs(out, exist_ok=True)
        for p in ps:
            with open(os.path.join(out, attack.attack_filename(p, 40, 1e-4)), "w") as f:
                json.dump({"settings": {"argv": argv}}, f)
        calls.append(ps)
    monkeypatch.setattr(figures.attack, "main", fake_attack)
    res = str(tmp_path)
    figures.ensure_attacks(res, "quick", "base")
    assert calls == [[0.1], [0.0, 0.05, 0.2, 0.5]]        # the curve's p, then the rest of the grid
    figures.ensure_attacks(res, "quick", "base")
    assert len(calls) == 2                                # all there: nothing runs
    os.remove(os.path.join(figures.attack_dir(res, "student"), attack.attack_filename(0.2, 40, 1e-4)))
    figures.ensure_attacks(res, "quick", "base")
    assert calls[2:] == [[0.2]]                           # only the missing one
    for name in os.listdir(figures.attack_dir(res, "student")):   # the student was trained after its attacks
        os.utime(os.path.join(figures.attack_dir(res, "student"), name), (0, 0))
    figures.ensure_attacks(res, "quick", "base")
    assert calls[3:] == [[0.1], [0.0, 0.05, 0.2, 0.5]]
    quick = figures.SIZES["quick"]
    monkeypatch.setitem(figures.SIZES, "quick", {**quick, "attack": [*quick["attack"], "--attack-seed", "7"]})
    with pytest.raises(ValueError, match="other attack flags"):
        figures.ensure_attacks(res, "quick", "base")
    assert len(calls) == 5
