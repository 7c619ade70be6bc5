"""The size penalty inputs (shared by train_lcp.py and probe.py)."""
import torch
import crbp

def _bnorm(zs):  # per-sample norm of a list of (B, ...) tensors
    return crbp._norm(zs, None, 1)

def _unit(zs):
    n = _bnorm(zs).clamp_min(1e-30).view(-1, *[1] * (zs[0].dim() - 1))
    return [z / n for z in zs]

def _jvp_double_vjp(hn, hp, w):
    """J w from the taped step hn = F(hp): J w = d/dz <J^T z, w>, z a dummy cotangent."""
    z = [torch.zeros_like(o, requires_grad=True) for o in hn]
    g = torch.autograd.grad(hn, hp, z, create_graph=True, retain_graph=True)
    return list(torch.autograd.grad(g, z, w, retain_graph=True))

def size_penalty_input(hn, hp, mode, iters):
    """Per-sample estimate sigma_b of ||J_b|| (differentiable w.r.t. the parameters); v is never differentiated."""
    v = _unit([torch.randn_like(o) for o in hn])
    if mode in ("power", "powerT"):
        for _ in range(iters):
            w = [t.detach() for t in torch.autograd.grad(hn, hp, v, retain_graph=True)]  # J^T v
            v = _unit([t.detach() for t in _jvp_double_vjp(hn, hp, w)] if mode == "power" else w)
    u = torch.autograd.grad(hn, hp, v, retain_graph=True, create_graph=True)  # v^T J, on the tape
    return _bnorm(list(u)) / _bnorm(v)  # ||v|| = 1; kept for clarity

