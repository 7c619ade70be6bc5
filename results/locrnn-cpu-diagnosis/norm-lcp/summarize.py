"""Table rows from runs/NAME/{metrics.jsonl, lcp_sigma.json, probe.json, NAME.wall}. usage: python summarize.py NAME..."""
import json, sys, os, collections, statistics as S
for run in sys.argv[1:]:
    d = f"runs/{run}"
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    ev = [r["eval"]["acc"] for r in rows if "eval" in r][1:]
    tr = [r for r in rows if "loss" in r]
    n = len(tr); parts = [tr[:n // 3], tr[n // 3:2 * n // 3], tr[2 * n // 3:]]
    med = lambda k, rs: S.median([r[k] for r in rs if r.get(k) is not None] or [float("nan")])
    stops = collections.Counter(r.get("neumann_stop") for r in tr)
    late = collections.Counter(r.get("neumann_stop") for r in parts[2])
    sig = json.load(open(f"{d}/lcp_sigma.json"))["sigma_mean_max"] if os.path.exists(f"{d}/lcp_sigma.json") else []
    m = len(sig); sp = [sig[:m // 3], sig[m // 3:2 * m // 3], sig[2 * m // 3:]] if m else []
    pr = json.load(open(f"{d}/probe.json")) if os.path.exists(f"{d}/probe.json") else {}
    wall = open(f"runs/{run}.wall").read().split()[-1] if os.path.exists(f"runs/{run}.wall") else "?"
    pen = "/".join("%.3g" % med("penalty", q) for q in parts)
    sg = "/".join("%.2f" % S.median(x[0] for x in q) for q in sp) if sp else "-"
    terms = "/".join("%.0f" % med("neumann_terms", q) for q in parts)
    res = "/".join("%.3f" % med("residual", q) for q in parts)
    accs = " | ".join("%.3f" % a for a in ev)
    print(f"| {run} | {accs} | {pen} | {sg} | {terms} | {dict(stops)} (last third {dict(late)}) | {res} | "
          f"{pr.get('power60', {}).get('mean', '-')} / {pr.get('powerT60', {}).get('mean', '-')} | {wall} s |")
