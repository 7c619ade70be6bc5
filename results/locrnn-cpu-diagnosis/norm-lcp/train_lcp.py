"""train.py with the LCP replaced by a penalty on the SIZE of J = dh_T/dh_{T-1} (not its column sums).
Monkeypatches crbp._vjp in this process only (no tracked file changed). crbp.run computes the penalty as
    _lcp(_vjp(h_T, h_{T-1}, ones, create_graph=True), mu, "mean")
and the LCP is the only caller of _vjp with create_graph=True. The patched _vjp returns [sigma] (sigma: (B,),
one size estimate per sample), so the unchanged _lcp gives mean_b (sigma_b - mu)_+^2.

  --lcp vjpnorm         sigma_b = ||J_b^T v_b|| / ||v_b||, v_b a fresh Gaussian per sample (one VJP, create_graph)
  --lcp power  --iters N  N no-grad power steps on J J^T (J^T by VJP, J by the double-VJP trick), then one
                        differentiable VJP: sigma_b ~ ||J_b||_2 (top singular value)
  --lcp powerT --iters N  N no-grad power steps on J^T alone, then the differentiable ratio ||J^T v||/||v||
                        (-> spectral radius when the dominant eigenvalue is real; what the Neumann series sees)
"""
import sys, os, json
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "..")); sys.path.insert(0, __import__("os").path.dirname(__file__))  # the repo root, here
import torch
torch.set_num_threads(1)
import crbp

argv = sys.argv[1:]
def pop(flag, default, typ=str):
    if flag in argv:
        i = argv.index(flag); val = typ(argv[i + 1]); del argv[i:i + 2]; return val
    return default
MODE, ITERS = pop("--lcp", "vjpnorm"), pop("--iters", 3, int)
_orig_vjp = crbp._vjp
LOG = []

from lcpfun import _bnorm, _unit, _jvp_double_vjp, size_penalty_input
import functools
size_penalty_input = functools.partial(size_penalty_input, mode=MODE, iters=ITERS)
def vjp(outputs, inputs, v, create_graph=False):
    if not create_graph:  # the Neumann series: unchanged
        return _orig_vjp(outputs, inputs, v, create_graph)
    sigma = size_penalty_input(tuple(outputs), tuple(inputs))
    LOG.append((float(sigma.mean()), float(sigma.max())))
    return [sigma]  # crbp._lcp([sigma], mu, "mean") = mean_b (sigma_b - mu)_+^2

crbp._vjp = vjp
import train
try:
    train.main(argv)
finally:
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(out, "lcp_sigma.json"), "w") as f:
        json.dump({"mode": MODE, "iters": ITERS, "sigma_mean_max": LOG}, f)
