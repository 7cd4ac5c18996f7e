"""A few checks on the real embedded model (SmolLM2-135M-Instruct from the GGUF), kept small."""
import copy

import pytest
import torch

import data
import eval as evaluation
import schedule
import teachers
import optim
import train


@pytest.fixture(scope="module")
def smollm():
    return teachers.load_model("smollm2-135m", dtype=torch.float32)


def test_real_model_generates_and_dpo_moves_it_towards_refusal(smollm, tmp_path):
    model, tokenizer, key = smollm
    assert key.startswith("SmolLM2-135M-Instruct.Q4_1.gguf:")
    data.check_chat_template(tokenizer, "smollm2-135m")
    harmful = [e.prompt for e in data.load_pool("harmful")[0][:2]]
    dtype = teachers.DTYPES[teachers.resolve_precision("auto")[0]]  # bf16 only where the CPU computes it natively
    compute = optim.cast_parameters(copy.deepcopy(model), dtype)
    answers, report = evaluation.generate(compute, tokenizer, harmful, max_new_tokens=16, token_budget=64)
    assert all(answers) and report["prompts"] == 2  # a budget of 64 tokens forces one prompt per batch

    args = train.build_parser().parse_args(["--loss", "dpo=1", "--micro-batch", "2", "--lr", "1e-5", "--beta", "0.1"])
    good = [data.encode(tokenizer, p, teachers.refusal_for(p), 64, 24) for p in harmful]
    bad = [data.encode(tokenizer, p, a, 64, 24) for p, a in zip(harmful, answers)]
    opt = optim.MasterWeightOptimizer(model, compute_dtype=dtype, **train.optimizer_options(args))  # model now computes in dtype
    pools = {"harmful": train.Pool(good, bad)}
    step, cfg = schedule.Step(0, 0, [0, 1], []), train.StepConfig.from_args(args)
    rows = [train.run_step(model, train.Frozen(compute, model), opt, step, pools, cfg, 1.0, 1e-5) for _ in range(3)]
    assert rows[0]["harmful_dpo_margin"] == 0.0  # the reference runs on the same batch: equal before the update
    assert rows[-1]["harmful_dpo_margin"] > rows[0]["harmful_dpo_margin"] + 1.0
    assert rows[-1]["harmful_dpo"] < rows[0]["harmful_dpo"]
    # a checkpoint of the real model loads back through transformers with the same logits
    teachers.save_model(model, tokenizer, str(tmp_path), state_dict=opt.master_state(model))
    again, _, _ = teachers.load_model(str(tmp_path), dtype=torch.float32)
    state = opt.master_state(model)
    for name, p in again.named_parameters():
        assert torch.equal(p.detach(), state[name]), name
