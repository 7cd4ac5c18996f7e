"""Which prompts each model refuses, and exact McNemar tests between every pair of models on the
same prompts: XSTest's 250 safe prompts (over-refusal) and the built-in held-out harmful split
(--seed 0, 40 prompts). Greedy answers, keyword judge and eval.py's rule: a degenerate answer is no
refusal, even when it holds a refusal marker.

    python bench/paired_refusals.py runs/a/student runs/b/student [--out refusals.json]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import teachers  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="checkpoint folders, GGUF files, aliases or hub ids")
    p.add_argument("--seed", type=int, default=0, help="the built-in split's seed (train.py --seed)")
    p.add_argument("--out", help="write every model's per-prompt refusals here (JSON)")
    teachers.add_precision_argument(p)
    args = p.parse_args()
    dtype, line = teachers.apply_precision(args, "cpu")
    print(line)
    sets = {"xstest_safe": [e.prompt for e in evaluation.load_xstest() if e.safe],
            "builtin_harmful_test": [e.prompt for e in data.load_pool("harmful", seed=args.seed)[1]]}
    refused = {}
    for name in args.models:
        model, tokenizer, _ = teachers.load_model(name, dtype=dtype)
        for key, prompts in sets.items():
            answers, _ = evaluation.generate(model, tokenizer, prompts)
            refused[(name, key)] = [evaluation.is_refusal(a) and not evaluation.is_degenerate(a) for a in answers]
            print(f"{name} {key}: refused {sum(refused[(name, key)])} / {len(prompts)}", flush=True)
    for key in sets:
        for i, a in enumerate(args.models):
            for b in args.models[i + 1:]:
                only_a, only_b, pval = evaluation.mcnemar(refused[(a, key)], refused[(b, key)])
                print(f"{key}: {a} vs {b}: only the first refuses {only_a}, only the second {only_b}, "
                      f"exact McNemar p = {pval:.2g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({f"{m}|{k}": v for (m, k), v in refused.items()}, f)


if __name__ == "__main__":
    main()
