"""Hand-written LoRA for the student (optim.LoRALinear, add_lora, student_state)."""
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import schedule
import teachers
import optim
import train
from conftest import make_tiny
from test_train import PROMPTS, GOOD, args_for, feats, make_ctx, step_with, pipeline_args, run_interrupted_at_step_5


def lora_model(tokenizer, *flags, seed=0):
    model = make_tiny(tokenizer, seed=seed)
    args = args_for("--lora-r", "4", *flags)
    n = optim.add_lora(model, r=args.lora_r, dtype=torch.float32, alpha=args.lora_alpha, targets=args.lora_targets,
                       dropout=args.lora_dropout, seed=args.seed)
    return model, args, n


def ids(tokenizer):
    return torch.tensor([feats(tokenizer, [(PROMPTS[0], GOOD[0])])[0]["input_ids"]])


def test_zero_b_gives_the_base_logits_exactly(tokenizer):
    model, _, n = lora_model(tokenizer)
    assert n == 7 * 2  # every default target in both layers
    with torch.no_grad():
        x = ids(tokenizer)
        assert torch.equal(model(input_ids=x).logits, make_tiny(tokenizer)(input_ids=x).logits)


def test_only_adapters_get_gradients(tokenizer):
    model, args, _ = lora_model(tokenizer)
    logits, labels = optim.forward(model, feats(tokenizer, zip(PROMPTS, GOOD)))
    train.losses.sequence_logps(logits, labels).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert len(with_grad) == 2 * 14
    # B = 0 at the start: only B receives a non-zero gradient
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert [p for p in optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args)).params] == \
        [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]


def test_merged_weights_load_in_transformers_and_reproduce_the_adapter_logits(tokenizer, tmp_path):
    model, args, _ = lora_model(tokenizer)
    torch.manual_seed(3)
    for m in optim.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    teachers.save_model(model, tokenizer, str(tmp_path), state_dict=optim.student_state(model, opt))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        a, b = model(input_ids=ids(tokenizer)).logits, merged(input_ids=ids(tokenizer)).logits
        base = make_tiny(tokenizer)(input_ids=ids(tokenizer)).logits
    # fp32: W x + s·B(A x) vs (W + s·BA) x differ only by summation order (~1e-7 relative)
    assert torch.allclose(a, b, atol=1e-5, rtol=0) and not torch.allclose(a, base, atol=1e-3)


def test_lora_steps_lower_the_loss(tokenizer):
    model, args, _ = lora_model(tokenizer, "--loss", "dpo=1,sft=1,kl=1", "--lr", "1e-2")
    teacher = make_tiny(tokenizer, seed=1)
    ctx = make_ctx(model, tokenizer)
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    step = schedule.Step(0, 0, [0, 1, 2, 3], [])
    history = [step_with(model, teacher, opt, step, ctx, args, 1.0, 1e-2) for _ in range(4)]
    assert history[-1]["loss"] < history[0]["loss"] - 0.1 and history[-1]["harmful_dpo_margin"] > 0
    frozen = dict(make_tiny(tokenizer).named_parameters())
    assert all(torch.equal(p, frozen[n.replace(".base.", ".")]) for n, p in model.named_parameters()
               if not n.endswith(("lora_A", "lora_B")))


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tokenizer):
    grads = []
    for checkpointing in (False, True):
        model, _, _ = lora_model(tokenizer)
        if checkpointing:
            optim.enable_checkpointing(model)
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.train()
        logits, labels = optim.forward(model, feats(tokenizer, zip(PROMPTS, GOOD)))
        train.losses.sequence_logps(logits, labels).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_resume_with_lora_equals_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    flags = ("--no-eval", "--lora-r", "4", "--lr", "1e-3")  # bf16 compute, the default precision
    train.run(pipeline_args(tiny_folder, tmp_path / "full", *flags))
    run_interrupted_at_step_5(monkeypatch, pipeline_args(tiny_folder, tmp_path / "cut", *flags))
    assert os.path.isfile(tmp_path / "cut" / "checkpoints" / "step-3" / "adapter.safetensors")
    train.run(pipeline_args(tiny_folder, tmp_path / "cut", *flags, "--resume"))
    a = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "student" / "model.safetensors"))
    base = load_file(os.path.join(tiny_folder, "model.safetensors"))
    assert a.keys() == b.keys() == base.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # frozen weights are the fp32 originals (not their bf16 compute copies); adapted ones moved
    assert torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "student")) is not None


def test_bad_lora_flags_are_refused_by_name(tiny_folder, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--lora-targets"):
        optim.add_lora(make_tiny(tokenizer), r=4, targets="c_attn", dtype=torch.float32)
    with pytest.raises(ValueError, match="lm_head is tied"):
        optim.add_lora(make_tiny(tokenizer), r=4, targets="lm_head", dtype=torch.float32)
    with pytest.raises(ValueError, match="--canary-mode with --lora-r"):
        train.run(pipeline_args(tiny_folder, tmp_path, "--lora-r", "4", "--canary-mode", "focus"))
