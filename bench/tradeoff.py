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
    python bench/tradeoff.py --models a=runs/a/student c=runs/c/student … --reuse eval/tradeoff.json  # a not swept again
    python bench/tradeoff.py --rebuild eval/tradeoff.json   # every number again from the file's per-prompt scores alone
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
    """NAME=PATH[,PATH...] (a row; several paths are its seeds; a bare PATH is its own name) → {name: [paths]}."""
    models = {}
    for spec in specs:
        name, _, paths = spec.partition("=") if "=" in spec else (spec, "", spec)
        paths = [p for p in paths.split(",") if p]
        if not name or not paths or name in models:
            raise ValueError(f"--models {spec!r}: need NAME=PATH[,PATH...] with distinct non-empty names")
        models[name] = paths
    return models


def score_model(path, harmful, safe, args, dtype, device):
    """One model's sweep: its refusals at each bias, scores, non-monotone counts, rates by bias, trade-off."""
    model, tokenizer, key = teachers.load_model(path, dtype=dtype, device=device)
    data.check_chat_template(tokenizer, path)
    refused = {kind: evaluation.refusals_under_bias(model, tokenizer, prompts, args.biases, args.max_new_tokens,
                                                    safe=kind == "safe")
               for kind, prompts in (("harmful", harmful), ("safe", safe))}
    del model  # one model in memory at a time
    scores, non_monotone = {}, {}
    for kind, rows in refused.items():
        scores[kind], non_monotone[kind] = evaluation.bias_scores(rows, args.biases)
    rates = {kind: [sum(r[i] for r in rows) / len(rows) for i in range(len(args.biases))] for kind, rows in refused.items()}
    return {"path": path, "key": key, **evaluation.tradeoff(scores["harmful"], scores["safe"], args.target),
            "scores": scores, "refused": refused, "non_monotone": non_monotone, "rates_by_bias": rates}


def load_prompts(args):
    """(harmful, safe) Examples: --harmful (or the built-in held-out split) and XSTest's safe prompts
    (or --borderline-dev's dev part), each a stratified sample of --limit when given."""
    harmful = (data.load_pool("harmful", seed=args.seed)[1] if args.harmful == BUILTIN
               else data.load_examples(args.harmful, "harmful"))
    safe = (data.load_borderline(args.borderline_dev, "dev") if args.borderline_dev
            else [e for e in evaluation.load_xstest(args.xstest) if e.safe])
    return tuple(data.stratified_sample(x, args.limit, args.seed) for x in (harmful, safe))


# the settings a model's sweep depends on: an earlier sweep (--reuse) is taken only where they and the prompts match
SWEEP_SETTINGS = ("biases", "max_new_tokens", "precision", "device", "refusal_openings", "target", "max_prompt_tokens",
                  "score")


def reusable(files, prompts, sweep):
    """{model key: its sweep} from earlier results files whose prompts and SWEEP_SETTINGS equal this run's.
    The key hashes the weight files only: a folder whose chat template or tokenizer changed with the same
    weights would be taken too (sweep it into a fresh file instead)."""
    found = {}
    for path in files:
        try:
            with open(path) as f:
                old = json.load(f)
            same = old["prompts"] == prompts and all(old["settings"].get(k) == sweep[k] for k in SWEEP_SETTINGS)
            rows = old["models"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--reuse {path}: not a bench/tradeoff.py results file ({e})") from None
        if not same or not all("seeds" in row for row in rows):  # files before rows had seeds: other settings too
            print(f"--reuse {path}: other prompts or sweep settings ({', '.join(SWEEP_SETTINGS)}); nothing taken from it")
            continue
        # a hub id's key is its name, not its content: never taken
        found.update({m["key"]: m for row in rows for m in row["seeds"] if m["key"] != m["path"]})
    return found


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
    for i, (name, row) in enumerate(models.items()):
        for j, m in enumerate(row["seeds"]):  # one line per seed, one colour per row
            c = m["curve"]
            ax.plot(c["over_refusal"], c["harmful_refusal"], color=f"C{i}", linewidth=1.2 if j == 0 else 0.7,
                    label=f"{name} (AUROC {row['auroc']:.3f}, {len(row['seeds'])} seed(s))" if j == 0 else None)
    ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)  # a score that knows nothing
    ax.set(xlabel=f"over-refusal ({safe_label})", ylabel="refusal (harmful prompts)", xlim=(0, 1), ylim=(0, 1.02),
           title="refusal-bias sweep")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def print_row(name, row, biases, target, n_harmful, n_safe):
    zero = biases.index(0.0)
    for m in row["seeds"]:
        print(f"{name} ({m['path']}): AUROC {m['auroc']:.3f}, HS {m['hs_at_target']:.1%} at over-refusal "
              f"{m['over_refusal']:.1%} (<= {target:.0%}); at bias 0: HS {1 - m['rates_by_bias']['harmful'][zero]:.1%}, "
              f"over-refusal {m['rates_by_bias']['safe'][zero]:.1%}; refusal switching off again as the bias grows: "
              f"{m['non_monotone']['harmful']} harmful, {m['non_monotone']['safe']} safe prompts", flush=True)
    print(f"{name}: mean over {len(row['seeds'])} seed(s): AUROC {row['auroc']:.3f}, HS "
          f"{row['hs_at_target']:.1%} at over-refusal <= {target:.0%}; {n_harmful} harmful, {n_safe} safe prompts",
          flush=True)


def print_tests(tests):
    for c in tests:
        print(f"{c['a']} - {c['b']}: " + "; ".join(
            f"{k} {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], p = {d['p']:.2g}, Holm p = {d['p_holm']:.2g}"
            for k, d in (("AUROC", c["auroc"]), ("HS", c["hs"]))))


def rebuild(path, png=None):
    """Every number of a results file recomputed from its per-prompt scores (no model loaded): each seed's
    trade-off, each row's means, the paired comparisons; stops when one differs from the file's."""
    try:
        with open(path) as f:
            saved = json.load(f)
        s, models = saved["settings"], saved["models"]
        for name, row in models.items():
            for m in row["seeds"]:
                again = evaluation.tradeoff(m["scores"]["harmful"], m["scores"]["safe"], s["target"])
                if any(again[k] != m[k] for k in again):
                    raise ValueError(f"{name} ({m['path']}): its trade-off differs from its scores'")
            for key in ("auroc", "hs_at_target"):
                if abs(sum(m[key] for m in row["seeds"]) / len(row["seeds"]) - row[key]) > 1e-12:
                    raise ValueError(f"{name}: its mean {key} differs from its seeds'")
        tests = comparisons(models, s["target"], s["n_boot"], s["seed"]) if len(models) > 1 else []
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: --rebuild {path}: {e}")
    if json.loads(json.dumps(tests)) != saved["comparisons"]:
        sys.exit(f"error: --rebuild {path}: the comparisons differ from the file's")
    for name, row in models.items():
        print_row(name, row, s["biases"], s["target"], s["n_harmful"], s["n_safe"])
    print_tests(tests)
    png = png or os.path.splitext(path)[0] + ".png"
    draw(models, s["target"], png, "PHTest dev" if s["safe_set"].get("part") == "dev" else "XSTest safe prompts")
    print(f"every number of {path} recomputed from its scores; drew {png}")


def main(argv=None):
    p = evaluation.OneLineParser(description=__doc__, formatter_class=evaluation.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+",
                   help="NAME=PATH[,PATH...]: checkpoint folders, GGUF files, aliases, hub ids; several paths are one row's seeds")
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
    p.add_argument("--reuse", nargs="+", default=[], metavar="FILE",
                   help="earlier results files: a model (by weight hash) swept there on the same prompts and settings "
                        "is not swept again")
    teachers.add_precision_argument(p)
    p.add_argument("--out", default=os.path.join("eval", "tradeoff.json"), help="results JSON")
    p.add_argument("--png", help="the curves (default: --out with .png)")
    p.add_argument("--rebuild", metavar="FILE", help="recompute every number of a results file from its per-prompt "
                   "scores and redraw its curves (no model loaded; --png: where)")
    args = p.parse_args(argv)
    if args.rebuild:
        return rebuild(args.rebuild, args.png)
    if not args.models:
        p.error("--models is required (or --rebuild FILE)")
    try:
        specs = parse_models(args.models)
        if 0.0 not in args.biases or list(args.biases) != sorted(args.biases):
            raise ValueError(f"--biases {args.biases}: must be increasing and include 0 (the model as it is)")
        harmful, safe = load_prompts(args)
        device = teachers.compute_device(args.device)
        dtype, line = teachers.apply_precision(args, device)
        print(line)
        sweep = {"biases": args.biases, "max_new_tokens": args.max_new_tokens, "precision": args.precision,
                 "device": str(device), "refusal_openings": list(evaluation.REFUSAL_OPENINGS), "target": args.target,
                 "max_prompt_tokens": teachers.MAX_PROMPT_TOKENS,
                 "score": "-(smallest first-token refusal bias at which the greedy answer fails the prompt)"}
        prompts = {"harmful": [e.prompt for e in harmful], "safe": [e.prompt for e in safe]}
        earlier = reusable(args.reuse, prompts, sweep)
        models = {}
        for name, paths in specs.items():
            seeds = []
            for path in paths:
                key = teachers.model_key(path) if earlier else None
                if key in earlier:
                    print(f"{name} ({path}): its sweep taken from --reuse (weights {key})")
                seeds.append({**earlier[key], "path": path} if key in earlier else
                             score_model(path, harmful, safe, args, dtype, device))
            models[name] = {"auroc": sum(m["auroc"] for m in seeds) / len(seeds),
                            "hs_at_target": sum(m["hs_at_target"] for m in seeds) / len(seeds),
                            "scores": {kind: [list(x) for x in zip(*(m["scores"][kind] for m in seeds))]
                                       for kind in ("harmful", "safe")},
                            "seeds": seeds}
            print_row(name, models[name], args.biases, args.target, len(harmful), len(safe))
    except (data.DataError, teachers.ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    tests = comparisons(models, args.target, args.n_boot, args.seed) if len(models) > 1 else []
    print_tests(tests)
    result = {
        "settings": {"argv": sys.argv[1:] if argv is None else list(argv),
                     "models": {n: [{"path": x["path"], "key": x["key"]} for x in m["seeds"]] for n, m in models.items()},
                     "harmful": evaluation.prompt_files(None if args.harmful == BUILTIN else [args.harmful]),
                     "n_harmful": len(harmful), "n_safe": len(safe), "limit": args.limit, "seed": args.seed,
                     "n_boot": args.n_boot, "precision_requested": args.precision_requested, **sweep,
                     "safe_set": ({"path": args.borderline_dev, "part": "dev"} if args.borderline_dev else
                                  {"path": args.xstest, "sha256": data.file_sha256(args.xstest)}),
                     "reused_from": args.reuse,
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},
        "prompts": prompts,
        "models": models,
        "comparisons": tests}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data.write_atomic(args.out, json.dumps(result, indent=1, allow_nan=False))
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    draw(models, args.target, png, "PHTest dev" if args.borderline_dev else "XSTest safe prompts")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
