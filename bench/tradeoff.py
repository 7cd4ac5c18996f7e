"""A trade-off curve per model (issue 28 item 5): refusal of harmful prompts against over-refusal of
XSTest's safe prompts, swept over eval.refusal_scores (log Σ p(refusal opening) − log Σ p(compliance
opening) after the chat-templated prompt; no generation, no judge). Per model: AUROC and HS (harmful
prompts not refused) at over-refusal <= --target; the first model against each other one:
stats.compare_tradeoff (paired bootstrap over prompts), p-values Holm-corrected over all of these
tests (AUROC and HS, every pair) together.

    python bench/tradeoff.py --models base=smollm2-135m student=runs/default/student
    python bench/tradeoff.py --models a=runs/a/student b=runs/b/student --harmful strongreject.csv \
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
    """(harmful, safe) Examples: --harmful (or the built-in held-out split) and XSTest's safe prompts,
    each a stratified sample of --limit when given."""
    harmful = (data.load_pool("harmful", seed=args.seed)[1] if args.harmful == BUILTIN
               else data.load_examples(args.harmful, "harmful"))
    safe = [e for e in evaluation.load_xstest(args.xstest) if e.safe]
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


def draw(models, target, path):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, m in models.items():
        c = m["curve"]
        ax.plot(c["over_refusal"], c["harmful_refusal"], label=f"{name} (AUROC {m['auroc']:.3f})")
    ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)  # a score that knows nothing
    ax.set(xlabel="over-refusal (XSTest safe prompts)", ylabel="refusal (harmful prompts)", xlim=(0, 1), ylim=(0, 1.02),
           title="refusal score trade-off")
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
    p.add_argument("--limit", type=schedule.positive, help="a seeded sample of N prompts of each set, stratified by category")
    p.add_argument("--seed", type=int, default=0, help="built-in split, samples and bootstrap")
    p.add_argument("--target", type=evaluation.probability, default=0.10, help="over-refusal at which HS is read")
    p.add_argument("--n-boot", type=schedule.positive, default=2000, help="bootstrap resamples per comparison")
    p.add_argument("--batch-size", type=schedule.positive, default=8, help="(prompt, opening) rows per forward")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    teachers.add_precision_argument(p)
    p.add_argument("--out", default=os.path.join("eval", "tradeoff.json"), help="results JSON")
    p.add_argument("--png", help="the curves (default: --out with .png)")
    args = p.parse_args(argv)
    try:
        specs = parse_models(args.models)
        harmful, safe = load_prompts(args)
        device = teachers.compute_device(args.device)
        dtype, line = teachers.apply_precision(args, device)
        print(line)
        models = {}
        for name, path in specs.items():
            model, tokenizer, key = teachers.load_model(path, dtype=dtype, device=device)
            data.check_chat_template(tokenizer, path)
            scores = {kind: evaluation.refusal_scores(model, tokenizer, prompts, batch_size=args.batch_size)
                      for kind, prompts in (("harmful", harmful), ("safe", safe))}
            del model  # one model in memory at a time
            models[name] = {"path": path, "key": key, **evaluation.tradeoff(scores["harmful"], scores["safe"], args.target),
                            "scores": scores}
            m = models[name]
            print(f"{name}: AUROC {m['auroc']:.3f}, HS {m['hs_at_target']:.1%} at over-refusal {m['over_refusal']:.1%} "
                  f"(<= {args.target:.0%}); {len(harmful)} harmful, {len(safe)} safe prompts", flush=True)
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
                     "xstest": {"path": args.xstest, "sha256": data.file_sha256(args.xstest)},
                     "n_harmful": len(harmful), "n_safe": len(safe), "limit": args.limit, "seed": args.seed,
                     "target": args.target, "n_boot": args.n_boot, "precision": args.precision,
                     "precision_requested": args.precision_requested, "device": str(device),
                     "score": "log sum p(refusal openings) - log sum p(compliance openings), answer's first tokens",
                     "refusal_openings": list(evaluation.REFUSAL_OPENINGS),
                     "compliance_openings": list(evaluation.COMPLIANCE_OPENINGS),
                     "max_prompt_tokens": teachers.MAX_PROMPT_TOKENS,
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},
        "prompts": {"harmful": [e.prompt for e in harmful], "safe": [e.prompt for e in safe]},
        "models": {n: {k: v for k, v in m.items() if k not in ("path", "key")} for n, m in models.items()},
        "comparisons": tests}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data.write_atomic(args.out, json.dumps(result, indent=1, allow_nan=False))
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    draw(models, args.target, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
