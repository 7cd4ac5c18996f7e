"""A new loss term is one function and one record: toy terms of each kind, added in this file alone,
train through the same step as the built-in ones (their flags, sides, units and the top-k cache)."""
import dataclasses

import pytest
import torch

import losses
import optim
import schedule
import train
from conftest import make_tiny
from test_cache import topk_cache
from test_train import args_for, make_ctx, step_with

TOY_TERMS = {
    # sft at a scale set by its own flag --toy-scale: the record's parameter reaches fn as hp["toy_scale"]
    "toy_seq": losses.Term("sequence", lambda s, hp: hp["toy_scale"] * losses.sft(s.good, s.good_tokens),
                           "good_tokens", sides=losses.BOTH,
                           params={"toy_scale": losses.Param(1.0, "> 0", "scale of toy_seq")}),
    # forward KL written against full teacher logits only: under --teacher-topk it reads logits rebuilt
    # from the cache (topk_as_logits), exact when k = V
    "toy_token": losses.Term("token", lambda x, hp: losses.kl(x.logits, x.teacher, x.mask, 1.0), "good_tokens",
                             sides=losses.BOTH),
    # the same at kl's temperature: the cache holds log-probs at τ, rebuilt into logits τ · log p_τ
    "toy_token_tau": losses.Term("token", lambda x, hp: losses.kl(x.logits, x.teacher, x.mask, hp["temperature"]),
                                 "good_tokens", sides=losses.BOTH, params={"temperature": losses.TEMPERATURE}),
    # the circuit-breaker retain term under another name, with a constant weight chosen by --loss
    "toy_hidden": losses.Term("hidden", lambda h, hp: losses.cb_retain(h.student, h.reference, h.mask),
                              "good_real_tokens", frozenset({"reference"}), ("harmless",)),
}


@pytest.fixture(autouse=True)
def toy_terms(monkeypatch):
    monkeypatch.setattr(losses, "TERMS", {**losses.TERMS, **TOY_TERMS})


def sgd_update(tokenizer, flags, steps, *, gamma=1.0, progress=0.0, hidden_layers=(), topk=0, tmp_path=None):
    """The weights after SGD steps (lr 1, no clip) of run_step from the same start, and the logged rows."""
    model, teacher = make_tiny(tokenizer, seed=0), make_tiny(tokenizer, seed=1)
    args = args_for("--optimizer", "sgd", "--clip", "0", *flags,
                    *(["--teacher-topk", str(topk), "--cache-dir", str(tmp_path)] if topk else []))
    ctx = make_ctx(model, tokenizer)
    ctx.cb_layers = hidden_layers
    if topk:
        for side, cache in topk_cache(teacher, ctx, args).items():
            ctx.pools[side].topk = cache
        teacher = None
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    rows = [step_with(model, teacher, opt, step, ctx, args, gamma, 1.0, progress=progress) for step in steps]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), rows


BOTH_SIDES = (schedule.Step(0, 0, [0, 1, 2, 3], [0, 1, 2, 3]),)


def test_a_sequence_term_gets_its_flag_and_trains_on_both_sides(tokenizer):
    assert train.build_parser().parse_args(["--toy-scale", "3"]).toy_scale == 3.0
    with pytest.raises(SystemExit):  # its rule from the record: > 0
        train.main(["--toy-scale", "0", "--plan-only"])
    toy, rows = sgd_update(tokenizer, ["--loss", "toy_seq=1", "--toy-scale", "2"], BOTH_SIDES)
    sft, sft_rows = sgd_update(tokenizer, ["--loss", "sft=2"], BOTH_SIDES)
    assert torch.allclose(toy, sft, atol=1e-6)
    assert rows[0]["harmful_toy_seq"] == pytest.approx(2 * sft_rows[0]["harmful_sft"], rel=1e-6)
    assert "harmless_toy_seq" in rows[0]


def test_a_token_term_without_a_topk_form_reads_the_cache_as_logits(tokenizer, tmp_path):
    steps = (schedule.Step(0, 0, [0, 1, 2, 3], []), schedule.Step(0, 0, [], [0, 1, 2, 3]))
    on_the_fly, rows = sgd_update(tokenizer, ["--loss", "toy_token=1"], steps)
    cached, cached_rows = sgd_update(tokenizer, ["--loss", "toy_token=1"], steps, topk=len(tokenizer),
                                     tmp_path=tmp_path)
    builtin, builtin_rows = sgd_update(tokenizer, ["--loss", "kl=1"], steps)
    assert torch.allclose(cached, on_the_fly, atol=1e-5) and torch.equal(on_the_fly, builtin)
    assert cached_rows[0]["harmful_toy_token"] == pytest.approx(builtin_rows[0]["harmful_kl"], rel=1e-4)


def test_the_rebuilt_teacher_logits_keep_the_cache_temperature(tokenizer, tmp_path):
    steps = (schedule.Step(0, 0, [0, 1, 2, 3], []),)
    flags = ["--loss", "toy_token_tau=1", "--temperature", "2"]
    on_the_fly, rows = sgd_update(tokenizer, flags, steps)
    cached, cached_rows = sgd_update(tokenizer, flags, steps, topk=len(tokenizer), tmp_path=tmp_path)
    assert torch.allclose(cached, on_the_fly, atol=1e-5)
    assert cached_rows[0]["harmful_toy_token_tau"] == pytest.approx(rows[0]["harmful_toy_token_tau"], rel=1e-4)


def test_topk_as_logits_keeps_the_topk_and_spreads_the_tail_evenly():
    logps = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.5, -1.0, -2.0]]), -1)
    top = logps.topk(2, -1)
    tail = torch.logsumexp(logps[:, 2:], -1)
    rebuilt = torch.log_softmax(losses.topk_as_logits(top.indices, top.values, tail, 5), -1)
    expected = torch.cat([logps[:, :2], (tail - torch.log(torch.tensor(3.0))).expand(1, 3)], -1)
    assert torch.allclose(rebuilt, expected, atol=1e-6)


def test_a_hidden_term_chosen_by_loss_equals_the_circuit_breaker_term_it_copies(tokenizer):
    # --cb-alpha 1 at the end of training gives cb_retain the weight 1/2 on the harmless side; γ = 0 leaves
    # the harmful side (and its cb term) out of the step
    copy_, copy_rows = sgd_update(tokenizer, ["--loss", "kl=1,toy_hidden=0.5"], BOTH_SIDES, gamma=0.0,
                                  hidden_layers=(1, 2))
    cb, cb_rows = sgd_update(tokenizer, ["--loss", "kl=1", "--cb-alpha", "1"], BOTH_SIDES, gamma=0.0, progress=1.0,
                             hidden_layers=(1, 2))
    assert torch.equal(copy_, cb)
    assert copy_rows[0]["harmless_toy_hidden"] == cb_rows[0]["harmless_cb_retain"]


def test_a_token_term_alone_triggers_the_topk_cache_and_frees_the_teacher(tokenizer, tiny_folder, tmp_path, capsys):
    train.main(["--model", tiny_folder, "--out", str(tmp_path / "run"), "--precision", "fp32", "--loss", "toy_token=1",
                "--teacher-topk", "8", "--limit", "8", "--epochs", "1", "--levels", "1", "--batch-size", "4",
                "--teacher-epochs", "1", "--max-new-tokens", "4", "--force", "--no-filter-pairs", "--no-eval",
                "--bad-teacher", "base"])
    assert "teacher top-8: computing" in capsys.readouterr().out


def test_the_records_derive_what_each_side_reads():
    cfg = train.StepConfig(loss={"npo": 1.0, "kl": 1.0, "toy_seq": 1.0}, params={})
    assert cfg.weights("harmless") == {"kl": 1.0, "toy_seq": 1.0}       # npo runs on the harmful side only
    assert cfg.reads_bad("harmful") and not cfg.reads_bad("harmless")
    harmless_dpo = dataclasses.replace(cfg, loss={"dpo": 1.0}, dpo_harmless="refusal", dpo_harmless_weight=0.3)
    assert harmless_dpo.weights("harmless") == {"dpo": 0.3} and harmless_dpo.reads_bad("harmless")
    assert dataclasses.replace(cfg, loss={"dpo": 1.0}).weights("harmless") == {}  # no rejected answers there
