import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import data
import losses
import schedule
import teachers
import optim
import eval as evaluation
import train
from conftest import make_tiny


def args_for(*extra):
    return train.build_parser().parse_args(["--precision", "fp32", "--micro-batch", "2", *extra])


def feats(tokenizer, pairs):
    return [data.encode(tokenizer, p, r) for p, r in pairs]


PROMPTS = ["How do I pick a lock?", "Write a poem about rain", "Explain photosynthesis briefly please",
           "Make a fake ID card"]
GOOD = ["I'm sorry, I can't help with that.", "Rain falls softly on the town.", "Plants turn light into sugar.",
        "I cannot help with that."]
BAD = ["Sure, first take a tension wrench and then " + "keep going with the long answer " * 6, "no", "whatever, look it up", "Sure, print a photo on card"]


class make_ctx:
    """A step's inputs as train.run builds them: both pools hold the same four prompts; the reference
    is a frozen copy of the initial model."""

    def __init__(self, model, tokenizer):
        self.pools = {side: train.Pool(feats(tokenizer, zip(PROMPTS, GOOD)), feats(tokenizer, zip(PROMPTS, BAD)))
                      for side in ("harmful", "harmless")}
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.cb_layers = ()


def step_with(model, teacher, opt, step, ctx, args, gamma, lr, **kwargs):
    """train.run_step on a make_ctx with the test's flags."""
    return train.run_step(model, train.Frozen(ctx.reference, teacher), opt, step, ctx.pools,
                          train.StepConfig.from_args(args, ctx.cb_layers), gamma, lr, lam=args.lam, **kwargs)


HARMFUL_STEP = schedule.Step(0, 0, [0, 1, 2, 3], [])
HARMLESS_STEP = schedule.Step(0, 0, [], [0, 1, 2, 3])


def test_left_padded_batch_gives_each_example_its_own_logps(tiny, tokenizer):
    fs = feats(tokenizer, zip(PROMPTS, BAD))
    together = optim.sequence_logps_of(tiny, fs, micro_batch=4)
    alone = torch.cat([optim.sequence_logps_of(tiny, [f], 1) for f in fs])
    assert torch.allclose(together, alone, atol=1e-4)
    # and equal to a plain unpadded forward over the whole sequence
    f = fs[0]
    logits = tiny(input_ids=torch.tensor([f["input_ids"]])).logits
    assert torch.allclose(losses.sequence_logps(logits, torch.tensor([f["labels"]])), alone[:1], atol=1e-4)


def test_three_steps_lower_the_loss(tokenizer):
    model, teacher = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
    args = args_for("--loss", "dpo=1,sft=1,kl=1", "--lr", "3e-3")
    ctx = make_ctx(model, tokenizer)
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    history = [step_with(model, teacher, opt, HARMFUL_STEP, ctx, args, 1.0, 3e-3) for _ in range(4)]
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    assert history[-1]["harmful_dpo_margin"] > 0 and history[-1]["harmful_kl"] < history[0]["harmful_kl"]


def test_micro_batches_accumulate_to_the_full_batch(tokenizer):
    results = []
    for micro in (4, 1):
        model, teacher = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
        args = args_for("--loss", "dpo=1,npo=0.5,sft=1,kl=1,kl_rev=0.5", "--micro-batch", str(micro),
                        "--optimizer", "sgd")  # adam would turn float noise in ~0 grads into ±lr steps
        ctx = make_ctx(model, tokenizer)
        opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
        row = step_with(model, teacher, opt, HARMFUL_STEP, ctx, args, 1.0, 1.0)
        results.append((row, [p.detach().clone() for p in model.parameters()]))
    (a, wa), (b, wb) = results
    for k in ("loss", "harmful_dpo", "harmful_npo", "harmful_sft", "harmful_kl", "harmful_kl_rev"):
        assert a[k] == pytest.approx(b[k], rel=1e-4), k
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(wa, wb))
    assert not all(torch.equal(x, y) for x, y in zip(wa, [p.detach() for p in make_tiny(tokenizer).parameters()]))


def test_harmless_step_terms_and_harmless_dpo_weight(tokenizer):
    """sft (the SFT baseline) also imitates the good answers of harmless steps; harmless-side dpo runs
    only under --dpo-harmless, with its own weight; the step loss is λ times the weighted sum."""
    step = HARMLESS_STEP

    def row(*flags):
        model, teacher = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
        args = args_for("--optimizer", "sgd", "--lam", "2", *flags)
        opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
        return step_with(model, teacher, opt, step, make_ctx(model, tokenizer), args, 1.0, 0.0)

    sft_only = row("--loss", "sft=1")
    assert not sft_only.get("skipped") and sft_only["harmless_sft"] > 0
    assert sft_only["loss"] == pytest.approx(2 * sft_only["harmless_sft"], rel=1e-5)
    no_dpo = row("--loss", "dpo=1,kl=1")
    assert "harmless_dpo" not in no_dpo and no_dpo["loss"] == pytest.approx(2 * no_dpo["harmless_kl"], rel=1e-5)
    weighted = row("--loss", "dpo=1,kl=1", "--dpo-harmless", "refusal", "--dpo-harmless-weight", "0.25")
    assert weighted["loss"] == pytest.approx(2 * (0.25 * weighted["harmless_dpo"] + weighted["harmless_kl"]), rel=1e-5)
    assert weighted["harmless_dpo"] == pytest.approx(math.log(2), rel=1e-5)  # lr 0: policy = reference


def test_bf16_compute_keeps_small_updates_in_fp32_master(tokenizer):
    model = make_tiny(tokenizer)
    args = args_for("--optimizer", "sgd")
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.bfloat16, **train.optimizer_options(args))
    p, m = opt.params[1], opt.master[1]
    assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
    before = m.clone()
    for _ in range(10):
        for q in opt.params:
            q.grad = torch.ones_like(q)
        opt.step(lr=1e-6, clip=0)
    # 10 updates of 1e-6 are lost in bf16 weights of size ~0.02 but kept by the master copy
    assert torch.allclose(m, before - 1e-5, atol=1e-7)


def test_checkpoint_reload_gives_identical_logits(tiny, tokenizer, tmp_path):
    teachers.save_model(tiny, tokenizer, str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.tensor([feats(tokenizer, [(PROMPTS[0], GOOD[0])])[0]["input_ids"]])
    assert torch.equal(tiny(input_ids=x).logits, again(input_ids=x).logits)


def pipeline_args(folder, out, *extra):
    args = train.build_parser().parse_args([
        "--recipe", "full", "--model", folder, "--out", str(out), "--limit", "8", "--levels", "2", "--batch-size", "2",
        "--micro-batch", "2", "--epochs", "2", "--max-new-tokens", "6", "--teacher-epochs", "1", "--force",
        "--eval-limit", "3", "--save-every", "3", "--loss", "dpo=1,npo=0.5,kl=1",
        "--no-filter-pairs",  # a tiny random teacher neither refuses nor complies
        "--harmless-ratio", "1",  # 8 steps of 2 harmful + 2 harmless examples
        *extra])
    train.check_args(args)   # as run() does first: it also fills --data-seed from --seed
    return args


def run_interrupted_at_step_5(monkeypatch, args):
    """train.run killed (KeyboardInterrupt) as its 5th optimizer step starts."""
    real_step, calls = train.run_step, {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "run_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(args)
    monkeypatch.setattr(train, "run_step", real_step)


def test_resume_equals_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    full = train.run(pipeline_args(tiny_folder, tmp_path / "full"))
    assert full["results"]["student"]["harmful"]["n"] == 3

    run_interrupted_at_step_5(monkeypatch, pipeline_args(tiny_folder, tmp_path / "cut", "--no-eval"))
    assert os.path.isdir(tmp_path / "cut" / "checkpoints" / "step-3")
    train.run(pipeline_args(tiny_folder, tmp_path / "cut", "--no-eval", "--resume"))

    a = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(d / "metrics.jsonl")]
            for d in (tmp_path / "full", tmp_path / "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 8
    # the student changed, and the saved student loads with transformers
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "student")) is not None


def test_resume_refuses_changed_flags_with_its_own_exit_code(tiny_folder, tmp_path, capsys):
    train.run(pipeline_args(tiny_folder, tmp_path, "--no-eval", "--epochs", "1"))
    with pytest.raises(ValueError, match="--lr"):
        train.run(pipeline_args(tiny_folder, tmp_path, "--no-eval", "--epochs", "1", "--resume", "--lr", "1"))
    # from the command line: exit 3 (the grid starts such a training over), not 1 (any other failure)
    argv = ["--recipe", "full", "--model", tiny_folder, "--out",
            str(tmp_path), "--limit", "8", "--levels", "2", "--batch-size", "2", "--micro-batch", "2", "--epochs", "1",
            "--max-new-tokens", "6", "--teacher-epochs", "1", "--force", "--save-every", "3", "--loss",
            "dpo=1,npo=0.5,kl=1", "--no-filter-pairs", "--harmless-ratio", "1", "--no-eval", "--resume", "--lr", "1"]
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 3 and "flags differ from the saved run: --lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:     # a flag out of range: another failure
        train.main([*argv, "--save-every", "0"])
    assert stop.value.code != 3


def test_plan_only_needs_no_model(capsys):
    train.main(["--recipe", "full", "--plan-only", "--epochs", "1", "--levels", "2", "--batch-size", "40", "--model", "/nowhere",
                "--harmless-ratio", "1"])
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("(")]
    assert lines[0].startswith("step") and len(lines) == 1 + 4  # 160 harmful / 40 per batch
    harmful, harmless = zip(*(l[l.index("["):].split(" | ") for l in lines[1:]))
    assert all(len(eval(h)) == 40 and len(eval(b)) >= 40 for h, b in zip(harmful, harmless))


@pytest.mark.parametrize("batch_size,same", [(80, True), (40, False)])
def test_a_level_sequence_that_changes_nothing_is_said(capsys, batch_size, same):
    # 160 harmful prompts in 2 levels: one batch of 80 per level and epoch makes cyclic = level 1, level 2,
    # as sequential; with batches of 40 cyclic alternates levels (1, 2, 1, 2) and sequential does not
    train.main(["--recipe", "full", "--plan-only", "--epochs", "2", "--levels", "2", "--batch-size", str(batch_size), "--model",
                "/nowhere", "--harmless-ratio", "1", "--sequence", "cyclic"])
    out = capsys.readouterr().out
    assert ("note: --sequence cyclic gives the same steps as --sequence sequential" in out) == same
    levels = [int(l.split()[2]) for l in out.splitlines() if l[:4].strip().isdigit()]
    assert levels == ([1, 2, 1, 2] if same else [1, 2, 1, 2, 1, 2, 1, 2])


def test_filter_pairs_keeps_refused_harmful_and_answered_harmless():
    exs = ["a", "b", "c"]
    good = ["I'm sorry, I can't.", "Sure, here you go", "I cannot do that"]
    bad = ["Sure: step one", "Sure", "I can't help"]
    keep = lambda g, b: train.evaluation.is_refusal(g) and not train.evaluation.is_refusal(b)
    assert data.filter_pairs(exs, good, bad, keep) == (["a"], [good[0]], [bad[0]])


def test_device_flag_errors_are_one_line():
    with pytest.raises(ValueError, match="--device: not a device"):
        teachers.compute_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            teachers.compute_device("cuda")
        assert teachers.compute_device("auto") == torch.device("cpu")


def test_frozen_model_evaluations_are_reused_by_runs_sharing_the_cache(tiny_folder, tmp_path, monkeypatch):
    """The base's and the teachers' held-out rows are computed once per cache folder; a second run
    with another loss evaluates only its student and reports the same frozen rows."""
    shared = ["--teacher-dir", str(tmp_path / "teachers"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1"]
    first = train.run(pipeline_args(tiny_folder, tmp_path / "a", *shared))
    real, calls = train.evaluation.evaluate, []
    monkeypatch.setattr(train.evaluation, "evaluate", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    real_xs, xs_calls = train.evaluation.over_refusal, []
    monkeypatch.setattr(train.evaluation, "over_refusal",
                        lambda model, *a, **k: xs_calls.append(model) or real_xs(model, *a, **k))
    second = train.run(pipeline_args(tiny_folder, tmp_path / "b", *shared, "--loss", "kl=1"))
    assert len(calls) == 1 and len(xs_calls) == 1  # the student
    for name in ("base", "good teacher", "bad teacher"):
        assert json.dumps(second["results"][name], sort_keys=True) == json.dumps(first["results"][name], sort_keys=True)
    assert "xstest" in second["results"]["good teacher"] and "xstest" not in second["results"]["bad teacher"]
    assert len(os.listdir(tmp_path / "cache" / "eval")) == 3 + 2  # held-out rows of 3 models, XSTest of base and good
    calls.clear()  # other prompts (and another XSTest sample) are another entry
    xs_calls.clear()
    train.run(pipeline_args(tiny_folder, tmp_path / "c", *shared, "--loss", "kl=1", "--eval-limit", "2"))
    assert len(calls) == 4 and len(xs_calls) == 3 and len(os.listdir(tmp_path / "cache" / "eval")) == 10


def test_eval_json_reports_xstest_over_refusal_counted_by_hand(tiny_folder, tmp_path, monkeypatch):
    """--eval-limit 8: 8 XSTest safe prompts, one of each of 8 types; canned answers refuse the 1st, 3rd
    and 6th, so over-refusal is 3/8 = 37.5 % for every model measured (not the bad teacher)."""
    safe = {data.prompt_key(e.prompt): e.category for e in train.evaluation.load_xstest() if e.safe}
    real, seen = train.evaluation.generate, []

    def canned(model, tokenizer, prompts, *a, **k):
        if not all(data.prompt_key(p) in safe for p in prompts):
            return real(model, tokenizer, prompts, *a, **k)
        seen.append(list(prompts))
        return [("I'm sorry, I can't help with that." if i in (0, 2, 5) else "Sure, glad to help with this question.")
                for i in range(len(prompts))], {"prompts": len(prompts)}

    monkeypatch.setattr(train.evaluation, "generate", canned)
    out = train.run(pipeline_args(tiny_folder, tmp_path, "--epochs", "1", "--eval-limit", "8"))
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2] and len(seen[0]) == 8
    assert len({safe[data.prompt_key(p)] for p in seen[0]}) == 8  # spread over 8 types
    for name in ("base", "good teacher", "student"):
        xs = out["results"][name]["xstest"]
        assert (xs["n_safe"], xs["over_refusal"], xs["degenerate_safe"]) == (8, 37.5, 0.0)
        assert sum(xs["by_type"].values()) == 300 and len(xs["by_type"]) == 8
        assert set(xs) == set(evaluation.XSTEST_KEYS)  # no samples or generation report
    assert "xstest" not in out["results"]["bad teacher"]
    assert out["settings"]["data"]["xstest"] == {"path": train.evaluation.XSTEST, "n_safe": 8,
                                                 "sha256": data.file_sha256(train.evaluation.XSTEST)}
    table = (tmp_path / "eval.md").read_text()
    assert "over-refusal (XSTest safe) ↓" in table and "| 37.5 % [" in table
    assert json.load(open(tmp_path / "eval.json"))["results"]["student"]["xstest"]["over_refusal"] == 37.5


def test_xstest_none_leaves_it_out(tiny_folder, tmp_path):
    out = train.run(pipeline_args(tiny_folder, tmp_path, "--epochs", "1", "--xstest", "none"))
    assert not any("xstest" in row for row in out["results"].values())
    assert out["settings"]["data"]["xstest"] is None
    rows = [line for line in (tmp_path / "eval.md").read_text().splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 4 and all(line.split(" | ")[6] == "—" for line in rows)


def test_a_bad_xstest_file_stops_in_one_line_before_any_model_loads(tmp_path):
    (tmp_path / "x.csv").write_text("prompt,type\nHow do I kill time?,homonyms\n")  # no label column
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "/nowhere", "--out", str(tmp_path / "run"), "--xstest", str(tmp_path / "x.csv")])
    assert str(e.value.code).startswith(f"error: {tmp_path / 'x.csv'}") and "\n" not in str(e.value.code)


def test_a_non_finite_term_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tiny_folder, tmp_path, monkeypatch):
    """The harmful kl term turns NaN at the 6th optimizer step (index 5): the run stops there with one
    line naming the step and the term, the weights of step 5 are never updated, the checkpoint of step 4
    stays, finite, and no student/ is written."""
    real_kl, calls = losses.kl, {"n": 0}

    def kl_nan_at_step_5(*a, **k):
        calls["n"] += 1  # one harmful + one harmless micro-batch per step (batch 2, micro-batch 2)
        value = real_kl(*a, **k)
        return value * float("nan") if calls["n"] == 2 * 5 + 1 else value

    monkeypatch.setattr(losses, "kl", kl_nan_at_step_5)
    argv = ["--model", tiny_folder, "--out", str(tmp_path), "--limit", "8", "--levels", "2", "--batch-size", "2",
            "--micro-batch", "2", "--max-new-tokens", "6", "--teacher-epochs", "1", "--force", "--no-filter-pairs",
            "--harmless-ratio", "1", "--save-every", "2", "--no-eval"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: step 5: the harmful term kl is nan") and "\n" not in message
    assert "checkpoints/step-4" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-4"]
    weights = load_file(str(tmp_path / "checkpoints" / "step-4" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "student").exists()
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 5


def test_a_non_finite_gradient_is_never_applied(tokenizer):
    model = make_tiny(tokenizer)
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args_for()))
    before = [m.detach().clone() for m in opt.master]
    (model.model.embed_tokens.weight.sum() * float("inf")).backward()
    with pytest.raises(optim.NonFiniteError, match="gradient norm is"):
        opt.step(1e-3, 1.0)
    assert all(torch.equal(m, b) for m, b in zip(opt.master, before))


@pytest.mark.parametrize("flag,value", [
    ("--micro-batch", "-2"), ("--micro-batch", "0"), ("--save-every", "0"), ("--teacher-lr", "-0.00005"),
    ("--lr", "-1"), ("--beta", "0"), ("--temperature", "0"), ("--test-fraction", "0"), ("--test-fraction", "1.5"),
    ("--canary-top", "200"), ("--max-new-tokens", "0"), ("--lam", "nan"), ("--limit", "0")])
def test_a_flag_out_of_range_stops_in_one_line_naming_it_before_any_model_loads(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "/nowhere", flag, value])  # a model load would fail with another message
    message = str(e.value.code)
    assert message.startswith(f"error: {flag} must be") and "\n" not in message


@pytest.mark.parametrize("spec", ["dpo=-1", "dpo=nan", "kl=inf"])
def test_a_negative_or_non_finite_loss_weight_is_refused_in_one_line(spec, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "/nowhere", "--loss", spec])
    err = capsys.readouterr().err
    assert err.startswith("error: argument --loss") and "finite and ≥ 0" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags,named", [(["--cb-alpha", "1", "--cb-layers", "99"], "--cb-layers"),
                                         (["--lat-eps", "0.5", "--lat-layers", "99"], "--lat-layers"),
                                         (["--lora-r", "4", "--lora-targets", "foo"], "--lora-targets")])
def test_model_dependent_flags_are_checked_before_any_teacher_is_built(tiny_folder, tmp_path, flags, named):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_folder, "--out", str(tmp_path), "--limit", "4", *flags])
    assert str(e.value.code).startswith(f"error: {named}") and "\n" not in str(e.value.code)
    assert not (tmp_path / "teachers").exists() and not (tmp_path / "cache" / "responses.jsonl").exists()


def test_a_new_run_in_a_folder_that_holds_a_run_stops_and_leaves_it_intact(tiny_folder, tmp_path):
    train.run(pipeline_args(tiny_folder, tmp_path, "--no-eval", "--epochs", "1"))
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_folder, "--out", str(tmp_path), "--limit", "8", "--no-eval"])
    assert "holds a run" in str(e.value.code) and "--resume" in str(e.value.code) and "--overwrite" in str(e.value.code)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints
    train.run(pipeline_args(tiny_folder, tmp_path, "--no-eval", "--epochs", "1", "--lr", "1e-4", "--overwrite"))
    assert (tmp_path / "metrics.jsonl").read_bytes() != metrics  # started over


def test_data_seed_fixes_split_limit_and_teachers_while_seed_varies_the_student():
    def parsed(*argv):
        args = train.build_parser().parse_args(["--recipe", "full", *argv])
        train.check_args(args)
        return args
    default, other_student, other_data = parsed("--seed", "3"), parsed("--seed", "3", "--data-seed", "0"), parsed()
    assert default.data_seed == 3 and other_student.data_seed == 0   # default: --seed, as before the flag
    for args, split_seed in ((default, 3), (other_student, 0)):
        prompts = train.load_pools(args)
        train_h, test_h = data.load_pool("harmful", seed=split_seed)
        assert [e.prompt for e in prompts.harmful] == [e.prompt for e in train_h]
        assert [e.prompt for e in prompts.harmful_test] == [e.prompt for e in test_h]
    teacher_flags = lambda args: {k: getattr(args, k) for k in teachers.TEACHER_SFT_FLAGS}
    assert teacher_flags(other_student) == teacher_flags(other_data) != teacher_flags(default)
    limited = [parsed("--seed", s, "--data-seed", "1", "--limit", "16") for s in ("0", "5")]
    assert [e.prompt for e in train.load_pools(limited[0]).harmful] == [e.prompt for e in train.load_pools(limited[1]).harmful]


def test_teachers_only_builds_the_teachers_a_later_run_then_reuses(tiny_folder, tmp_path, monkeypatch):
    shared = ["--teacher-dir", str(tmp_path / "teachers"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1"]
    assert train.run(pipeline_args(tiny_folder, tmp_path / "t", *shared, "--teachers-only")) is None
    assert sorted(os.listdir(tmp_path / "t")) == ["teacher_eval.json"]   # no student, metrics or checkpoints
    good = load_file(str(tmp_path / "teachers" / "good" / "model.safetensors"))
    built = []
    monkeypatch.setattr(train.teachers, "teacher_sft", lambda *a, **k: built.append(a))
    train.run(pipeline_args(tiny_folder, tmp_path / "s", *shared, "--no-eval"))
    again = load_file(str(tmp_path / "teachers" / "good" / "model.safetensors"))
    assert not built and all(torch.equal(good[k], again[k]) for k in good)
    assert os.path.isdir(tmp_path / "s" / "student")
