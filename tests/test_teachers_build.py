"""Building teachers: the bad teacher's harmless pairs, the relevance column of the teacher table,
and build.json (a built teacher is reused only with the settings that built it)."""
import json
import os
import shutil

import pytest
import torch

import eval as evaluation
import teachers
import train
from test_train import pipeline_args

# Hand-written harmless prompts with an on-topic answer each (relevant) and the same answers
# rotated by one (irrelevant: fluent, about another prompt).
PROMPTS = ["Explain how to temper chocolate for dipping strawberries",
           "What happens chemically when iron rusts in moist air?",
           "Give me tips for memorizing the multiplication tables quickly",
           "Describe how plate tectonics causes earthquakes"]
RELEVANT = ["Melt the chocolate slowly, then cool it while stirring.",  # chocolate
            "Iron reacts with oxygen and water to form rust.",  # iron, rust(s)
            "Practice one table a day and say it aloud.",  # table(s)
            "Plates grind past each other and release energy as earthquakes."]  # plate(s), earthquake(s)
IRRELEVANT = RELEVANT[-1:] + RELEVANT[:-1]
REAL_TEACHER_SFT = teachers.teacher_sft


def test_bad_harmless_pairs_give_each_prompt_another_prompts_answer():
    assert teachers.bad_harmless_pairs(["a", "b"], ["A", "B"], "derange", seed=3) == [("a", "B"), ("b", "A")]
    prompts, answers = list("abcdefg"), list("ABCDEFG")
    pairs = teachers.bad_harmless_pairs(prompts, answers, "derange", seed=0)
    assert [p for p, _ in pairs] == prompts and sorted(a for _, a in pairs) == answers
    assert all(a != p.upper() for p, a in pairs)
    assert pairs == teachers.bad_harmless_pairs(prompts, answers, "derange", seed=0)
    assert pairs != teachers.bad_harmless_pairs(prompts, answers, "derange", seed=1)
    assert teachers.bad_harmless_pairs(prompts, answers, "none") == []
    assert teachers.bad_harmless_pairs(["a"], ["A"], "derange") == []  # no derangement of one prompt


def test_relevance_column_separates_on_topic_from_off_topic_answers():
    assert evaluation.relevance_rate(PROMPTS, RELEVANT) == 1.0
    assert evaluation.relevance_rate(PROMPTS, IRRELEVANT) == 0.0
    assert evaluation.relevance_rate(PROMPTS, RELEVANT[:3] + IRRELEVANT[3:]) == 0.75
    # "tips", "give", "quickly" are stop words: sharing them does not make an answer relevant
    assert evaluation.relevance_rate(PROMPTS[2:3], ["Give it a go quickly, those are my tips."]) == 0.0
    refusals = ["I'm sorry, I can't help with that."] * 4
    report = evaluation.teacher_report({"good": refusals, "bad": RELEVANT},
                                     {"good": teachers.Responses(RELEVANT, PROMPTS), "bad": IRRELEVANT}, PROMPTS)
    assert report["good"]["harmless_relevance"] == 1.0 and report["bad"]["harmless_relevance"] == 0.0
    # the prompts carried by Responses are used when none are passed
    assert evaluation.teacher_report({"g": refusals}, {"g": teachers.Responses(RELEVANT[:3] + IRRELEVANT[3:], PROMPTS)}
                                   )["g"]["harmless_relevance"] == 0.75
    rows = evaluation.teacher_table(report).splitlines()
    assert rows[0].endswith("| relevance (harmless) |")
    assert rows[2].startswith("| good |") and rows[2].endswith("| 0.0% | 100.0% |")  # harmless refusal, relevance
    assert rows[3].startswith("| bad |") and rows[3].endswith("| 0.0% | 0.0% |")


def prepare(folder, tmp_path, *flags, sft_calls=None, monkeypatch=None, fit=True):
    """teachers.prepare_teachers on the tiny checkpoint with pipeline_args' flags: (result, log lines,
    (base, tokenizer, key)). sft_calls: records each teacher SFT's (desc, pairs); fit=False skips
    the training itself (the teacher is a copy of the base)."""
    args = pipeline_args(folder, tmp_path / "run", "--teacher-dir", str(tmp_path / "teachers"),
                         "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--limit", "4", *flags)
    if sft_calls is not None:
        monkeypatch.setattr(teachers, "teacher_sft", lambda a, b, pairs, desc: sft_calls.append((desc, pairs)) or
                            (REAL_TEACHER_SFT(a, b, pairs, desc) if fit else teachers.compute_copy(b.fp32, a.precision, b.device)))
    lines = []
    base = train.load_base(args, lines.append)
    prompts = train.load_pools(args)
    found = teachers.prepare_teachers(teachers.TeacherFlags.from_args(args), base, prompts.harmful, prompts.harmless, lines.append)
    return (found.good, found.bad, found.keys, found.answers), lines, (base.compute, base.tokenizer, base.key)


def answer(prompt):
    return f"Sure: {prompt[:20]}"


def fake_generate(model, tokenizer, prompts, *a, **k):
    return [answer(p) for p in prompts], {}


def test_default_bad_teacher_learns_other_prompts_answers_to_harmless_prompts(tiny_folder, tmp_path, monkeypatch):
    # a tiny random model answers "" to everything: hand-written answers make the pairs tellable apart
    monkeypatch.setattr(teachers, "generate", fake_generate)
    calls = []
    (good, bad, keys, answers), lines, (base, _, key) = prepare(tiny_folder, tmp_path, "--limit", "2",
                                                                sft_calls=calls, monkeypatch=monkeypatch)
    prompts = train.load_pools(pipeline_args(tiny_folder, tmp_path, "--limit", "2"))
    harmful, harmless = [e.prompt for e in prompts.harmful], [e.prompt for e in prompts.harmless]
    (desc, pairs), = [c for c in calls if c[0].startswith("bad")]
    # harmful prompts keep the base's own compliant answer; the two harmless prompts swap answers
    assert pairs == [(harmful[0], answer(harmful[0])), (harmful[1], answer(harmful[1])),
                     (harmless[0], answer(harmless[1])), (harmless[1], answer(harmless[0]))]
    assert bad is not base and keys["bad"] != key
    # the bad teacher's harmless answers are there for the teacher table, with their prompts
    assert answers["bad"][1].prompts == harmless and len(answers["bad"][1]) == 2
    report = evaluation.teacher_report({k: v[0] for k, v in answers.items()}, {k: v[1] for k, v in answers.items()})
    assert all(report[k]["harmless_relevance"] is not None for k in ("good", "bad"))


def test_bad_teacher_base_and_bad_harmless_none_build_no_harmless_pairs(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "generate", fake_generate)
    calls = []
    (_, bad, _, _), _, (base, _, _) = prepare(tiny_folder, tmp_path / "a", "--limit", "2", "--bad-teacher", "base",
                                              sft_calls=calls, monkeypatch=monkeypatch, fit=False)
    assert bad is base and [d for d, _ in calls] == ["good teacher (refusal SFT)"]
    calls.clear()
    prepare(tiny_folder, tmp_path / "b", "--limit", "2", "--bad-harmless", "none", sft_calls=calls,
            monkeypatch=monkeypatch, fit=False)
    harmful = [e.prompt for e in train.load_pools(pipeline_args(tiny_folder, tmp_path, "--limit", "2")).harmful]
    (_, pairs), = [c for c in calls if c[0].startswith("bad")]
    assert pairs == [(p, answer(p)) for p in harmful]


@pytest.fixture(scope="module")
def built(tiny_folder, tmp_path_factory):
    """Teachers built once with the default teacher flags (a teacher folder and an answer cache),
    and the log of that build; tests work on copies."""
    folder = tmp_path_factory.mktemp("built")
    _, lines, _ = prepare(tiny_folder, folder)
    return folder, lines


def copy_of(built, tmp_path):
    for name in ("teachers", "cache"):
        shutil.copytree(built[0] / name, tmp_path / name)
    return tmp_path / "teachers"


def test_teacher_built_with_other_flags_stops_with_one_line_naming_them(tiny_folder, built, tmp_path):
    assert built[1][:2] == ["bad teacher: building", "good teacher: building"]
    teacher_dir = copy_of(built, tmp_path)
    with open(teacher_dir / "good" / "build.json") as f:
        assert json.load(f)["flags"]["teacher_lr"] == 5e-5
    for flags, named in [(["--teacher-lr", "1e-3"], "--teacher-lr 5e-05 → 0.001"),
                         (["--seed", "1"], "--data-seed 0 → 1"),   # --data-seed follows --seed
                         (["--data-seed", "1"], "--data-seed 0 → 1"),
                         (["--limit", "3"], "--limit 4 → 3"),
                         (["--max-response-tokens", "16"], "--max-response-tokens 32 → 16"),
                         (["--bad-harmless", "none"], "--bad-harmless derange → none")]:
        with pytest.raises(teachers.ModelError) as e:
            prepare(tiny_folder, tmp_path, *flags)
        msg = str(e.value)
        assert "\n" not in msg and named in msg, msg
        assert f"delete {teacher_dir / 'bad'} to rebuild it, or pass another --teacher-dir" in msg
    with pytest.raises(teachers.ModelError, match="the good teacher .* --teacher-harmless-repeat 2 → 1"):
        prepare(tiny_folder, tmp_path, "--teacher-harmless-repeat", "1")
    # and train.main turns it into one `error:` line
    with pytest.raises(SystemExit) as e:
        train.main(["--recipe", "full", "--model", tiny_folder, "--out", str(tmp_path / "run"), "--teacher-dir", str(teacher_dir),
                    "--cache-dir", str(tmp_path / "cache"), "--limit", "4", "--max-new-tokens", "6",
                    "--teacher-epochs", "1", "--batch-size", "2", "--precision", "fp32", "--teacher-lr", "1e-3"])
    assert str(e.value.code).startswith("error: the bad teacher in ") and "\n" not in str(e.value.code)
    assert "--teacher-lr 5e-05 → 0.001" in str(e.value.code) and "--batch-size" not in str(e.value.code)


def test_same_flags_reuse_the_built_teachers(tiny_folder, built, tmp_path, monkeypatch):
    teacher_dir = copy_of(built, tmp_path)
    monkeypatch.setattr(teachers, "teacher_sft", lambda *a, **k: pytest.fail("a teacher was built again"))
    # --micro-batch only changes how the same gradient is summed: still the same teacher
    _, lines, _ = prepare(tiny_folder, tmp_path, "--micro-batch", "1")
    assert lines[:2] == [f"bad teacher: reusing {teacher_dir / 'bad'}", f"good teacher: reusing {teacher_dir / 'good'}"]
    # another student seed with the data seed fixed: still the same teachers (the ablation's seeds)
    _, lines, _ = prepare(tiny_folder, tmp_path, "--seed", "1", "--data-seed", "0")
    assert lines[:2] == [f"bad teacher: reusing {teacher_dir / 'bad'}", f"good teacher: reusing {teacher_dir / 'good'}"]


def test_a_save_cut_short_leaves_no_build_json(tiny, tokenizer, tmp_path, monkeypatch):
    def killed(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # after the weights, before build.json

    real = teachers.save_model
    monkeypatch.setattr(teachers, "save_model", killed)
    folder = str(tmp_path / "good")
    with pytest.raises(KeyboardInterrupt):
        teachers.save_teacher(tiny, tokenizer, folder, {"teacher": "good"})
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert teachers.build_status(folder, {"teacher": "good"}) == "incomplete (no build.json)"


def test_incomplete_teacher_folders_are_rebuilt(tiny_folder, built, tmp_path):
    teacher_dir = copy_of(built, tmp_path)
    os.remove(teacher_dir / "good" / "build.json")
    os.remove(teacher_dir / "bad" / "config.json")
    _, lines, _ = prepare(tiny_folder, tmp_path)
    assert lines[:2] == [f"bad teacher: rebuilding, {teacher_dir / 'bad'} is incomplete (no config.json)",
                         f"good teacher: rebuilding, {teacher_dir / 'good'} is incomplete (no build.json)"]
    assert all(os.path.isfile(teacher_dir / n / f) for n in ("good", "bad") for f in ("config.json", "build.json"))
    _, lines, _ = prepare(tiny_folder, tmp_path)
    assert [l.split(":")[1].split()[0] for l in lines[:2]] == ["reusing", "reusing"]


def test_an_fp32_teacher_is_reloaded_as_it_was_trained(tiny_folder, tmp_path, monkeypatch):
    """The teacher a run trains with is the reloaded folder: in an fp32 run it must be the fp32 SFT
    result itself, not a bf16 rounding of it."""
    trained = {}
    monkeypatch.setattr(teachers, "teacher_sft", lambda f, b, pairs, desc: trained.setdefault(
        desc, REAL_TEACHER_SFT(f, b, pairs, desc)))
    (good, _, _, _), _, _ = prepare(tiny_folder, tmp_path)   # --precision fp32
    want = trained["good teacher (refusal SFT)"].state_dict()
    got = good.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k].cpu(), v.cpu()) for k, v in want.items())
