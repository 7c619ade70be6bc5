# The table of sweep.sh, long.sh and long4k.sh (and run.sh's seed-0 rows) from the committed runs/*/metrics.jsonl
# (a run still training is named below the table):
# python sweep_table.py
import json, statistics as st, os
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs"))
rows = ["conv4-bptt-T1", "hgru-bptt-T5", "hgru-c-rbp-T5", "hgru-c-rbp-T5-xi0.01", "hgru-c-rbp-T5-xi0.1",
        "hgru-c-rbp-T10", "hgru-c-rbp-T20", "hgru-c-rbp-T20-xi0.1", "conv4-bptt-T1-2k", "hgru-c-rbp-T20-2k",
        "conv4-bptt-T1-4k", "hgru-c-rbp-T20-4k"]
print("| head | T | ξ | PQ | PQ_th | PQ curves | PQ at t = 1 / T / 2T / 40 | residual at T | ξ · LCP | s / step |")
print("|---|---|---|---|---|---|---|---|---|---|")
unfinished = []
for r in rows:
    rs = [json.loads(l) for l in open(r + "/metrics.jsonl")]
    if not any("final" in x for x in rs):
        unfinished.append(f"{r} (step {max(x.get('iter', 0) for x in rs)})")
        continue
    f = [x for x in rs if "final" in x][-1]
    c = json.load(open(r + "/config.json")); T = c["steps"]; p = f["per_step_pq"]
    tr = [x for x in rs if "loss_mask" in x]; last = tr[2 * len(tr) // 3:]  # the last third of training
    res = f"{st.median(x['residual'] for x in last):.3f}" if "residual" in last[0] else "–"
    lcp = f"{st.median(x['loss_lcp'] for x in last):.1e}" if c["algo"].startswith("c-") else "–"
    pts = [1, T, 2 * T, 40] if c["head"] == "hgru" else []
    curve = " / ".join(f"{p[t - 1]:.1f}" for t in pts if t <= len(p)) or "–"
    name = "conv4" if c["head"] == "conv4" else f"hGRU, {c['algo'].upper()}"
    head = (T, c["xi"]) if c["head"] == "hgru" else ("–", "–")
    print(f"| {name} | {head[0]} | {head[1]} | {f['final']['pq']:.2f} | {f['final']['pq_th']:.2f} | "
          f"{f['final']['pq_curve']:.2f} | {curve} | {res} | {lcp} | {tr[-1]['s_per_step']:.2f} |")
if unfinished:
    print("\nstill training (resume with ../../train_panoptic.py --resume runs/<run> --device cpu): " + ", ".join(unfinished))
