"""How far the top-k KL (losses.kl_topk / kl_rev_topk, --teacher-topk) is from the full KL on real
teacher outputs.

    python bench/topk_error.py --teacher runs/default/teachers/good --student smollm2-135m \
        --cache-dir runs/default/cache --limit 16

Runs teacher and student in bf16 (as train.py does) over the teacher's greedy answers to the
built-in training prompts (harmful and harmless; cached answers are reused), and prints for each k
the mean per-token KL in both directions, full and top-k, and the relative error.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import losses  # noqa: E402
import teachers  # noqa: E402
import optim  # noqa: E402


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--cache-dir", default="runs/topk_error", help="where teacher answers are cached")
    p.add_argument("--limit", type=int, default=16, help="prompts per pool")
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-response-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)

    teacher, tokenizer, key = teachers.load_model(args.teacher)
    student, _, _ = teachers.load_model(args.student)
    prompts = [e.prompt for kind in ("harmful", "harmless")
               for e in data.load_pool(kind, None, None, 0.2, 0, args.limit)[0]]
    answers = teachers.generate_cached(teacher, tokenizer, key, prompts, os.path.join(args.cache_dir, "responses.jsonl"),
                                       args.max_new_tokens)
    feats = [data.encode(tokenizer, q, a, 256, args.max_response_tokens) for q, a in zip(prompts, answers)]
    sums, tokens = {}, 0
    for i in range(0, len(feats), 8):
        s_logits, labels = optim.forward(student, feats[i:i + 8])
        t_logits, _ = optim.forward(teacher, feats[i:i + 8])
        mask = losses.response_mask(labels)
        n = int(mask.sum())
        tokens += n
        for name, fn in (("kl", losses.kl), ("kl_rev", losses.kl_rev)):
            sums[name, 0] = sums.get((name, 0), 0.0) + n * float(fn(s_logits, t_logits, mask, args.temperature))
        t = torch.log_softmax(t_logits.float() / args.temperature, -1)
        for k in args.k:
            ids, logps, tail = teachers.topk_logps(t_logits, labels, k, args.temperature)
            window = teachers.topk_window((ids, logps, tail), mask)
            for name, fn in (("kl", losses.kl_topk), ("kl_rev", losses.kl_rev_topk)):
                sums[name, k] = sums.get((name, k), 0.0) + n * float(fn(s_logits, *window, mask, args.temperature))
            sums["tail", k] = sums.get(("tail", k), 0.0) + float(tail.exp().sum())
        sums["top1", 0] = sums.get(("top1", 0), 0.0) + float(t.max(-1).values.exp()[mask].sum())
    print(f"{len(feats)} answers, {tokens} response tokens; teacher {key}; student {args.student}; "
          f"mean teacher top-1 prob {sums['top1', 0] / tokens:.3f}")
    print(f"{'k':>6} {'teacher tail':>12} {'KL':>9} {'KL top-k':>9} {'rel err':>8} {'KL rev':>9} {'rev top-k':>9} {'rel err':>8}")
    full, rev = sums["kl", 0] / tokens, sums["kl_rev", 0] / tokens
    for k in args.k:
        a, b = sums["kl", k] / tokens, sums["kl_rev", k] / tokens
        print(f"{k:>6} {sums['tail', k] / tokens:>12.2e} {full:>9.4f} {a:>9.4f} {(full - a) / full:>8.2%} "
              f"{rev:>9.4f} {b:>9.4f} {(rev - b) / rev:>8.2%}")


if __name__ == "__main__":
    main()
