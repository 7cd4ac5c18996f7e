"""A trade-off curve per model (issue 28 item 5): refusal of harmful prompts against over-refusal of
safe prompts as a bias on the refusal-opening tokens sweeps the model from answering everything to
refusing everything (eval.refusals_under_bias: greedy answers, keyword judge, degenerate answers
against the model on both sides). Per model: AUROC of eval.bias_scores and HS (harmful prompts not
refused) at over-refusal <= --target; the first model against each other one: stats.compare_tradeoff
(paired bootstrap over prompts), p-values Holm-corrected over all of these tests (AUROC and HS, every
pair) together. Safe prompts: XSTest's (a test set: report) or, with --borderline-dev, PHTest's dev
part (choices); harmful: the built-in held-out split (dev) or a file such as StrongREJECT (test).

    python bench/tradeoff.py --models base=smollm2-135m student=runs/default/student --borderline-dev phtest
    python bench/tradeoff.py --models a=runs/a/student b=runs/b/student --harmful strongreject.json \
        --limit 100 --out eval/tradeoff.json --png eval/tradeoff.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import schedule  # noqa: E402
import stats  # noqa: E402
import teachers  # noqa: E402

BUILTIN = "builtin"  # --harmful: the built-in held-out harmful split of --seed


def parse_models(specs):
    """NAME=PATH (a bare PATH is its own name) → {name: path}, in the order given."""
    models = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)  # a path may hold "="
        if not name or not path or name in models:
            raise ValueError(f"--models {spec!r}: need NAME=PATH with distinct non-empty names")
        models[name] = path
    return models


def load_prompts(args):
    """(harmful, safe) Examples: --harmful (or the built-in held-out split) and XSTest's safe prompts
    (or --borderline-dev's dev part), each a stratified sample of --limit when given."""
    harmful = (data.load_pool("harmful", seed=args.seed)[1] if args.harmful == BUILTIN
               else data.load_examples(args.harmful, "harmful"))
    safe = (data.load_borderline(args.borderline_dev, "dev") if args.borderline_dev
            else [e for e in evaluation.load_xstest(args.xstest) if e.safe])
    return tuple(data.stratified_sample(x, args.limit, args.seed) for x in (harmful, safe))


def comparisons(models, target, n_boot, seed):
    """The first model against each other one, with Holm-corrected p-values over every test."""
    (first, a), *others = models.items()
    out = []
    for name, b in others:
        t = stats.compare_tradeoff(a["scores"]["harmful"], a["scores"]["safe"], b["scores"]["harmful"],
                                   b["scores"]["safe"], target, n_boot, seed)
        out.append({"a": first, "b": name, "method": t.method,
                    **{k: dict(d._asdict(), ci=list(d.ci)) for k, d in (("auroc", t.auroc), ("hs", t.hs))}})
    tests = [c[k] for c in out for k in ("auroc", "hs")]
    for test, p in zip(tests, stats.holm([t["p"] for t in tests])):
        test["p_holm"] = p
    return out


def draw(models, target, path, safe_label="XSTest safe prompts"):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, m in models.items():
        c = m["curve"]
        ax.plot(c["over_refusal"], c["harmful_refusal"], label=f"{name} (AUROC {m['auroc']:.3f})")
    ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)  # a score that knows nothing
    ax.set(xlabel=f"over-refusal ({safe_label})", ylabel="refusal (harmful prompts)", xlim=(0, 1), ylim=(0, 1.02),
           title="refusal-bias sweep")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    p = evaluation.OneLineParser(description=__doc__, formatter_class=evaluation.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="NAME=PATH: checkpoint folders, GGUF files, aliases, hub ids")
    p.add_argument("--harmful", default=BUILTIN, help="harmful prompt file or hub name (default: built-in held-out split)")
    p.add_argument("--xstest", nargs="?", const=evaluation.XSTEST, default=evaluation.XSTEST,
                   help="XSTest CSV or hub name (default: the shipped copy); its safe prompts")
    p.add_argument("--borderline-dev", metavar="SPEC", help="safe prompts: this borderline set's dev part (phtest, a "
                   "file or hub name) instead of XSTest's")
    p.add_argument("--biases", type=float, nargs="+", default=list(evaluation.BIASES),
                   help="increasing logit biases on the refusal-opening tokens")
    p.add_argument("--max-new-tokens", type=schedule.positive, default=16, help="answer length the judge reads")
    p.add_argument("--limit", type=schedule.positive, help="a seeded sample of N prompts of each set, stratified by category")
    p.add_argument("--seed", type=int, default=0, help="built-in split, samples and bootstrap")
    p.add_argument("--target", type=evaluation.probability, default=0.10, help="over-refusal at which HS is read")
    p.add_argument("--n-boot", type=schedule.positive, default=2000, help="bootstrap resamples per comparison")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    teachers.add_precision_argument(p)
    p.add_argument("--out", default=os.path.join("eval", "tradeoff.json"), help="results JSON")
    p.add_argument("--png", help="the curves (default: --out with .png)")
    args = p.parse_args(argv)
    try:
        specs = parse_models(args.models)
        if 0.0 not in args.biases or list(args.biases) != sorted(args.biases):
            raise ValueError(f"--biases {args.biases}: must be increasing and include 0 (the model as it is)")
        harmful, safe = load_prompts(args)
        device = teachers.compute_device(args.device)
        dtype, line = teachers.apply_precision(args, device)
        print(line)
        models = {}
        for name, path in specs.items():
            model, tokenizer, key = teachers.load_model(path, dtype=dtype, device=device)
            data.check_chat_template(tokenizer, path)
            refused = {kind: evaluation.refusals_under_bias(model, tokenizer, prompts, args.biases,
                                                            args.max_new_tokens, safe=kind == "safe")
                       for kind, prompts in (("harmful", harmful), ("safe", safe))}
            del model  # one model in memory at a time
            scores, non_monotone = {}, {}
            for kind, rows in refused.items():
                scores[kind], non_monotone[kind] = evaluation.bias_scores(rows, args.biases)
            at = {kind: [sum(r[i] for r in rows) / len(rows) for i in range(len(args.biases))] for kind, rows in refused.items()}
            models[name] = {"path": path, "key": key, **evaluation.tradeoff(scores["harmful"], scores["safe"], args.target),
                            "scores": scores, "refused": refused, "non_monotone": non_monotone, "rates_by_bias": at}
            m = models[name]
            print(f"{name}: AUROC {m['auroc']:.3f}, HS {m['hs_at_target']:.1%} at over-refusal {m['over_refusal']:.1%} "
                  f"(<= {args.target:.0%}); at bias 0: HS {1 - at['harmful'][args.biases.index(0.0)]:.1%}, over-refusal "
                  f"{at['safe'][args.biases.index(0.0)]:.1%}; prompts whose refusal switches off again as the bias grows: "
                  f"{non_monotone['harmful']} harmful, {non_monotone['safe']} safe; {len(harmful)} harmful, {len(safe)} safe "
                  f"prompts", flush=True)
    except (data.DataError, teachers.ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    tests = comparisons(models, args.target, args.n_boot, args.seed) if len(models) > 1 else []
    for c in tests:
        print(f"{c['a']} - {c['b']}: " + "; ".join(
            f"{k} {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], p = {d['p']:.2g}, Holm p = {d['p_holm']:.2g}"
            for k, d in (("AUROC", c["auroc"]), ("HS", c["hs"]))))
    result = {
        "settings": {"argv": sys.argv[1:] if argv is None else list(argv),
                     "models": {n: {"path": m["path"], "key": m["key"]} for n, m in models.items()},
                     "harmful": evaluation.prompt_files(None if args.harmful == BUILTIN else [args.harmful]),
                     "n_harmful": len(harmful), "n_safe": len(safe), "limit": args.limit, "seed": args.seed,
                     "target": args.target, "n_boot": args.n_boot, "precision": args.precision,
                     "precision_requested": args.precision_requested, "device": str(device),
                     "score": "-(smallest first-token refusal bias at which the greedy answer fails the prompt)",
                     "biases": args.biases, "max_new_tokens": args.max_new_tokens,
                     "refusal_openings": list(evaluation.REFUSAL_OPENINGS),
                     "safe_set": ({"path": args.borderline_dev, "part": "dev"} if args.borderline_dev else
                                  {"path": args.xstest, "sha256": data.file_sha256(args.xstest)}),
                     "max_prompt_tokens": teachers.MAX_PROMPT_TOKENS,
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},
        "prompts": {"harmful": [e.prompt for e in harmful], "safe": [e.prompt for e in safe]},
        "models": {n: {k: v for k, v in m.items() if k not in ("path", "key")} for n, m in models.items()},
        "comparisons": tests}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data.write_atomic(args.out, json.dumps(result, indent=1, allow_nan=False))
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    draw(models, args.target, png, "PHTest dev" if args.borderline_dev else "XSTest safe prompts")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
