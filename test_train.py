"""Tests of train.py: metrics and analysis against hand-computed cases, figure files, CLI runs on the CPU."""
import json
import math
import struct
import xml.etree.ElementTree as ET
import zlib

import pytest
import torch

import figures

import train


# ---- metrics, by hand -----------------------------------------------------------------------------

def test_seg_metrics_on_a_hand_counted_case():
    target = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]]])  # 2 positives, 6 negatives
    pred = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 0]]])  # TP 1, FN 1, FP 1, TN 5
    logits = torch.stack([1 - pred, pred], 1).float()
    counts = train.seg_counts(logits, target)
    assert counts.tolist() == [[1, 1, 1, 5]]
    m = train.seg_metrics(counts[0])
    assert m["recall"] == 0.5 and m["precision"] == 0.5 and m["f1"] == 0.5
    assert math.isclose(m["bal_acc"], (0.5 + 5 / 6) / 2) and math.isclose(m["iou"], 0.5 / 1.5)


def test_batch_averaged_and_pooled_metrics_differ_as_defined():
    a, b = torch.tensor([1.0, 0, 0, 9]).double(), torch.tensor([1.0, 3, 0, 6]).double()  # F1 1.0 and 0.4
    out = train.summarize_seg([a, b])
    assert math.isclose(out["f1"], (1.0 + 0.4) / 2)  # the paper: unweighted mean over batches
    assert math.isclose(out["pooled_f1"], 2 * 2 / (2 * 2 + 3 + 0))  # pooled counts


def test_focal_loss_matches_its_formula():
    logits, target = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randint(0, 2, (2, 3, 3))
    p = logits.softmax(1).gather(1, target[:, None])[:, 0]
    assert torch.isclose(train.focal_loss(logits, target).double(), (-(1 - p) ** 2 * p.log()).mean())


def test_maze_solved_needs_every_free_pixel_and_ignores_walls():
    target = torch.tensor([[[0, 1, 1], [0, 0, 0]]])
    free = torch.tensor([[[1, 1, 1], [0, 1, 1]]]).bool()
    good = torch.tensor([[[0, 1, 1], [1, 0, 0]]])  # wrong only on a wall pixel
    bad = torch.tensor([[[0, 1, 0], [0, 0, 0]]])
    to_logits = lambda p: torch.stack([1 - p, p], 1).float()
    assert train.maze_solved(to_logits(good), target, free).tolist() == [True]
    assert train.maze_solved(to_logits(bad), target, free).tolist() == [False]


# ---- state-space analysis -------------------------------------------------------------------------

def test_pca_finds_the_direction_of_points_on_a_line():
    d = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    origin = torch.tensor([5.0, -1.0, 0.5], dtype=torch.float64)
    X = torch.linspace(-2, 3, 11, dtype=torch.float64)[:, None] * d + origin
    mean, comps = train.pca(X, k=1)
    assert torch.allclose(mean, X.mean(0)) and math.isclose(abs(float(comps[0] @ d)), 1.0, rel_tol=1e-12)


def test_state_space_distance_is_mean_squared_difference_between_t_N_and_t_T():
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)  # 5 images, T = 6, C = 3
    proj, dist = train.state_space(pooled, N=4, k=2)
    mean, comps = train.pca(pooled[:, :4].reshape(-1, 3), 2)
    want = ((pooled[:, 3] - mean) @ comps.T - (pooled[:, 5] - mean) @ comps.T).square().mean(1)
    assert proj.shape == (5, 6, 2) and torch.allclose(dist, want)


def test_ks_statistic_by_hand_and_kolmogorov_critical_values():
    D, p = train.ks_2samp([1, 2, 3, 4], [3.5, 5, 6, 7])  # ECDFs differ most at x = 3: 3/4 - 0
    assert D == 0.75
    assert train.ks_2samp([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    # The classic 5% and 1% critical values of the Kolmogorov distribution.
    assert abs(train.kolmogorov_q(1.3581) - 0.05) < 1e-4 and abs(train.kolmogorov_q(1.6276) - 0.01) < 1e-4
    far = train.ks_2samp(torch.arange(50.0), torch.arange(50.0) + 100)
    assert far[0] == 1.0 and far[1] < 1e-6


# ---- figures ---------------------------------------------------------------------------------------

def png_chunks(path):
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    i, chunks = 8, []
    while i < len(raw):
        n, kind = struct.unpack(">I4s", raw[i:i + 8])
        body, crc = raw[i + 8:i + 8 + n], struct.unpack(">I", raw[i + 8 + n:i + 12 + n])[0]
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        i += 12 + n
    return chunks


def test_timecourse_png_is_valid(tmp_path):
    n, H, W, steps = 2, 6, 5, [1, 3]
    path = tmp_path / "t.png"
    figures.timecourse_png(str(path), torch.rand(n, 1, H, W), torch.rand(n, H, W) > 0.5, torch.rand(n, 2, H, W), steps)
    chunks = png_chunks(path)
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h = struct.unpack(">II", chunks[0][1][:8])
    assert (w, h) == (4 * (W + 2), n * (H + 2))
    pixels = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(pixels) == h * (1 + 3 * w)


def test_svg_plot_parses_and_has_the_series(tmp_path):
    path = tmp_path / "p.svg"
    figures.svg_plot(str(path), {"a < b": ([1, 2, 3], [0.1, 0.5, 0.2]), "c": ([1, 2], [1.0, float("nan")])},
                   "step t", "F1", "title & more")
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


# ---- the command line, end to end on the CPU --------------------------------------------------------

MODELS = ["hgru", "hgru_gn", "convlstm", "locrnn", "convgru", "ff", "resnet", "rresnet"]


@pytest.mark.parametrize("task", ["pathfinder", "pathfinder-cls", "mazes"])
@pytest.mark.parametrize("model", MODELS)
def test_dry_run_trains_evaluates_and_writes_the_run_dir(tmp_path, task, model, capsys):
    out = tmp_path / "run"
    train.main(["--task", task, "--model", model, "--dry-run", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "parameters" in printed and "held-out" in printed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("loss" in r and math.isfinite(r["loss"]) for r in rows) and "final" in rows[-1]
    assert json.load(open(out / "config.json"))["model"] == model
    for fig in ("learning_curve.svg", "per_step.svg"):
        ET.parse(out / fig)
    if model not in ("ff", "resnet"):
        assert len(json.load(open(out / "state_space.json"))["distance"]) > 0
    if task != "pathfinder-cls" and model not in ("ff", "resnet"):
        png_chunks(out / "timecourse.png")


def tiny(out, *extra):
    return ["--task", "mazes", "--model", "convgru", "--channels", "8", "--kernel", "3", "--algo", "c-bptt",
            "--steps", "2", "--batch-size", "4",
            "--images", "24", "--eval-images", "4", "--eval-batch-size", "4", "--eval-every", "1000",
            "--eval-steps", "3", "--device", "cpu", "--out", str(out), *extra]


def test_resume_in_pieces_equals_one_uninterrupted_run(tmp_path):
    train.main(tiny(tmp_path / "whole"))
    train.main(tiny(tmp_path / "pieces", "--until", "12"))
    mid = torch.load(tmp_path / "pieces" / "checkpoint.pt", weights_only=False)
    assert mid["iteration"] == 3
    train.main(["--resume", str(tmp_path / "pieces")])
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "pieces" / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert any(not torch.equal(a["model"][k], mid["model"][k]) for k in a["model"])


def test_bad_command_lines_say_what_is_wrong(tmp_path, capsys):
    cases = [
        (["--task", "cifar"], "invalid choice"),
        (["--model", "transformer"], "--model must be one of"),
        (["--algo", "rbp", "--steps", "1"], "--steps >= 2"),
        (["--algo", "tbptt"], "needs --truncate"),
        (["--model", "ff", "--algo", "c-rbp"], "feedforward"),
        (["--mu", "1.5"], "--mu must be"),
        (["--resume", str(tmp_path / "nothing")], "no config.json"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_resume_refuses_a_changed_config_and_a_corrupt_checkpoint(tmp_path, capsys):
    train.main(tiny(tmp_path / "r", "--until", "8"))
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", str(tmp_path / "r"), "--lr", "0.5"])
    assert "--lr 0.5 (run has 0.001)" in capsys.readouterr().err
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot be read"):
        train.main(["--resume", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(tiny(tmp_path / "r"))


@pytest.mark.parametrize("algo", ["c-bptt", "tbptt"])
def test_other_algos_dry_run(tmp_path, algo):
    train.main(["--task", "mazes", "--model", "convgru", "--algo", algo, "--dry-run", "--device", "cpu",
                "--out", str(tmp_path / "run")] + (["--truncate", "2"] if algo == "tbptt" else []))
    assert "final" in json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train.main(tiny(tmp_path / "r", "--until", "8"))
    good = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    monkeypatch.setattr(train, "task_loss", lambda args, logits, target, free: logits.sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main(["--resume", str(tmp_path / "r")])
    kept = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert kept["iteration"] == good["iteration"] == 2
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_ks_compare_of_two_runs(tmp_path, capsys):
    for name, d in (("a", [0.1, 0.2, 0.3, 0.4] * 5), ("b", [1.1, 1.2, 1.3, 1.4] * 5)):
        (tmp_path / name).mkdir()
        json.dump({"N": 6, "T": 40, "distance": d}, open(tmp_path / name / "state_space.json", "w"))
    D, p = train.main(["--ks", str(tmp_path / "a"), str(tmp_path / "b")])
    assert D == 1.0 and p < 1e-3 and "KS D = 1.000" in capsys.readouterr().out
