"""Layer-by-layer CPU offloading of frozen models (teachers.Offloader). Without a GPU the device is
the storage device, but every layer still gets its own copy while it runs, so the tests see each
swap through the parameters' data pointers."""
import copy
import json

import pytest
import torch

import losses
import teachers
import optim
import train
from conftest import make_tiny
from test_train import PROMPTS, GOOD, feats, pipeline_args
from test_ddp import assert_same_metrics


def offloaded_pair(tokenizer, seed=0, layers=3):
    model = make_tiny(tokenizer, seed=seed, layers=layers)
    return model, copy.deepcopy(model).requires_grad_(False)


def layer_params(off):
    return [[getattr(module, kind)[name] for module, kind, name, _ in slots] for slots in off.stored]


def test_each_layer_swapped_in_and_released_logits_identical(tokenizer):
    model, plain = offloaded_pair(tokenizer)
    off = teachers.offload(model, "cpu")
    stored_ptrs = [[cpu.data_ptr() for *_, cpu in slots] for slots in off.stored]
    seen = []

    def check_resident(i):  # registered after the offloader's pre-hook, so it runs after it
        def hook(module, args):
            seen.append(i)
            ptrs = [p.data_ptr() for p in layer_params(off)[i]]
            assert all(a != b for a, b in zip(ptrs, stored_ptrs[i])), "layer runs on its CPU storage"
        return hook

    handles = [layer.register_forward_pre_hook(check_resident(i)) for i, layer in enumerate(off.layers)]
    x = torch.tensor([feats(tokenizer, [(PROMPTS[0], GOOD[0])])[0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)
    for h in handles:
        h.remove()
    assert seen == [0, 1, 2] and off.swapped_in == [1, 1, 1] and off.released == [1, 1, 1]
    assert [[p.data_ptr() for p in ps] for ps in layer_params(off)] == stored_ptrs
    assert not off.copies and not off.by_storage


def test_generation_with_kv_cache_and_inference_mode(tokenizer):
    model, plain = offloaded_pair(tokenizer)
    off = teachers.offload(model, "cpu")
    batch = train.data.collate(feats(tokenizer, zip(PROMPTS[:2], GOOD[:2])), tokenizer.pad_token_id, side="left")
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**kw), plain.generate(**kw))
    assert off.swapped_in == off.released == [6, 6, 6]  # prefill + 5 cached decoding steps
    with torch.inference_mode():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits)


def test_backward_to_inputs_reads_saved_weights_from_storage(tokenizer, monkeypatch):
    """A frozen offloaded model still passes gradients to its inputs (LAT-like use); the weights it
    saved for backward are brought back from their CPU copy, not left on the device."""
    model, plain = offloaded_pair(tokenizer)
    off = teachers.offload(model, "cpu")
    unpacked = {"n": 0}
    real_unpack = teachers.Offloader._unpack

    def counting_unpack(self, packed):
        unpacked["n"] += not isinstance(packed, torch.Tensor)
        return real_unpack(self, packed)

    monkeypatch.setattr(teachers.Offloader, "_unpack", counting_unpack)
    ids = torch.tensor([feats(tokenizer, [(PROMPTS[1], GOOD[1])])[0]["input_ids"]])
    grads = []
    for m in (model, plain):
        x = plain.get_input_embeddings()(ids).detach().requires_grad_(True)
        m(inputs_embeds=x).logits.float().log_softmax(-1)[..., :50].sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    assert unpacked["n"] >= 7 * 3  # at least each projection's weight in every layer
    assert all(p.grad is None for p in model.parameters()) and not off.saved_hooks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_student_gradients_of_kl_against_offloaded_teacher_identical(tokenizer, device):
    grads = []
    for offload in (False, True):
        student, teacher = make_tiny(tokenizer, seed=0).to(device), make_tiny(tokenizer, seed=1, layers=3).to(device)
        if offload:
            teachers.offload(teacher, device)
        fs = feats(tokenizer, zip(PROMPTS, GOOD))
        logits, labels = optim.forward(student, fs)
        with torch.no_grad():
            teacher_logits, _ = optim.forward(teacher, fs, keep=logits.shape[1])
        losses.kl(logits, teacher_logits, losses.response_mask(labels)).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("grad", [False, True])
def test_exception_inside_a_layer_leaves_every_weight_in_storage(tokenizer, grad):
    model, plain = offloaded_pair(tokenizer)
    off = teachers.offload(model, "cpu")
    stored_ptrs = [[cpu.data_ptr() for *_, cpu in slots] for slots in off.stored]

    def boom(module, args, output):
        raise RuntimeError("injected")

    handle = off.layers[1].self_attn.register_forward_hook(boom)
    x = torch.tensor([feats(tokenizer, [(PROMPTS[2], GOOD[2])])[0]["input_ids"]])
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="injected"):
        model(input_ids=x)
    handle.remove()
    assert [[p.data_ptr() for p in ps] for ps in layer_params(off)] == stored_ptrs
    assert not off.copies and not off.saved_hooks and off.swapped_in == off.released == [1, 1, 0]
    with torch.no_grad():  # and the model still works
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)


def test_remove_undoes_offloading(tokenizer):
    model, plain = offloaded_pair(tokenizer)
    off = teachers.offload(model, "cpu")
    off.remove()
    x = torch.tensor([feats(tokenizer, [(PROMPTS[3], GOOD[3])])[0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)
    assert off.swapped_in == [0, 0, 0] and all(not l._forward_pre_hooks and not l._forward_hooks for l in off.layers)


def test_offload_flag_gives_the_same_run(tiny_folder, tmp_path):
    """--offload all with circuit breakers (the ref model is offloaded too) trains the same student."""
    rows = []
    for mode in ("none", "all"):
        out = tmp_path / mode
        train.run(pipeline_args(tiny_folder, out, "--no-eval", "--epochs", "1", "--cb-alpha", "1",
                                "--offload", mode))
        rows.append([{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(out / "metrics.jsonl")])
    # the offloaded reference and teacher are copies of the same weights: equal up to float noise
    # (bit for bit where the BLAS kernels do not depend on memory alignment, as MKL's AVX2 path does)
    assert len(rows[0]) == 4 and "harmful_cb" in rows[0][0]
    assert_same_metrics(rows[0], rows[1])


def test_offload_flag_says_which_frozen_models_stay_in_cpu_memory():
    """--offload teachers offloads the base too when the bad teacher is the base itself."""
    expected = {("none", "break"): (False, False, False), ("teachers", "break"): (True, True, False),
                ("teachers", "base"): (True, True, True), ("ref", "break"): (False, False, True),
                ("all", "break"): (True, True, True)}
    for (offload, bad), want in expected.items():
        assert tuple(teachers.offloaded(offload, m, bad) for m in ("good", "bad", "base")) == want, (offload, bad)
