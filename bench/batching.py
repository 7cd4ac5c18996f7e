"""Padding spent by random vs length-grouped batches (`--group-by-length G`) on real data: the
built-in training prompts with a train.py run's cached answers, tokenised as train.py does, cut
into the run's plan and its micro-batches. Padded tokens are forward/backward work on nothing, so
their share is what grouping saves; it is counted exactly, no timing involved.

    python bench/batching.py --run runs/default --groups 0 1 2 4 8
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train  # noqa: E402


def answers_of(run, model_key):
    path = os.path.join(run, "cache", "responses.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"--run {run}: no cache/responses.jsonl (run train.py there first)")
    rows = data.read_jsonl(path)
    return {r["prompt"]: r["response"] for r in rows if r["model"] == model_key}


def padding(plan, lengths, micro_batch):
    """(padded tokens, real tokens) over the plan's micro-batches (right-padded to their longest)."""
    padded = real = 0
    for step in plan:
        for kind in ("harmful", "harmless"):
            lens, indices = lengths[kind], getattr(step, kind)
            for i in range(0, len(indices), micro_batch):
                chunk = [lens[j] for j in indices[i:i + micro_batch]]
                padded += len(chunk) * max(chunk)
                real += sum(chunk)
    return padded, real


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default", help="a train.py run folder (its cached answers)")
    p.add_argument("--groups", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="--group-by-length values (0 = random)")
    p.add_argument("--max-response-tokens", type=int, nargs="+", default=[32, 64])
    argv, rest = p.parse_known_args()
    args = train.build_parser().parse_args(rest)
    with open(os.path.join(argv.run, "teacher_eval.json")) as f:
        good_key = json.load(f)["models"]["good"]
    prompts = train.load_pools(args)
    harmful, harmless = prompts.harmful, prompts.harmless
    answers = answers_of(argv.run, good_key)
    missing = [e.prompt for e in harmful + harmless if e.prompt not in answers]
    if missing:
        raise SystemExit(f"--run {argv.run}: no cached good-teacher answer for {len(missing)} prompts, e.g. {missing[0]!r}")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(argv.run, "teachers", "good"))
    print(f"{len(harmful)} harmful + {len(harmless)} harmless prompts, good-teacher answers from {argv.run}; "
          f"batch {args.batch_size}, micro-batch {args.micro_batch}, {args.epochs} epochs, {args.levels} levels\n")
    print("| answer tokens | --group-by-length | padded tokens | real tokens | padding share | × random's padded tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cut in argv.max_response_tokens:
        lengths = {kind: [len(data.encode(tokenizer, e.prompt, answers[e.prompt], args.max_prompt_tokens, cut)["input_ids"])
                          for e in pool] for kind, pool in (("harmful", harmful), ("harmless", harmless))}
        base = None
        for g in argv.groups:
            args.group_by_length = g
            _, plan = train.make_plan(args, harmful, len(harmless), lengths=[lengths["harmful"], lengths["harmless"]])
            padded, real = padding(plan, lengths, args.micro_batch)
            base = base or padded
            print(f"| {cut} | {g or 'random'} | {padded} | {real} | {1 - real / padded:.1%} | {padded / base:.2f} |")


if __name__ == "__main__":
    main()
