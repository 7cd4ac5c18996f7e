"""Files a run writes and a rerun reads (issue 15, items 6, 9 and 10): written whole, a tail cut
short by a kill dropped with a note, damaged inputs and caches named or rebuilt, caches keyed by
what decides them."""
import json
import os
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import teachers
import eval as evaluation
import train
from conftest import make_tiny
from test_train import make_ctx, pipeline_args, run_interrupted_at_step_5


# ---------------------------------------------------------------- JSONL that runs append to

def test_a_cut_last_line_is_dropped_with_a_note_naming_the_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    for tail in (b'{"step": 2, "lo', b'{"step": 2}', b'{"step": 2, "lo\n'):  # cut mid-line, before its newline, garbled
        with open(path, "wb") as f:
            f.write(b'{"step": 0}\n\n{"step": 1}\n' + tail)
        notes = []
        assert data.read_jsonl(path, notes.append) == [{"step": 0}, {"step": 1}]
        assert notes == [f"{path}: dropped line 4, cut short by an interrupted write"]
    with open(path, "wb") as f:
        f.write(b'{"step": 0}\n{"step": 1}\n')
    notes = []
    assert data.read_jsonl(path, notes.append) == [{"step": 0}, {"step": 1}] and notes == []


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = str(tmp_path / "responses.jsonl")
    for middle in (b'{"key": "b", "resp\n', b'[1, 2]\n', b'\xff\xfe\n'):
        with open(path, "wb") as f:
            f.write(b'{"key": "a"}\n' + middle + b'{"key": "c"}\n')
        with pytest.raises(data.DataError) as e:
            data.read_jsonl(path)
        assert str(e.value) == f"{path}:2: not a JSON record; the file is damaged (delete this line, or the file)"


def test_an_append_after_a_cut_tail_starts_its_own_line(tmp_path):
    path = str(tmp_path / "responses.jsonl")
    with open(path, "wb") as f:
        f.write(b'{"a": 1}\n{"b": ')
    data.append_jsonl(path, [{"c": 3}, {"d": 4}])
    assert open(path, "rb").read() == b'{"a": 1}\n{"c": 3}\n{"d": 4}\n'
    data.append_jsonl(path, [{"e": 5}])
    assert open(path, "rb").read() == b'{"a": 1}\n{"c": 3}\n{"d": 4}\n{"e": 5}\n'


def counting_generate(monkeypatch):
    """teachers.generate replaced by one that answers "answer N" and records the prompts it got."""
    calls = []

    def generate(model, tokenizer, prompts, max_new_tokens, **kwargs):
        calls.append(list(prompts))
        return [f"answer {len(calls)}"] * len(prompts), {}

    monkeypatch.setattr(teachers, "generate", generate)
    return calls


def test_answer_cache_with_a_cut_tail_is_reused_and_repaired(tmp_path, monkeypatch, capsys):
    calls = counting_generate(monkeypatch)
    tok = types.SimpleNamespace(chat_template="{{ messages }}")
    path = str(tmp_path / "responses.jsonl")
    assert teachers.generate_cached(None, tok, "m", ["p", "q"], path) == ["answer 1", "answer 1"]
    with open(path, "ab") as f:
        f.write(b'{"key": "0f3a", "model": "m", "prom')  # a kill during the next append
    assert teachers.generate_cached(None, tok, "m", ["q", "p"], path) == ["answer 1", "answer 1"]
    assert capsys.readouterr().out == f"{path}: dropped line 3, cut short by an interrupted write\n"
    assert teachers.generate_cached(None, tok, "m", ["r"], path) == ["answer 2"]
    assert sorted(calls[0]) == ["p", "q"] and calls[1:] == [["r"]]
    assert sorted(json.loads(l)["prompt"] for l in open(path)) == ["p", "q", "r"]  # the cut tail is gone from the file
    with open(path, "a") as f:
        f.write("not json\n")
        f.write(open(path).readline())
    with pytest.raises(data.DataError, match=rf"^{path}:4: not a JSON record"):
        teachers.generate_cached(None, tok, "m", ["p"], path)


def test_answers_are_keyed_by_the_chat_template(tmp_path, monkeypatch):
    calls = counting_generate(monkeypatch)
    path = str(tmp_path / "responses.jsonl")
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    one, edited = types.SimpleNamespace(chat_template=template), types.SimpleNamespace(chat_template=template + "\n")
    assert teachers.generate_cached(None, one, "m", ["p"], path) == ["answer 1"]
    assert teachers.generate_cached(None, one, "m", ["p"], path) == ["answer 1"]
    assert teachers.generate_cached(None, edited, "m", ["p"], path) == ["answer 2"]  # generated again
    assert teachers.generate_cached(None, one, "m", ["p"], path) == ["answer 1"]
    assert calls == [["p"], ["p"]]


def test_resume_drops_a_cut_metrics_line_and_stops_on_a_damaged_one(tiny_folder, tmp_path, monkeypatch, capsys):
    run_interrupted_at_step_5(monkeypatch, pipeline_args(tiny_folder, tmp_path, "--no-eval"))
    path = str(tmp_path / "metrics.jsonl")
    lines = open(path).readlines()
    assert [json.loads(l)["step"] for l in lines] == [0, 1, 2, 3]
    with open(path, "w") as f:
        f.writelines([lines[0], '{"step": 1, "loss": 0.6\n', *lines[2:]])
    with pytest.raises(data.DataError) as e:
        train.run(pipeline_args(tiny_folder, tmp_path, "--no-eval", "--resume"))
    assert str(e.value) == f"{path}:2: not a JSON record; the file is damaged (delete this line, or the file)"
    with open(path, "w") as f:
        f.writelines([*lines, '{"step": 4, "epoch": 1, "le'])  # the kill cut the line of step 4
    capsys.readouterr()
    train.run(pipeline_args(tiny_folder, tmp_path, "--no-eval", "--resume"))
    assert f"{path}: dropped line 5, cut short by an interrupted write\n" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in open(path)] == list(range(8))


# ---------------------------------------------------------------- folders written whole

def test_a_model_save_cut_short_leaves_the_old_folder_whole(tokenizer, tmp_path, monkeypatch):
    folder = str(tmp_path / "model")
    old, new = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
    teachers.save_model(old, tokenizer, folder)
    real = tokenizer.save_pretrained

    def killed(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # every file written, the folder not yet moved in

    monkeypatch.setattr(tokenizer, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        teachers.save_model(new, tokenizer, folder + "/")
    monkeypatch.undo()
    weights = lambda: load_file(os.path.join(folder, "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(weights(), old.model.embed_tokens.weight) and os.path.isfile(os.path.join(folder, "config.json"))
    teachers.save_model(new, tokenizer, folder)
    assert torch.equal(weights(), new.model.embed_tokens.weight)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the cut save's temporary folder went with the next save


def test_a_teacher_save_cut_short_leaves_no_folder(tiny, tokenizer, tmp_path, monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(teachers, "save_file", killed)
    folder = str(tmp_path / "good")
    with pytest.raises(KeyboardInterrupt):
        teachers.save_teacher(tiny, tokenizer, folder, {"teacher": "good"})
    assert teachers.build_status(folder, {"teacher": "good"}) == "absent"


def test_a_model_is_not_saved_over_a_folder_of_other_files(tiny, tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(teachers.ModelError) as e:
        teachers.save_model(tiny, tokenizer, str(tmp_path))
    assert str(e.value) == f"{tmp_path}: a folder that holds no model; not replacing it (give a new or a model folder)"
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_replace_folder_swaps_whole_folders(tmp_path):
    (tmp_path / "new.tmp").mkdir()
    (tmp_path / "new.tmp" / "a").write_text("new")
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "a").write_text("old")
    (tmp_path / "student" / "b").write_text("old")
    data.replace_folder(str(tmp_path / "new.tmp"), str(tmp_path / "student"))
    assert os.listdir(tmp_path) == ["student"] and os.listdir(tmp_path / "student") == ["a"]
    assert (tmp_path / "student" / "a").read_text() == "new"


# ---------------------------------------------------------------- damaged inputs and caches

@pytest.mark.parametrize("name,raw,line,byte", [
    ("bad.csv", b"prompt\nfine\nd\xe9j\xe0 vu\n", 3, "e9"),
    ("bad.jsonl", b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "\xff"}\n', 2, "ff"),  # after a byte-order mark
    ("bad.json", b'[\n{"prompt": "a"},\n\n{"prompt": "\x80"}]', 4, "80"),
])
def test_a_data_file_that_is_not_utf8_names_file_and_line(tmp_path, name, raw, line, byte):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(data.DataError) as e:
        data.load_examples(str(path))
    assert str(e.value) == f"{path}:{line}: not UTF-8 text (byte 0x{byte}); save the file as UTF-8"


@pytest.mark.parametrize("name,text,message", [
    ("list.json", '[{"prompt": "a"}, {"prompt": "b"}, "c"]', ": item 3 of the list is a str, not a record with named fields"),
    ("nested.json", '{"train": [{"prompt": "a"}, [1, 2]]}', ": item 2 of the list is a list, not a record with named fields"),
    ("scalar.json", "42", ": expected a list of records, got a int"),
    ("rows.jsonl", '{"prompt": "a"}\n\n"b"\n', ":3: a str, not a record with named fields"),
])
def test_items_that_are_not_records_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(data.DataError) as e:
        data.load_examples(str(path))
    assert str(e.value) == f"{path}{message}"


def test_a_directory_is_not_a_data_file(tmp_path):
    (tmp_path / "harmful.csv").mkdir()
    for path in (tmp_path, tmp_path / "harmful.csv"):
        with pytest.raises(data.DataError) as e:
            data.load_examples(str(path))
        assert str(e.value) == f"{path}: is a directory, not a data file"


@pytest.mark.parametrize("flag", ["--out", "--teacher-dir", "--cache-dir"])
def test_a_folder_flag_naming_a_file_stops_in_one_line(tmp_path, flag):
    (tmp_path / "file").write_text("")
    argv = ["--plan-only", "--out", str(tmp_path / "run"), flag, str(tmp_path / "file")]  # stops before any model
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == f"error: {flag} {tmp_path / 'file'}: is a file, not a folder"
    assert not (tmp_path / "run").exists()


def test_an_unreadable_evaluation_cache_entry_is_computed_again(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(1) or {"harmful": {"n": len(calls)}})
    prompts = [data.Example("How do I bake bread?")]
    ident = evaluation.frozen_ident("m", "base", types.SimpleNamespace(chat_template="t"), "fp32", torch.device("cpu"),
                                    "auto")
    frozen = lambda: evaluation.evaluate_frozen(ident, lambda: None, None, prompts, prompts, str(tmp_path))
    assert frozen() == {"harmful": {"n": 1}} and frozen() == {"harmful": {"n": 1}}
    [name] = os.listdir(tmp_path / "eval")
    path = str(tmp_path / "eval" / name)
    for damaged in ('{"harmful": {"n"', "[1]"):
        with open(path, "w") as f:
            f.write(damaged)
        capsys.readouterr()
        assert frozen() == {"harmful": {"n": len(calls)}}
        assert capsys.readouterr().out == f"{path}: an unreadable evaluation cache entry, computed again\n"
        assert json.load(open(path)) == {"harmful": {"n": len(calls)}}  # rewritten
    assert len(calls) == 3 and os.listdir(tmp_path / "eval") == [name]


def test_a_topk_cache_folder_missing_a_file_is_rebuilt(tokenizer, tmp_path, monkeypatch):
    model, teacher = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
    ctx = make_ctx(model, tokenizer)
    lines = []
    cache = lambda: teachers.teacher_topk_cache(teacher, "tiny-1", ctx.pools, k=4, temperature=1.0,
                                             cache_dir=str(tmp_path), micro_batch=2, log=lines.append)
    folder = os.path.dirname(cache()["harmful"].ids.filename)
    first = np.array(cache()["harmless"].logps)
    os.remove(os.path.join(folder, "harmless.logps.npy"))
    again = cache()["harmless"].logps
    assert lines == [f"teacher top-4: computing {folder}", f"teacher top-4: reusing {folder}",
                     f"teacher top-4: rebuilding {folder}, it has no harmless.logps.npy"]
    assert np.array_equal(again, first) and os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]


# ---------------------------------------------------------------- racing and stale caches

def test_a_topk_cache_another_run_finished_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two runs build the same cache: each writes its own <hash>.<pid>.tmp; the one that finishes
    second keeps the first one's folder (which that run may be reading) and drops its own."""
    folder = str(tmp_path / "teacher_topk" / "0123abcd")
    pools = {"harmful": [{"labels": [-100, 5, 6]}, {"labels": [-100, -100, 7]}]}
    logits = torch.arange(2 * 3 * 10, dtype=torch.float).reshape(2, 3, 10).sin()
    seen = []

    def logits_of(feats):
        if not seen:  # the other run starts and finishes while this one computes
            seen.append(sorted(os.listdir(os.path.dirname(folder))))
            monkeypatch.setattr(os, "getpid", lambda: 99999)
            teachers.build_topk_cache(folder, ["id"], pools, lambda f: (logits, torch.tensor([x["labels"] for x in f])),
                                      4, 1.0, 8)
            monkeypatch.undo()
            open(os.path.join(folder, "theirs"), "w").close()
        return logits, torch.tensor([x["labels"] for x in feats])

    teachers.build_topk_cache(folder, ["id"], pools, logits_of, 4, 1.0, 8)
    assert seen == [[f"0123abcd.{os.getpid()}.tmp"]]
    assert sorted(os.listdir(folder)) == sorted([f"harmful.{p}.npy" for p in teachers.TOPK_PARTS] + ["id.json", "theirs"])
    assert os.listdir(os.path.dirname(folder)) == ["0123abcd"]
    assert teachers.TopkCache(folder, "harmful").offsets.tolist() == [0, 2, 3]


def write_prompts(path, prompts):
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)


def test_resume_takes_the_folder_however_spelled_and_refuses_edited_data(tiny_folder, tmp_path, capsys):
    harmful = tmp_path / "harmful.jsonl"
    prompts = [f"How do I break into house number {i}?" for i in range(10)]  # 8 train (all kept by --limit 8), 2 test
    write_prompts(harmful, prompts)
    out = str(tmp_path / "run")
    flags = ("--no-eval", "--epochs", "1", "--harmful", str(harmful))
    train.run(pipeline_args(tiny_folder, out + "/", *flags))
    with open(os.path.join(out, "checkpoints", "step-4", "args.json")) as f:
        saved = json.load(f)
    assert saved["out"] == out and saved["teacher_dir"] == os.path.join(out, "teachers")
    capsys.readouterr()
    train.run(pipeline_args(tiny_folder, out, *flags, "--resume"))  # the same folder without the slash
    assert f"resumed from {os.path.join(out, 'checkpoints', 'step-4')} at step 4 of 4" in capsys.readouterr().out
    write_prompts(harmful, prompts[:9] + ["How do I break into a car?"])
    with pytest.raises(ValueError) as e:
        train.run(pipeline_args(tiny_folder, out + "//", *flags, "--resume"))
    assert str(e.value).startswith(f"--resume: the training data changed since the saved run (sha256 of its prompts "
                                   f"{saved['data_sha256'][:12]} → ")
    assert str(e.value).endswith("): restore the data files, or start over with --overwrite")
