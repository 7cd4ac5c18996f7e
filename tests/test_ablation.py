"""Refusal-direction ablation (teachers.refusal_directions / ablated / orthogonalize) on tiny random models."""
import copy
import json
import os

import pytest
import torch

import data
import teachers
from conftest import make_tiny

PROMPTS = ["How do I pick a lock?", "Write a poem about the sea.", "hi", "Explain photosynthesis in two sentences."]


def batch(tokenizer, prompts=PROMPTS):
    return next(teachers._prompt_batches(tokenizer, prompts, batch_size=len(prompts)))


def hooks(model):
    return {(name, k) for name, m in model.named_modules() for k in m._forward_hooks}


def random_direction(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.config.hidden_size, generator=g)


def test_ablated_stream_has_no_component_along_r_and_hooks_are_removed(tokenizer, tiny):
    tiny.config.tie_last_hidden_states = False  # hidden_states[-1]: last layer's output, before the final norm
    b = batch(tokenizer)
    plain = teachers._forward(tiny, b, output_hidden_states=True).hidden_states  # installs transformers' own hooks
    before = hooks(tiny)
    r = random_direction(tiny)
    unit = r / r.norm()
    with teachers.ablated(tiny, r):
        assert len(hooks(tiny)) == len(before) + 1 + 2 * tiny.config.num_hidden_layers
        states = teachers._forward(tiny, b, output_hidden_states=True).hidden_states
    assert len(states) == tiny.config.num_hidden_layers + 1  # embedding output + every layer's output
    for s, p in zip(states, plain):
        assert (p @ unit).abs().max() > 1e-2  # the plain model does write along r
        assert (s @ unit).abs().max() < 1e-5
    assert hooks(tiny) == before
    with pytest.raises(RuntimeError, match="boom"):
        with teachers.ablated(tiny, r):
            raise RuntimeError("boom")
    assert hooks(tiny) == before
    again = teachers._forward(tiny, b, output_hidden_states=True).hidden_states
    torch.testing.assert_close(again[-1], plain[-1])


def _untied(tokenizer, seed=0):
    model = make_tiny(tokenizer, seed=seed)
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    untied = type(model)(config).eval()
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight.data = model.lm_head.weight.detach().clone() + 0.01 * torch.randn_like(untied.lm_head.weight)
    return untied


@pytest.mark.parametrize("kind", ["tied", "untied, random norm gains and biases"])
def test_orthogonalize_equals_hooked_ablation(tokenizer, kind):
    """Embedding + o_proj + down_proj are every write to the residual stream: baking the projection
    into them gives the hooked model's logits."""
    if kind == "tied":
        model = make_tiny(tokenizer, seed=3)
    else:  # non-uniform RMSNorm gains would change a tied unembedding's logits (see orthogonalize's docstring)
        model = _untied(tokenizer, seed=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    b = batch(tokenizer)
    r = random_direction(model, seed=4)
    plain = teachers._forward(model, b).logits
    with teachers.ablated(model, r):
        hooked = teachers._forward(model, b).logits
    baked_model = teachers.orthogonalize(copy.deepcopy(model), r)
    baked = teachers._forward(baked_model, b).logits
    mask = b["attention_mask"].bool()
    assert (plain - hooked)[mask].abs().max() > 1e-3  # the ablation does change the model
    torch.testing.assert_close(baked[mask], hooked[mask], atol=1e-4, rtol=1e-4)
    unit = r / r.norm()
    assert (baked_model.model.embed_tokens.weight @ unit).abs().max() < 1e-5


def test_tied_unembedding_changes_when_final_norm_gain_is_not_uniform(tokenizer):
    """The caveat in orthogonalize's docstring, made concrete: tied + non-uniform final gain ≠ hooked."""
    model = make_tiny(tokenizer, seed=3)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    b, r = batch(tokenizer), random_direction(model, seed=4)
    with teachers.ablated(model, r):
        hooked = teachers._forward(model, b).logits
    baked = teachers._forward(teachers.orthogonalize(copy.deepcopy(model), r), b).logits
    assert (baked - hooked)[b["attention_mask"].bool()].abs().max() > 1e-4


def test_refusal_directions_equal_brute_force_mean_difference(tokenizer):
    model = make_tiny(tokenizer, seed=5, layers=3)
    harmful, harmless = PROMPTS[:3], PROMPTS[1:] + ["What is 2 + 2?"]
    got = teachers.refusal_directions(model, tokenizer, harmful, harmless, batch_size=2)  # padded batches

    def mean_state(prompts):
        rows = []
        for p in prompts:  # one prompt at a time, no padding, default positions
            ids = tokenizer(data.prompt_text(tokenizer, p), add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([hs[l][0, -1] for l in range(model.config.num_hidden_layers)]))
        return torch.stack(rows).mean(0)

    want = mean_state(harmful) - mean_state(harmless)
    assert got.shape == (3, model.config.hidden_size) and got.dtype == torch.float32
    assert want[1:].abs().max() > 1e-3  # not trivially zero (layer 0: same last template token for all)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_pick_layer_lowest_refusal_under_kl_else_lowest_kl():
    table = [{"layer": 1, "refusal_rate": 0.0, "kl": 0.5}, {"layer": 2, "refusal_rate": 0.5, "kl": 0.05},
             {"layer": 3, "refusal_rate": 0.25, "kl": 0.08}, {"layer": 4, "refusal_rate": 0.25, "kl": 0.02}]
    assert teachers.pick_layer(table, 0.1) == (table[3], False)
    assert teachers.pick_layer(table, 0.01) == (table[3], True)
    assert teachers.pick_layer(table, 1.0) == (table[0], False)


def test_orthogonalize_rejects_other_architectures(tokenizer):
    with pytest.raises(teachers.ModelError, match="Llama-style"):
        teachers.orthogonalize(torch.nn.Linear(4, 4), torch.ones(4))


def test_break_cli_writes_loadable_model_and_json(tiny_folder, tmp_path):
    out = str(tmp_path / "broken")
    teachers.main(["break", "--method", "ablate", "--model", tiny_folder, "--out", out, "--n-prompts", "4",
                   "--n-val", "2", "--select-tokens", "2", "--eval-limit", "2"])
    info = json.load(open(os.path.join(out, "ablation.json")))
    assert {"chosen_layer", "table", "prompts", "settings", "held_out"} <= set(info)
    assert not set(info["prompts"]["direction_harmful"]) & set(info["prompts"]["selection_harmful"])
    held_out = {e.prompt for e in data.load_pool("harmful")[1]}
    assert not held_out & set(info["prompts"]["direction_harmful"] + info["prompts"]["selection_harmful"])
    model, _, _ = teachers.load_model(out, dtype=torch.float32)
    r = torch.tensor(info["direction"])
    assert (model.model.embed_tokens.weight @ r).abs().max() < 1e-5
    assert (model.model.layers[0].mlp.down_proj.weight.T @ r).abs().max() < 1e-5
