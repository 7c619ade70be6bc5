import json, sys, collections, statistics as S
for run in sys.argv[1:]:
    rows = [json.loads(l) for l in open(f"runs/{run}/metrics.jsonl")]
    ev = [(r["images"], r["eval"]["acc"]) for r in rows if "eval" in r]
    tr = [r for r in rows if "loss" in r]
    rep = json.load(open(f"runs/{run}/report.json")) if __import__("os").path.exists(f"runs/{run}/report.json") else {}
    print(f"== {run}: eval " + " ".join(f"{i}:{a:.3f}" for i, a in ev))
    def q(k, rs):
        v = [r[k] for r in rs if r.get(k) is not None]
        return f"{S.median(v):.3g}" if v else "-"
    n = len(tr); parts = [tr[:n // 3], tr[n // 3:2 * n // 3], tr[2 * n // 3:]]
    for name, rs in zip(("early", "mid", "late"), parts):
        stops = collections.Counter(r.get("neumann_stop") for r in rs)
        print(f"   {name:5s} imgs {rs[0]['images']}-{rs[-1]['images']}: loss {q('loss', rs)} residual {q('residual', rs)} "
              f"penalty {q('penalty', rs)} terms {q('neumann_terms', rs)} sum {q('neumann_sum', rs)} stops {dict(stops)}")
