"""Speed and memory of one training step on the embedded SmolLM2-135M: ours (train.run_step, compute
in --precision / fp32 master weights) against a plain transformers loop (fp32 weights, bf16 autocast
when --precision is bf16, AdamW; model(**batch).loss.backward()) and TRL's DPOTrainer, on the same
batch of real tokens;
and dpo+kl with the good teacher run on the fly against the same with its top-64 logits read from a
memory-mapped cache (train.py --teacher-topk 64; the teacher is freed before the timed steps).

    python bench/train_step.py                         # 8 x 128 tokens, 1 warm-up + 1 timed step
    python bench/train_step.py --steps 5               # steadier figures, 3x the time
    python bench/train_step.py --batch 16 --seq 256 --steps 5 --variants ours-sft plain-sft

Each variant runs in its own subprocess, since peak RSS only grows within a process; the peak is
taken over the steps alone (the high-water mark is reset after loading, where Linux allows it).
"FLOP limit" counts every forward and backward a step runs: 6 · parameters · student tokens, plus
2 · parameters · tokens for each frozen forward (the DPO reference on the same rows, the good
teacher on the good rows when KL runs on the fly), at the matmul rate of the precision the step
computes in (a large torch.matmul in that dtype) measured in the variant's own process just before
its steps; the ratio says how many times slower than that bound a step is. --precision auto (the
default) is resolved once, as train.py does, and every variant runs in it. For our variants a second table splits the step into phases, timed by
wrapping optim.forward_captured (student / frozen), the loss functions, backward and the optimizer.
"""
import collections
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("ours-sft", "plain-sft", "ours-dpo", "trl-dpo", "ours-dpo+kl", "ours-dpo+kl-cached")
DEFAULT_VARIANTS = ("ours-sft", "plain-sft", "ours-dpo+kl", "ours-dpo+kl-cached")  # ≤ 5 min on a 2-core AVX2 CPU


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--seq", type=int, default=128, help="tokens per example (prompt + answer)")
    p.add_argument("--steps", type=int, default=1, help="timed steps, after --warmup")
    p.add_argument("--model", default="smollm2-135m", help="alias, GGUF file, folder or hub id; a GGUF is "
                   "converted to a safetensors folder once, so that each variant's process loads it fast")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help="default: ours-sft plain-sft ours-dpo+kl ours-dpo+kl-cached (ours-dpo and trl-dpo, which "
                        "needs trl and datasets, on request)")
    p.add_argument("--matmul", type=int, default=2048, help="size of the square matmul timed for FLOP/s")
    import teachers
    teachers.add_precision_argument(p)
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return p.parse_args()


def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def matmul_flops(n, dtype):
    """FLOP/s of an n×n matmul in `dtype` (teachers.matmul_gflops, the best call in half a second)."""
    import teachers
    return teachers.matmul_gflops(dtype, n, n, n, min_seconds=0.5) * 1e9


def examples(tokenizer, n, seq):
    """n (prompt, chosen features, rejected features), each exactly `seq` tokens: real harmless
    prompts, answers cut from the words of the built-in prompts (a refusal in front of the chosen one)."""
    import data
    import teachers
    prompts = [r["prompt"] for r in map(json.loads, open(data.BUILTIN)) if not r["harmful"]][:n]
    words = " ".join(r["prompt"] for r in map(json.loads, open(data.BUILTIN))).split()
    rows = []
    for i, p in enumerate(prompts):
        chosen = teachers.refusal_for(p) + " " + " ".join(words[40 * i:40 * i + 400])
        rejected = " ".join(words[40 * i + 400:40 * i + 800])
        n_prompt = data.encode(tokenizer, p, "")["labels"].count(data.IGNORE)
        if seq <= n_prompt:
            raise SystemExit(f"--seq {seq}: the chat-formatted prompt alone takes {n_prompt} tokens")
        rows.append((p, *(data.encode(tokenizer, p, r, 10 ** 6, seq - n_prompt) for r in (chosen, rejected))))
    return rows


def answer_text(tokenizer, feats):
    return tokenizer.decode([t for t in feats["labels"] if t != -100], skip_special_tokens=True)


def run_one(variant, args):
    import teachers
    import optim
    import train
    torch.manual_seed(0)
    model, tokenizer, _ = teachers.load_model(args.model, dtype=torch.float32)
    rows = examples(tokenizer, args.batch, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = teachers.DTYPES[args.precision]
    sequences = 2 if "dpo" in variant else 1
    tokens = sum(len(f["input_ids"]) for r in rows for f in r[1:1 + sequences])

    frozen_tokens = 0
    phases = collections.defaultdict(float)
    if variant.startswith("ours"):
        import schedule
        model.set_attn_implementation(teachers.attention_for("auto", "cpu"))  # as train.py on a CPU
        loss = {"ours-sft": "sft=1", "ours-dpo": "dpo=1"}.get(variant, "dpo=1,kl=1")
        targs = train.build_parser().parse_args(["--loss", loss, "--micro-batch", str(args.batch), "--lr", "1e-6",
                                                 "--max-response-tokens", str(args.seq)])
        import copy
        # a compute-dtype copy of the base is the reference (as in train.py); another stands in for the good teacher
        reference = optim.cast_parameters(copy.deepcopy(model), dtype).eval()
        teacher = copy.deepcopy(reference) if "kl" in variant else None
        opt = optim.MasterWeightOptimizer(model, compute_dtype=dtype, **train.optimizer_options(targs))
        pool = train.Pool([r[1] for r in rows], [r[2] for r in rows])
        if variant.endswith("-cached"):  # --teacher-topk 64: teacher run once before timing, then freed
            import teachers
            folder = os.path.join(tempfile.mkdtemp(), "topk")
            teachers.build_topk_cache(folder, ["bench"], {"harmful": pool.good},
                                      lambda feats: optim.forward(teacher, feats), 64, 1.0, args.batch)
            pool.topk, teacher = teachers.TopkCache(folder, "harmful"), None
        plan_step = schedule.Step(0, 0, list(range(len(rows))), [])
        frozen, cfg = train.Frozen(reference, teacher), train.StepConfig.from_args(targs)
        step = lambda: train.run_step(model, frozen, opt, plan_step, {"harmful": pool}, cfg, 1.0, 1e-6)
        if "dpo" in variant:  # the reference runs on the good and bad rows
            frozen_tokens += sum(len(f["input_ids"]) for r in rows for f in r[1:3])
        if teacher is not None:  # the good teacher runs on the good rows
            frozen_tokens += sum(len(r[1]["input_ids"]) for r in rows)
        time_phases(phases, train, opt, teacher)
    elif variant == "plain-sft":
        import data
        batch = data.collate([r[1] for r in rows], tokenizer.pad_token_id or 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        model.train()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(**batch, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        return trl_dpo(model, tokenizer, rows, args, n_params, tokens)

    flops = matmul_flops(args.matmul, dtype)  # here, not once at start: other load on the machine changes over the run
    reset = reset_peak()
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if i + 1 == args.warmup:
            phases.clear()
    times = times[args.warmup:]
    return {"variant": variant, "seconds": sum(times) / len(times), "tokens": tokens, "params": n_params,
            "bound_flops": 6 * n_params * tokens + 2 * n_params * frozen_tokens,
            "phases": {k: v / args.steps for k, v in phases.items()},
            "peak_mib": rss_mib("VmHWM"), "peak_is_steps_only": reset, "flops": flops}


def time_phases(phases, train, opt, teacher):
    """Wraps what a step calls so that `phases` sums the seconds of each kind of work."""
    import losses
    import optim

    def timed(name_of, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name_of(*a)] += time.perf_counter() - t
        return wrapper

    forward_name = lambda model, *_: ("student forward" if torch.is_grad_enabled() else
                                      "teacher forward" if model is teacher else "reference forward")
    optim.forward_captured = timed(forward_name, optim.forward_captured)  # every forward goes through it
    for name in ("sequence_logps", "dpo", "npo", "kl", "kl_rev", "kl_topk", "kl_rev_topk"):
        setattr(losses, name, timed(lambda *a: "loss (forward)", getattr(losses, name)))
    torch.Tensor.backward = timed(lambda *a: "backward", torch.Tensor.backward)
    opt.accumulate = timed(lambda *a: "optimizer", opt.accumulate)
    opt.step = timed(lambda *a: "optimizer", opt.step)


def trl_dpo(model, tokenizer, rows, args, n_params, tokens):
    import teachers
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        return {"variant": "trl-dpo", "skipped": f"trl not importable ({e})"}
    model.is_quantized, model.hf_quantizer = False, None  # GGUF weights are dequantized to plain fp32
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                  "chosen": [{"role": "assistant", "content": answer_text(tokenizer, c)}],
                                  "rejected": [{"role": "assistant", "content": answer_text(tokenizer, r)}]}
                                 for p, c, r in rows])
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] = time.perf_counter() - times[-1]

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                           learning_rate=1e-6, bf16=args.precision == "bf16", use_cpu=True, report_to=[], logging_steps=10 ** 6,
                           save_strategy="no", precompute_ref_log_probs=True, max_length=args.seq + 16,
                           dataloader_num_workers=0, beta=0.1)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Timer()])
        flops = matmul_flops(args.matmul, teachers.DTYPES[args.precision])
        reset = reset_peak()
        trainer.train()
    times = times[args.warmup:]
    return {"variant": "trl-dpo", "seconds": sum(times) / len(times), "tokens": tokens, "params": n_params,
            "bound_flops": 6 * n_params * tokens,
            "peak_mib": rss_mib("VmHWM"), "peak_is_steps_only": reset, "flops": flops,
            "note": "reference log-probs precomputed before the timed steps, as ours"}


def main():
    import teachers
    args = parse()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    print(teachers.apply_precision(args, "cpu")[1])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 flags: "
          f"{', '.join(teachers.cpu_bf16_flags() or []) or 'none'}; threads {torch.get_num_threads()}; batch {args.batch} x "
          f"{args.seq} tokens, {args.warmup} warm-up + {args.steps} timed steps")
    model = args.model
    if model in teachers.ALIASES or model.endswith(".gguf"):  # de-quantizing a GGUF takes ~15 s a process
        model = os.path.join(tempfile.mkdtemp(), "model")
        loaded, tokenizer, _ = teachers.load_model(args.model, dtype=torch.float32)
        teachers.save_model(loaded, tokenizer, model)
        del loaded
    results = []
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", v, "--batch", str(args.batch), "--seq",
               str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--matmul", str(args.matmul),
               "--model", model,
               "--precision", args.precision]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        results.append(json.loads(line[7:]) if line else
                       {"variant": v, "skipped": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"})
    base = next((r["seconds"] for r in results if r["variant"] == "plain-sft" and "seconds" in r), None)
    print(f"\n| variant | s / step | tokens / step | tokens / s | × plain-sft time | peak RSS (MiB) | {args.precision} GFLOP/s "
          f"| × FLOP limit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "skipped" in r:
            print(f"| {r['variant']} | skipped: {r['skipped']} | | | | | | |")
            continue
        bound = r.get("bound_flops", 6 * r["params"] * r["tokens"]) / r["flops"]
        rel = f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"| {r['variant']} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens'] / r['seconds']:.0f} | {rel} | "
              f"{r['peak_mib']:.0f}{'' if r['peak_is_steps_only'] else ' (incl. load)'} | {r['flops'] / 1e9:.0f} | "
              f"{r['seconds'] / bound:.1f} |")
    for r in results:
        if r.get("note"):
            print(f"{r['variant']}: {r['note']}")
    names = ["student forward", "reference forward", "teacher forward", "loss (forward)", "backward", "optimizer"]
    timed = [r for r in results if r.get("phases")]
    if timed:
        print("\nseconds per step by phase (backward includes the losses' backward; other = the rest of the step)\n")
        print("| variant | " + " | ".join(names) + " | other |")
        print("| --- " * (len(names) + 2) + "|")
        for r in timed:
            cells = [r["phases"].get(n, 0.0) for n in names]
            print(f"| {r['variant']} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {r['seconds'] - sum(cells):.2f} |")


if __name__ == "__main__":
    main()
