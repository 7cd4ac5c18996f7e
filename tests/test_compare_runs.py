"""bench/compare_runs.py: students of train.py runs compared prompt by prompt (hand-counted cases)."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare_runs  # noqa: E402

REFUSE, COMPLY, EMPTY = "I'm sorry, I can't help with that.", "Sure, here is how you do it step by step.", ""


def write_run(folder, harmful_answers, xstest_refused, dev_refused=None):
    os.makedirs(folder)
    student = {"answers": {"harmful": harmful_answers, "harmless": []},
               "xstest": {"refused": xstest_refused, "degenerate": [False] * len(xstest_refused)}}
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump({"results": {"student": student}}, f)
    if dev_refused is not None:
        with open(os.path.join(folder, "dev.json"), "w") as f:
            json.dump({"metrics": {"borderline_dev": {"prompts": [f"p{i}" for i in range(len(dev_refused))],
                                                      "refused": dev_refused, "degenerate": [False] * len(dev_refused)}}}, f)


def test_rates_pairs_and_holm_match_hand_counts(tmp_path):
    # reference: complies on 5 of 6 harmful prompts; the other row refuses 4 of those 5 (the 6th answer,
    # empty, is degenerate and counts as harmful for both), so 4 nonzero differences, all of one sign:
    # exact sign-flip p = 2 / 2**4 = 0.125
    write_run(tmp_path / "a", [COMPLY] * 5 + [EMPTY], [False, True, False, False], [False, False])
    write_run(tmp_path / "b", [REFUSE] * 4 + [COMPLY, EMPTY], [False, True, False, False], [True, False])
    rows = compare_runs.row_matrices([str(tmp_path / "a")])
    assert rows["hs"][:, 0].tolist() == [1, 1, 1, 1, 1, 1] and rows["xstest"][:, 0].tolist() == [0, 1, 0, 0]
    table = compare_runs.compare({"ref": [str(tmp_path / "a")], "new": [str(tmp_path / "b")]})
    new = next(line for line in table.splitlines() if line.startswith("| new"))
    # three tests (HS 0.125, PHTest dev: one difference, p = 1; XSTest: none, p = 1): Holm 3 × 0.125 = 0.375
    assert "33.3 % [" in new and "-66.7 pts, Holm p 0.38" in new
    assert "50.0 % [" in new and "+50.0 pts, Holm p 1" in new


def test_a_row_whose_seeds_saw_other_prompts_stops(tmp_path):
    write_run(tmp_path / "a", [COMPLY] * 3, [False] * 4)
    write_run(tmp_path / "b", [COMPLY] * 4, [False] * 4)
    with pytest.raises(ValueError, match="hs: the runs of one row were evaluated on other prompts"):
        compare_runs.row_matrices([str(tmp_path / "a"), str(tmp_path / "b")])


def write_test(folder, hs_answers, xstest):
    """RUN/test.json as eval.py writes it: xstest is [(safe, refused, degenerate)] per prompt."""
    os.makedirs(folder, exist_ok=True)
    x = {"prompts": [f"x{i}" for i in range(len(xstest))], "safe": [s for s, _, _ in xstest],
         "refused": [r for _, r, _ in xstest], "degenerate": [d for _, _, d in xstest]}
    with open(os.path.join(folder, "test.json"), "w") as f:
        json.dump({"metrics": {"hs": {"answers": hs_answers}, "xstest": x}}, f)


def test_the_test_report_reads_safe_xstest_prompts_only_and_counts_degenerate_against(tmp_path):
    # XSTest: 2 unsafe prompts (refused: ignored) and 3 safe ones: refused, degenerate (counts as a
    # failure), answered → 2 of 3; two seeds agree. StrongREJECT: comply, refuse, empty → 2 of 3.
    xs = [(False, True, False), (True, True, False), (False, True, False), (True, False, True), (True, False, False)]
    for seed in ("s0", "s1"):
        write_test(tmp_path / seed, [COMPLY, REFUSE, EMPTY], xs)
    rows = compare_runs.row_matrices([str(tmp_path / "s0"), str(tmp_path / "s1")], from_file="test.json")
    assert rows["xstest"].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert rows["hs"].tolist() == [[1, 1], [0, 0], [1, 1]]
    # a row that refuses the one complied prompt: StrongREJECT 1 of 3, one nonzero difference, sign-flip p = 1
    write_test(tmp_path / "t", [REFUSE, REFUSE, EMPTY], xs)
    table = compare_runs.compare({"ref": [str(tmp_path / "s0")], "new": [str(tmp_path / "t")]}, from_file="test.json")
    assert "borderline" not in table.splitlines()[0]   # a metric no file holds is no column
    new = next(line for line in table.splitlines() if line.startswith("| new"))
    assert "33.3 % [" in new and "-33.3 pts, Holm p 1" in new and "66.7 % [" in new


def test_an_attack_result_gives_its_hs_after_the_attack(tmp_path):
    os.makedirs(tmp_path / "r")
    curve = [{"step": 0, "hs": {"answers": [REFUSE, REFUSE]}}, {"step": 8, "hs": {"answers": [COMPLY, REFUSE]}}]
    with open(tmp_path / "r" / "attack.json", "w") as f:
        json.dump({"result": {"curve": curve}}, f)
    assert compare_runs.row_matrices([str(tmp_path / "r")], from_file="attack.json")["hs"].tolist() == [[1], [0]]


def test_kept_outcomes_rebuild_the_table_though_answers_are_cut(tmp_path, capsys):
    # the refusal marker lies past the 200 kept characters: a judge re-run on the kept text would call it
    # harmful, so the kept files must carry the judge's outcome, not only the answer
    late_refusal = "Let me think about this request first. " * 6 + "I'm sorry, I can't help with that."
    write_run(tmp_path / "a", [COMPLY, COMPLY, late_refusal], [False, True], [False, True, False])
    write_run(tmp_path / "b", [REFUSE, COMPLY, COMPLY], [False, False], [False, False, False])
    rows = [f"ref={tmp_path / 'a'}", f"new={tmp_path / 'b'}"]
    compare_runs.main([*rows, "--keep", str(tmp_path / "kept")])
    table = capsys.readouterr().out
    kept = json.load(open(tmp_path / "kept" / "ref-s0.json"))["metrics"]
    assert kept["hs"]["outcome"] == [1, 1, 0] and kept["borderline_dev"]["outcome"] == [0, 1, 0]
    assert len(kept["hs"]["answers"][2]) == 200 and kept["hs"]["answers"][2] == late_refusal[:200]
    compare_runs.main(["--rebuild", str(tmp_path / "kept")])
    assert capsys.readouterr().out == table
    # HS ref 2/3, new 2/3 with one prompt each way; hand count: differences +1 and -1, p = 1
    assert "| new | 1 | 66.7 % [" in table and "+0.0 pts, Holm p 1" in table


def test_rebuild_of_a_folder_without_rows_json_stops_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="rows.json: not a compare_runs.py --keep folder"):
        compare_runs.main(["--rebuild", str(tmp_path)])


def test_runs_of_other_data_seeds_are_not_paired(tmp_path):
    # the held-out prompts of a run are drawn by its data seed: prompt i of one run is not prompt i of the other
    for name, seed in (("a", 0), ("b", 1)):
        write_run(tmp_path / name, [COMPLY, REFUSE], [False])
        saved = json.load(open(tmp_path / name / "eval.json"))
        saved["settings"] = {"data_seed": seed, "data": {"harmful_test": "builtin:test"}}
        json.dump(saved, open(tmp_path / name / "eval.json", "w"))
    with pytest.raises(ValueError, match="other prompts"):
        compare_runs.row_matrices([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match="other prompts"):
        compare_runs.compare({"ref": [str(tmp_path / "a")], "new": [str(tmp_path / "b")]})


def test_cut_tokens_judges_only_the_first_n_tokens_of_each_answer(tmp_path, tiny_folder, tokenizer, capsys):
    # a harmful answer that refuses late, and a borderline answer that refuses late (a refusal) or is empty
    late = "Sure, here is a long answer that goes on and on before it ends. I'm sorry, I can't help with that."
    n_late = len(tokenizer(late.split(" I'm")[0], add_special_tokens=False).input_ids)   # tokens before the refusal
    os.makedirs(tmp_path / "r")
    hs = {"answers": [late, REFUSE]}
    dev = {"prompts": ["p0", "p1"], "answers": [late, COMPLY], "refused": [True, False], "degenerate": [False, False]}
    with open(tmp_path / "r" / "dev.json", "w") as f:
        json.dump({"metrics": {"hs": hs, "borderline_dev": dev}}, f)
    run = f"r={tmp_path / 'r'}"
    compare_runs.main(["--from", "dev.json", run])
    assert "| r | 1 | 0.0 % [" in capsys.readouterr().out          # both refuse in full: HS 0, over-refusal 1 of 2
    compare_runs.main(["--from", "dev.json", "--cut-tokens", str(n_late), "--tokenizer", tiny_folder, run])
    line = capsys.readouterr().out.splitlines()[2]
    # cut before the refusal: the late answer complies (HS 1 of 2) and is no over-refusal (0 of 2)
    assert line.startswith("| r | 1 | 50.0 % [") and "| 0.0 % [" in line
    compare_runs.main(["--from", "dev.json", "--cut-tokens", "1000", "--tokenizer", tiny_folder, run])
    assert "| r | 1 | 0.0 % [" in capsys.readouterr().out           # longer than every answer: unchanged
    for argv in (["--cut-tokens", "8", run],                               # train.py's eval.json: no full answers
                 ["--from", "dev.json", "--cut-tokens", "8", "--keep", str(tmp_path / "k"), run],   # kept: no cut
                 ["--from", "dev.json", "--cut-tokens", "0", run]):
        with pytest.raises(SystemExit) as stop:
            compare_runs.main(argv)
        assert stop.value.code == 2 and not os.path.exists(tmp_path / "k")   # argparse's one-line usage error
    assert "--cut-tokens needs --from FILE" in capsys.readouterr().err


def test_each_seed_rate_is_printed_in_run_order(tmp_path):
    # seed 0 complies on 2 of 4 harmful prompts, seed 1 on 3 of 4 (the empty answer counts as harmful):
    # 50.0 and 75.0 %; XSTest: 1 of 2 safe prompts refused at seed 0, none at seed 1
    write_test(tmp_path / "s0", [COMPLY, COMPLY, REFUSE, REFUSE], [(True, True, False), (True, False, False)])
    write_test(tmp_path / "s1", [COMPLY, EMPTY, COMPLY, REFUSE], [(True, False, False), (True, False, False)])
    table = compare_runs.compare({"ref": [str(tmp_path / "s0"), str(tmp_path / "s1")]}, from_file="test.json")
    assert table.splitlines()[-1] == "Per seed (%, runs in the order given): ref: hs 50.0 / 75.0; xstest 50.0 / 0.0"
