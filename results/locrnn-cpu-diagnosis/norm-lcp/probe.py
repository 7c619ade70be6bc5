"""Size estimates of J = dh_T/dh_{T-1} for a trained run (32 test mazes, train mode as in training): the three
penalty inputs at their training iteration counts, and converged ones (60 steps): power/60 ~ per-sample ||J||_2,
powerT/60 ~ per-sample spectral radius (when its eigenvalue is real). usage: python probe.py RUN_DIR"""
import sys, json
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "..")); sys.path.insert(0, __import__("os").path.dirname(__file__))  # the repo root, here
import torch
torch.set_num_threads(1)
import data, models
from lcpfun import size_penalty_input
run, T = sys.argv[1], 15
model = models.load(run); model.train()
cfg = json.load(open(f"{run}/config.json"))
images, target, free = data.task_batch("mazes", 0, 32, split="test", grid=cfg["grid"], canvas=cfg["canvas"], seed=0)
with torch.no_grad():
    x = model.front(images); h = model.embed(x)
    for _ in range(T - 1):
        h = model.cell(h, x)
hp = tuple(z.detach().requires_grad_() for z in h); x = x.detach()
hn = model.cell(hp, x)
torch.manual_seed(0)
out = {}
for mode, it in (("vjpnorm", 0), ("powerT", 3), ("power", 3), ("powerT", 60), ("power", 60)):
    s = size_penalty_input(hn, hp, mode, it).detach()
    out[f"{mode}{it}"] = dict(mean=round(s.mean().item(), 4), max=round(s.max().item(), 4),
                              pen=round((s - 0.9).clamp(min=0).square().mean().item(), 5))
print(run, json.dumps(out))
json.dump(out, open(f"{run}/probe.json", "w"))
