"""Cosine between the rbp gradient and the exact bptt gradient of the same loss at T, on one training batch."""
import sys, json, warnings
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))  # the repo root
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import data, models, report
run, T = sys.argv[1], 15
model = models.load(run).train()
cfg = json.load(open(f"{run}/config.json"))
images, target, free = data.task_batch("mazes", 3, 32, split="train", grid=cfg["grid"], canvas=cfg["canvas"], seed=0)
names = [n for n, _ in model.named_parameters() if not n.startswith("embed")]
def grad(**kw):
    model.zero_grad(set_to_none=True)
    out = model(images, steps=T, **kw)
    report.TASKS["mazes"].loss(out.logits, target, free).backward()
    p = dict(model.named_parameters())
    g = {n: (p[n].grad.clone() if p[n].grad is not None else torch.zeros_like(p[n])) for n in names}
    return g, out.stats
def cos(a, b, keys):
    va = torch.cat([a[k].flatten() for k in keys]); vb = torch.cat([b[k].flatten() for k in keys])
    return (va @ vb / va.norm() / vb.norm()).item(), (va.norm() / vb.norm()).item()
gb, _ = grad(algo="bptt")
cellk = [n for n in names if n.startswith("cell")]
frontk = [n for n in names if n.startswith("front")]
print(f"{run}: cosine to the bptt gradient (all non-embed params | cell only | stem only), norm ratio")
for kw in (dict(neumann_steps=0), dict(neumann_steps=5), dict(neumann_steps=15), dict(neumann_steps=30),
           dict(neumann_steps=15, faithful=True)):
    g, st = grad(algo="rbp", **kw)
    c_all, r_all = cos(g, gb, names); c_cell, _ = cos(g, gb, cellk); c_front, _ = cos(g, gb, frontk)
    print(f"  rbp {kw}: {c_all:.3f} | {c_cell:.3f} | {c_front:.3f}  norm ratio {r_all:.2f}  stop {st.neumann_stop} terms {st.neumann_terms}")
for t in (30, 60):
    gt, _ = grad(algo="bptt", steps=t) if False else (None, None)
