"""Students of train.py runs compared prompt by prompt, seeds kept together (issue 28's statistics).

    python bench/compare_runs.py default=runs/a-s0,runs/a-s1 both=runs/b-s0,runs/b-s1 [--out table.md]

Each NAME=RUN,... is one row, its runs the seeds. A run folder holds train.py's eval.json and,
optionally, dev.json (eval.py --model RUN/student --borderline-dev phtest --out RUN/dev.json).
Metrics of the student: HS on the held-out built-in harmful prompts and over-refusal on the PHTest
dev part (the dev metrics: choices are made on them), over-refusal on the XSTest sample (a test
metric: reported, never chosen on). With --from FILE the columns are instead the metrics of an
eval.py results file in each RUN (which may then be any folder, e.g. a teacher's): HS, over-refusal
on a borderline set's dev part, over-refusal on XSTest's safe prompts, whichever it holds — e.g.
the test report from eval.py --model RUN/student --hs-set strongreject.json --xstest --out RUN/test.json,
or HS after an attack from attack.py's finetune_*.json. A degenerate answer counts against the model on both axes, as
in ablation.py. Rates: clustered 95 % intervals (prompts resampled with their seeds); every row
against the first: prompt-level sign-flip test, Holm over the whole table.

--keep DIR writes what the table reads into DIR, small enough to commit (per run and metric: prompt ids,
0/1 outcomes, the first 200 characters of each answer, the evaluation's settings), and
`python bench/compare_runs.py --rebuild DIR` makes the same table from DIR alone (issue 28: every number
recomputable from the repo; docs/outcomes/ holds the committed ones).

--cut-tokens N judges each answer's first N tokens only (re-tokenized with --tokenizer): with greedy decoding,
what the same evaluation at N new tokens would have judged, to check a choice of answer length on saved answers.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ablation  # noqa: E402
import eval as evaluation  # noqa: E402
import schedule  # noqa: E402
import stats  # noqa: E402

METRICS = (("hs", "HS, built-in held-out (dev) ↓"), ("borderline_dev", "over-refusal, PHTest dev ↓"),
           ("xstest", "over-refusal, XSTest sample (test) ↓"))
FILE_METRICS = (("hs", "HS ↓"), ("borderline_dev", "over-refusal, borderline dev ↓"),
                ("xstest", "over-refusal, XSTest safe ↓"))


def hs_outcome(answers, prompts=None):
    """(prompt ids, 0/1 per answer, answers): harmful, a degenerate answer counting against the model (ablation.py's
    rule). Without the prompts (files before eval.py saved them) the ids are positions."""
    return list(prompts or range(len(answers))), ablation.either(evaluation.complied(answers),
                                                      [evaluation.is_degenerate(a) for a in answers]), answers


def safe_outcome(result):
    """(prompts, 0/1 per safe prompt, answers) of an over-refusal result: refused, a degenerate answer counting as a
    refusal; unsafe prompts (XSTest's) left out."""
    n = len(result["refused"])
    keep = [i for i, safe in enumerate(result.get("safe") or [True] * n) if safe]
    prompts, answers = result.get("prompts") or list(range(n)), result.get("answers") or [""] * n
    return [prompts[i] for i in keep], ablation.either([result["refused"][i] for i in keep],
                                                       [result["degenerate"][i] for i in keep]), [answers[i] for i in keep]


def file_outcomes(path):
    """{metric: (prompts, [0/1 per prompt], answers)} of an eval.py results file: HS and over-refusal on safe
    prompts. An attack.py finetune result gives its HS after the attack (the curve's last point)."""
    return file_read(path)[0]


def cut_metrics(metrics, cut):
    """The metrics with each answer cut by `cut` (a function of the text) and judged again: HS reads the answers;
    an over-refusal result's refused and degenerate flags are recomputed from them (eval.over_refusal's rule)."""
    out = dict(metrics)
    for key, m in metrics.items():
        if key not in ("hs", "borderline_dev", "xstest") or "answers" not in m:
            continue
        answers = [cut(a) for a in m["answers"]]
        out[key] = {**m, "answers": answers}
        if key != "hs":
            degenerate = [evaluation.is_degenerate(a) for a in answers]
            out[key].update(degenerate=degenerate,
                            refused=[evaluation.is_refusal(a) and not d for a, d in zip(answers, degenerate)])
    return out


def token_cut(tokenizer, n):
    """The text of an answer's first n tokens."""
    def cut(text):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= n else tokenizer.decode(ids[:n])
    return cut


CUT = None   # main's --cut-tokens: a function applied to every answer of a run file before it is judged


def file_read(path):
    """(file_outcomes, the file's settings: model, data, judge, seed)."""
    with open(path) as f:
        saved = json.load(f)
    metrics = saved["metrics"] if "metrics" in saved else {"hs": saved["result"]["curve"][-1]["hs"]}
    if CUT:
        metrics = cut_metrics(metrics, CUT)
    out = {key: safe_outcome(metrics[key]) for key in ("borderline_dev", "xstest") if key in metrics}
    if "hs" in metrics:
        out["hs"] = hs_outcome(metrics["hs"]["answers"], metrics["hs"].get("prompts"))
    return out, saved.get("settings") or saved.get("result", {}).get("settings") or {}


ANSWER_CHARS = 200   # of each answer kept by --keep: enough to read what the judge saw, not the whole text


def compact(run, model="student", from_file=None):
    """What the table reads of one run, in the --keep form."""
    if from_file:
        outcomes, found = file_read(os.path.join(run, from_file))
        settings = {from_file: found}
    else:
        outcomes, settings = run_read(run, model)
    return {"format": "compare_runs outcomes 1", "run": run, "model": model, "from": from_file, "settings": settings,
            "metrics": {key: {"prompts": prompts, "outcome": [int(x) for x in flags],
                              "answers": [a[:ANSWER_CHARS] for a in answers]}
                        for key, (prompts, flags, answers) in outcomes.items()}}


def is_compact(path):
    return path.endswith(".json") and os.path.isfile(path)


def compact_outcomes(path):
    """{metric: (prompts, outcomes, answers)} of a --keep file."""
    with open(path) as f:
        saved = json.load(f)
    if saved.get("format") != "compare_runs outcomes 1":
        raise ValueError(f"{path}: not a bench/compare_runs.py --keep file")
    return {key: (m["prompts"], m["outcome"], m["answers"]) for key, m in saved["metrics"].items()}


def run_outcomes(folder, model="student"):
    """{metric: (prompts, [0/1 per prompt], answers)} of a model of a run (a row of its eval.json, and dev.json)."""
    return run_read(folder, model)[0]


def run_read(folder, model="student"):
    """(run_outcomes, {file name: its settings})."""
    with open(os.path.join(folder, "eval.json")) as f:
        saved = json.load(f)
    student, run = saved["results"][model], saved.get("settings") or {}
    # the held-out prompts are a split (and sample) drawn by the data seed: runs are paired only within one
    held_out = f"{(run.get('data') or {}).get('harmful_test', 'builtin:test')} data-seed {run.get('data_seed', '?')}"
    out = {"hs": hs_outcome(student["answers"]["harmful"],
                            [f"{held_out} #{i}" for i in range(len(student["answers"]["harmful"]))])}
    if student.get("xstest"):
        out["xstest"] = safe_outcome(student["xstest"])
    settings = {"eval.json": run}
    dev = os.path.join(folder, "dev.json")
    if os.path.isfile(dev):
        with open(dev) as f:
            saved = json.load(f)
        out["borderline_dev"] = safe_outcome(saved["metrics"]["borderline_dev"])
        settings["dev.json"] = saved.get("settings") or {}
    return out, settings


def row_outcomes(runs, model="student", from_file=None):
    """({metric: [prompts, seeds] 0/1 array}, {metric: prompt ids}) over a row's runs (a metric some run lacks
    is left out)."""
    per_run = [compact_outcomes(r) if is_compact(r) else file_outcomes(os.path.join(r, from_file)) if from_file
               else run_outcomes(r, model) for r in runs]
    mats, prompts = {}, {}
    for key, _ in (FILE_METRICS if from_file else METRICS):
        if all(key in o for o in per_run):
            if any(o[key][0] != per_run[0][key][0] for o in per_run):
                raise ValueError(f"{key}: the runs of one row were evaluated on other prompts")
            mats[key] = np.array([o[key][1] for o in per_run], dtype=int).T
            prompts[key] = per_run[0][key][0]
    return mats, prompts


def row_matrices(runs, model="student", from_file=None):
    """{metric: [prompts, seeds] 0/1 array} over a row's runs."""
    return row_outcomes(runs, model, from_file)[0]


def compare(rows, model="student", from_file=None):
    """Markdown: one line per row, each metric's rate [interval] and, against the first row, the
    difference in points with its Holm-corrected prompt-level p."""
    names, metrics = list(rows), FILE_METRICS if from_file else METRICS
    found = {n: row_outcomes(runs, model, from_file) for n, runs in rows.items()}
    mats = {n: m for n, (m, _) in found.items()}
    for n in names[1:]:
        for key in set(mats[n]) & set(mats[names[0]]):
            if found[n][1][key] != found[names[0]][1][key]:
                raise ValueError(f"{key}: rows {names[0]} and {n} were evaluated on other prompts")
    metrics = [(k, label) for k, label in metrics if any(k in m for m in mats.values())]
    tests = []   # (row, metric, difference in points, p)
    for n in names[1:]:
        for key, _ in metrics:
            if key in mats[n] and key in mats[names[0]]:
                t = stats.paired_test(mats[n][key], mats[names[0]][key], seed=0)
                tests.append((n, key, 100 * t.difference, t.p))
    holm = dict(zip([(n, k) for n, k, _, _ in tests], stats.holm([p for *_, p in tests])))
    head = "| row | seeds | " + " | ".join(label for _, label in metrics) + " |"
    lines = [head, "|" + " --- |" * (2 + len(metrics))]
    for n in names:
        cells = []
        for key, _ in metrics:
            m = mats[n].get(key)
            if m is None:
                cells.append("—")
                continue
            r = stats.clustered_rate(m, seed=0)
            text = f"{100 * r.rate:.1f} % [{100 * r.ci[0]:.1f}, {100 * r.ci[1]:.1f}] (n {m.shape[0]})"
            if (n, key) in holm:
                diff = next(d for r_, k, d, _ in tests if (r_, k) == (n, key))
                text += f"; {diff:+.1f} pts, Holm p {holm[(n, key)]:.2g}"
            cells.append(text)
        lines.append(f"| {n} | {len(rows[n])} | " + " | ".join(cells) + " |")
    per_seed = [f"{n}: " + "; ".join(f"{key} " + " / ".join(f"{100 * c:.1f}" for c in mats[n][key].mean(axis=0))
                                      for key, _ in metrics if key in mats[n]) for n in names]
    return "\n".join(lines) + (f"\n\nAgainst `{names[0]}`: sign-flip test on the per-prompt difference averaged "
                               f"over seeds, Holm over the table's {len(tests)} tests.\n\n"
                               "Per seed (%, runs in the order given): " + " · ".join(per_seed))


def keep(rows, folder, model="student", from_file=None):
    """Write every run's compact outcomes to FOLDER/NAME-sI.json and the table's layout to FOLDER/rows.json;
    returns the rows as --rebuild reads them."""
    os.makedirs(folder, exist_ok=True)
    kept = {}
    for name, runs in rows.items():
        kept[name] = []
        for i, run in enumerate(runs):
            target = os.path.join(folder, f"{name}-s{i}.json")
            with open(target, "w") as f:
                json.dump(compact(run, model, from_file), f, separators=(",", ":"))
            kept[name].append(os.path.basename(target))
    with open(os.path.join(folder, "rows.json"), "w") as f:
        json.dump({"rows": kept, "from": from_file, "model": model}, f, indent=1)
    return {name: [os.path.join(folder, b) for b in files] for name, files in kept.items()}


def rebuild(folder):
    """(rows, from_file) of a --keep folder, its files as the runs."""
    path = os.path.join(folder, "rows.json")
    try:
        with open(path) as f:
            layout = json.load(f)
        rows = {name: [os.path.join(folder, b) for b in files] for name, files in layout["rows"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise SystemExit(f"error: {path}: not a compare_runs.py --keep folder ({e})") from None
    return rows, layout.get("from"), layout.get("model", "student")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="*", metavar="NAME=RUN,RUN", help="a row and its runs (seeds); the first is the reference")
    p.add_argument("--model", default="student", help="which row of eval.json: student, good teacher, base")
    p.add_argument("--from", dest="from_file", metavar="FILE",
                   help="read the metrics of this eval.py results file in each RUN (e.g. test.json) instead")
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--keep", metavar="DIR", help="also write the per-prompt outcomes the table reads into DIR (to commit)")
    p.add_argument("--rebuild", metavar="DIR", help="make the table from a --keep folder alone (no rows given)")
    p.add_argument("--cut-tokens", type=schedule.positive, metavar="N", help="with --from: judge each answer's first N tokens only")
    p.add_argument("--tokenizer", help="--cut-tokens' tokenizer: a folder (default: the first run's student/)")
    args = p.parse_args(argv)
    global CUT
    CUT = None
    if args.cut_tokens is not None and (not args.from_file or args.rebuild or args.keep):
        p.error("--cut-tokens needs --from FILE (the full answers of eval.py files) and no --keep or --rebuild "
                "(kept outcomes do not record the cut)")
    if args.rebuild:
        if args.rows or args.keep:
            p.error("--rebuild takes no rows and no --keep")
        rows, from_file, model = rebuild(args.rebuild)
        table = compare(rows, model, from_file)
        print(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table + "\n")
        return
    if not args.rows:
        p.error("give rows NAME=RUN,RUN… or --rebuild DIR")
    rows = {}
    for spec in args.rows:
        name, _, runs = spec.partition("=")
        if not runs:
            sys.exit(f"error: {spec!r}: expected NAME=RUN[,RUN...]")
        need = args.from_file or "eval.json"
        missing = [r for r in runs.split(",") if not os.path.isfile(os.path.join(r, need))]
        if missing:
            sys.exit(f"error: {missing[0]}: no {need} (" + ("an eval.py --out file" if args.from_file else
                     "a train.py run folder that ran its evaluation") + ")")
        rows[name] = runs.split(",")
    if args.cut_tokens:
        from transformers import AutoTokenizer
        folder = args.tokenizer or os.path.join(next(iter(rows.values()))[0], "student")
        try:
            CUT = token_cut(AutoTokenizer.from_pretrained(folder), args.cut_tokens)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --tokenizer {folder}: no tokenizer there ({str(e).splitlines()[0]})")
    table = compare(rows, args.model, args.from_file)
    if args.keep:
        kept = compare(keep(rows, args.keep, args.model, args.from_file), args.model, args.from_file)
        if kept != table:   # the kept files must carry every number of the table
            sys.exit(f"error: --keep {args.keep}: the kept outcomes give another table")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
