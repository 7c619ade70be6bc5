"""Compare trained runs from their committed run directories: the reproduction table with the paper's numbers
beside ours, the KS tests between the runs' state-space drifts, and figures across runs (the README's).

    python compare.py results/pf14-bptt results/pf14-crbp                     # the reproduction table
    python compare.py results/pf14-* --figure per_step.svg                    # their per-step F1 in one figure
    python compare.py results/mazes-* --extrapolation results/figures         # one figure per recurrent run
    python compare.py results/pf14-crbp --halting                             # steps chosen per image
"""
import argparse
import glob
import json
import os
import re

import figures
import report

# The paper's numbers beside ours (crbp_official_spec.md 6.1-6.2), for runs of its config: the hGRU trained on
# PF-14. F1 at the trained T (best epoch, 10k test images), F1 at t = 6, 20, 40, and the peak F1 over t on PF-20, PF-25.
PAPER = {"c-rbp": dict(at_T=0.980, per_step={6: 0.528, 20: 0.986, 40: 0.982}, peak={20: 0.976, 25: 0.889}),
         "bptt": dict(at_T=0.993, per_step={6: 0.991, 20: 0.245, 40: 0.229}, peak={20: 0.946, 25: 0.781}),
         "c-bptt": dict(at_T=0.992, per_step={6: 0.988, 20: 0.911, 40: 0.860}, peak={20: 0.990, 25: 0.925}),
         "rbp": dict(at_T=0.833, per_step={}, peak={}), "ff6": dict(at_T=0.883, per_step={}, peak={})}


def paper_numbers(cfg):
    """The paper's numbers for a run of its Pathfinder config (the hGRU, or the FF6 control), else {}."""
    if not (cfg.task == "pathfinder" and cfg.length == 14 and cfg.size == 150):
        return {}
    return PAPER["ff6"] if cfg.model == "ff" else PAPER.get(cfg.algo, {}) if cfg.model == "hgru" else {}


TARGET = 0.98  # time to accuracy: the first held-out check whose curve metric (PF: F1) reaches this


def runs_table(run_dirs):
    """A markdown table of runs from their committed config.json, metrics.jsonl, report.json and
    state_space.json, with the paper's numbers in brackets where the run is its config: what the README's
    reproduction table is made from (python compare.py RUN_DIR ...). Then the KS tests between runs."""
    lines = [f"| run | images | first check at {TARGET} | at T | per step t | peak over t, other test sets "
             "| drift T → last t (median) | held-out checks (images (training wall time): headline / curve metric) |",
             "|---|---|---|---|---|---|---|---|"]
    short = lambda n: f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"
    ref = lambda value, paper: f"{value:.3f}" + (f" ({paper:.3f})" if paper is not None else "")
    drifts = {}
    for run in run_dirs:
        cfg, rows = report.load_config(run), report.read_metrics(run)
        task, paper, name = report.TASKS[cfg.task], paper_numbers(cfg), os.path.basename(os.path.normpath(run))
        seen = max([r["images"] for r in rows if "loss" in r] or [0])
        checks, kept = [r for r in rows if "eval" in r and r["images"]], []
        for r in checks:  # a geometric sample of the checks: each one kept has twice the images of the last kept
            if r is checks[-1] or not kept or r["images"] >= 2 * kept[-1]["images"]:
                kept.append(r)
        when = lambda r: f"{short(r['images'])}" + (f" ({r['minutes']:.0f} min)" if "minutes" in r else "")
        reached = next((when(r) for r in checks if r["eval"][task.curve] >= TARGET), "–")  # time to accuracy
        checks = ", ".join(when(r) + f": {r['eval'][task.metric]:.3f} / {r['eval'][task.curve]:.3f}" for r in kept)
        rep = _report(run) if os.path.isfile(os.path.join(run, "report.json")) else None
        cells = ["(training)", "", "", ""]
        if rep:
            knob = str(getattr(cfg, task.knob))
            curve = rep["per_step"].get(knob, [])
            shown = ([t for t in paper.get("per_step", {}) if t <= len(curve)]
                     or sorted({t for t in (1, cfg.steps, len(curve)) if t <= len(curve)}))
            cells[0] = f"{task.curve} " + ref(rep["final"][task.curve], paper.get("at_T"))
            cells[1] = ", ".join(f"{t}: " + ref(curve[t - 1], paper.get("per_step", {}).get(t)) for t in shown)
            cells[2] = ", ".join(f"{task.knob} {n}: " + ref(max(c), paper.get("peak", {}).get(int(n)))
                                 + f" at t={c.index(max(c)) + 1}" for n, c in rep["per_step"].items() if n != knob)
            if rep.get("drift_median") is not None:
                cells[3] = f"{rep['drift_median']:.3g}"
        space = os.path.join(run, "state_space.json")
        distance = json.load(open(space))["distance"] if os.path.isfile(space) else []
        if distance:  # a feedforward run has no state to drift
            drifts[f"{name} ({cfg.algo})"] = distance
        lines.append(f"| {name} ({cfg.model} {cfg.algo}, T={cfg.steps}) | {seen:,} of {cfg.images:,} | {reached} | "
                     + " | ".join(cells) + f" | {checks} |")
    if any(paper_numbers(report.load_config(run)) for run in run_dirs):
        lines.append("\nIn brackets: the paper's numbers for the same config (F1 at T: its best epoch on 10k images).")
    names = list(drifts)
    for i, a in enumerate(names):  # the paper: BPTT vs C-RBP differ (p < 0.05), C-BPTT vs C-RBP do not
        for b in names[i + 1:]:
            D, p = report.ks_2samp(drifts[a], drifts[b])
            lines.append(f"\nState-space drift, two-sample KS test, {a} vs {b}: D = {D:.3f}, p = {p:.3g} "
                         f"(n = {len(drifts[a])}, {len(drifts[b])}).")
    return "\n".join(lines)


def runs_figure(run_dirs, path):
    """The per-step curves of finished runs on their training test set in one SVG (the paper's Fig. 2c in
    spirit), with the paper's numbers at t = 6, 20, 40 as dots in the run's colour where it has them."""
    series, dots, colors = {}, set(), {}
    for i, run in enumerate(run_dirs):
        cfg = report.load_config(run)
        task, paper = report.TASKS[cfg.task], paper_numbers(cfg)
        curve = _report(run)["per_step"][str(getattr(cfg, task.knob))]
        name = f"{cfg.algo}, T={cfg.steps}"
        series[name], colors[name] = (list(range(1, len(curve) + 1)), curve), i
        if paper.get("per_step"):
            series[f"{name}: paper"], colors[f"{name}: paper"] = tuple(map(list, zip(*paper["per_step"].items()))), i
            dots.add(f"{name}: paper")
    figures.svg_plot(path, series, "step t", task.curve, f"{task.curve} after t steps: ours (lines), the paper (dots)",
                     points=dots, colors=colors)


def extrapolation_figure(run, path, baselines=()):
    """One recurrent run's per-step curves on every test set it was evaluated on (its training set and
    --eval-lengths), its training T circled, and feedforward runs' scores on the same sets as dotted lines
    (the LocRNN paper's Fig. 2 in spirit)."""
    cfg, rep = report.load_config(run), _report(run)
    task = report.TASKS[cfg.task]
    series, dots, colors, dashed = {}, set(), {}, set()
    bases = [(report.load_config(base).model, _report(base)["per_step"]) for base in baselines]
    for i, (n, curve) in enumerate(sorted(rep["per_step"].items(), key=lambda kv: int(kv[0]))):
        name = f"{task.knob} {n}" + (" (trained)" if int(n) == getattr(cfg, task.knob) else "")
        series[name], colors[name] = (list(range(1, len(curve) + 1)), curve), i
        if int(n) == getattr(cfg, task.knob) and cfg.steps <= len(curve):
            series[f"T = {cfg.steps}"], colors[f"T = {cfg.steps}"] = ([cfg.steps], [curve[cfg.steps - 1]]), i
            dots.add(f"T = {cfg.steps}")
        for model, scores in bases:  # a feedforward run: one score per test set, drawn across the steps
            if n in scores:
                label = f"{model} {task.knob} {n}"
                series[label], colors[label] = ([1, len(curve)], [scores[n][0]] * 2), i
                dashed.add(label)
    figures.svg_plot(path, series, "step t", task.curve, f"{cfg.model} {cfg.algo}, trained at T = {cfg.steps} on "
                     f"{task.knob} {getattr(cfg, task.knob)}", points=dots, colors=colors, dashed=dashed)


def halting_table(run):
    """Steps chosen per image, from a run's eval_*_halt*.json (python train.py --eval RUN --halt TOL ...): for
    each test set, the curve metric when every image stops at its own fixed point, with the mean steps taken
    in brackets, for each tolerance; beside it the metric at the trained T and at the best fixed t."""
    cfg = report.load_config(run)
    task, evals = report.TASKS[cfg.task], {}  # (test set, distractors K) -> {tolerance: record}
    for path in glob.glob(os.path.join(run, "eval_*_halt*.json")):
        rec, name = json.load(open(path)), os.path.basename(path)
        k = re.search(r"_K(\d+)_", name)
        evals.setdefault((rec[task.knob], k and int(k.group(1))), {})[float(name[:-5].rsplit("_halt", 1)[1])] = rec
    if not evals:
        raise ValueError(f"{run} has no eval_*_halt*.json: python train.py --eval {run} --halt 1e-3 --steps 60 "
                         f"(and --{task.knob} N for other test sets) writes them")
    tols = sorted({tol for by_tol in evals.values() for tol in by_tol}, reverse=True)
    lines = [f"{os.path.basename(os.path.normpath(run))} ({cfg.model} {cfg.algo}, T={cfg.steps}): {task.curve} with "
             "each image halted at its own fixed point, and the mean steps taken (in brackets)\n",
             f"| {task.knob} | " + " | ".join(f"halt {tol:g}" for tol in tols) + f" | fixed T = {cfg.steps} | "
             "best fixed t |", "|---" * (len(tols) + 3) + "|"]
    for (n, K), by_tol in sorted(evals.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        curve = [m[task.curve] for m in max(by_tol.values(), key=lambda r: len(r["per_step"]))["per_step"]]
        best = max(range(len(curve)), key=curve.__getitem__)
        cells = [f"{by_tol[t]['halt'][task.curve]:.3f} ({by_tol[t]['halt']['steps_mean']:.1f})" if t in by_tol
                 else "–" for t in tols]
        name = f"{n}" + (f", K = {K}" if K is not None else "") + (" (trained)" if n == getattr(cfg, task.knob) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {curve[min(cfg.steps, len(curve)) - 1]:.3f} | "
                     f"{curve[best]:.3f} at t = {best + 1} |")
    return "\n".join(lines)


def _report(run):
    path = os.path.join(run, "report.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run} has no report.json yet: finish the run, or draw it with train.py --report {run}")
    return json.load(open(path))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Tables and figures of trained runs, from their run directories")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories that train.py wrote (results/pf14-*)")
    ap.add_argument("--figure", metavar="SVG", help="also draw the finished runs' per-step curves in one figure")
    ap.add_argument("--halting", action="store_true", help="also print each run's table of steps chosen per image "
                    "(from the eval_*_halt*.json that train.py --eval RUN --halt TOL writes)")
    ap.add_argument("--extrapolation", metavar="DIR", help="also draw each finished recurrent run's curves on every "
                    "test set, feedforward runs as dotted lines: DIR/extrapolation_<run>.svg")
    args = ap.parse_args()
    try:
        print(runs_table(args.runs))
        for run in args.runs if args.halting else ():
            print("\n" + halting_table(run))
    except ValueError as e:  # not a run directory, or no halting evaluations
        ap.error(str(e))
    done = [run for run in args.runs if os.path.isfile(os.path.join(run, "report.json"))]
    if args.figure:
        runs_figure(done, args.figure)
    if args.extrapolation:
        os.makedirs(args.extrapolation, exist_ok=True)
        feedforward = [run for run in done if _report(run).get("drift_median") is None]  # no state, no drift
        for run in done:
            if run not in feedforward:
                name = os.path.basename(os.path.normpath(run))
                extrapolation_figure(run, os.path.join(args.extrapolation, f"extrapolation_{name}.svg"), feedforward)
