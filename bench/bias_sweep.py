"""The refusal-bias sweep in two generations (eval.answers_under_bias) against one generation per bias, on
one model and the same prompts: how many answers differ, and the time of each, side by side in one process.
First, where each prompt's first token switches to a refusal opening (the bias range a sweep needs);
--switch-only stops there.

    python bench/bias_sweep.py --model runs/default/student --harmful ../shared/data/refusal_direction/strongreject.json --limit 100
    python bench/bias_sweep.py --model runs/default/student --harmful ../shared/data/refusal_direction/malicious_instruct.json \
        --borderline-dev phtest --limit 50 --switch-only   # on dev prompts
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import schedule  # noqa: E402
import teachers  # noqa: E402
from tradeoff import BUILTIN, load_prompts  # noqa: E402  (bench/, the script's own folder)


def main(argv=None):
    p = evaluation.OneLineParser(description=__doc__, formatter_class=evaluation.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint folder, GGUF file, alias or hub id")
    p.add_argument("--harmful", default=BUILTIN, help="harmful prompt file or hub name (default: built-in held-out split)")
    p.add_argument("--limit", type=schedule.positive, help="a seeded sample of N prompts of each set, stratified")
    p.add_argument("--biases", type=float, nargs="+", default=[-8, -4, -2, 0, 2, 4, 8], help="increasing biases")
    p.add_argument("--max-new-tokens", type=schedule.positive, default=16)
    p.add_argument("--borderline-dev", metavar="SPEC", help="safe prompts: this borderline set's dev part instead of XSTest's")
    p.add_argument("--switch-only", action="store_true", help="only the switch biases, no sweeps")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    teachers.add_precision_argument(p)
    p.set_defaults(seed=0, xstest=evaluation.XSTEST)   # what load_prompts reads: bench/tradeoff.py's defaults
    args = p.parse_args(argv)
    try:
        harmful, safe = load_prompts(args)   # each a stratified sample of --limit
        device = teachers.compute_device(args.device)
        dtype, line = teachers.apply_precision(args, device)
        model, tokenizer, _ = teachers.load_model(args.model, dtype=dtype, device=device)
    except (data.DataError, teachers.ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(line, f"torch threads {torch.get_num_threads()}", sep="; ")
    ids = evaluation.refusal_opening_ids(tokenizer)
    for name, examples in (("harmful", harmful), ("borderline dev" if args.borderline_dev else "XSTest safe", safe)):
        prompts = [e.prompt for e in examples]
        # the bias at which a prompt's greedy first token turns into a refusal opening
        scores = teachers.generate(model, tokenizer, prompts, 1, first_token_bias=(ids, 0.0), keep_first_scores=True)[1]
        opening = torch.zeros(scores["first_scores"].shape[1], dtype=torch.bool)
        opening[ids] = True
        switch = (scores["first_scores"][:, ~opening].max(1).values - scores["first_scores"][:, opening].max(1).values)
        print(f"{name}: first-token switch bias min / 5 % / median / 95 % / max: "
              + " / ".join(f"{v:+.1f}" for v in np.percentile(switch.numpy(), [0, 5, 50, 95, 100])), flush=True)
        if args.switch_only:
            continue
        start = time.perf_counter()
        fast = evaluation.answers_under_bias(model, tokenizer, prompts, args.biases, args.max_new_tokens)
        t_fast = time.perf_counter() - start
        start = time.perf_counter()
        each = [teachers.generate(model, tokenizer, prompts, args.max_new_tokens, first_token_bias=(ids, b))[0]
                for b in args.biases]
        t_each = time.perf_counter() - start
        differ = sum(a != b for x, y in zip(fast, each) for a, b in zip(x, y))
        changing = sum(len(set(column)) > 1 for column in zip(*each))
        print(f"{name}: {differ} of {len(prompts) * len(args.biases)} answers differ ({changing} of {len(prompts)} "
              f"prompts change answer across the biases); two generations {t_fast:.0f} s, one per bias {t_each:.0f} s "
              f"({t_each / t_fast:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
