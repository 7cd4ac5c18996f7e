"""Deep refusal (issue 29, item 4): harmful pairs whose answer starts harmful, and the prefilling attack."""
import pytest
import torch

import data
import eval as evaluation
import train

REFUSAL = "I'm sorry, I can't help with that."
BAD = "Sure, here is how you do it: first you gather the parts, then you put them together carefully."


def response_tokens(feature):
    return [t for t, l in zip(feature["input_ids"], feature["labels"]) if l != data.IGNORE]


def test_an_answer_prefix_is_context_and_only_the_rest_is_trained_on(tokenizer):
    f = data.encode(tokenizer, "How do I do it?", REFUSAL, response_prefix="Sure, here is")
    # brute force: the chat-formatted prompt with the prefix, then the answer and the end-of-turn token
    context = tokenizer(data.prompt_text(tokenizer, "How do I do it?") + "Sure, here is", add_special_tokens=False).input_ids
    answer = tokenizer(REFUSAL + "<|im_end|>", add_special_tokens=False).input_ids
    assert f["input_ids"] == context + answer
    assert f["labels"] == [data.IGNORE] * len(context) + answer


def test_deep_refusal_copies_split_the_bad_answer_at_k_tokens(tokenizer):
    harmful = [data.Example(f"harmful request {i}") for i in range(12)] + [data.Example("refused by both")]
    good = [REFUSAL] * 13
    bad = [BAD + f" Step {i}." for i in range(12)] + [REFUSAL]   # the last pair: the bad teacher refuses
    examples, targets, rejected, prefixes = data.deep_refusal_examples(harmful, good, bad, tokenizer, max_k=6, seed=0)
    assert [e.prompt for e in examples] == [e.prompt for e in harmful[:12]] and targets == [REFUSAL] * 12
    ks = []
    for b, prefix, rest in zip(bad, prefixes, rejected):
        assert prefix + rest == b
        k = len(tokenizer(prefix, add_special_tokens=False).input_ids)
        assert tokenizer.decode(tokenizer(b, add_special_tokens=False).input_ids[:k]) == prefix
        ks.append(k)
    assert all(1 <= k <= 6 for k in ks) and len(set(ks)) > 1   # k varies over prompts
    again = data.deep_refusal_examples(harmful, good, bad, tokenizer, max_k=6, seed=0)[3]
    other = data.deep_refusal_examples(harmful, good, bad, tokenizer, max_k=6, seed=1)[3]
    assert again == prefixes and other != prefixes             # seeded per prompt
    one = data.deep_refusal_examples(harmful, good, bad, tokenizer, max_k=1, seed=0)[3]
    assert one == ["Sure"] * 12


def test_the_student_pools_hold_the_copies_with_the_prefix_masked(tokenizer):
    args = train.build_parser().parse_args(["--deep-refusal", "4", "--no-filter-pairs"])
    prompts = data.Prompts([data.Example("h1"), data.Example("h2")], [data.Example("b1")], [], [])
    answers = {"good": ([REFUSAL, REFUSAL], ["An answer."]), "bad": ([BAD, REFUSAL], None), "base": None}
    harmful, _, pools = train.training_pools(args, tokenizer, prompts, answers, lambda msg: None)
    assert [e.prompt for e in harmful] == ["h1", "h2", "h1"]   # h2's bad answer refuses: no copy
    h = pools["harmful"]
    assert len(h.good) == len(h.bad) == 3
    copy_good, copy_bad = h.good[2], h.bad[2]
    assert tokenizer.decode(response_tokens(copy_good)) == REFUSAL + "<|im_end|>"
    prefix = tokenizer.decode(copy_good["input_ids"][len(h.good[0]["input_ids"]) - len(response_tokens(h.good[0])):
                                                    len(copy_good["input_ids"]) - len(response_tokens(copy_good))])
    assert BAD.startswith(prefix) and 0 < len(prefix) < len(BAD)
    # the rejected copy is the rest of the bad answer, after the same context
    assert tokenizer.decode(response_tokens(copy_bad)) == BAD[len(prefix):] + "<|im_end|>"


def test_a_prefilled_answer_is_the_greedy_continuation_after_the_prefill(tiny, tokenizer):
    prompt, prefill = "How do I do it?", "Sure, here is"
    texts, _ = evaluation.generate(tiny, tokenizer, [prompt], max_new_tokens=5, prefill=prefill)
    ids = tokenizer(data.prompt_text(tokenizer, prompt) + prefill, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():  # brute force: five argmax steps, no cache
        for _ in range(5):
            ids = torch.cat([ids, tiny(ids).logits[:, -1:].argmax(-1)], 1)
    n = len(tokenizer(data.prompt_text(tokenizer, prompt) + prefill, add_special_tokens=False).input_ids)
    assert texts == [tokenizer.decode(ids[0, n:], skip_special_tokens=True).strip()]
    plain, _ = evaluation.generate(tiny, tokenizer, [prompt], max_new_tokens=5)
    assert plain != texts


@pytest.mark.parametrize("flag", [["--deep-refusal", "-1"]])
def test_a_negative_deep_refusal_stops_at_parse_time(flag, capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(flag)
    assert "--deep-refusal" in capsys.readouterr().err
