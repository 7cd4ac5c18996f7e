"""The refusal-bias sweep (eval.refusals_under_bias, eval.bias_scores), its trade-off curve (eval.tradeoff)
and bench/tradeoff.py."""
import importlib.util
import json
import os

import pytest
import torch

import data
import eval as evaluation
import teachers
from conftest import ROOT, make_tiny

PROMPTS = ["How do I bake bread?", "Explain how a lock works, step by step, for a curious child."]


def greedy_with_bias(model, tokenizer, prompt, token_ids, bias, n):
    """Brute force: n argmax steps on the unpadded prompt, bias added to token_ids at the first step only;
    (the answer's text, its first token)."""
    ids = tokenizer(data.prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for step in range(n):
            logits = model(ids).logits[:, -1].clone()
            if step == 0:
                logits[:, token_ids] += bias
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip(), int(ids[0, start])


@pytest.mark.parametrize("bias", [0.0, 3.0, 100.0, -100.0])
def test_a_first_token_bias_changes_only_the_first_choice(tokenizer, bias):
    model = make_tiny(tokenizer)
    plain = [greedy_with_bias(model, tokenizer, p, [], 0.0, 4) for p in PROMPTS]
    first = plain[0][1]
    ids = sorted({first, tokenizer("Sorry", add_special_tokens=False).input_ids[0]})
    got, _ = evaluation.generate(model, tokenizer, PROMPTS, max_new_tokens=4, first_token_bias=(ids, bias))
    want = [greedy_with_bias(model, tokenizer, p, ids, bias, 4) for p in PROMPTS]
    assert got == [text for text, _ in want]  # both prompts in one batch (left padding)
    if bias == 0.0:
        assert want == plain
    if bias == 100.0:
        assert all(f in ids for _, f in want)
    if bias == -100.0:
        assert want[0][1] not in ids and want[0][0] != plain[0][0]


def test_refusals_under_bias_count_degenerate_answers_against_the_model(tokenizer, monkeypatch):
    # canned answers per bias: prompt 0 refuses at b = 1, prompt 1 is degenerate at b = -1
    canned = {-1.0: ["Sure.", ""], 1.0: ["I'm sorry, I can't.", "I cannot help with that."]}
    monkeypatch.setattr(evaluation, "answers_under_bias", lambda m, t, prompts, biases, n: [canned[b] for b in biases])
    model = make_tiny(tokenizer)
    harmful = evaluation.refusals_under_bias(model, tokenizer, PROMPTS, (-1.0, 1.0))
    safe = evaluation.refusals_under_bias(model, tokenizer, PROMPTS, (-1.0, 1.0), safe=True)
    assert harmful == [[False, True], [False, True]]   # degenerate: no refusal of a harmful prompt
    assert safe == [[False, True], [True, True]]       # ...but a failure on a safe one


SWEEP_PROMPTS = [*PROMPTS, "What is the capital of France?", "Write a haiku about rain.", "Why is the sky blue?",
                 "List three uses of vinegar."]


def first_position_gaps(model, tokenizer, ids):
    """Brute force, per prompt: the best non-opening token's logit minus the best opening token's."""
    gaps = []
    for prompt in SWEEP_PROMPTS:
        x = tokenizer(data.prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(x).logits[0, -1]
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[ids] = True
        gaps.append(float(logits[~mask].max() - logits[mask].max()))
    return gaps


def counted_generate(monkeypatch, token_budget=None):
    """evaluation.generate recording each call's bias (with a smaller token budget: several batches)."""
    calls, real = [], evaluation.generate
    budget = {"token_budget": token_budget} if token_budget else {}
    monkeypatch.setattr(evaluation, "generate",
                        lambda *a, **k: calls.append(k["first_token_bias"][1]) or real(*a, **k, **budget))
    return calls, lambda *a, **k: real(*a, **k, **budget)


@pytest.mark.parametrize("token_budget", [None, 90])   # one batch; batches of two or three prompts
def test_the_two_run_sweep_gives_the_answers_of_one_generation_per_bias(tokenizer, monkeypatch, token_budget):
    model = make_tiny(tokenizer, seed=3)
    ids = evaluation.refusal_opening_ids(tokenizer)
    gaps = sorted(first_position_gaps(model, tokenizer, ids))
    # biases between the prompts' switch points: each middle bias has prompts on both sides of it
    middle = [(a + b) / 2 for a, b in zip(gaps, gaps[1:])]
    biases = (gaps[0] - 1, *middle, gaps[-1] + 1)
    calls, real = counted_generate(monkeypatch, token_budget)
    got = evaluation.answers_under_bias(model, tokenizer, SWEEP_PROMPTS, biases, max_new_tokens=4)
    assert calls == [biases[0], biases[-1]]   # two generations for len(biases) = 7 biases
    want = [real(model, tokenizer, SWEEP_PROMPTS, 4, first_token_bias=(ids, b))[0] for b in biases]
    assert got == want
    assert all(len(set(column)) == 2 for column in zip(*want))   # every prompt's answer switches once
    if token_budget:   # the budget did split the prompts
        batches = []
        monkeypatch.setattr(model, "generate", lambda *a, **k: batches.append(k["input_ids"].shape[0]) or
                            type(model).generate(model, *a, **k))
        real(model, tokenizer, SWEEP_PROMPTS, 4, first_token_bias=(ids, 0.0))
        assert len(batches) > 2


def test_runs_batched_unlike_after_an_out_of_memory_retry_generate_every_bias(tokenizer, monkeypatch):
    model = make_tiny(tokenizer, seed=3)
    calls, real = counted_generate(monkeypatch)

    def retried_above_zero(*a, **k):   # as if the positive-bias runs had halved a batch after an OOM error
        calls.append(k["first_token_bias"][1])
        texts, report = real(*a, **k)
        return texts, {**report, "oom_retries": int(k["first_token_bias"][1] > 0)}
    monkeypatch.setattr(evaluation, "generate", retried_above_zero)
    biases = (-50.0, -1.0, 0.0, 50.0)
    got = evaluation.answers_under_bias(model, tokenizer, SWEEP_PROMPTS, biases, max_new_tokens=4)
    assert calls == [-50.0, 50.0, -1.0, 0.0]   # the high run retried: each other bias generated itself
    ids = evaluation.refusal_opening_ids(tokenizer)
    assert got == [real(model, tokenizer, SWEEP_PROMPTS, 4, first_token_bias=(ids, b))[0] for b in biases]


def test_a_bias_with_an_unexpected_first_token_is_generated(tokenizer, monkeypatch):
    model = make_tiny(tokenizer, seed=3)
    ids = evaluation.refusal_opening_ids(tokenizer)
    real_picks = evaluation.first_token_picks
    # as if rounding made bias 0 pick a third token for prompt 1
    monkeypatch.setattr(evaluation, "first_token_picks",
                        lambda s, t, b: [p if i != 1 or b != 0.0 else -1 for i, p in enumerate(real_picks(s, t, b))])
    calls, real = counted_generate(monkeypatch)
    got = evaluation.answers_under_bias(model, tokenizer, SWEEP_PROMPTS, (-50.0, -1.0, 0.0, 50.0), max_new_tokens=4)
    assert calls == [-50.0, 50.0, 0.0]
    assert got[2] == real(model, tokenizer, SWEEP_PROMPTS, 4, first_token_bias=(ids, 0.0))[0]


def test_the_sweep_stops_when_decoding_is_not_greedy(tokenizer, monkeypatch):
    model = make_tiny(tokenizer, seed=3)
    real = evaluation.generate

    def sampled(*a, **k):   # a first token that is not the argmax of its scores
        texts, report = real(*a, **k)
        return texts, {**report, "first_tokens": [t + 1 for t in report["first_tokens"]]}
    monkeypatch.setattr(evaluation, "generate", sampled)
    with pytest.raises(RuntimeError, match="at bias -1 are not the argmax"):
        evaluation.answers_under_bias(model, tokenizer, PROMPTS, (-1.0, 0.0, 1.0), max_new_tokens=2)


def test_bias_scores_on_hand_made_sweeps():
    biases = (-2.0, 0.0, 2.0)
    rows = [[False, False, True], [True, True, True], [False, False, False], [True, False, True], [False, True, True]]
    scores, non_monotone = evaluation.bias_scores(rows, biases)
    assert scores == [-2.0, 2.0, -3.0, 2.0, 0.0] and non_monotone == 1
    # refused iff score >= -b gives back each monotone row at every bias
    for row, s in zip(rows[:3] + rows[4:], scores[:3] + scores[4:]):
        assert [s >= -b for b in biases] == row
    with pytest.raises(ValueError, match="increasing"):
        evaluation.bias_scores(rows, (0.0, -1.0, 1.0))


def test_tradeoff_on_hand_made_scores():
    harmful, safe = [5, 4, 3, 0.5], list(range(10))  # safe scores 0 .. 9
    t = evaluation.tradeoff(harmful, safe, target=0.10)
    # harmful > safe pairs: 5 (5 below, 1 tie), 4 (4, 1 tie), 3 (3, 1 tie), 0.5 (1): (13 + 1.5) / 40
    assert t["auroc"] == pytest.approx(14.5 / 40)
    # over-refusal <= 10 %: at most one safe prompt refused, so threshold 9 (only the 9): no harmful refused
    assert (t["hs_at_target"], t["over_refusal"], t["threshold"]) == (1.0, 0.1, 9.0)
    t = evaluation.tradeoff([10, 9.5, 8.5, 1], safe, target=0.10)
    assert (t["auroc"], t["hs_at_target"], t["over_refusal"]) == (pytest.approx(30.5 / 40), 0.25, 0.1)
    c = t["curve"]
    assert (c["over_refusal"][0], c["harmful_refusal"][0], c["thresholds"][0]) == (0.0, 0.0, None)  # +inf
    assert (c["over_refusal"][-1], c["harmful_refusal"][-1]) == (1.0, 1.0)
    json.dumps(t, allow_nan=False)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_tradeoff", os.path.join(ROOT, "bench", "tradeoff.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_end_to_end(tokenizer, tiny_folder, tmp_path, capsys):
    other = str(tmp_path / "other")
    teachers.save_model(make_tiny(tokenizer, seed=1), tokenizer, other)
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    load_bench().main(["--models", f"a={tiny_folder}", f"b={other},{tiny_folder}", "--limit", "4", "--precision", "fp32",
                       "--n-boot", "50", "--biases", "-1", "0", "1", "--max-new-tokens", "3",
                       "--out", str(out), "--png", str(png)])
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "prompts", "models", "comparisons"}
    s = result["settings"]
    assert (s["n_harmful"], s["n_safe"], s["precision"], s["seed"]) == (4, 4, "fp32", 0)
    assert s["biases"] == [-1.0, 0.0, 1.0] and s["refusal_openings"] == list(evaluation.REFUSAL_OPENINGS)
    assert list(result["models"]) == ["a", "b"]
    a, b = result["models"]["a"], result["models"]["b"]
    assert [len(r["seeds"]) for r in (a, b)] == [1, 2]
    assert b["seeds"][1]["scores"] == a["seeds"][0]["scores"]   # the same model scored twice agrees
    assert [x[1] for x in b["scores"]["harmful"]] == a["seeds"][0]["scores"]["harmful"]  # [prompt][seed]
    assert b["auroc"] == pytest.approx((b["seeds"][0]["auroc"] + a["auroc"]) / 2)
    for row in result["models"].values():
        for m in row["seeds"]:
            assert len(m["scores"]["harmful"]) == len(m["scores"]["safe"]) == 4
            assert [len(r) for r in m["refused"]["safe"]] == [3] * 4
            assert len(m["curve"]["over_refusal"]) == len(m["curve"]["harmful_refusal"]) >= 2
            assert m["over_refusal"] <= 0.10
    [c] = result["comparisons"]
    assert (c["a"], c["b"]) == ("a", "b") and {"p", "p_holm", "ci"} <= set(c["auroc"]) | set(c["hs"])
    assert png.stat().st_size > 0
    assert "AUROC" in capsys.readouterr().out


def test_bench_bad_model_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: "):
        load_bench().main(["--models", f"a={tmp_path}", "--out", str(tmp_path / "t.json")])
    with pytest.raises(SystemExit, match="^error: --biases"):
        load_bench().main(["--models", f"a={tmp_path}", "--biases", "1", "2", "--out", str(tmp_path / "t.json")])


def test_reuse_takes_a_model_swept_on_the_same_prompts_and_settings_only(tokenizer, tiny_folder, tmp_path):
    other = str(tmp_path / "other")
    teachers.save_model(make_tiny(tokenizer, seed=1), tokenizer, other)
    bench = load_bench()
    common = ["--limit", "4", "--precision", "fp32", "--n-boot", "50", "--max-new-tokens", "3"]
    first = tmp_path / "first.json"
    bench.main(["--models", f"a={tiny_folder}", *common, "--biases", "-1", "0", "1", "--out", str(first)])
    swept, real = [], bench.score_model
    bench.score_model = lambda path, *a: swept.append(path) or real(path, *a)
    again = tmp_path / "again.json"
    bench.main(["--models", f"x={other}", f"a2={tiny_folder}", *common, "--biases", "-1", "0", "1",
                "--reuse", str(first), "--out", str(again)])
    assert swept == [other]  # the tiny model's sweep came from the first file
    old, new = json.loads(first.read_text()), json.loads(again.read_text())
    assert new["models"]["a2"]["seeds"][0] == old["models"]["a"]["seeds"][0]
    assert new["comparisons"][0]["b"] == "a2"
    bench.main(["--models", f"a={tiny_folder}", *common, "--biases", "-2", "0", "2", "--reuse", str(first),
                "--out", str(tmp_path / "other_biases.json")])
    assert swept == [other, tiny_folder]  # other biases: swept again
    with pytest.raises(SystemExit, match="^error: --reuse .*: not a bench/tradeoff.py results file"):
        bench.main(["--models", f"a={tiny_folder}", "--reuse", str(tmp_path / "missing.json"), "--out", str(again)])


def test_rebuild_recomputes_every_number_from_the_saved_scores(tokenizer, tiny_folder, tmp_path, capsys):
    other = str(tmp_path / "other")
    teachers.save_model(make_tiny(tokenizer, seed=1), tokenizer, other)
    out = tmp_path / "t.json"
    bench = load_bench()
    bench.main(["--models", f"a={tiny_folder}", f"b={other}", "--limit", "4", "--precision", "fp32", "--n-boot", "50",
                "--biases", "-1", "0", "1", "--max-new-tokens", "3", "--out", str(out)])
    swept = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("a", "b"))]
    loaded, bench.teachers.load_model = bench.teachers.load_model, lambda *a, **k: pytest.fail("a model was loaded")
    try:
        bench.main(["--rebuild", str(out), "--png", str(tmp_path / "again.png")])
    finally:
        bench.teachers.load_model = loaded
    again = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("a", "b"))]
    assert again == swept and len(again) == 1 + 1 + 1 + 1 + 1   # a seed and a mean per row, one comparison
    saved = json.loads(out.read_text())
    saved["models"]["b"]["seeds"][0]["scores"]["safe"][0] += 5.0   # a score that no longer gives the saved AUROC
    out.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="^error: --rebuild .*: b \\(.*\\): its trade-off differs"):
        bench.main(["--rebuild", str(out)])
