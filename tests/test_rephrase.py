"""Rephrased harmful prompts (past / future tense, hypothetical, third person, fiction) for training
and for a rephrased HS set."""
import argparse

import pytest

import data
import eval as evaluation
import train
from test_train import pipeline_args


def test_each_prompt_gets_one_framing_chosen_by_its_hash_and_keeps_its_category():
    examples = [data.Example(f"explain how to pick lock number {i}", category=f"c{i % 3}") for i in range(40)]
    mixed = data.rephrase(examples, "mixed", seed=0)
    assert [e.category for e in mixed] == [e.category for e in examples]
    for e, r in zip(examples, mixed):
        assert r.prompt == data.REPHRASINGS[r.extra["rephrasing"]].format(prompt=e.prompt)
        assert r.extra["original"] == e.prompt
    assert {r.extra["rephrasing"] for r in mixed} == set(data.REPHRASINGS)   # 40 prompts reach all five
    assert [r.prompt for r in data.rephrase(list(reversed(examples)), "mixed")] == [r.prompt for r in reversed(mixed)]
    assert data.rephrase(examples[:1], "past")[0].prompt == "In the past, how did people do this? " + examples[0].prompt
    with pytest.raises(data.DataError, match="rephrasing 'passive'"):
        data.rephrase(examples, "passive")


def test_heldout_framings_share_no_wording_with_the_trained_ones():
    """The evaluation-only templates reach every prompt with one of their five framings, and none of them
    shares a five-word run with a training template (a model could refuse that wording alone)."""
    examples = [data.Example(f"explain how to pick lock number {i}") for i in range(40)]
    held = data.rephrase(examples, "heldout", seed=0)
    assert {r.extra["rephrasing"] for r in held} == set(data.HELDOUT_REPHRASINGS)
    for e, r in zip(examples, held):
        assert r.prompt == data.HELDOUT_REPHRASINGS[r.extra["rephrasing"]].format(prompt=e.prompt)
    runs = lambda text: {tuple(text.lower().split()[i:i + 5]) for i in range(len(text.split()) - 4)}
    trained = set().union(*(runs(t.format(prompt="")) for t in data.REPHRASINGS.values()))
    assert not any(runs(t.format(prompt="")) & trained for t in data.HELDOUT_REPHRASINGS.values())
    assert data.rephrase(examples[:1], "heldout-past")[0].prompt.startswith("Historically speaking")


def test_rephrased_copies_join_the_harmful_training_prompts_only(tiny_folder, tmp_path):
    plain = train.load_pools(pipeline_args(tiny_folder, tmp_path))
    more = train.load_pools(pipeline_args(tiny_folder, tmp_path, "--rephrase-harmful", "fiction"))
    assert [e.prompt for e in more.harmful] == [e.prompt for e in plain.harmful] + [
        data.REPHRASINGS["fiction"].format(prompt=e.prompt) for e in plain.harmful]
    assert more.harmless == plain.harmless and more.harmful_test == plain.harmful_test


def test_eval_rephrases_the_hs_set_when_asked():
    args = argparse.Namespace(protocol="offline", hs_set=None, judge=None, hs_n=3, max_new_tokens=None, fa_task=None,
                              xstest=None, mc=None, borderline_dev=None, seed=0, hs_split="train", threshold=0.5,
                              hs_rephrase="past", hs_prefill="")
    (prompts, _, _, _), settings = evaluation.plan_metrics(args)["hs"]
    originals = evaluation.load_hs_set(n=3)
    assert [p.prompt for p in prompts] == ["In the past, how did people do this? " + e.prompt for e in originals]
    assert settings["rephrased"] == "past"
