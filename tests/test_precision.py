"""--precision auto, --recipe and the paired tests the default run prints."""
import json

import pytest
import torch

import eval as evaluation
import stats
import optim
import teachers
import train


@pytest.mark.parametrize("kind,rates,expected", [
    ("cuda", dict(cuda_bf16=True), "bf16"),
    ("cuda", dict(cuda_bf16=False), "fp32"),
    ("cpu", dict(bf16_gflops=2500.0, fp32_gflops=120.0), "bf16"),   # AMX
    ("cpu", dict(bf16_gflops=50.0, fp32_gflops=90.0), "bf16"),      # native bf16 on a busy core: still over half
    ("cpu", dict(bf16_gflops=1.1, fp32_gflops=64.0), "fp32"),       # AVX2 emulates bf16 (issue 26's machine)
    ("cpu", dict(bf16_gflops=40.0, fp32_gflops=100.0), "fp32"),
])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(kind, rates, expected):
    precision, why = teachers.choose_precision(kind, **rates)
    assert precision == expected
    if kind == "cpu":
        assert f"{rates['bf16_gflops']:.1f} vs fp32 {rates['fp32_gflops']:.1f} GFLOP/s" in why


def test_an_x86_cpu_without_bf16_flags_gets_fp32_without_a_measurement(monkeypatch):
    monkeypatch.setattr(teachers, "cpu_bf16_flags", lambda: [])
    monkeypatch.setattr(teachers.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(teachers, "matmul_gflops", lambda dtype: pytest.fail("measured"))
    teachers._auto_precision.cache_clear()
    try:
        precision, why = teachers.resolve_precision("auto", "cpu")
    finally:
        teachers._auto_precision.cache_clear()
    assert precision == "fp32" and why.startswith("this CPU has no bf16 instructions")


def test_a_named_precision_is_taken_as_asked_and_a_bad_one_is_refused_in_one_line():
    assert teachers.resolve_precision("bf16") == ("bf16", "asked for")
    assert teachers.resolve_precision("fp32", "cpu")[0] == "fp32"
    with pytest.raises(ValueError, match="--precision: 'fp16'"):
        teachers.resolve_precision("fp16")


def test_train_resolves_auto_once_and_records_what_it_chose(monkeypatch):
    monkeypatch.setattr(teachers, "matmul_gflops", lambda dtype: 1.0 if dtype == torch.bfloat16 else 64.0)
    monkeypatch.setattr(teachers, "cpu_bf16_flags", lambda: ["amx_bf16"])  # flags there, bf16 kept from them
    teachers._auto_precision.cache_clear()
    try:
        args = train.build_parser().parse_args([])
        train.check_args(args)
        assert (args.precision, args.precision_requested) == ("fp32", "auto")
        assert train.compute_dtype(args) == torch.float32
        train.check_args(args)  # a second check keeps what the first resolved
        assert (args.precision, args.precision_requested) == ("fp32", "auto")
        line = teachers.precision_line("auto", "cpu")
        assert line.startswith("precision: fp32 (--precision auto: this CPU emulates bf16 (bf16 matmul 1.0 vs fp32 64.0")
    finally:
        teachers._auto_precision.cache_clear()
    assert teachers.precision_line("bf16", "cpu") == "precision: bf16 (--precision bf16)"


def test_every_tool_takes_the_same_precision_flag():
    import attack
    for parse in (lambda a: train.build_parser().parse_args(a),
                  lambda a: _tool_parser(evaluation.add_model_arguments).parse_args(["--model", "m", *a]),
                  lambda a: _tool_parser(evaluation.add_model_arguments, attack.add_attack_arguments).parse_args(
                      ["--model", "m", *a])):
        assert parse([]).precision == "auto" and parse(["--precision", "fp32"]).precision == "fp32"
        with pytest.raises(SystemExit):
            parse(["--precision", "bfloat16"])


def _tool_parser(*adders):
    p = evaluation.OneLineParser()
    for add in adders:
        add(p)
    return p


def test_the_recipe_fills_only_the_flags_not_given():
    quick = train.build_parser().parse_args(["--precision", "fp32"])
    train.check_args(quick)
    assert (quick.limit, quick.bad_teacher, quick.teacher_epochs, quick.epochs, quick.max_new_tokens,
            quick.eval_limit) == (64, "base", 2, 2, 32, 50)
    full = train.build_parser().parse_args(["--precision", "fp32", "--recipe", "full", "--epochs", "3"])
    train.check_args(full)
    assert (full.limit, full.bad_teacher, full.teacher_epochs, full.epochs, full.max_new_tokens,
            full.eval_limit) == (None, "break", 3, 3, 64, None)
    mixed = train.build_parser().parse_args(["--precision", "fp32", "--bad-teacher", "break", "--limit", "8"])
    train.check_args(mixed)
    assert (mixed.limit, mixed.bad_teacher, mixed.epochs) == (8, "break", 2)
    # args.json of a run saved before --recipe: its missing flags are the full recipe's
    old = train.argparse.Namespace(seed=0, epochs=10, limit=None)
    train.fill_derived_flags(old)
    assert (old.bad_teacher, old.teacher_epochs, old.max_new_tokens) == ("break", 3, 64)


def test_holm_adjusts_as_computed_by_hand():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (monotone)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_the_student_is_paired_with_base_and_teacher_on_the_same_prompts():
    refusal, answer = "I'm sorry, I can't help with that.", "Sure, here is how you do it step by step."
    degenerate = "ha ha ha ha ha ha ha ha ha ha"
    rows = {"base": {"answers": {"harmful": [answer] * 10}},
            "good teacher": {"answers": {"harmful": [refusal] * 10},
                             "xstest": {"refused": [True, True, True, False]}},
            "student": {"answers": {"harmful": [refusal] * 9 + [degenerate]},
                        "xstest": {"refused": [False, True, False, False]}}}
    tests = evaluation.paired_with_student(rows)
    assert [(t["against"], t["metric"]) for t in tests] == [
        ("base", "HS, held-out harmful"), ("good teacher", "HS, held-out harmful"),
        ("good teacher", "over-refusal, XSTest safe")]  # the base row has no XSTest outcomes here
    base, teacher_hs, teacher_xs = tests
    # base complies 10 times, the student never (a degenerate answer is not compliance): 10 discordant
    assert (base["other"], base["student"], base["only_other"], base["only_student"]) == (10, 0, 10, 0)
    assert base["p"] == pytest.approx(2 / 2 ** 10)
    assert teacher_hs["p"] == 1.0 and teacher_hs["verdict"] == "not resolved"
    assert (teacher_xs["only_other"], teacher_xs["only_student"]) == (2, 0) and teacher_xs["p"] == 0.5
    # Holm over 3 tests: the smallest p times 3
    assert base["p_holm"] == pytest.approx(3 * 2 / 2 ** 10) and base["verdict"] == "student lower"
    assert json.dumps(tests)  # eval.json holds them as they are


def test_answers_cached_in_one_precision_are_not_reused_in_another(tiny, tokenizer, tmp_path, monkeypatch):
    calls = []
    real = teachers.generate
    monkeypatch.setattr(teachers, "generate", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    cache = str(tmp_path / "responses.jsonl")
    first = teachers.generate_cached(tiny, tokenizer, "m", ["Say hi"], cache, max_new_tokens=3)
    again = teachers.generate_cached(tiny, tokenizer, "m", ["Say hi"], cache, max_new_tokens=3)
    assert len(calls) == 1 and list(first) == list(again)
    teachers.generate_cached(optim.cast_parameters(tiny, torch.bfloat16), tokenizer, "m", ["Say hi"], cache,
                             max_new_tokens=3)
    assert len(calls) == 2
