"""`isic.py with quick` end to end on the prepared synthetic data: every output file."""

import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import models
from raug.data.loaders import CLASS_NAMES, TEST_CSV, TRAIN_CSV
from raug.data.transforms import IMAGENET_MEAN
from raug.files.checkpoint import is_project_checkpoint, load_checkpoint
from raug.methods.teacher import inspect_teacher
from raug.report.plots import plot_confusion, plot_history, plot_roc
from raug.report.runs import load_runs
from raug.train.metrics import balanced_accuracy, confusion_matrix, normalize_confusion

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiment" / "isic" / "isic.py"
PNG = b"\x89PNG\r\n\x1a\n"
ARGS = ["_img_size=32", "_epochs=2", "_batch_size=32", "_device=cpu"]


def run_isic(cwd, base, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "with", "quick", f"_base_path={base}",
           f"_save_folder={out}", *ARGS, *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def teacher_run(prepared_isic, tmp_path_factory):
    """One quick teacher run, started from an unrelated working directory."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    out = tmp_path_factory.mktemp("runs") / "teacher"
    proc = run_isic(elsewhere, prepared_isic, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"base": Path(prepared_isic), "out": out, "proc": proc, "cwd": elsewhere}


def test_sacred_run_completed_with_per_epoch_metrics(teacher_run):
    run_dir = teacher_run["out"] / "1"
    assert {"config.json", "run.json", "metrics.json", "cout.txt"} <= {p.name for p in run_dir.iterdir()}
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["experiment"]["name"] == "isic"
    assert run["experiment"]["mainfile"] == "experiment/isic/isic.py"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["_model_name"] == "resnet-50"
    assert config["_img_size"] == 32
    assert config["_pretrained"] is False
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("train.loss", "train.accuracy", "train.balanced_accuracy", "val.loss",
                 "val.accuracy", "val.balanced_accuracy", "val.auc", "lr"):
        assert metrics[name]["steps"] == [1, 2], name
        assert all(np.isfinite(metrics[name]["values"]))
    for name in ("test.accuracy", "test.balanced_accuracy", "test.auc", "test.top2_accuracy"):
        assert metrics[name]["values"] == [pytest.approx(run["result"][name])]
    cout = (run_dir / "cout.txt").read_text()
    assert "epoch 1/2 | train loss" in cout
    assert "epoch 2/2 | train loss" in cout
    assert "%|" not in cout  # progress bars stay on the terminal
    artifacts = set(run["artifacts"])
    assert {"best-checkpoint.pth", "test_predictions.csv", "val_predictions.csv",
            "final_metrics.json", "history.png", "test_roc_curves.png"} <= artifacts


def test_checkpoints_are_self_describing_and_load_with_weights_only(teacher_run):
    out = teacher_run["out"]
    best_path = out / "best-checkpoint" / "best-checkpoint.pth"
    last_path = out / "last-checkpoint" / "last-checkpoint.pth"
    for path in (best_path, last_path):
        assert isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
    best, last = load_checkpoint(best_path), load_checkpoint(last_path)
    for ck in (best, last):
        assert is_project_checkpoint(ck)
        assert ck["model_name"] == "resnet-50"
        assert ck["num_classes"] == 8
        assert ck["class_names"] == list(CLASS_NAMES)
        assert ck["img_size"] == 32
        assert ck["normalization"]["mean"] == pytest.approx(IMAGENET_MEAN)
        assert ck["config"]["_save_folder"] == str(out)
        # how the training images were prepared, so prediction can shrink new images alike
        prep = json.loads((teacher_run["base"] / "prep_info.json").read_text())
        assert ck["data_preparation"] == {"size": prep["size"], "split_hash": prep["split_hash"]}
        assert ck["data_preparation"]["size"] == 80
    assert last["epoch"] == 2
    assert len(last["history"]) == 2
    assert {"optimizer_state_dict", "scheduler_state_dict", "rng", "early_stop"} <= set(last)
    metrics = json.loads((out / "metrics.json").read_text())
    assert best["epoch"] == metrics["best_epoch"]
    model = models.create_model("resnet-50", 8)
    model.load_state_dict(best["model_state_dict"])


def test_a_quick_run_says_so_in_its_checkpoints_and_config(teacher_run):
    # the KD scripts refuse a quick teacher as their default (issue #18)
    out = teacher_run["out"]
    for rel in ("best-checkpoint/best-checkpoint.pth", "last-checkpoint/last-checkpoint.pth"):
        assert load_checkpoint(out / rel)["config"]["_quick"] is True
    assert json.loads((out / "1" / "config.json").read_text())["_quick"] is True
    assert inspect_teacher(out / "best-checkpoint" / "best-checkpoint.pth").quick is True


def test_predictions_csv_matches_reported_metrics(teacher_run):
    out, base = teacher_run["out"], teacher_run["base"]
    metrics = json.loads((out / "metrics.json").read_text())
    result = json.loads((out / "1" / "run.json").read_text())["result"]
    full = pd.read_csv(base / TRAIN_CSV)
    expected_ids = {"test": list(pd.read_csv(base / TEST_CSV)["image"].astype(str)),
                    "val": list(full.loc[full["folder"] == 2, "image"].astype(str))}
    for split in ("val", "test"):
        frame = pd.read_csv(out / f"{split}_pred" / "predictions.csv", dtype={"image": str})
        assert list(frame.columns) == ["image", "REAL", "PRED", *CLASS_NAMES]
        assert list(frame["image"]) == expected_ids[split]
        probs = frame[list(CLASS_NAMES)].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert list(frame["PRED"]) == [CLASS_NAMES[k] for k in probs.argmax(axis=1)]
        real = frame["REAL"].map(CLASS_NAMES.index).to_numpy()
        pred = frame["PRED"].map(CLASS_NAMES.index).to_numpy()
        bacc = balanced_accuracy(real, pred, len(CLASS_NAMES))
        assert bacc == pytest.approx(metrics[f"{split}.balanced_accuracy"], abs=1e-12)
        assert bacc == pytest.approx(result[f"{split}.balanced_accuracy"], abs=1e-12)
        assert metrics[f"{split}.n"] == len(frame)


def _png_pixels(path: Path) -> np.ndarray:
    """The decoded RGB pixels of a PNG file (fails on anything that is not a whole PNG)."""
    assert path.read_bytes()[:8] == PNG, path
    with Image.open(path) as image:
        assert image.format == "PNG", path
        return np.asarray(image.convert("RGB"))


def _rendered(fig) -> np.ndarray:
    """``fig`` drawn the way RunOutputs.save_figure draws it (PNG, dpi 100), decoded."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    with Image.open(buf) as image:
        return np.asarray(image.convert("RGB"))


def _assert_same_picture(path: Path, expected: np.ndarray):
    got = _png_pixels(path)
    assert got.shape == expected.shape, path
    # Same data, same code, same matplotlib: at most stray anti-aliasing pixels may differ.
    differing = np.abs(got.astype(int) - expected.astype(int)).max(axis=2) > 8
    assert differing.mean() < 0.0005, f"{path}: {differing.mean():.2%} of the pixels differ"


def test_plots_and_marker(teacher_run):
    out = teacher_run["out"]
    pngs = [out / "history.png"] + [
        out / f"{split}_pred" / name
        for split in ("val", "test")
        for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "roc_curves.png")
    ]
    for png in pngs:
        pixels = _png_pixels(png)
        height, width, _ = pixels.shape
        assert width >= 400, (png, pixels.shape)
        assert height >= 300, (png, pixels.shape)
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 20, (png, len(colours))  # drawn, not one flat colour
        # mostly white background with something drawn on it
        assert 0.02 < (pixels.min(axis=2) < 250).mean() < 0.9, png
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    marker = json.loads((out / "COMPLETED").read_text())
    assert marker["run_id"] == "1"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("best_epoch", "test.accuracy", "test.balanced_accuracy", "test.auc",
                "test.top2_accuracy", "val.balanced_accuracy", "test.recall.MEL"):
        assert key in metrics
    # nothing left half-written
    assert not list(out.rglob("*.tmp"))

    # The marker belongs to this run: its best epoch, written between its start and its end.
    assert marker["best_epoch"] == metrics["best_epoch"]
    assert marker["best_epoch"] in list(history["epoch"])
    run = json.loads((out / "1" / "run.json").read_text())
    completed = datetime.fromisoformat(marker["completed"])
    assert completed.utcoffset() == timedelta(0)
    started = datetime.fromisoformat(run["start_time"]).replace(tzinfo=UTC)
    stopped = datetime.fromisoformat(run["stop_time"]).replace(tzinfo=UTC)
    assert started - timedelta(seconds=1) <= completed <= stopped

    # The figures show this run's numbers: drawn again here from the run's own tables
    # (history.csv, predictions.csv), they give the same picture.
    _assert_same_picture(out / "history.png", _rendered(plot_history(history.to_dict("records"))))
    for split in ("val", "test"):
        frame = pd.read_csv(out / f"{split}_pred" / "predictions.csv", dtype={"image": str})
        labels = frame["REAL"].map(CLASS_NAMES.index).to_numpy()
        probs = frame[list(CLASS_NAMES)].to_numpy()
        cm = confusion_matrix(labels, probs.argmax(axis=1), len(CLASS_NAMES))
        folder = out / f"{split}_pred"
        _assert_same_picture(folder / "confusion_matrix.png", _rendered(
            plot_confusion(cm, CLASS_NAMES, f"{split}: confusion matrix", False)))
        _assert_same_picture(folder / "confusion_matrix_normalized.png", _rendered(
            plot_confusion(normalize_confusion(cm), CLASS_NAMES, f"{split}: recall per class", True)))
        _assert_same_picture(folder / "roc_curves.png", _rendered(
            plot_roc(labels, probs, CLASS_NAMES, f"{split}: one-vs-rest ROC")))
    # and a different history (one more epoch) would not pass for it
    longer = [*history.to_dict("records"), {**history.iloc[-1].to_dict(), "epoch": 3}]
    assert _rendered(plot_history(longer)).shape == _png_pixels(out / "history.png").shape
    with pytest.raises(AssertionError, match="pixels differ"):
        _assert_same_picture(out / "history.png", _rendered(plot_history(longer)))

    # The copies attached to the Sacred run are these files.
    for name, path in (("history.png", out / "history.png"),
                       ("test_roc_curves.png", out / "test_pred" / "roc_curves.png"),
                       ("val_confusion_matrix.png", out / "val_pred" / "confusion_matrix.png")):
        assert (out / "1" / name).read_bytes() == path.read_bytes(), name


def test_rerun_refuses_and_changes_nothing(teacher_run):
    out = teacher_run["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = run_isic(teacher_run["cwd"], teacher_run["base"], out)
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr
    assert "_resume=True" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_runs_table_lists_the_run(teacher_run):
    frame = load_runs(teacher_run["out"].parent)
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["script"] == "isic"
    assert row["status"] == "COMPLETED"
    assert row["_folder"] == 2
    assert row["_img_size"] == 32
    metrics = json.loads((teacher_run["out"] / "metrics.json").read_text())
    assert row["test.balanced_accuracy"] == metrics["test.balanced_accuracy"]
    assert row["test.recall.MEL"] == metrics["test.recall.MEL"]
    assert row["best_val"] == metrics["best.val_loss"]


# ----------------------------------------------------------------------------- issue #20: refused before any run folder


def assert_refused_in_one_line(proc, out, line):
    """The command failed, printed ``line`` as one line of stderr, no traceback, no run folder."""
    assert proc.returncode != 0
    assert line in proc.stderr.splitlines(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(("extra", "line"), [
    ("_lr=-1", "_lr=-1 is not a config key of this script; did you mean _lr_init?"),
    ("_lerning_rate=0.5", "_lerning_rate=0.5 is not a config key of this script; did you mean _lr_init?"),
    ("seed=1099511627776", "seed=1099511627776 is invalid: expected an integer in [0, 4294967295]"),
])
def test_unknown_key_or_seed_out_of_range_stops_before_any_run_folder(prepared_isic, tmp_path, extra, line):
    out = tmp_path / "never"
    proc = run_isic(tmp_path, prepared_isic, out, extra)
    assert_refused_in_one_line(proc, out, f"  {line}")


def test_class_without_training_images_stops_before_any_run_folder(prepared_isic, tmp_path):
    base = tmp_path / "data"
    for part in ("train", "test"):
        (base / part).mkdir(parents=True)
        (base / part / "imgs").symlink_to(Path(prepared_isic) / part / "imgs")
    (base / TEST_CSV).write_bytes((Path(prepared_isic) / TEST_CSV).read_bytes())
    full = pd.read_csv(Path(prepared_isic) / TRAIN_CSV, dtype={"image": str})
    full.loc[(full["diagnostic"] != "DF") | (full["folder"] == 2)].to_csv(base / TRAIN_CSV, index=False)
    out = tmp_path / "never"
    proc = run_isic(tmp_path, base, out)
    problem = next(line for line in proc.stderr.splitlines() if "no image of class" in line)
    assert problem.startswith("  _folder=2: the training folds [1, 3, 4, 5] of ")
    assert "hold no image of class(es) ['DF'], so their frequency class weights are undefined" in problem
    assert_refused_in_one_line(proc, out, problem)
