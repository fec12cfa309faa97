"""The main job's comparison table: test metrics from the Sacred runs + portability figures.

:func:`model_footprint` measures what a portable device cares about for a
checkpoint (parameters, fp32 size, CPU latency per image at batch 1);
:func:`comparison_frame` joins it with the runs' test metrics (read back from
the Sacred logs by :func:`raug.report.runs.load_runs`); :mod:`raug.report.seeds`
reduces the rows of several seeds to mean ± sd and writes the tables and the chart.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

import models
from raug.files.checkpoint import load_checkpoint

METRIC_COLUMNS = {
    "test.accuracy": "test accuracy",
    "test.balanced_accuracy": "test balanced accuracy",
    "test.auc": "test macro AUC",
}


def model_footprint(checkpoint: str | Path, latency_px: int = 224, repeats: int = 20) -> dict:
    """Parameters, fp32 size (MB) and median CPU batch-1 latency (ms) of a checkpoint's network.

    Latency is measured on one thread-pool setting (torch's default), eval mode,
    under ``inference_mode``, at ``latency_px`` (the deployment size, whatever
    size the run trained at), after warm-up.
    """
    ckpt = load_checkpoint(checkpoint)
    fusion = models.checkpoint_fusion(ckpt, ckpt["model_name"])
    model = models.create_model(ckpt["model_name"], ckpt["num_classes"], fusion=fusion)
    models.load_weights(model, ckpt)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    x = torch.randn(1, 3, latency_px, latency_px).contiguous(memory_format=torch.channels_last)
    extra = (torch.zeros(1, fusion.meta_features),) if fusion.uses_metadata else ()
    model = model.to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x, *extra)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, *extra)
            times.append(time.perf_counter() - start)
    return {
        "model": ckpt["model_name"],
        "parameters (M)": params / 1e6,
        "size fp32 (MB)": size_mb,
        f"CPU latency @{latency_px}px (ms)": 1000 * statistics.median(times),
    }


def comparison_frame(runs: pd.DataFrame, steps: Mapping[str, str | Path], latency_px: int = 224) -> pd.DataFrame:
    """One row per step: its COMPLETED run's test metrics and its best checkpoint's footprint.

    Args:
        runs: :func:`raug.report.runs.load_runs` of the folders below.
        steps: ``{label: _save_folder}`` in display order.
        latency_px: input size of the latency measurement.
    """
    rows = []
    for label, folder in steps.items():
        folder = Path(folder)
        same_folder = runs["_save_folder"].map(Path) == folder
        done = runs[(runs["status"] == "COMPLETED") & same_folder]
        if done.empty:
            raise ValueError(f"no COMPLETED run for {label!r} in {folder}")
        run = done.iloc[-1]
        row = {"method": label}
        row.update({name: float(run[key]) for key, name in METRIC_COLUMNS.items()})
        row.update(model_footprint(folder / "best-checkpoint" / "best-checkpoint.pth", latency_px))
        rows.append(row)
    return pd.DataFrame(rows)
