"""Tests of report.py and train.py: metrics and analysis against hand-computed cases, figure files, and the
command line end to end on the CPU (each bug a user met has a test here)."""
import json
import math
import shutil
import struct
import xml.etree.ElementTree as ET
import zlib

import pytest
import torch

import figures
import models
import compare
import options
import report
import train


# ---- metrics, by hand -----------------------------------------------------------------------------

def test_seg_metrics_on_a_hand_counted_case():
    target = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]]])  # 2 positives, 6 negatives
    pred = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 0]]])  # TP 1, FN 1, FP 1, TN 5
    logits = torch.stack([1 - pred, pred], 1).float()
    counts = report.seg_counts(logits, target)
    assert counts.tolist() == [[1, 1, 1, 5]]
    m = report.seg_metrics(counts[0])
    assert m["recall"] == 0.5 and m["precision"] == 0.5 and m["f1"] == 0.5
    assert math.isclose(m["bal_acc"], (0.5 + 5 / 6) / 2) and math.isclose(m["iou"], 0.5 / 1.5)


def test_batch_averaged_and_pooled_metrics_differ_as_defined():
    a, b = torch.tensor([1.0, 0, 0, 9]).double(), torch.tensor([1.0, 3, 0, 6]).double()  # F1 1.0 and 0.4
    out = report.summarize_seg([a, b])
    assert math.isclose(out["f1"], (1.0 + 0.4) / 2)  # the paper: unweighted mean over batches
    assert math.isclose(out["pooled_f1"], 2 * 2 / (2 * 2 + 3 + 0))  # pooled counts


def test_focal_loss_matches_its_formula():
    logits, target = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randint(0, 2, (2, 3, 3))
    p = logits.softmax(1).gather(1, target[:, None])[:, 0]
    loss = report.focal_loss(logits, target)
    assert loss.dtype == torch.float64 and torch.isclose(loss, (-(1 - p) ** 2 * p.log()).mean(), rtol=1e-14, atol=0)
    assert report.focal_loss(logits.bfloat16(), target).dtype == torch.float32  # bf16 is summed in float32


def test_maze_solved_needs_every_free_pixel_and_ignores_walls():
    target = torch.tensor([[[0, 1, 1], [0, 0, 0]]])
    free = torch.tensor([[[1, 1, 1], [0, 1, 1]]]).bool()
    good = torch.tensor([[[0, 1, 1], [1, 0, 0]]])  # wrong only on a wall pixel
    bad = torch.tensor([[[0, 1, 0], [0, 0, 0]]])
    to_logits = lambda p: torch.stack([1 - p, p], 1).float()
    assert report.maze_solved(to_logits(good), target, free).tolist() == [True]
    assert report.maze_solved(to_logits(bad), target, free).tolist() == [False]


# ---- state-space analysis -------------------------------------------------------------------------

def test_pca_finds_the_direction_of_points_on_a_line():
    d = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    origin = torch.tensor([5.0, -1.0, 0.5], dtype=torch.float64)
    X = torch.linspace(-2, 3, 11, dtype=torch.float64)[:, None] * d + origin
    mean, comps = report.pca(X, k=1)
    assert torch.allclose(mean, X.mean(0)) and math.isclose(abs(float(comps[0] @ d)), 1.0, rel_tol=1e-12)


def test_state_space_distance_is_mean_squared_difference_between_t_N_and_t_T():
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)  # 5 images, T = 6, C = 3
    proj, dist = report.state_space(pooled, N=4, k=2)
    mean, comps = report.pca(pooled[:, :4].reshape(-1, 3), 2)
    want = ((pooled[:, 3] - mean) @ comps.T - (pooled[:, 5] - mean) @ comps.T).square().mean(1)
    assert proj.shape == (5, 6, 2) and torch.allclose(dist, want)


def test_ks_statistic_by_hand_and_kolmogorov_critical_values():
    D, p = report.ks_2samp([1, 2, 3, 4], [3.5, 5, 6, 7])  # ECDFs differ most at x = 3: 3/4 - 0
    assert D == 0.75
    assert report.ks_2samp([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    # The classic 5% and 1% critical values of the Kolmogorov distribution.
    assert abs(report.kolmogorov_q(1.3581) - 0.05) < 1e-4 and abs(report.kolmogorov_q(1.6276) - 0.01) < 1e-4
    far = report.ks_2samp(torch.arange(50.0), torch.arange(50.0) + 100)
    assert far[0] == 1.0 and far[1] < 1e-6
    with pytest.raises(ValueError, match="two non-empty samples"):
        report.ks_2samp([], [1.0, 2.0])


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
    assert (w, h) == (4 * (W + 2), 7 + n * (H + 2))  # a 7-px header row names the columns
    pixels = torch.tensor(list(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))))
    assert len(pixels) == h * (1 + 3 * w)
    header = pixels.view(h, 1 + 3 * w)[:7, 1:].view(7, 4, W + 2, 3)
    assert all((header[:, c] == 0).any() for c in range(4)), "every column has a label"


def test_text_bitmap_draws_the_labels():
    assert figures.text_bitmap("T=1").shape == (5, 12) and figures.text_bitmap("input", 2).shape == (10, 40)
    assert figures.text_bitmap("1")[:, 1].all()  # the stem of the 1


def test_svg_plot_parses_and_has_the_series(tmp_path):
    path = tmp_path / "p.svg"
    figures.svg_plot(str(path), {"a < b": ([1, 2, 3], [0.1, 0.5, 0.2]), "c": ([1, 2], [1.0, float("nan")])},
                   "step t", "F1", "title & more")
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


@pytest.mark.parametrize("ys", [[0.07, 0.72], [1e-4, 2.73e-4], [12345.0, 250000.0], [0.3, 0.3]])
def test_svg_tick_labels_are_round_and_inside_the_figure(tmp_path, ys):
    path = tmp_path / "p.svg"
    figures.svg_plot(str(path), {"a": ([0, 50_000, 100_000], [ys[0], ys[-1], ys[0]])}, "images", "y")
    texts = ET.parse(path).getroot().findall("{http://www.w3.org/2000/svg}text")
    for t in texts:
        if t.get("transform") or not t.text:  # the rotated y label; an empty title
            continue
        x, width = float(t.get("x")), 6.5 * len(t.text)
        left = {"end": x - width, "middle": x - width / 2}.get(t.get("text-anchor"), x)
        assert left >= 0 and left + width <= 480, t.text
        assert len(t.text) <= 7 or not t.text[0].isdigit(), t.text  # round ticks: no float noise
    labels = [t.text for t in texts]
    assert "100k" in labels and "40k" in labels  # x ticks at round numbers of images


# ---- the command line, end to end on the CPU --------------------------------------------------------

MODELS = ["hgru", "hgru_gn", "convlstm", "locrnn", "convgru", "ff", "resnet", "rresnet"]
FAST = {("pathfinder", "hgru"), ("pathfinder-cls", "locrnn"), ("mazes", "convgru")}  # one quick run per task
MATRIX = [pytest.param(t, m, marks=() if (t, m) in FAST else pytest.mark.slow)
          for t in ("pathfinder", "pathfinder-cls", "mazes") for m in MODELS]


@pytest.mark.parametrize("task,model", MATRIX)
def test_dry_run_trains_evaluates_and_writes_the_run_dir(tmp_path, task, model, capsys):
    out = tmp_path / "run"
    train.main(["--task", task, "--model", model, "--dry-run", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "parameters" in printed and "held-out" in printed and "chance" in printed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("loss" in r and math.isfinite(r["loss"]) for r in rows)
    assert "final" in json.load(open(out / "report.json"))
    assert json.load(open(out / "config.json"))["model"] == model
    for fig in ("learning_curve.svg", "per_step.svg"):
        ET.parse(out / fig)
    if model not in ("ff", "resnet"):
        assert len(json.load(open(out / "state_space.json"))["distance"]) > 0
        assert "state-space drift" in printed and "fixed point" in printed
        checks = [r["eval"] for r in rows if "eval" in r]  # each held-out check probes J at h_(T-1)
        assert checks and all(c["rho"] > 0 and math.isfinite(c["residual"]) for c in checks)
        assert "J's spectral radius" in printed and "J at h_2: spectral radius" in printed
    if task != "pathfinder-cls" and model not in ("ff", "resnet"):
        png_chunks(out / "timecourse.png")


def test_dry_run_evaluates_past_the_steps_typed_with_it(tmp_path, capsys):
    # a typed --steps beyond the dry run's default: the per-step pass and the drift must still run past T
    train.main(["--dry-run", "--device", "cpu", "--steps", "6", "--out", str(tmp_path / "run")])
    assert json.load(open(tmp_path / "run" / "state_space.json"))["T"] == 7


def test_eval_on_another_distractor_count(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(["--dry-run", "--device", "cpu", "--out", str(run)])  # pathfinder hgru, default distractors
    curve = train.main(["--eval", str(run), "--distractors", "15", "--steps", "4"])
    assert len(curve) == 4 and "with 15 distractors" in capsys.readouterr().out
    assert (run / "eval_length6_K15_T4.json").is_file()
    cfg = report.load_config(str(run))
    kw = dict(split="test", length=6, size=75)
    few, many = (report.data.task_batch("pathfinder-seg", 0, 4, distractors=k, **kw)[0] for k in (0, 15))
    assert few.sum() < many.sum() and cfg.distractors is None  # more snakes, more ink; the run keeps its own


def tiny(out, *extra):
    return ["--task", "mazes", "--model", "convgru", "--channels", "8", "--kernel", "3", "--algo", "c-bptt",
            "--steps", "2", "--batch-size", "4",
            "--images", "24", "--eval-images", "4", "--eval-batch-size", "4", "--eval-every", "8",
            "--eval-steps", "3", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo", ["c-bptt", "bptt"])
def test_cuda_training_under_cuda_graphs_equals_the_compiled_cell(tmp_path, algo):
    """--compile-mode reduce-overhead (CUDA graphs, each call's outputs copied out) trains as the default
    compiled cell does, on the GPU: the same weights after a few steps, to float32 rounding."""
    runs = []
    for mode in ("default", "reduce-overhead"):
        out = tmp_path / mode
        train.main(tiny(out, "--algo", algo, "--device", "cuda", "--compile", "--compile-mode", mode))
        runs.append(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    assert all(torch.allclose(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-5) for k in runs[0])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted tiny run, which the resumed ones must equal."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train.main(tiny(run))
    return run


def weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def assert_same_weights(a, b):
    assert a["iteration"] == b["iteration"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_in_pieces_equals_one_uninterrupted_run(tmp_path, whole):
    train.main(tiny(tmp_path / "pieces", "--until", "12"))
    mid = weights(tmp_path / "pieces")
    assert mid["iteration"] == 3
    train.main(["--resume", str(tmp_path / "pieces")])
    a, b = weights(whole), weights(tmp_path / "pieces")
    assert a["iteration"] == 6
    assert_same_weights(a, b)
    assert any(not torch.equal(a["model"][k], mid["model"][k]) for k in a["model"])
    rows = lambda run: [(r["images"], sorted(r)) for r in report.read_metrics(run)]
    assert rows(whole) == rows(tmp_path / "pieces")
    clock = [r["minutes"] for r in report.read_metrics(tmp_path / "pieces") if "minutes" in r]
    assert len(clock) >= 2 and clock == sorted(clock) and b["minutes"] >= mid["minutes"] > 0  # over both pieces


def test_resume_trims_rows_logged_after_the_checkpoint(tmp_path, whole):
    train.main(tiny(tmp_path / "r", "--until", "8"))
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # as if the process died after logging these
        f.write(json.dumps({"images": 12, "eval": {"acc": 0.5}}) + "\n")
        f.write(json.dumps({"images": 16, "loss": 1.0}) + "\n")
    train.main(["--resume", str(tmp_path / "r")])
    images = lambda run: [r["images"] for r in report.read_metrics(run)]
    assert images(tmp_path / "r") == images(whole)


BAD = [
    (["--task", "cifar"], "invalid choice"),
    (["--model", "transformer"], "--model must be one of"),
    (["--algo", "rbp", "--steps", "1"], "--steps >= 2"),
    (["--algo", "tbptt"], "needs --truncate"),
    (["--model", "ff", "--algo", "c-rbp"], "feedforward"),
    (["--mu", "1.5"], "--mu must be"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--neumann-steps", "-3"], "--neumann-steps must be >= 0"),
    (["--length", "0"], "pass >= 2"),
    (["--size", "8"], "--size must be >= 75"),
    (["--task", "mazes", "--grid", "10"], "must be odd"),
    (["--penalty-weight", "-10"], "--penalty-weight must be >= 0"),
    (["--kernel", "4"], "--kernel must be odd"),
    (["--device", "tpu"], "pass auto, cpu, cuda"),
    (["--resume", "nowhere"], "no config.json"),
    (["--resume", "a", "--report", "b"], "pass one of"),
    (["--steps", "20", "--eval-steps", "10"], "--eval-steps must be >= --steps"),
    (["--halt", "1e-3"], "--halt is for --eval"),
    (["--distractors", "-1"], "--distractors must be >= 0"),
    (["--bn-group", "3"], "--bn-group must divide the per-rank batch (32)"),
    (["--compile-mode", "reduce-overhead"], "pass --compile (or --fast) too"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_command_lines_fail_early_and_say_what_to_pass(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # nothing may be written: not even runs/
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_reproduction_presets_need_a_gpu(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--preset", "pf14-crbp"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
    p = options.get_parser()
    p.set_defaults(**options.PRESETS["pf14-bptt"])
    assert vars(p.parse_args([]))["algo"] == "bptt" and options.PRESETS["pf14-bptt"]["out"] == "results/pf14-bptt"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_fails_early(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--device", "cuda", "--out", str(tmp_path / "run")])
    assert "no CUDA GPU is visible" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_unwritable_out_fails_early(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        train.main(tiny(tmp_path / "file" / "run"))
    assert "is a file, not a directory" in capsys.readouterr().err


def test_resume_refuses_a_changed_config_another_out_and_a_corrupt_file(tmp_path, capsys):
    train.main(tiny(tmp_path / "r", "--until", "8"))
    capsys.readouterr()
    for argv, message in ((["--lr", "0.5"], "--lr 0.5 (run has 0.001)"),
                          (["--out", str(tmp_path / "b")], "copy the directory")):
        with pytest.raises(SystemExit):
            train.main(["--resume", str(tmp_path / "r"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    shutil.copytree(tmp_path / "r", tmp_path / "copy")  # a copied run resumes in its new place
    train.main(["--resume", str(tmp_path / "copy"), "--until", "12"])
    assert weights(tmp_path / "copy")["iteration"] == 3 and weights(tmp_path / "r")["iteration"] == 2
    with pytest.raises(SystemExit):
        train.main(tiny(tmp_path / "r"))
    assert "unfinished run: continue it with --resume" in capsys.readouterr().err
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot be read"):
        train.main(["--resume", str(tmp_path / "r")])
    (tmp_path / "r" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "r")])
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_and_says_how_to_start_afresh(tmp_path, capsys, monkeypatch):
    train.main(tiny(tmp_path / "r"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(tiny(tmp_path / "r"))
    err = capsys.readouterr().err
    assert "finished run" in err and "--report" in err and "rm -r" in err
    monkeypatch.chdir(tmp_path)  # a preset's run directory: `make clean`
    (tmp_path / "runs" / "pathfinder-cpu").mkdir(parents=True)
    (tmp_path / "runs" / "pathfinder-cpu" / "model.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        options.parse_args(["--preset", "pathfinder-cpu"])
    assert "make clean" in capsys.readouterr().err


def test_the_papers_runs_are_presets_into_results_that_need_a_gpu_unless_dry(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in options.RESULTS:
        with pytest.raises(SystemExit):
            options.parse_args(["--preset", name])
        assert "needs a CUDA GPU" in capsys.readouterr().err
        args = options.parse_args(["--preset", name, "--dry-run"])  # its dry run: a temporary directory
        assert args.images == options.DRY_RUN["images"] and args.eval_lengths  # and other test sets at the end
    mazes = options.parse_args(["--preset", "mazes-rresnet", "--dry-run"])
    assert (mazes.model, mazes.grid, mazes.eval_lengths) == ("rresnet", 11, [9, 13])
    assert options.PRESETS["mazes-locrnn"]["images"] == 2_500_000
    assert all(options.PRESETS[name]["out"] == f"results/{name}" for name in options.RESULTS)
    assert options.PRESETS["pfcls-locrnn"]["eval_lengths"] == [9, 18]


def test_dry_run_honours_typed_options_and_writes_to_a_temporary_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for _ in range(2):  # twice: a second dry run must not find the first one's run directory
        train.main(["--task", "mazes", "--model", "convgru", "--dry-run", "--device", "cpu", "--steps", "2",
                    "--images", "12", "--lr", "0.01"])
    runs = sorted((tmp_path / "tmp").iterdir())
    assert len(runs) == 2 and not (tmp_path / "runs").exists()
    cfg = json.load(open(runs[0] / "config.json"))
    assert (cfg["steps"], cfg["images"], cfg["lr"], cfg["batch_size"]) == (2, 12, 0.01, 4)
    assert weights(runs[0])["iteration"] == 3


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_is_exact(tmp_path, monkeypatch, capsys, whole):
    import os
    import signal
    task, calls = report.TASKS["mazes"], []

    def loss(*a):  # Ctrl-C during the third step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return task.loss(*a)
    monkeypatch.setitem(report.TASKS, "mazes", task._replace(loss=loss))
    train.main(tiny(tmp_path / "r"))
    printed = capsys.readouterr().out
    assert "Ctrl-C" in printed and f"python train.py --resume {tmp_path / 'r'}" in printed
    assert weights(tmp_path / "r")["iteration"] == 3
    monkeypatch.setitem(report.TASKS, "mazes", task)
    train.main(["--resume", str(tmp_path / "r")])
    assert_same_weights(weights(whole), weights(tmp_path / "r"))


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    train.main(tiny(tmp_path / "r", "--until", "8"))
    good = weights(tmp_path / "r")

    def full_disk(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device"):
        train.main(["--resume", str(tmp_path / "r")])
    monkeypatch.undo()
    assert not (tmp_path / "r" / "checkpoint.pt.tmp").exists()
    assert_same_weights(weights(tmp_path / "r"), good)


@pytest.mark.parametrize("algo", ["c-bptt", "tbptt"])
def test_other_algos_dry_run(tmp_path, algo):
    train.main(["--task", "mazes", "--model", "convgru", "--algo", algo, "--dry-run", "--device", "cpu",
                "--out", str(tmp_path / "run")] + (["--truncate", "2"] if algo == "tbptt" else []))
    assert "final" in json.load(open(tmp_path / "run" / "report.json"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train.main(tiny(tmp_path / "r", "--until", "8"))
    good = weights(tmp_path / "r")
    monkeypatch.setitem(report.TASKS, "mazes", report.TASKS["mazes"]._replace(
        loss=lambda logits, target, free: logits.sum() * float("nan")))
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main(["--resume", str(tmp_path / "r")])
    assert good["iteration"] == 2
    assert_same_weights(weights(tmp_path / "r"), good)


# ---- from a saved run: models.load, --report, --eval --------------------------------------------------

def test_load_report_and_eval_a_saved_run(tmp_path, capsys):
    run = tmp_path / "r"
    train.main(tiny(run))
    first = json.load(open(run / "report.json"))
    model = models.load(str(run))
    assert not model.training and model.steps == 2 and model.algo == "c-bptt"  # what it trained with
    images, _, _ = report.data.task_batch("mazes", 0, 2, split="test")
    out = model(images, steps=5, per_step=True)
    assert len(out.per_step) == 5 and out.per_step[-1].shape == (2, 2, 32, 32)
    assert torch.equal(models.load(str(run / "checkpoint.pt")).state_dict()["cell.w_h.weight"],
                       model.state_dict()["cell.w_h.weight"])
    for f in ("report.json", "per_step.svg", "learning_curve.svg", "state_space.svg", "timecourse.png"):
        (run / f).unlink()
    capsys.readouterr()
    train.main(["--report", str(run)])
    printed = capsys.readouterr().out
    assert json.load(open(run / "report.json")) == first and "held-out (4 images) at T=2" in printed
    assert all((run / f).exists() for f in ("per_step.svg", "learning_curve.svg", "state_space.svg", "timecourse.png"))
    curve = train.main(["--eval", str(run), "--grid", "9", "--steps", "5"])
    assert len(curve) == 5 and "on grid 9" in capsys.readouterr().out
    assert len(json.load(open(run / "eval_grid9_T5.json"))["per_step"]) == 5
    dyn = json.load(open(run / "eval_grid9_T5.json"))["dynamics"]  # the probe at h_(T-1) and h_(steps-1)
    assert len(dyn["residual"]) == 5 and sorted(dyn["probe"]) == ["1", "4"]
    assert len(first["dynamics"]["residual"]) == 3 and sorted(first["dynamics"]["probe"]) == ["1", "2"]
    train.main(["--eval", str(run), "--grid", "9", "--steps", "5", "--halt", "1e-3"])
    assert "each image halted at residual <= 0.001" in capsys.readouterr().out
    halted = json.load(open(run / "eval_grid9_T5_halt0.001.json"))["halt"]
    assert 1 <= halted["steps_mean"] <= halted["steps_max"] <= 5
    train.main(["--eval", str(run), "--grid", "9", "--steps", "5", "--halt", "1e9"])  # every image halts at once
    halting, best = compare.halting_table(str(run)).splitlines(), max(range(5), key=lambda t: curve[t]["acc"])
    assert halting[0].startswith("r (convgru c-bptt, T=2): acc with each image halted at its own fixed point")
    assert halting[2:] == ["| grid | halt 1e+09 | halt 0.001 | fixed T = 2 | best fixed t |", "|---" * 5 + "|",
                           f"| 9 | {curve[0]['acc']:.3f} (1.0) | {halted['acc']:.3f} ({halted['steps_mean']:.1f}) | "
                           f"{curve[1]['acc']:.3f} | {curve[best]['acc']:.3f} at t = {best + 1} |"]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(ValueError, match="no eval_.*halt.*json: python train.py --eval"):
        compare.halting_table(str(tmp_path / "none"))
    cfg = report.load_config(str(run))
    at_once = report.evaluate(model, cfg, "cpu", 5, 4, halt=1e9, grid=9)  # every image halts after step 1
    assert at_once["steps_max"] == 1 and at_once["acc"] == curve[0]["acc"]
    with torch.no_grad():  # halting at once is one step
        assert torch.equal(model(images, steps=5, halt=1e9).logits, model(images, steps=1).logits)
    table = compare.runs_table([str(run)]).splitlines()
    acc = first["final"]["acc"]
    assert len(table) == 3 and table[2].startswith(f"| r (convgru c-bptt, T=2) | 24 of 24 | – | acc {acc:.3f} |")
    assert "| 8 (0 min): " in table[2] and "(0." not in table[2]  # its held-out checks; no paper numbers here
    with pytest.raises(SystemExit):
        train.main(["--eval", str(run), "--lr", "0.5"])
    with pytest.raises(ValueError, match="neither model.pt nor checkpoint.pt"):
        models.load(str(tmp_path))


def test_dynamics_measures_the_steps_that_the_model_takes(tmp_path):
    run = tmp_path / "r"
    train.main(tiny(run))
    model, cfg = models.load(str(run)), report.load_config(str(run))
    dyn = report.dynamics(model, cfg, "cpu", steps=6)
    # The same images through the model's own forward (crbp.run): h_0 and the states after each step.
    images, _, _ = report.data.task_batch("mazes", 0, dyn["images"], split="test", **report.data_options(cfg))
    with torch.no_grad():
        states = [model.drive(images)[1]] + model(images, steps=6, per_step="state").per_step
    flat = [torch.cat([z.flatten(1) for z in (h if isinstance(h, tuple) else (h,))], 1) for h in states]
    want = [((b - a).norm(dim=1) / b.norm(dim=1)).median().item() for a, b in zip(flat, flat[1:])]
    assert dyn["residual"] == pytest.approx(want, rel=1e-5) and dyn["residual"][0] > 0
    for probe in dyn["probe"].values():  # the Jacobian's spectral radius and column sums, finite
        assert probe["rho"] > 0 and math.isfinite(probe["colsum_mean"]) and 0 <= probe["above_mu"] <= 1
    short = report.dynamics(model, cfg, "cpu", steps=1)  # an evaluation that stops before the trained T = 2
    assert list(short["probe"]) == ["0"] and "at t=1:" in report.dynamics_text(short, cfg)


def test_runs_table_sets_the_papers_numbers_beside_ours_and_ks_tests_the_drifts(tmp_path):
    cfg = dict(task="pathfinder", model="hgru", length=14, size=150, steps=6, images=400_000)
    for algo, drift in (("bptt", [5.0, 6.0, 7.0, 8.0] * 4), ("c-rbp", [0.1, 0.2, 0.3, 0.4] * 4)):
        run = tmp_path / algo
        run.mkdir()
        (run / "config.json").write_text(json.dumps({**cfg, "algo": algo}))
        rows = [{"images": n, "loss": 0.1} for n in (100_000, 400_000)]
        rows += [{"images": n, "minutes": n / 1e4, "eval": {"bal_acc": n / 1e6, "f1": n / 2e6}}
                 for n in range(100_000, 400_001, 100_000)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        curve = [t / 40 for t in range(1, 41)]
        per_step = {"14": curve, "20": curve[:10] + [0.0] * 30}
        (run / "report.json").write_text(json.dumps({"final": {"f1": 0.5}, "per_step": per_step, "drift_median": 6.5}))
        (run / "state_space.json").write_text(json.dumps({"distance": drift}))
    lines = compare.runs_table([str(tmp_path / "bptt"), str(tmp_path / "c-rbp")]).splitlines()
    bptt = lines[2]
    assert bptt.startswith("| bptt (hgru bptt, T=6) | 400,000 of 400,000 | – | f1 0.500 (0.993) | 6: 0.150 (0.991), ")
    assert "40: 1.000 (0.229) | length 20: 0.250 (0.946) at t=10 | 6.5 |" in bptt
    assert bptt.endswith("| 100k (10 min): 0.100 / 0.050, 200k (20 min): 0.200 / 0.100, 400k (40 min): 0.400 / 0.200 |")
    assert "f1 0.500 (0.980)" in lines[3]
    ks = lines[-1]  # disjoint samples of 16: D = 1, and p far below 0.05
    assert ks.startswith("State-space drift, two-sample KS test, bptt (bptt) vs c-rbp (c-rbp): D = 1.000, p = ")
    assert float(ks.split("p = ")[1].split(" ")[0]) < 1e-4
    compare.runs_figure([str(tmp_path / "bptt"), str(tmp_path / "c-rbp")], tmp_path / "f.svg")
    svg = ET.parse(tmp_path / "f.svg").getroot()
    shapes = lambda tag: [e for e in svg.iter() if e.tag.endswith(tag)]
    assert len(shapes("polyline")) == 2 and len(shapes("circle")) == 6  # two curves, the paper's t = 6, 20, 40
    assert {e.get("fill") for e in shapes("circle")} == {e.get("stroke") for e in shapes("polyline")}  # per run
    ff = tmp_path / "resnet"  # a feedforward run: one score per test set, drawn dotted across the steps
    ff.mkdir()
    (ff / "config.json").write_text(json.dumps({**cfg, "model": "resnet", "algo": "bptt", "steps": 1}))
    (ff / "report.json").write_text(json.dumps({"final": {"f1": 0.6}, "per_step": {"14": [0.6], "20": [0.4]}}))
    (ff / "state_space.json").write_text(json.dumps({"distance": []}))  # as report.full writes it: no state
    rows = compare.runs_table([str(tmp_path / "c-rbp"), str(ff)]).splitlines()  # no KS test with an empty sample
    assert rows[3].startswith("| resnet (resnet bptt, T=1) | 0 of 400,000 | – | f1 0.600 | 1: 0.600 |")
    assert not any(line.startswith("State-space drift") for line in rows)
    compare.extrapolation_figure(str(tmp_path / "c-rbp"), tmp_path / "e.svg", [str(ff)])
    svg = ET.parse(tmp_path / "e.svg").getroot()
    assert len(shapes("polyline")) == 4 and len(shapes("circle")) == 1  # PF-14, PF-20, two dotted; T circled
    assert sum(e.get("stroke-dasharray") is not None for e in shapes("polyline")) == 2


def test_held_out_checks_print_on_their_own_lines(tmp_path, capsys, monkeypatch):
    train.main(tiny(tmp_path / "r"))  # piped (capsys): every check is printed, once
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("held-out check at") for line in lines) == 3
    monkeypatch.setattr(train.sys.stdout, "isatty", lambda: True, raising=False)
    p = train.Progress(10)
    p.update(5, 1.0, "loss 1")
    p.note("held-out check")
    p.update(10, 1.0, "loss 0.5")
    p.close()
    out = capsys.readouterr().out
    assert "\nheld-out check\n" in out and out.endswith("\n")


def test_neumann_summary_counts_stop_reasons_and_residuals():
    rows = [{"images": 10 * i, "loss": 1.0, "residual": r, "neumann_stop": s}
            for i, (r, s) in enumerate([(0.1, "tolerance"), (0.3, "tolerance"), (0.2, "max_terms")])]
    line = report.neumann_summary(rows + [{"images": 0, "eval": {}}])
    assert "3 logged training steps" in line and "max_terms 1x, tolerance 2x" in line
    assert "median 0.2, max 0.3" in line
    assert report.neumann_summary([{"images": 1, "loss": 1.0}]) is None
    assert "not contractive" not in line
    assert "not contractive" in report.neumann_summary([{"images": 1, "loss": 1.0, "neumann_stop": "diverging"}])


def test_ks_compare_of_two_runs(tmp_path, capsys):
    for name, d in (("a", [0.1, 0.2, 0.3, 0.4] * 5), ("b", [1.1, 1.2, 1.3, 1.4] * 5)):
        (tmp_path / name).mkdir()
        json.dump({"N": 6, "T": 40, "distance": d}, open(tmp_path / name / "state_space.json", "w"))
    D, p = train.main(["--ks", str(tmp_path / "a"), str(tmp_path / "b")])
    assert D == 1.0 and p < 1e-3 and "KS D = 1.000" in capsys.readouterr().out


def test_imports_go_one_way():
    """Each module imports only modules below it: figures, crbp, pathfinder, data, fastpath, cells, models, report,
    compare, options, then train, bench, panoptic (a library) and train_panoptic. No circles; report.py never needs
    train.py."""
    import ast
    import pathlib
    order = ["figures", "crbp", "pathfinder", "data", "fastpath", "cells", "models", "report", "compare", "options",
             "train", "bench", "panoptic", "train_panoptic"]
    for path in pathlib.Path(__file__).parent.glob("*.py"):
        if path.stem not in order:
            continue
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        upward = [m for m in names & set(order) if order.index(m) >= order.index(path.stem)]
        assert not upward, f"{path.name} imports {upward}"
