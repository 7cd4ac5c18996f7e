"""Memory and time of --offload, --optim-state-device and --lora-r (default: the embedded SmolLM2-135M).

    python bench/memory.py                 # 8 prompts, --precision auto, on the device torch finds
    python bench/memory.py --batch 4 --lora-r 16
    python bench/memory.py --model runs/m1.7b --device cuda   # any checkpoint folder or hub id

offload: a frozen teacher's forward (no_grad) over a batch of real prompt+answer tokens, plain and
offloaded; "peak resident" is the largest number of parameter bytes the model held on the compute
device at any moment of the offloaded forward, read through the hooks (on CUDA also
torch.cuda.max_memory_allocated). On a CPU-only machine the device is the CPU: the numbers show the
hook/copy overhead, not a saving.
train step: one optimizer step (DPO + KL against a frozen teacher, train.run_step) per setting: full
fine-tuning; optimizer state in CPU memory; the teacher offloaded; LoRA. Trainable parameters, bytes
of fp32 master weights + AdamW state (3 × 4 bytes per trainable parameter), step time, and on CUDA
the peak GPU memory of the step (torch.cuda.max_memory_allocated, student + teacher + activations).
"""
import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import schedule  # noqa: E402
import teachers  # noqa: E402
import optim  # noqa: E402
import train  # noqa: E402


def mib(n):
    return f"{n / 2**20:.1f} MiB"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="examples per forward / optimizer step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--model", default="smollm2-135m", help="alias, checkpoint folder or hub id")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    teachers.add_precision_argument(p)
    a = p.parse_args()
    device = teachers.compute_device(a.device)
    dtype, line = teachers.apply_precision(a, device)
    print(line)
    model, tok, _ = teachers.load_model(a.model, dtype=dtype, device=device)
    prompts = [e.prompt for e in train.data.load_pool("harmful")[0][:a.batch]]
    feats = [train.data.encode(tok, p, teachers.refusal_for(p)) for p in prompts]  # the good answer
    compliant = "Sure, here is a detailed answer. First, you need to gather the materials and then"
    print(f"model {a.model}, device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {a.batch}")

    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied embeddings counted once
    total = sum(t.numel() * t.element_size() for t in unique.values())
    del unique  # its references would keep the offloaded layers' device copies alive
    with torch.no_grad():
        plain = timed(lambda: optim.forward(model, feats), a.repeats)
        off = teachers.offload(model, device)
        peak = {"bytes": 0}
        rest = total - sum(cpu.numel() * cpu.element_size() for slots in off.stored for *_, cpu in slots)

        def watch(module, args):
            held = sum(t.numel() * t.element_size() for ts in off.copies.values() for t in ts)
            peak["bytes"] = max(peak["bytes"], rest + held)
        handles = [layer.register_forward_pre_hook(watch) for layer in off.layers]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        offloaded = timed(lambda: optim.forward(model, feats), a.repeats)
        for h in handles:
            h.remove()
    print(f"offload: parameters {mib(total)}; peak resident during the offloaded forward {mib(peak['bytes'])} "
          f"(embeddings/norm/lm_head {mib(rest)} + at most two of {len(off.layers)} layers)")
    if device.type == "cuda":
        print(f"offload: torch.cuda.max_memory_allocated {mib(torch.cuda.max_memory_allocated())}")
    print(f"offload: forward {plain * 1000:.0f} ms plain, {offloaded * 1000:.0f} ms offloaded "
          f"({offloaded / plain:.2f}x)")
    off.remove()
    model.to(device)  # remove() leaves the layers in CPU memory

    settings = [("full fine-tuning", 0, "same", False), ("full, optimizer state in CPU memory", 0, "cpu", False),
                ("full, teacher offloaded", 0, "same", True), (f"LoRA r={a.lora_r}", a.lora_r, "same", False)]
    for name, r, state_device, offload_teacher in settings:
        student = copy.deepcopy(model).requires_grad_(True)  # before offloading: a copy would share the hooks
        off = teachers.offload(model, device) if offload_teacher else None
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        args = train.build_parser().parse_args(["--lora-r", str(r), "--micro-batch", str(a.batch),
                                                "--optim-state-device", state_device])
        if r:
            optim.add_lora(student, r=r, dtype=dtype)
        opt = optim.MasterWeightOptimizer(student, compute_dtype=dtype, **train.optimizer_options(args))
        trainable = sum(p.numel() for p in opt.params)
        pool = train.Pool(feats, [train.data.encode(tok, p, compliant) for p in prompts])
        step, cfg = schedule.Step(0, 0, list(range(a.batch)), []), train.StepConfig.from_args(args)
        frozen = train.Frozen(model, model)  # the compute-dtype base is the reference, as in train.py, and the teacher
        seconds = timed(lambda: train.run_step(student, frozen, opt, step, {"harmful": pool}, cfg, 1.0, 1e-5),
                        a.repeats)
        gpu = (f", peak GPU memory {mib(torch.cuda.max_memory_allocated())} ({mib(before)} resident before)"
               if device.type == "cuda" else "")
        print(f"{name}: {trainable / 1e6:.2f} M trainable parameters, fp32 master + AdamW state "
              f"{mib(trainable * 12)}, optimizer step {seconds:.2f} s{gpu}", flush=True)
        del student, opt, pool
        if off:
            off.remove()
            model.to(device)


if __name__ == "__main__":
    main()
