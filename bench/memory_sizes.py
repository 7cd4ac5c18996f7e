"""Bytes per GPU of one training step, on paper, from a model config: DDP, FSDP2 at N GPUs, LoRA, --offload.

    python bench/memory_sizes.py                                  # 1 B and 8 B students, the default step
    python bench/memory_sizes.py --model path/config.json --micro-batch 4 --seq 512

What a GPU holds, per component (bf16 compute, fp32 master weights, AdamW):
  weights      bf16 compute copy of the student: 2 B/param (FSDP2: its shard, plus two layers gathered)
  grads        bf16 .grad of a backward (2 B/param) + the fp32 sums over micro-batches (4 B/param)
  master       fp32 master weights, 4 B/param          optimizer   AdamW moments, 8 B/param
  frozen       the reference (the base) and the good teacher, bf16: 2 B/param each, whole on every GPU
               (train.py --fsdp shards only the student); --offload all: two layers resident, the rest
               streamed from CPU memory
  activations  what backward keeps for one micro-batch: DPO reads 2 rows per example (chosen and
               rejected) at --seq tokens, eager attention (the s × s probabilities kept), bf16 logits of
               every row, the teacher's logits of the good rows; --gradient-checkpointing keeps each
               layer's input and one layer's full set
Under FSDP2 (torch's fully_shard with fp32 sharded parameters and bf16 compute) the fp32 shard is the
master: weights, grads and optimizer state are each divided by N, plus the gathered bf16 layers.
LoRA: the base weights are frozen bf16; only the adapters (rank r on the attention and MLP
projections) carry master weights, grads and moments. These are estimates (no allocator overhead,
fragmentation or the CUDA context's ~0.5 GiB): docs/results.md compares one with a measured step.
"""
import argparse
import json
import os

CONFIGS = {   # published shapes
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "smollm2-1.7b": dict(hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192, vocab=49152, tied=True),
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "llama-3.1-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False),
}
GIB = 2 ** 30


def from_config_json(path):
    with open(path) as f:
        c = json.load(f)
    return dict(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                intermediate=c["intermediate_size"], vocab=c["vocab_size"], tied=c.get("tie_word_embeddings", False))


def layer_params(c):
    """A Llama decoder layer: q, k, v, o, gate, up, down (no biases) and two RMSNorm weights."""
    h, kv = c["hidden"], c["kv_heads"] * (c["hidden"] // c["heads"])
    return 2 * h * h + 2 * h * kv + 3 * h * c["intermediate"] + 2 * h


def n_params(c):
    embed = c["vocab"] * c["hidden"]
    return embed * (1 if c["tied"] else 2) + c["layers"] * layer_params(c) + c["hidden"]


def lora_params(c, r):
    """Rank-r adapters (A: in × r, B: r × out) on every q, k, v, o, gate, up, down."""
    h, i, kv = c["hidden"], c["intermediate"], c["kv_heads"] * (c["hidden"] // c["heads"])
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return c["layers"] * sum(r * (a + b) for a, b in shapes)


def activation_bytes(c, micro_batch, seq, checkpointing=False):
    """Bytes backward keeps for one micro-batch (bf16): 2 rows per example (DPO's chosen and rejected)."""
    rows, h, i, kv = 2 * micro_batch, c["hidden"], c["intermediate"], c["kv_heads"] * (c["hidden"] // c["heads"])
    tokens = rows * seq
    # inputs of the two norms and of q/k/v, o, gate/up, down; q, k, v; gate, up, act(gate); attention probs
    per_layer = 2 * tokens * (5 * h + 2 * kv + 4 * i) + 2 * rows * c["heads"] * seq * seq
    layers = (c["layers"] * 2 * tokens * h + per_layer) if checkpointing else c["layers"] * per_layer
    logits = 2 * tokens * c["vocab"] + 2 * (tokens // 2) * c["vocab"]   # the student's rows, the teacher's good rows
    return layers + logits


def per_gpu(c, setting, gpus=1, micro_batch=8, seq=288, lora_r=16, checkpointing=False):
    """{component: bytes} on one GPU for a setting: ddp, fsdp2, fsdp2-offload, lora, offload (ddp with
    --offload all)."""
    p = n_params(c)
    two_layers = 2 * layer_params(c)
    frozen = 2 * 2 * p   # reference and good teacher, bf16
    out = {"activations": activation_bytes(c, micro_batch, seq, checkpointing)}
    streamed = 2 * 2 * (two_layers + c["vocab"] * c["hidden"])   # --offload all: two layers of each frozen model
    if setting.startswith("fsdp2"):
        gathered = 2 * (two_layers + c["vocab"] * c["hidden"])   # bf16 working set: two layers and the embedding
        out.update(weights=4 * p / gpus + gathered, grads=4 * p / gpus + gathered, master=0,
                   optimizer=8 * p / gpus, frozen=streamed if setting.endswith("offload") else frozen)
    elif setting == "lora":
        a = lora_params(c, lora_r)
        out.update(weights=2 * p + 2 * a, grads=6 * a, master=4 * a, optimizer=8 * a, frozen=frozen)
    else:
        out.update(weights=2 * p, grads=6 * p, master=4 * p, optimizer=8 * p,
                   frozen=frozen if setting == "ddp" else streamed)
    out["total"] = sum(out.values())
    return out


COLUMNS = ("weights", "grads", "master", "optimizer", "frozen", "activations", "total")


def table(models, micro_batch, seq, lora_r, checkpointing):
    rows = [("DDP (any number of GPUs)", "ddp", 1), ("DDP, --offload all", "offload", 1),
            (f"LoRA r = {lora_r}", "lora", 1)] + [(f"FSDP2, {n} GPUs", "fsdp2", n) for n in (2, 4, 8)] + [
            ("FSDP2, 8 GPUs, --offload all", "fsdp2-offload", 8)]
    lines = []
    for name, c in models.items():
        lines += [f"\n{name}: {n_params(c) / 1e9:.2f} B parameters; micro-batch {micro_batch} × 2 rows × {seq} tokens"
                  f"{', gradient checkpointing' if checkpointing else ''}; GiB per GPU\n",
                  "| setting | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
        for label, setting, gpus in rows:
            b = per_gpu(c, setting, gpus, micro_batch, seq, lora_r, checkpointing)
            lines.append(f"| {label} | " + " | ".join(f"{b[k] / GIB:.1f}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"],
                   help=f"names ({', '.join(CONFIGS)}) or config.json files")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=288, help="tokens per row (default: --max-prompt-tokens 256 + 32)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    models = {}
    for spec in args.model:
        if spec in CONFIGS:
            models[spec] = CONFIGS[spec]
        elif os.path.isfile(spec):
            models[spec] = from_config_json(spec)
        else:
            p.error(f"--model {spec}: not one of {', '.join(CONFIGS)} nor a config.json file")
    print(table(models, args.micro_batch, args.seq, args.lora_r, args.gradient_checkpointing))


if __name__ == "__main__":
    main()
