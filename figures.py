"""Figures from saved results, one command per figure; results that are missing are computed first
(train.py runs and attack.py attacks, into --results), unless --no-run. Top of the import order.

    python figures.py hs-vs-p --quick            # HS and FA after the fine-tuning attack against its harmful share p
    python figures.py hs-vs-steps --quick        # HS and FA along the attack (p = 0.1)
    python figures.py hs-vs-shots --quick        # HS against the number of in-context shots k
    python figures.py loss-ablation --quick      # students trained with DPO / NPO / KL / reverse KL alone
    python figures.py schedule-ablation --quick  # sequential / cyclic / mixed level order
    python figures.py training-curves --quick    # loss per level, γ and lr of the student run
    python figures.py all --quick
    python figures.py ablation --quick [--rows …] [--seeds 0 1 2] [--jobs N] [--device cuda]
                                                 # every mechanism against the student, paired over seeds

The four models of the attack figures: the base, the SFT baseline (`train.py --loss sft=1`: plain
refusal SFT), the good teacher and the student (default `train.py`). Every run shares one teacher
folder and one answer cache, so the teachers are built once (the ablation's teacher rows build other
good teachers beside them). PNGs go to --out (docs/).
"""
import argparse
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ablation  # noqa: E402
import attack  # noqa: E402
import data  # noqa: E402
import schedule  # noqa: E402
import train  # noqa: E402

FIGURES = ("hs-vs-p", "hs-vs-steps", "hs-vs-shots", "loss-ablation", "schedule-ablation", "training-curves")
MODELS = {"base": "base", "sft-baseline": "SFT baseline", "good-teacher": "good teacher", "student": "student"}
LOSS_RUNS = {"loss-dpo": "dpo=1", "loss-npo": "npo=1", "loss-kl": "kl=1", "loss-kl_rev": "kl_rev=1"}
SEQUENCE_RUNS = {"student": "sequential", "sequence-cyclic": "cyclic", "sequence-mixed": "mixed"}
CURVE_P = 0.1
# --quick: the embedded model on a 2-core CPU (docs/results.md says why these sizes). Runs: 64 training
# prompts per pool, 1 epoch, 40 held-out prompts; attacks: n = 40 (p·40 harmful), 2 epochs of batch 10
# (8 steps) at lr 1e-4 (hs-vs-p draws one line per lr found, so `attack.py --attack-lr` adds more),
# micro-batches of ≤ 512 padded tokens, HS on 40 prompts with 32-token answers, FA on 40 items, the
# p = 0.1 curve every 2 steps; in-context k up to 8.
SIZES = {
    "quick": {"train": ["--recipe", "full", "--limit", "64", "--epochs", "1", "--eval-limit", "40"],
              "attack": ["--limit", "40", "--attack-n", "40", "--attack-epochs", "2", "--attack-batch", "10",
                         "--attack-fa-n", "40", "--attack-max-new-tokens", "32", "--attack-micro-tokens", "512"],
              "n": 40, "lrs": [1e-4], "eval_every": 2, "shots": [0, 1, 2, 4, 8]},
    "full": {"train": ["--recipe", "full"], "attack": [], "n": attack.ATTACK_PROTOCOL["n"], "lrs": [attack.ATTACK_PROTOCOL["lr"]],
             "eval_every": 100, "shots": list(attack.SHOTS_GRID)},
}


def pct(x):
    return 100 * x


# ---------------------------------------------------------------- computing missing results


def ensure_run(res, name, extra, size, base):
    """The train.py run `name` in res, trained unless it is there; one made by other flags (a changed
    size or default) stops with an error rather than join the figures."""
    out = ablation.run_dir(res, name)
    argv = ["--model", base, "--out", out, "--teacher-dir", os.path.join(res, "teachers"),
            "--cache-dir", os.path.join(res, "cache"), "--overwrite",  # a run cut short starts over
            *SIZES[size]["train"], *extra]
    done = os.path.join(out, "eval.json")
    status = ablation.run_status(done, argv)
    if status == "other":
        raise ValueError(f"{out} was trained with other flags than this size's ({done}.argv): remove it or "
                         f"use another --results")
    if status != "missing":
        print(f"[figures] reusing {out}" + (" (made before its argv was recorded)" if status == "unrecorded" else ""))
        return out
    print(f"[figures] train.py run {name}")
    train.main(argv)
    ablation.record_argv(done, argv)
    return out


def model_specs(res, size, base):
    student = ensure_run(res, "student", [], size, base)  # also builds the shared good teacher
    return {"base": base,
            "sft-baseline": os.path.join(ensure_run(res, "sft-baseline", ["--loss", "sft=1"], size, base), "student"),
            "good-teacher": os.path.join(res, "teachers", "good"),
            "student": os.path.join(student, "student")}


def attack_dir(res, model):
    return os.path.join(res, "attacks", model)


def _without_p(argv):
    """argv less the --attack-p list: one attack.py call writes one file per p."""
    out, skipping = [], False
    for a in argv:
        skipping = a == "--attack-p" or (skipping and not a.startswith("--"))
        if not skipping:
            out.append(a)
    return out


def attack_done(path, argv, model):
    """Whether the attack result `path` is there, made by `argv` (its --attack-p list aside) and newer than
    the model it attacked (a retrained student is attacked again); one made by other flags (a changed
    size, attack seed or protocol) stops with an error, like ensure_run's."""
    if not os.path.isfile(path) or (os.path.exists(model) and os.path.getmtime(path) < os.path.getmtime(model)):
        return False
    recorded = ablation.load_json(path).get("settings", {}).get("argv")
    if recorded is not None and _without_p(recorded) != _without_p(argv):
        raise ValueError(f"{path} was made by other attack flags than this size's: remove it or use another "
                         f"--results")
    return True


def ensure_attacks(res, size, base, incontext=False):
    """Fine-tuning attacks over the p grid (the p = 0.1 one with a curve) or the in-context attack, per model."""
    sz = SIZES[size]
    data = ablation.run_dir(res, "student")  # the bad teacher's answers of the default run are the harmful pairs
    for model, spec in model_specs(res, size, base).items():
        out = attack_dir(res, model)
        common = ["--model", spec, "--attack-data", data, "--attack-out", out, *sz["attack"]]
        if incontext:
            argv = ["incontext", *common, "--shots", *map(str, sz["shots"])]
            if not attack_done(os.path.join(out, "incontext.json"), argv, spec):
                attack.main(argv)
            continue
        for lr in sz["lrs"]:
            curve = ["finetune", *common, "--attack-p", str(CURVE_P), "--attack-lr", str(lr),
                     "--attack-eval-every", str(sz["eval_every"])]
            if not attack_done(os.path.join(out, attack.attack_filename(CURVE_P, sz["n"], lr)), curve, spec):
                attack.main(curve)
            grid = lambda ps: ["finetune", *common, "--attack-p", *map(str, ps), "--attack-lr", str(lr)]
            rest = [p for p in attack.ATTACK_P_GRID if p != CURVE_P  # the curve's run wrote that one
                    and not attack_done(os.path.join(out, attack.attack_filename(p, sz["n"], lr)), grid([p]),
                                    spec)]
            if rest:
                attack.main(grid(rest))


# ---------------------------------------------------------------- rendering from saved results

def finetune_results(res):
    """{model: [(p, n, lr, result JSON)]} of every fine-tuning attack saved under res/attacks."""
    out = {}
    for path in sorted(glob.glob(os.path.join(res, "attacks", "*", "finetune_*.json"))):
        saved = ablation.load_json(path)
        a = saved["settings"]["attack"]
        model = os.path.basename(os.path.dirname(path)) + (f"+lora{a['lora_r']}" if a.get("lora_r") else "")
        out.setdefault(model, []).append((a["p"], a["n"], a["lr"], saved))
    if not out:
        raise FileNotFoundError(f"no fine-tuning attack results in {res}/attacks")
    return out


def _legend_name(model):
    name, _, lora = model.partition("+lora")  # attacks with --attack-lora-r are separate lines
    return MODELS.get(name, name) + (f" (LoRA r {lora} attack)" if lora else "")


def hs_vs_p(res, png):
    fig, (ax_hs, ax_fa) = plt.subplots(1, 2, figsize=(10, 4))
    for model, rows in finetune_results(res).items():
        for n, lr in sorted({(r[1], r[2]) for r in rows}):
            pts = sorted(((p, saved["result"]["curve"][-1]) for p, r_n, r_lr, saved in rows if (r_n, r_lr) == (n, lr)),
                         key=lambda pt: pt[0])
            label = f"{_legend_name(model)} (n {n}, lr {lr:g})"
            # a diverged attack is not a defence: its HS is left out of the line (NaN), and marked
            hs = [float("nan") if pt.get("diverged") else pt["hs"]["hs"] for _, pt in pts]
            ax_hs.plot([pct(p) for p, _ in pts], hs, marker="o", label=label)
            for p, pt in pts:
                if pt.get("diverged"):
                    ax_hs.annotate("diverged", (pct(p), 0), fontsize=7, rotation=90)
            ax_fa.plot([pct(p) for p, _ in pts], [pt["fa"]["fa"] for _, pt in pts], marker="o", label=label)
    for ax, name in ((ax_hs, "HS after the attack (%) ↓"), (ax_fa, "FA after the attack (%) ↑")):
        ax.set(xlabel="harmful share p of the fine-tuning set (%)", ylabel=name)
        ax.grid(alpha=0.3)
    ax_hs.legend(fontsize=7)
    _save(fig, png)


def hs_vs_steps(res, png):
    fig, (ax_hs, ax_fa) = plt.subplots(1, 2, figsize=(10, 4))
    for model, rows in finetune_results(res).items():
        for p, n, lr, saved in rows:
            curve = saved["result"]["curve"]
            if p != CURVE_P or len(curve) < 3:
                continue
            label = f"{_legend_name(model)} (lr {lr:g})"
            ax_hs.plot([pt["step"] for pt in curve], [float("nan") if pt.get("diverged") else pt["hs"]["hs"]
                                                      for pt in curve], marker="o", label=label)
            ax_fa.plot([pt["step"] for pt in curve], [pt["fa"]["fa"] for pt in curve], marker="o", label=label)
    if not ax_hs.lines:
        raise FileNotFoundError(f"no attack curve (p = {CURVE_P}, --attack-eval-every) in {res}/attacks")
    for ax, name in ((ax_hs, "HS (%) ↓"), (ax_fa, "FA (%) ↑")):
        ax.set(xlabel=f"attack optimizer steps (p = {CURVE_P})", ylabel=name)
        ax.grid(alpha=0.3)
    ax_hs.legend(fontsize=7)
    _save(fig, png)


def hs_vs_shots(res, png):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for path in sorted(glob.glob(os.path.join(res, "attacks", "*", "incontext.json"))):
        points = ablation.load_json(path)["result"]["points"]
        ax.plot([pt["k"] for pt in points], [pt["hs"] for pt in points], marker="o",
                label=_legend_name(os.path.basename(os.path.dirname(path))))
    if not ax.lines:
        raise FileNotFoundError(f"no in-context attack results in {res}/attacks")
    ks = sorted({x for line in ax.lines for x in line.get_xdata()})
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(int(k)) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="compliant shots k before the prompt", ylabel="HS (%) ↓")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, png)


def run_bars(res, runs, png, title):
    """Grouped bars: the student's HS and over-refusal on held-out prompts, per run."""
    names, hs, over = [], [], []
    for name, label in runs.items():
        path = os.path.join(ablation.run_dir(res, name), "eval.json")
        if os.path.isfile(path):
            student = ablation.load_json(path)["results"]["student"]
            names.append(label)
            hs.append(pct(student["hs"]))
            over.append(pct(student["over_refusal"]))
    if not names:
        raise FileNotFoundError(f"no run of {', '.join(runs)} in {res}/runs")
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], hs, 0.4, label="HS (keyword) ↓")
    ax.bar([i + 0.2 for i in x], over, 0.4, label="over-refusal ↓")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="% of held-out prompts", title=title)
    ax.legend(fontsize=8)
    _save(fig, png)


def training_curves(res, png):
    path = os.path.join(ablation.run_dir(res, "student"), "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}")
    rows = data.read_jsonl(path)
    fig, (ax_loss, ax_gamma, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.8))
    for level in sorted({r["level"] for r in rows}):
        for side, marker in (("harmful", "o"), ("harmless", "x")):
            pts = [r for r in rows if r["level"] == level and f"{side}_loss" in r]
            if pts:
                ax_loss.plot([r["step"] for r in pts], [r[f"{side}_loss"] for r in pts], marker,
                             color=f"C{level - 1}", label=f"level {level} {side}")
    ax_gamma.plot([r["step"] for r in rows], [r["gamma"] for r in rows])
    ax_lr.plot([r["step"] for r in rows], [r["lr"] for r in rows])
    for ax, name in ((ax_loss, "side loss (before γ, λ)"), (ax_gamma, "γ"), (ax_lr, "learning rate")):
        ax.set(xlabel="optimizer step", ylabel=name)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=6, ncol=2)
    _save(fig, png)


def _save(fig, png, rect=(0, 0, 1, 1)):
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")


# ---------------------------------------------------------------- the ablation (docs/results.md#the-ablation-issue-17)

def ablation_figure(stats, png):
    """HS before attack, after the benign-only attack (p = 0) and after p = 0.1, each against XSTest
    over-refusal: one point per row, 95 % interval bars; and each row's trade-off curve (the refusal-bias
    sweep, seeds averaged) on the same axes."""
    panels = [("hs", "HS, no attack"), ("attack_p0", "HS after the p = 0 attack"),
              ("attack_p0.1", "HS after the p = 0.1 attack")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 6.5), sharey=True)
    bar = lambda v, ci: [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]   # rounding can cross the point
    for ax, (key, title) in zip(axes, panels):
        for i, (row, st) in enumerate(stats.items()):
            if st["xstest"] is None or st[key] is None:
                continue
            ax.errorbar(st["xstest"], st[key], xerr=bar(st["xstest"], st["xstest_ci"]),
                        yerr=bar(st[key], st[f"{key}_ci"]), fmt="os^D"[i // 10 % 4], color=f"C{i % 10}", capsize=3,
                        label=st["label"])
        ax.set(xlabel="over-refusal on XSTest's safe prompts (%) ↓", title=title)
        ax.grid(alpha=0.3)
    for i, st in enumerate(stats.values()):
        if st.get("curve"):
            _, over, hs = zip(*st["curve"]["points"])
            axes[3].plot(over, hs, linewidth=1, color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4])
    axes[3].set(xlabel="over-refusal on XSTest's safe prompts (%) ↓", xlim=(-2, 102),
                title=f"the refusal-bias sweep ({ablation.CURVE_TOKENS}-token answers)")
    axes[3].grid(alpha=0.3)
    axes[0].set_ylabel("harmful answers on StrongREJECT (%) ↓")
    fig.suptitle("safety against over-refusal, before and after fine-tuning attacks (95 % intervals)")
    # the legend goes below the panels: inside one it would hide points
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    _save(fig, png, rect=(0, 0.22, 1, 1))


def ablation_grid(res, out, size, base, seeds, jobs, device, run_missing, rows=None):
    """`figures.py ablation`: the experiment (ablation.grid), then its figure."""
    stats = ablation.grid(res, size, base, seeds, jobs, device, run_missing, rows)
    png = os.path.join(out, "ablation-quick.png" if size == "quick" else "ablation.png")
    if not stats:   # dev cells only (the LAT sweep): nothing to draw, and a committed figure is left as it is
        print(f"no finished test cell: {png} not drawn")
        return None
    ablation_figure(stats, png)
    return png


def make(figure, res, out, size, base, run_missing):
    png = os.path.join(out, f"{figure}.png")
    if figure in ("hs-vs-p", "hs-vs-steps"):
        if run_missing:
            ensure_attacks(res, size, base)
        (hs_vs_p if figure == "hs-vs-p" else hs_vs_steps)(res, png)
    elif figure == "hs-vs-shots":
        if run_missing:
            ensure_attacks(res, size, base, incontext=True)
        hs_vs_shots(res, png)
    elif figure == "loss-ablation":
        runs = {**LOSS_RUNS, "student": "dpo=1,kl=1 (default)"}
        if run_missing:
            for name, loss in LOSS_RUNS.items():
                ensure_run(res, name, ["--loss", loss], size, base)
            ensure_run(res, "student", [], size, base)
        run_bars(res, runs, png, "loss ablation (student)")
    elif figure == "schedule-ablation":
        if run_missing:
            for name, sequence in SEQUENCE_RUNS.items():
                ensure_run(res, name, [] if name == "student" else ["--sequence", sequence], size, base)
        run_bars(res, SEQUENCE_RUNS, png, "level order ablation (student)")
    else:
        if run_missing:
            ensure_run(res, "student", [], size, base)
        training_curves(res, png)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=(*FIGURES, "all", "ablation"), help="ablation: the table and figure of "
                   "every mechanism, ≥ 3 seeds (not part of all)")
    p.add_argument("--quick", action="store_true", help="CPU sizes (see SIZES in figures.py)")
    p.add_argument("--results", help="results folder (default: runs/figures-quick with --quick, else runs/figures)")
    p.add_argument("--out", default="docs", help="folder of the PNGs")
    p.add_argument("--model", default="smollm2-135m", help="the base model")
    p.add_argument("--no-run", action="store_true", help="only render what is saved; never train or attack")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ablation: student seeds")
    p.add_argument("--jobs", type=schedule.positive, default=1, help="ablation: cells run at a time")
    p.add_argument("--device", default="cpu", help="ablation: device of every run (cpu, cuda, auto)")
    p.add_argument("--rows", nargs="+", choices=(*ablation.ABLATION_ROWS, "combination"),
                   help="ablation: run only these rows (default: all but the size's skip_rows in ablation.py); the table "
                        "shows every finished cell")
    p.add_argument("--strongreject", default=ablation.STRONGREJECT,
                   help="ablation: StrongREJECT's prompts, JSON [{instruction, category}] or CSV with forbidden_prompt "
                        "(default: ../shared/data/refusal_direction/strongreject.json)")
    p.add_argument("--dev-harmful", default=ablation.DEV_HARMFUL,
                   help="ablation: harmful dev prompts for its choices (default: ../shared's MaliciousInstruct)")
    p.add_argument("--dev-borderline", default=ablation.DEV_BORDERLINE,
                   help="ablation: prompts that sound harmful but are not, whose dev part the choices read "
                        "(a file, a hub name or phtest)")
    args = p.parse_args(argv)
    ablation.STRONGREJECT = os.path.normpath(os.path.abspath(args.strongreject))
    ablation.DEV_HARMFUL = os.path.normpath(os.path.abspath(args.dev_harmful))
    ablation.DEV_BORDERLINE = (args.dev_borderline if args.dev_borderline == "phtest" or not os.path.exists(args.dev_borderline)
                               else os.path.normpath(os.path.abspath(args.dev_borderline)))
    size = "quick" if args.quick else "full"
    try:
        if args.figure == "ablation":
            res = args.results or os.path.join("runs", "ablation-quick" if args.quick else "ablation")
            return [ablation_grid(res, args.out, size, args.model, args.seeds, args.jobs, args.device,
                                  not args.no_run, args.rows)]
        res = args.results or os.path.join("runs", "figures-quick" if args.quick else "figures")
        return [make(f, res, args.out, size, args.model, not args.no_run)
                for f in (FIGURES if args.figure == "all" else [args.figure])]
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
