"""How fast the power-iteration estimates converge (c-rbp default model, h_{T-1}, 32 test mazes), and their cost."""
import sys, json, time
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "..")); sys.path.insert(0, __import__("os").path.dirname(__file__))  # the repo root, here
import torch
torch.set_num_threads(1)
import data, models
from lcpfun import size_penalty_input
run = sys.argv[1]
model = models.load(run); model.train()
cfg = json.load(open(f"{run}/config.json"))
images, target, free = data.task_batch("mazes", 0, 32, split="test", grid=cfg["grid"], canvas=cfg["canvas"], seed=0)
with torch.no_grad():
    x = model.front(images); h = model.embed(x)
    for _ in range(14):
        h = model.cell(h, x)
hp = tuple(z.detach().requires_grad_() for z in h)
t0 = time.time(); hn = model.cell(hp, x.detach()); tc = time.time() - t0
print(f"one cell step {tc*1e3:.1f} ms")
for mode in ("powerT", "power"):
    for it in (0, 1, 2, 3, 5, 10, 20):
        torch.manual_seed(0); t0 = time.time()
        s = size_penalty_input(hn, hp, mode, it); dt = time.time() - t0
        print(mode, it, f"mean {s.mean().item():.3f} max {s.max().item():.3f}  {dt*1e3:.0f} ms")
