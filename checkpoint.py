"""Checkpoints of a student run (train.py): written whole or not at all, found, and resumed exactly (weights,
optimizer state, RNG, canary state; metrics.jsonl cut to the steps before the checkpoint)."""
import glob
import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import data
import optim
import parallel
import robust
import teachers


def write_folder(path, write):
    """write(tmp) into a temporary folder, then moved to `path`: a kill leaves it complete or absent."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    data.replace_folder(tmp, path)


def save(path, model, tokenizer, opt, step, flags, canary=None, original=None):
    """A resumable checkpoint: weights (merged for transformers), adapters under LoRA, optimizer and RNG
    state, canary state, and the run's `flags` ({flag: value}, args.json). Older checkpoints in the
    same folder are removed once it is written. Every rank calls it: under --fsdp the shards are
    gathered into one-process form (the checkpoint is the same as a one-process run's), then rank 0
    writes."""
    weights = parallel.gather_state(optim.student_state(model, opt, original))
    optimizer = parallel.gather_optimizer_state(opt.optimizer.state_dict())
    canary = robust.whole_canary(canary)
    if not parallel.is_main():
        return

    def write(tmp):
        teachers.save_model(model, tokenizer, tmp, state_dict=weights)
        if optim.lora_modules(model):  # the merged weights above are for transformers; resume reads the adapters
            save_file({k: v.contiguous().cpu() for k, v in optim.adapter_state(model, opt).items()},
                      os.path.join(tmp, "adapter.safetensors"))
        # plain tensors, ints, tuples and lists only: resume loads this with weights_only=True
        torch.save({"step": step, "optimizer": optimizer, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    **robust.save_canary(canary, tmp)}, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(flags, f, indent=2)

    write_folder(path, write)
    for old in glob.glob(os.path.join(os.path.dirname(path), "step-*")):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)


def save_student(out, student, opt, canary, base):
    """OUT/student: the final weights as transformers reads them (LoRA merged) and the canary masks."""
    def write(tmp):
        teachers.save_model(student, base.tokenizer, tmp, state_dict=optim.student_state(student, opt,
                                                                                           base.fp32.state_dict()))
        if canary.masks:
            robust.save_masks(canary.masks, tmp)

    write_folder(os.path.join(out, "student"), write)
    return os.path.join(out, "student")


def restore_rng(state):
    """CPU and CUDA generators as trainer_state.pt saved them. A run saved without CUDA leaves the
    CUDA generators as they are; one saved with CUDA and resumed without it ignores them."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"][:torch.cuda.device_count()])


def latest(out):
    found = [(int(os.path.basename(p).split("-")[1]), p) for p in glob.glob(os.path.join(out, "checkpoints", "step-*"))
             if os.path.isfile(os.path.join(p, "trainer_state.pt")) and not p.endswith(".tmp")]
    return max(found)[1] if found else None


def load_weights(model, folder):
    """A checkpoint's trainable weights by name: the adapters under LoRA, else the whole model."""
    if optim.lora_modules(model):
        return load_file(os.path.join(folder, "adapter.safetensors"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    if "lm_head.weight" not in state and getattr(model.config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def resume(out, resume_from, student, opt, n_steps, log):
    """(first step, CanaryState): from the checkpoint when resuming (weights, optimizer, RNG, canary
    state; OUT/metrics.jsonl cut to the steps before it), else a fresh start."""
    metrics_path = os.path.join(out, "metrics.jsonl")
    if not resume_from:
        if os.path.exists(metrics_path) and parallel.is_main():
            os.remove(metrics_path)
        return 0, robust.CanaryState()
    params = dict(student.named_parameters())
    opt.load_master(student, {k: parallel.shard_like(v, params[k]) if k in params else v
                              for k, v in load_weights(student, resume_from).items()})
    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=True)
    opt.optimizer.load_state_dict(parallel.shard_optimizer_state(state["optimizer"], opt.master))
    restore_rng(state)
    canary = robust.load_canary(resume_from, state, params)
    if os.path.exists(metrics_path) and parallel.is_main():  # a line cut short by the kill is dropped, with a note
        keep = [row for row in data.read_jsonl(metrics_path, log) if row.get("step", math.inf) < state["step"]]
        data.write_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in keep))
    log(f"resumed from {resume_from} at step {state['step']} of {n_steps}")
    return state["step"], canary
