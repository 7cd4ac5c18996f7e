"""The refusal-bias sweep in two generations (eval.answers_under_bias) against one generation per bias, on
one model and the same prompts: how many answers differ, and the time of each, side by side in one process.

    python bench/bias_sweep.py --model runs/default/student --harmful ../shared/data/refusal_direction/strongreject.json --limit 100
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import schedule  # noqa: E402
import teachers  # noqa: E402


def main(argv=None):
    p = evaluation.OneLineParser(description=__doc__, formatter_class=evaluation.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint folder, GGUF file, alias or hub id")
    p.add_argument("--harmful", default="builtin", help="harmful prompt file or hub name (default: built-in held-out split)")
    p.add_argument("--limit", type=schedule.positive, help="a seeded sample of N prompts of each set, stratified")
    p.add_argument("--biases", type=float, nargs="+", default=[-8, -4, -2, 0, 2, 4, 8], help="increasing biases")
    p.add_argument("--max-new-tokens", type=schedule.positive, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    teachers.add_precision_argument(p)
    args = p.parse_args(argv)
    try:
        harmful = (data.load_pool("harmful", seed=0)[1] if args.harmful == "builtin"
                   else data.load_examples(args.harmful, "harmful"))
        safe = [e for e in evaluation.load_xstest() if e.safe]
        device = teachers.compute_device(args.device)
        dtype, line = teachers.apply_precision(args, device)
        model, tokenizer, _ = teachers.load_model(args.model, dtype=dtype, device=device)
    except (data.DataError, teachers.ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(line, f"torch threads {torch.get_num_threads()}", sep="; ")
    ids = evaluation.refusal_opening_ids(tokenizer)
    for name, examples in (("harmful", harmful), ("XSTest safe", safe)):
        prompts = [e.prompt for e in data.stratified_sample(examples, args.limit, 0)]
        start = time.perf_counter()
        fast = evaluation.answers_under_bias(model, tokenizer, prompts, args.biases, args.max_new_tokens)
        t_fast = time.perf_counter() - start
        start = time.perf_counter()
        each = [teachers.generate(model, tokenizer, prompts, args.max_new_tokens, first_token_bias=(ids, b))[0]
                for b in args.biases]
        t_each = time.perf_counter() - start
        differ = sum(a != b for x, y in zip(fast, each) for a, b in zip(x, y))
        switch = sum(len(set(column)) > 1 for column in zip(*each))
        print(f"{name}: {differ} of {len(prompts) * len(args.biases)} answers differ ({switch} of {len(prompts)} "
              f"prompts change answer across the biases); two generations {t_fast:.0f} s, one per bias {t_each:.0f} s "
              f"({t_each / t_fast:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
