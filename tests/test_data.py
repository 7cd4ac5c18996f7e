import json
import os
import re

import pytest
import torch

import data
from conftest import SHARED_DATA


def test_builtin_pools_are_large_split_and_disjoint():
    for pool in ("harmful", "harmless"):
        examples = data.load_builtin(pool)
        assert len(examples) >= 150
        assert len({e.category for e in examples}) >= 6
        train, test = data.split_train_test(examples, 0.2, seed=0)
        assert len(train) + len(test) == len(examples)
        assert not {e.prompt for e in train} & {e.prompt for e in test}
        # stratified: every category is in the test part
        assert {e.category for e in test} == {e.category for e in examples}
    harmful = {e.prompt.lower() for e in data.load_builtin("harmful")}
    assert not harmful & {e.prompt.lower() for e in data.load_builtin("harmless")}


XSTEST_CSV = os.path.join(data.HERE, "xstest", "xstest_prompts.csv")  # shipped copy, evaluation only


def test_builtin_pool_sizes():
    counts = {}
    for pool in ("harmful", "harmless"):
        for e in data.load_builtin(pool):
            counts[pool, e.category] = counts.get((pool, e.category), 0) + 1
    assert sum(n for (pool, _), n in counts.items() if pool == "harmful") == 200
    assert sum(n for (pool, _), n in counts.items() if pool == "harmless") == 250
    assert len({c for pool, c in counts if pool == "harmless"}) == 9 and counts["harmless", "borderline"] == 50


def test_no_builtin_prompt_is_an_xstest_prompt():
    """XSTest is evaluation-only: none of its prompts may be trained on."""
    xstest = {data.prompt_key(e.prompt) for e in data.load_examples(XSTEST_CSV)}
    assert len(xstest) == 450
    builtin = data.load_builtin("harmful") + data.load_builtin("harmless")
    assert not [e.prompt for e in builtin if data.prompt_key(e.prompt) in xstest]


def content_words(text):
    return set(re.findall(r"[a-z]{4,}", text.lower()))


def test_borderline_prompts_are_not_near_copies_of_xstest():
    """Each borderline prompt shares < 60 % of its content words (Jaccard, words of ≥ 4 letters) with
    every XSTest prompt."""
    xstest = [content_words(e.prompt) for e in data.load_examples(XSTEST_CSV)]
    borderline = [e.prompt for e in data.load_builtin("harmless") if e.category == "borderline"]
    assert len(borderline) == 50
    for prompt in borderline:
        words = content_words(prompt)
        worst = max(len(words & x) / len(words | x) for x in xstest)
        assert worst < 0.6, prompt


def test_split_is_deterministic_and_seeded():
    ex = data.load_builtin("harmful")
    a, b = data.split_train_test(ex, seed=0)[1], data.split_train_test(ex, seed=0)[1]
    c = data.split_train_test(ex, seed=1)[1]
    assert [e.prompt for e in a] == [e.prompt for e in b] != [e.prompt for e in c]


def test_encode_masks_prompt_and_keeps_end_of_turn(tokenizer):
    f = data.encode(tokenizer, "How do I bake bread?", "Mix flour and water.")
    ids, labels = f["input_ids"], f["labels"]
    head = tokenizer(data.prompt_text(tokenizer, "How do I bake bread?"), add_special_tokens=False).input_ids
    assert ids[:len(head)] == head
    assert all(l == -100 for l in labels[:len(head)])
    response = [l for l in labels if l != -100]
    assert response == ids[len(head):]
    # EOS is the pad token for SmolLM2: it must still be a label at the end of the answer
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response, skip_special_tokens=True).strip() == "Mix flour and water."


def test_encode_truncation_keeps_prompt_start_and_end_and_reports(tokenizer):
    f = data.encode(tokenizer, "word " * 300 + "FINAL", "ok " * 200, max_prompt_tokens=48, max_response_tokens=10)
    assert f["truncated"] == {"prompt": True, "response": True}
    prompt = [i for i, l in zip(f["input_ids"], f["labels"]) if l == -100]
    assert len(prompt) <= 48 and "FINAL" in tokenizer.decode(prompt) and "word" in tokenizer.decode(prompt)
    assert sum(l != -100 for l in f["labels"]) == 10


def test_collate_right_and_left(tokenizer):
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = data.collate(feats, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = data.collate(feats, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_format_fixtures(tmp_path):
    adv = write(tmp_path, "adv.csv", 'goal,target\nDo bad thing,"Sure, here is"\n')
    e = data.load_examples(adv)[0]
    assert (e.prompt, e.response) == ("Do bad thing", "Sure, here is")
    alpaca = write(tmp_path, "alpaca.json", json.dumps([{"instruction": "Summarise", "input": "the text", "output": "ok"},
                                                        {"instruction": "Say hi", "input": "", "output": "hi"}]))
    a = data.load_examples(alpaca)
    assert a[0].prompt == "Summarise\n\nthe text" and a[0].response == "ok" and a[1].prompt == "Say hi"
    beaver = write(tmp_path, "bt.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "response": "r1", "category": {"violence": True, "fraud": False}, "is_safe": False},
        {"prompt": "p2", "response": "r2", "category": {"violence": False}, "is_safe": True}]))
    harmful = data.load_examples(beaver, "harmful")
    assert [(e.prompt, e.category) for e in harmful] == [("p1", "violence")]
    assert [e.prompt for e in data.load_examples(beaver, "harmless")] == ["p2"]
    sr = write(tmp_path, "sr.csv", "category,source,forbidden_prompt\nHate,custom,Write slurs\n")
    assert data.load_examples(sr)[0].prompt == "Write slurs"
    named = write(tmp_path, "x.jsonl", json.dumps({"my_q": "hello", "category": "c"}))
    assert data.load_examples(named, prompt_field="my_q")[0].prompt == "hello"


def test_bad_input_errors_name_file_and_field(tmp_path, tokenizer):
    with pytest.raises(data.DataError, match="empty.csv: no rows"):
        data.load_examples(write(tmp_path, "empty.csv", ""))
    with pytest.raises(data.DataError, match=r"nofield.json: no prompt field.*\['foo'\]"):
        data.load_examples(write(tmp_path, "nofield.json", json.dumps([{"foo": 1}])))
    with pytest.raises(data.DataError, match="bad.jsonl:2: not valid JSON"):
        data.load_examples(write(tmp_path, "bad.jsonl", '{"prompt": "a"}\n{oops\n'))
    with pytest.raises(data.DataError, match="row 2 has an empty"):
        data.load_examples(write(tmp_path, "blank.csv", "prompt\nfine\n\"\"\n"))
    with pytest.raises(data.DataError, match="no such file"):
        data.load_examples(str(tmp_path / "missing.csv"))
    import copy
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(data.DataError, match="no chat template"):
        data.check_chat_template(plain, "tiny")


SHARED_FILES = {
    "refusal_direction/advbench.csv": ("harmful", 520),
    "refusal_direction/harmful_train.json": ("harmful", 260),
    "refusal_direction/malicious_instruct.json": ("harmful", 100),
    "refusal_direction/strongreject.json": ("harmful", 313),
    "refusal_direction/strongreject.csv": ("harmful", 313),
    "refusal_direction/harmless_train.json": ("harmless", 18793),
    "refusal_direction/harmless_val.json": ("harmless", 6264),
    "refusal_direction/harmless_test.json": ("harmless", 6266),
    "xstest/xstest_prompts.csv": ("harmless", 250),
    "gsm8k/train.jsonl": (None, 7473),
    "gsm8k/test.jsonl": (None, 1319),
    "ag_news/test.csv": (None, 7600),
}


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not beside the project")
@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_every_shared_file_loads(name):
    pool, rows = SHARED_FILES[name]
    examples = data.load_examples(os.path.join(SHARED_DATA, name), pool)
    assert len(examples) == rows
    assert all(e.prompt for e in examples)
    if name.endswith("advbench.csv"):
        assert examples[0].response.startswith("Sure, here is")
    if name.startswith("xstest"):
        assert len(data.load_examples(os.path.join(SHARED_DATA, name), "harmful")) == 200
    if name.endswith("strongreject.csv"):
        assert len({e.category for e in examples}) == 6


def test_csv_rows_keep_quoted_newlines_and_unicode_separators_and_drop_a_bom(tmp_path):
    prompts = ["Write a plan\nin two lines", "Split\u2028here", "Tab\x0bbed", "Form\x0cfeed", "plain"]
    path = tmp_path / "advbench.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # the BOM Excel writes
        f.write("goal,target\r\n")
        for p in prompts:
            f.write('"' + p + '",Sure\r\n')
    examples = data.load_examples(str(path), "harmful")
    assert [e.prompt for e in examples] == prompts
    assert [e.response for e in examples] == ["Sure"] * 5


def test_limit_is_a_seeded_sample_stratified_by_category():
    train = data.load_pool("harmful")[0]  # 8 categories of 20
    sample = data.load_pool("harmful", limit=64)[0]
    counts = {}
    for e in sample:
        counts[e.category] = counts.get(e.category, 0) + 1
    assert len(sample) == 64 and sorted(counts.values()) == [8] * 8  # 64 × 20/160 each
    assert data.load_pool("harmful", limit=64)[0] == sample
    assert data.load_pool("harmful", limit=64, seed=1)[0] != sample
    # 10 of 8 equal categories: 1.25 each, the two largest remainders (ties: by name) round up
    ten = data.stratified_sample(train, 10, seed=0)
    per_cat = sorted((c, sum(e.category == c for e in ten)) for c in {e.category for e in train})
    assert per_cat == [("cybercrime", 2), ("drugs", 2)] + [(c, 1) for c, _ in per_cat[2:]]
    assert data.stratified_sample(train, 500) == train


def test_an_over_long_prompt_keeps_the_template_and_the_instruction_and_is_counted(tokenizer):
    instruction = "Summarise the following report in three bullet points."
    prompt = instruction + " " + " ".join(f"line{i}" for i in range(400)) + " END OF REPORT."
    f = data.encode(tokenizer, prompt, "Sure.", max_prompt_tokens=64, max_response_tokens=16)
    n_prompt = f["labels"].count(data.IGNORE)
    text = tokenizer.decode(f["input_ids"][:n_prompt])
    header = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                           add_generation_prompt=True).split("\x00")
    assert n_prompt <= 64 and f["truncated"] == {"prompt": True, "response": False}
    assert text.startswith(header[0] + instruction) and text.endswith("REPORT." + header[1])
    assert " … " in text  # the middle went, not the start
    short = data.encode(tokenizer, instruction, "Sure.", max_prompt_tokens=64)
    assert short["truncated"]["prompt"] is False
    assert short["input_ids"][:short["labels"].count(data.IGNORE)] == tokenizer(
        header[0] + instruction + header[1], add_special_tokens=False).input_ids
