"""Recurrent vision models built from the cells of cells.py (hGRU, hGRU-GN, ConvLSTM, LocRNN, ConvGRU, R-ResNet),
and the feedforward controls.

    [CRBP] Linsley, Ashok, Govindarajan, Liu, Serre. "Stable and expressive recurrent vision models."
           NeurIPS 2020 (supplement §3): the Pathfinder hGRU, its ConvLSTM and 6-layer CNN controls, and
           the GroupNorm hGRU of the panoptic mask head.
    [LOC]  "Cortically motivated recurrence enables task extrapolation" (ICLR 2023 submission, §4.1):
           LocRNN, ConvGRU, and the ResNet / R-ResNet of Schwarzschild et al. (NeurIPS 2021) on Mazes.

Where the authors' code and their paper disagree we follow the code that produced the numbers, say so in a
comment marked "code vs paper", and offer the paper's form as an option where it is cheap.

Every recurrent model is  front end -> cell run by crbp.run -> readout:

    x   = front(images)                                    # static drive, computed once with grad
    h_T = crbp.run(cell, x, h_0, steps=T, algo=...).state  # h_t = cell(h_{t-1}, x), t = 1..T
    y   = readout(h_T)

    model = models.build("hgru", task="pathfinder-seg")              # the C-RBP paper's hGRU
    logits, penalty, stats, _ = model(images, steps=20, algo="c-rbp")
    loss = focal_loss(logits, masks) + 10 * penalty                   # LCP weight 10 as in the paper
    per_t = model.eval()(images, steps=40, per_step=True).per_step   # readout after every step, no graph
    model = models.load("runs/pathfinder-14")                         # a model that train.py trained

Tasks: "pathfinder-seg" (images B x 1 x H x W -> per-pixel logits B x 2 x H x W, the C-RBP paper),
"pathfinder-cls" (B x 1 x H x W -> B x 2, the LocRNN paper's Pathfinder), "mazes" (B x 3 x H x W -> per-pixel
B x 2 x H x W). Default sizes per task are in TASKS and in each constructor below; build() lists the options.
"""
import functools
import inspect
import itertools
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import crbp
import fastpath
from cells import (BasicBlock, ConvGRUCell, ConvLSTMCell, HGRUCell, HGRUGNCell, LocRNNCell,  # noqa: F401
                   LocRNNEmbedding, RResNetCell, _check_choice, _check_int, _check_kernel)

TASKS = {  # input channels, drive width, default steps T and algo (T=20 C-RBP for PF-14; LocRNN code's T)
    "pathfinder-seg": dict(in_channels=1, width=25, steps=20, algo="c-rbp"),
    "pathfinder-cls": dict(in_channels=1, width=32, steps=12, algo="bptt"),
    "mazes": dict(in_channels=3, width=64, steps=15, algo="bptt"),
}
MIN_SIZE = 8  # smallest image side we accept (the Pathfinder-cls stem downsamples by 4)
crbp.WRAPPERS.add(__name__)  # crbp's warnings name the line that called the model, not this file


class Output(NamedTuple):
    logits: torch.Tensor  # B x 2 x H x W (seg, mazes) or B x 2 (cls)
    penalty: torch.Tensor  # 0-d LCP at the last transition; zero without "c-" or for feedforward models
    stats: Optional[crbp.Stats]  # None for feedforward models
    per_step: Optional[list]  # when asked: the readout (or the state) after each step t = 1..T, detached


# ----------------------------------------------------------------------------------------------------------
# Front ends and readouts


def gabor_bank() -> torch.Tensor:
    """The C-RBP hGRU's 7x7 front-end bank, 25 x 1 x 7 x 7, built analytically (no data file).

    The paper code loads `gabor_serre.npy`: 24 Gabors and a positive blob. This recipe, fitted to that file
    (it matches to < 1e-6), is Serre et al.'s (2007) S1 filter at the 7x7 scale (wavelength 3.5, sigma 2.8,
    aspect 0.3) on the offsets x (row) and y (column) in -3..3, cut to the disc x^2 + y^2 <= 9, then made
    zero-mean (over all 49 pixels, so the corners end up at -mean) and unit-norm:
        u = x cos(theta) + y sin(theta),  v = -x sin(theta) + y cos(theta)
        G = exp(-(u^2 + 0.3^2 v^2) / (2 2.8^2)) cos(2 pi u / 3.5 + phi)
    Filters 0..11: theta = 90 - 15 j degrees, phi = 0; filters 12..23: the same thetas, phi = 116.6 degrees
    (the file's second phase, fitted). Filter 24: the disc, 29 pixels of 49/29 each (sum 49), as in the file.
    """
    r = torch.arange(7, dtype=torch.float64) - 3
    x, y = torch.meshgrid(r, r, indexing="ij")  # (7, 7) offsets: x down the rows, y along the columns
    disc = (x ** 2 + y ** 2 <= 9).double()
    filters = []
    for phi in (0.0, math.radians(116.6)):
        for j in range(12):
            th = math.radians(90 - 15 * j)
            u, v = x * math.cos(th) + y * math.sin(th), -x * math.sin(th) + y * math.cos(th)
            g = torch.exp(-(u ** 2 + 0.3 ** 2 * v ** 2) / (2 * 2.8 ** 2)) * torch.cos(2 * math.pi * u / 3.5 + phi)
            g = g * disc - (g * disc).mean()
            filters.append(g / g.norm())
    filters.append(disc * 49 / disc.sum())
    return torch.stack(filters)[:, None].float()  # (25, 1, 7, 7)


class GaborEnergy(nn.Module):
    """Pathfinder-seg drive of [CRBP]: Z = (conv0 * I)^2, conv0 7x7 1->25 initialised with gabor_bank().

    conv0 stays trainable (the paper code only overwrote .data); its bias keeps PyTorch's default init.
    The square makes Z >= 0, which the hGRU's suppression stage assumes. No normalisation follows.
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 25, 7, padding=3)
        with torch.no_grad():
            self.conv0.weight.copy_(gabor_bank())

    def forward(self, images):
        return self.conv0(images).square()  # (B, 25, H, W)


def gabor_stem_bank(n: int = 32, size: int = 11) -> torch.Tensor:
    """The LocRNN code's frozen Pathfinder stem bank, n x 1 x size x size.

    theta = linspace(0, pi, n/2) with both ends (so theta = 0 and pi repeat, as in the code), phases {0, pi},
    2 cycles over the support (sf = 2/size), isotropic envelope sigma = size/4, peak 0.5, cosine carrier:
        w(x, y) = 0.5 exp(-(x^2 + y^2) / (2 sigma^2)) cos(2 pi sf (x cos theta + y sin theta) + phase)
    """
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    env = 0.5 * torch.exp(-(x ** 2 + y ** 2) / (2 * (size / 4) ** 2))
    bank = [env * torch.cos(2 * math.pi * (2 / size) * (x * math.cos(th) + y * math.sin(th)) + ph)
            for th in torch.linspace(0, math.pi, n // 2).tolist() for ph in (0.0, math.pi)]
    return torch.stack(bank)[:, None].float()


class GaborStem(nn.Module):
    """Pathfinder-cls stem of [LOC]: frozen 11x11 stride-2 Gabor conv, BN, ReLU, max-pool 3/2: stride 4.

    code vs paper: the paper's table says "Gabor filter 3x3"; we follow the code's 11x11 stride-2 bank.
    code vs ours: the code reads RGB copies of the grey image and applies the same filter to all 3 channels;
    on our 1-channel images that is the filter times 3. The code also resizes 150 -> 160 px; we take the
    images at whatever size data.py gives (150 -> 38 x 38 maps instead of 40 x 40).
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.register_buffer("weight", 3 * gabor_stem_bank(width))  # frozen: a buffer, not a parameter
        self.bn = nn.BatchNorm2d(width)

    def forward(self, images):
        x = F.relu(self.bn(F.conv2d(images, self.weight, stride=2, padding=5)))
        return F.max_pool2d(x, 3, stride=2, padding=1)  # (B, 32, H/4, W/4)


def maze_stem(in_channels: int, width: int, bn: bool = True) -> nn.Module:
    """Mazes stem: conv3x3 (no bias), BN, ReLU (LocRNN code's recurrent models) or without BN (ResNets)."""
    bn = [nn.BatchNorm2d(width)] if bn else []
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), *bn, nn.ReLU())


def maze_head(channels: int, bn: bool = True) -> nn.Module:
    """Mazes per-pixel head: conv3x3 C->32->8->2, no biases; with BN (LocRNN code) or without (ResNets)."""
    layers = []
    for a, b in ((channels, 32), (32, 8)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False)] + ([nn.BatchNorm2d(b)] if bn else []) + [nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(8, 2, 3, padding=1, bias=False))


class SegReadout(nn.Sequential):
    """Pathfinder-seg readout of [CRBP]: BN (batch statistics in train and eval) + 1x1 conv to 2 classes.

    conv6 is xavier-normal with both biases log(0.99/0.01) (equal biases cancel in the softmax).
    """

    def __init__(self, channels: int):
        conv = nn.Conv2d(channels, 2, 1)
        nn.init.xavier_normal_(conv.weight)
        nn.init.constant_(conv.bias, math.log(0.99 / 0.01))
        super().__init__(nn.BatchNorm2d(channels, eps=1e-3, track_running_stats=False), conv)


class GlobalMaxLinear(nn.Module):
    """Pathfinder-cls head of [LOC] after a 2-channel map: global max over space, then Linear(2, 2)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x.amax(dim=(2, 3)))  # (B, 2, H, W) -> (B, 2)


def _ends(task, channels):
    """(front end, readout) of the recurrent models for a task; `channels` = the cell's output channels."""
    if task == "pathfinder-seg":
        return GaborEnergy(), SegReadout(channels)
    if task == "pathfinder-cls":
        return GaborStem(TASKS[task]["width"]), nn.Sequential(nn.Conv2d(channels, 2, 1), GlobalMaxLinear())
    return maze_stem(3, TASKS[task]["width"]), maze_head(channels)


# ----------------------------------------------------------------------------------------------------------
# Models


class Recurrent(nn.Module):
    """front end -> cell run by crbp.run -> readout. See the module docstring."""

    recurrent = True

    def __init__(self, front, readout, *, cell, task, steps=None, algo=None, embed=None, driven=True):
        super().__init__()
        self.front, self.cell, self.readout, self.embed = front, cell, readout, embed
        self.task, self.in_channels, self.driven = task, TASKS[task]["in_channels"], driven
        self.steps = TASKS[task]["steps"] if steps is None else steps
        self.algo = TASKS[task]["algo"] if algo is None else algo
        _check_int("steps", self.steps, 1)
        _check_choice("algo", self.algo, crbp.ALGOS)
        self.compiled = {}

    def compile_cell(self, **options):
        """The fast path: from now on run every step through torch.compile(self.cell, **options) (crbp's
        fast_cell), and, for cells with an explicit VJP (HGRUCell.linearize / adjoint), the Neumann terms and
        the LCP through that compiled VJP (crbp's vjp) instead of autograd. Same parameters and state_dict."""
        compiled = {"cell": fastpath.compile(self.cell, **options)}
        if hasattr(self.cell, "linearize"):
            compiled["linearize"] = fastpath.compile(self.cell.linearize, **options)
            compiled["adjoint"] = fastpath.compile(self.cell.adjoint, **options)
        object.__setattr__(self, "compiled", compiled)  # not submodules: the state_dict stays the cell's
        return self

    def drive(self, images):
        """(x, h0, extra) of a run on these images: the static drive, the initial state, and the cell's
        per-run keyword arguments (the hGRU's kernel spectra), so that a step is self.cell(h, x, **extra)."""
        x = self.front(images)
        h0 = self.embed(x) if self.embed is not None else self.cell.init_state(x)
        return x, h0, (self.cell.prepare(x) if hasattr(self.cell, "prepare") else {})

    def forward(self, images, steps=None, algo=None, per_step=False, **crbp_options) -> Output:
        """Logits after `steps` steps of `algo` (defaults: self.steps, self.algo), the LCP penalty and the
        crbp stats; options go to crbp.run. per_step=True (or "logits") also returns the readout after every
        step t = 1..T, per_step="state" the state (detached tensors: no graph of the steps is kept)."""
        steps = self.steps if steps is None else steps
        algo = self.algo if algo is None else algo
        _check_images(images, self.in_channels)
        _check_choice("per_step", per_step, (False, True, "logits", "state"))
        if per_step and self.training:
            raise ValueError("per_step is for evaluation: call model.eval() first (in train mode the per-step "
                             "readouts would update BatchNorm running statistics)")
        if not self.driven and torch.is_grad_enabled() and _cuts_tape(algo, steps, crbp_options.get("truncate")):
            raise ValueError(f"{algo} does not backpropagate to step 1, and this model has no input drive, so its "
                             "stem would get no gradient: use bptt, c-bptt, or tbptt with truncate=steps")
        x, h0, extra = self.drive(images)
        record, user_on_step = [], crbp_options.pop("on_step", None)
        if per_step:
            def on_step(t, h):
                with torch.no_grad():  # a readout per step without keeping its graph
                    record.append(_detach(h) if per_step == "state" else self.readout(_first(h)))
                if user_on_step is not None:
                    user_on_step(t, h)
            crbp_options["on_step"] = on_step
        elif user_on_step is not None:
            crbp_options["on_step"] = user_on_step
        cell = functools.partial(self.cell, **extra) if extra else self.cell
        own_cell = "fast_cell" not in crbp_options
        if "cell" in self.compiled:  # the fast path (compile_cell)
            crbp_options.setdefault("fast_cell", functools.partial(self.compiled["cell"], **extra))
        if "linearize" in self.compiled and "vjp" not in crbp_options:  # one StepVJP per run: its Jacobian factors
            vjp = fastpath.StepVJP(functools.partial(self.compiled["linearize"], **extra),
                                   functools.partial(self.compiled["adjoint"], **extra))
            crbp_options["vjp"], fast = vjp, crbp_options["fast_cell"]
            if own_cell and (algo.startswith("c-") or algo == "rbp"):  # the last step by linearize: its factors
                t = itertools.count(1)  # serve the LCP and the Neumann terms (crbp.run calls the cell `steps` times)
                crbp_options["fast_cell"] = lambda h, x: (vjp.step if next(t) == steps and torch.is_grad_enabled()
                                                          else fast)(h, x)
        state, penalty, stats = crbp.run(cell, x, h0, steps=steps, algo=algo, **crbp_options)
        return Output(self.readout(_first(state)), penalty, stats, record if per_step else None)


class Feedforward(nn.Module):
    """A feedforward control with the models' forward signature: no steps, no algo, zero penalty."""

    recurrent = False
    steps = algo = None

    def __init__(self, net, *, task):
        super().__init__()
        self.net, self.task, self.in_channels = net, task, TASKS[task]["in_channels"]

    def forward(self, images, steps=None, algo=None, per_step=False, **crbp_options) -> Output:
        if steps is not None or algo not in (None, "bptt") or per_step or crbp_options:
            raise ValueError("a feedforward model has no steps: call model(images) without steps, algo (other than "
                             f"'bptt'), per_step or crbp options; got steps={steps!r}, algo={algo!r}, "
                             f"per_step={per_step!r}, options={sorted(crbp_options)}")
        _check_images(images, self.in_channels)
        logits = self.net(images)
        return Output(logits, logits.new_zeros(()), None, None)


def _ff6(in_channels, channels, kernel, layers):
    """The C-RBP paper's feedforward control (FFnet.py): conv0 7x7 (no bias, random init: the Gabor load is
    commented out, and no square), BN0, then `layers` x [conv E x E, BN, ReLU], then a 1x1 conv to 2.
    Its BNs are default ones (running statistics at eval). 845,527 parameters with 25 channels, 15 x 15, 6."""
    body = [nn.Conv2d(in_channels, channels, 7, padding=3, bias=False), nn.BatchNorm2d(channels)]
    for _ in range(layers):
        body += [nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*body, nn.Conv2d(channels, 2, 1))


def _cls(task, net):
    return nn.Sequential(net, GlobalMaxLinear()) if task == "pathfinder-cls" else net


def _pick(task, value, defaults):
    return defaults[task] if value is None else value


# Per-task defaults. Pathfinder-seg follows the C-RBP paper (25 channels, 15 x 15 horizontal kernels for every
# recurrent model), Pathfinder-cls the LocRNN code's Pathfinder configs (32 channels at 1/4 resolution, 9 x 9),
# Mazes the LocRNN code's Mazes configs (64 channels, 5 x 5).
KERNEL = {"pathfinder-seg": 15, "pathfinder-cls": 9, "mazes": 5}


def hgru(task="pathfinder-seg", *, kernel=None, steps=None, algo=None, bias_init="trained", form="code",
         conv="direct"):
    """hGRU of [CRBP] (HGRUCell) on the task's front end; its channels are the drive's (25 / 32 / 64).
    On pathfinder-cls and mazes this is still the C-RBP hGRU, not the LocRNN code's hConvGRU port (per-step
    BatchNorms, ReLU, random h_0), whose per-step BNs cannot run for other step counts."""
    width = TASKS[task]["width"]
    cell = HGRUCell(width, _pick(task, kernel, KERNEL), bias_init=bias_init, form=form, conv=conv)
    return Recurrent(*_ends(task, width), cell=cell, task=task, steps=steps, algo=algo)


def hgru_gn(task="pathfinder-seg", *, kernel=None, groups=None, steps=None, algo=None):
    """Panoptic hGRU (HGRUGNCell) with this task's sizes; groups default to about 8 channels per group as in
    GN(32) on 256 channels (25 channels: 5 groups). panoptic.py builds HGRUGNCell(256, 3) directly."""
    width, steps_ = TASKS[task]["width"], TASKS[task]["steps"] if steps is None else steps
    _check_int("steps", steps_, 1)  # the gate-bias init depends on T
    cell = HGRUGNCell(width, _pick(task, kernel, KERNEL), timesteps=steps_,
                      groups=_pick(task, groups, {"pathfinder-seg": 5, "pathfinder-cls": 4, "mazes": 8}))
    return Recurrent(*_ends(task, width), cell=cell, task=task, steps=steps, algo=algo)


def convlstm(task="pathfinder-seg", *, channels=None, kernel=None, steps=None, algo=None):
    """ConvLSTM control of [CRBP]: the hGRU's front end and readout (1,126,452 parameters on Pathfinder-seg)."""
    width = TASKS[task]["width"]
    channels = _pick(task, channels, {t: d["width"] for t, d in TASKS.items()})
    cell = ConvLSTMCell(width, channels, _pick(task, kernel, KERNEL))
    return Recurrent(*_ends(task, channels), cell=cell, task=task, steps=steps, algo=algo)


def locrnn(task="pathfinder-seg", *, channels=None, long_kernel=None, short_kernel=None, init_state=None,
           steps=None, algo=None):
    """LocRNN of [LOC]. Pathfinder-cls: 32 channels, 9 x 9 / 5 x 5, zero init, T = 12. Mazes: 64 channels,
    5 x 5 / 3 x 3, embedding init, T = 15. Pathfinder-seg: 32 channels, 15 x 15 / 5 x 5, zero init."""
    width = TASKS[task]["width"]
    channels = _pick(task, channels, {"pathfinder-seg": 32, "pathfinder-cls": 32, "mazes": 64})
    init_state = _pick(task, init_state, {"pathfinder-seg": "zeros", "pathfinder-cls": "zeros", "mazes": "embed"})
    _check_choice("init_state", init_state, ("zeros", "embed"))
    cell = LocRNNCell(width, channels, _pick(task, long_kernel, KERNEL),
                      _pick(task, short_kernel, {"pathfinder-seg": 5, "pathfinder-cls": 5, "mazes": 3}))
    embed = LocRNNEmbedding(width, channels) if init_state == "embed" else None
    return Recurrent(*_ends(task, channels), cell=cell, task=task, steps=steps, algo=algo, embed=embed)


def convgru(task="pathfinder-seg", *, channels=None, kernel=None, act="tanh", steps=None, algo=None):
    """ConvGRU of the LocRNN code. Pathfinder-cls: 32 -> 24 channels, 9 x 9; Mazes: 64, 5 x 5."""
    width = TASKS[task]["width"]
    channels = _pick(task, channels, {"pathfinder-seg": 25, "pathfinder-cls": 24, "mazes": 64})
    cell = ConvGRUCell(width, channels, _pick(task, kernel, KERNEL), act=act)
    return Recurrent(*_ends(task, channels), cell=cell, task=task, steps=steps, algo=algo)


def ff(task="pathfinder-seg", *, channels=25, kernel=15, layers=6):
    """The C-RBP paper's 6-layer 15 x 15 CNN (see _ff6); for pathfinder-cls followed by max + Linear."""
    _check_int("channels", channels, 1)
    _check_kernel("kernel", kernel)
    _check_int("layers", layers, 1)
    return Feedforward(_cls(task, _ff6(TASKS[task]["in_channels"], channels, kernel, layers)), task=task)


def resnet(task="mazes", *, depth=36, width=64):
    """Feedforward Mazes ResNet-d (no BN): stem, (d - 4)/2 BasicBlocks, head 64->32->8->2.
    ResNet-12 / 20 / 36: 317,520 / 612,432 / 1,202,256 parameters (Mazes)."""
    if not (isinstance(depth, int) and depth >= 8 and (depth - 4) % 4 == 0):
        raise ValueError(f"depth must be 8, 12, 16, ... (4 + 4 k), got {depth!r}")
    _check_int("width", width, 1)
    blocks = [BasicBlock(width) for _ in range((depth - 4) // 2)]
    net = nn.Sequential(maze_stem(TASKS[task]["in_channels"], width, bn=False), *blocks, maze_head(width, bn=False))
    return Feedforward(_cls(task, net), task=task)


def rresnet(task="mazes", *, width=64, steps=8, algo="bptt"):
    """Weight-tied R-ResNet: R-ResNet-d runs its 2-block group (d - 4)/4 times, so T = 8 is R-ResNet-36.
    The head runs after every iteration on request (per_step, the "thoughts"). 170,064 parameters."""
    _check_int("width", width, 1)
    return Recurrent(maze_stem(TASKS[task]["in_channels"], width, bn=False), _cls(task, maze_head(width, bn=False)),
                     cell=RResNetCell(width), task=task, steps=8 if steps is None else steps,
                     algo="bptt" if algo is None else algo, driven=False)


MODELS = {"hgru": hgru, "hgru_gn": hgru_gn, "convlstm": convlstm, "locrnn": locrnn, "convgru": convgru,
          "ff": ff, "resnet": resnet, "rresnet": rresnet}


def build(name: str, task: str = "pathfinder-seg", **options) -> nn.Module:
    """MODELS[name](task=task, **options), checking the name, the task and the option names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: pass one of {sorted(MODELS)}")
    _check_choice("task", task, tuple(TASKS))
    allowed = [p for p in inspect.signature(MODELS[name]).parameters if p != "task"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}: it takes {allowed}")
    model = MODELS[name](task=task, **options)
    model.build_config = {"name": name, "task": task, "options": dict(options)}  # what save() records
    return model


def defaults(name: str, task: str = "pathfinder-seg") -> tuple:
    """(steps T, algo) that build(name, task) uses when given neither; (None, None) for a feedforward model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: pass one of {sorted(MODELS)}")
    params = inspect.signature(MODELS[name]).parameters
    if "steps" not in params:
        return None, None
    pick = lambda key: TASKS[task][key] if params[key].default is None else params[key].default
    return pick("steps"), pick("algo")


def save(model: nn.Module, path) -> None:
    """Write a model that build() made: its weights (on the CPU, so that any machine reads the file) and the
    build() call, so that load() needs nothing else."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"build": model.build_config, "model": weights}, path)


def load(path, device="cpu") -> nn.Module:
    """A trained model from a file of save() or train.py's checkpoint.pt, or from a run directory (its
    model.pt, else its checkpoint.pt). In eval mode, on `device`: ready for model(images, steps=T,
    per_step=True). The steps and algo it trained with are model.steps and model.algo; from a checkpoint of
    a run still training, model.trained_images says how far it had got (None for a finished model.pt)."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in ("model.pt", "checkpoint.pt") if os.path.isfile(os.path.join(path, f))]
        if not files:
            raise ValueError(f"{path} holds neither model.pt nor checkpoint.pt: pass a run directory that "
                             "train.py wrote, or one of those files")
        path = files[0]
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass a run directory or a file that models.save wrote") from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} cannot be read as a saved model ({type(e).__name__}: {e})") from None
    if not (isinstance(saved, dict) and "build" in saved and "model" in saved):
        raise ValueError(f"{path} has no build config and weights: it was not written by models.save or train.py")
    b = saved["build"]
    model = build(b["name"], b["task"], **b["options"])
    model.load_state_dict(saved["model"])
    model.trained_images = saved.get("images")  # train.py's checkpoints hold it; save()'s finished models do not
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _first(h):
    return h[0] if isinstance(h, tuple) else h  # ConvLSTM (h, c) -> h, LocRNN (L, S) -> L


def _detach(h):
    return tuple(z.detach() for z in h) if isinstance(h, tuple) else h.detach()


def _cuts_tape(algo, steps, truncate):
    """Whether algo leaves step 1 off the tape (so h_0 and a drive-free stem get no gradient)."""
    return algo in ("rbp", "c-rbp") or (algo in ("tbptt", "c-tbptt") and truncate != steps)


def _check_images(images, in_channels):
    if not (isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4):
        raise ValueError(f"images must be a float Tensor B x {in_channels} x H x W, got "
                         f"{type(images).__name__}{tuple(images.shape) if isinstance(images, torch.Tensor) else ''}")
    if images.shape[1] != in_channels or min(images.shape[2:]) < MIN_SIZE:
        raise ValueError(f"images must be B x {in_channels} x H x W with H, W >= {MIN_SIZE} for this task, "
                         f"got {tuple(images.shape)}")
