"""Probe a trained LocRNN: forward residual per step (T..4T), Neumann terms at h_{T-1}, LCP column sums,
and the spectral radius of J at h_{T-1} by power iteration on J^T."""
import sys, json, math
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))  # the repo root
import torch
torch.set_num_threads(1)
import crbp, data, models, report

run = sys.argv[1]
T = int(sys.argv[2]) if len(sys.argv) > 2 else 15
model = models.load(run)           # eval mode
cfg = json.load(open(f"{run}/config.json"))
images, target, free = data.task_batch("mazes", 0, 32, split="test", grid=cfg["grid"], canvas=cfg["canvas"], seed=0)
res = {}
# 1. forward residual per step, and exact-match per step
with torch.no_grad():
    x = model.front(images); h = model.embed(x)
    prev = h
    per = []
    for t in range(1, 4 * T + 1):
        h = model.cell(h, x)
        r = (crbp._norm(h, prev) / crbp._norm(h)).item()
        acc = report.maze_solved(model.readout(h[0]), target, free).double().mean().item()
        nrm = crbp._norm(h).item() / math.sqrt(32)
        per.append((t, r, acc, nrm)); prev = h
print("t  residual  acc  ||h||/sample")
for t, r, a, n in per:
    if t in (1, 2, 5, 10, T - 1, T, T + 1, 20, 30, 45, 60) or t == 4 * T:
        print(f"{t:3d} {r:.4f} {a:.3f} {n:.2f}")
res["per_step"] = per
# 2. Neumann series at h_{T-1}, on the task gradient, K=40, model in train mode (as in training)
model.train()
def neumann_probe(K=40):
    out = model(images, steps=T, algo="rbp", neumann_steps=K, tol=0.0)
    loss = report.TASKS["mazes"].loss(out.logits, target, free)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return out.stats
st = neumann_probe()
print("neumann (train mode) stop", st.neumann_stop, "terms", st.neumann_terms, "sum", st.neumann_sum)
n0 = st.neumann_norms[0]
print("  norms/||g||:", " ".join(f"{v / n0:.3g}" for v in st.neumann_norms))
res["neumann_norms"] = st.neumann_norms
# 3. LCP column sums u = 1^T J at h_{T-1} and power iteration for rho(J)
with torch.no_grad():
    x = model.front(images); h = model.embed(x)
    for _ in range(T - 1):
        h = model.cell(h, x)
hp = tuple(z.detach().requires_grad_() for z in h)
x = x.detach()
hn = model.cell(hp, x)
u = crbp._vjp(hn, hp, [torch.ones_like(z) for z in hn])
ucat = torch.cat([z.flatten() for z in u])
lcp = crbp._lcp(u, 0.9, "mean").item()
print(f"LCP column sums 1^T J: mean {ucat.mean():.3f} median {ucat.median():.3f} max {ucat.max():.3f} "
      f"frac>0.9 {(ucat > 0.9).double().mean():.3f} frac>1 {(ucat > 1).double().mean():.3f}; LCP(mean, mu .9) {lcp:.3e}")
# power iteration on J^T for one sample's largest growth (batch-wide vector; spectral radius estimate)
v = [torch.randn_like(z) for z in hn]
rates = []
for k in range(60):
    w = crbp._vjp(hn, hp, v)
    nv, nw = crbp._norm(v).item(), crbp._norm(w).item()
    rates.append(nw / nv)
    v = [z / nw for z in w]
print("power-iteration ||J^T v||/||v|| at k=1,10,30,60:", [round(rates[i], 3) for i in (0, 9, 29, 59)])
# also ||J||_2 proxy via J^T J iteration: use random probe growth of J^T alone above is rho-ish
res.update(lcp=lcp, u_mean=ucat.mean().item(), u_max=ucat.max().item(), frac_u_gt_mu=(ucat > 0.9).double().mean().item(),
           rho_est=rates[-1])
json.dump(res, open(f"{run}/diag.json", "w"))
