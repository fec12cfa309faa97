"""The main job's comparison over seeds: mean ± sd per method as markdown, CSV and a chart.

One run on ~100 test images swings by 0.05-0.08 between seeds (and between CPUs),
so a single table cannot tell signal from noise. Each method is trained once per
seed; :func:`per_seed_frame` reads every seed's row with
:func:`raug.report.compare.comparison_frame` (test metrics and footprint), and
:func:`summarize_methods` reduces them with :func:`raug.report.aggregate.summarize`
(mean, sample sd with ddof=1, n), the same statistic as ``python -m raug.report.runs
--group-by``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from raug.files.atomic import atomic_write_bytes, atomic_write_text
from raug.report import aggregate
from raug.report.compare import METRIC_COLUMNS, comparison_frame

# read by the summary's notes: how "best" was chosen, and whether all runs share one split
RUN_COLUMNS = ("_best_metric", aggregate.SPLIT_HASH_COLUMN)


def per_seed_frame(runs: pd.DataFrame, folders_by_seed: Mapping[int, Mapping[str, Path]],
                   latency_px: int = 224) -> pd.DataFrame:
    """One row per (seed, method): test metrics, footprint, ``seed``, ``_save_folder``, :data:`RUN_COLUMNS`.

    Args:
        runs: :func:`raug.report.runs.load_runs` of the folders below.
        folders_by_seed: ``{seed: {method label: _save_folder}}``, methods in display order.
        latency_px: input size of the latency measurement.

    Raises:
        ValueError: a folder holds no COMPLETED run (names the method and folder).
    """
    done = aggregate.completed_runs(runs)
    by_folder = done.set_index(done["_save_folder"].map(Path))
    frames = []
    for seed, steps in folders_by_seed.items():
        frame = comparison_frame(runs, steps, latency_px)
        frame.insert(1, "seed", seed)
        frame["_save_folder"] = [Path(steps[method]) for method in frame["method"]]
        for column in RUN_COLUMNS:
            frame[column] = frame["_save_folder"].map(by_folder[column]) if column in by_folder else None
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summarize_methods(per_seed: pd.DataFrame) -> aggregate.Summary:
    """Mean ± sd over seeds of every numeric column, one row per method in first-seen order."""
    values = [c for c in per_seed.columns if c != "seed" and pd.api.types.is_numeric_dtype(per_seed[c])]
    summary = aggregate.summarize(per_seed, ["method"], values)
    order = list(dict.fromkeys(per_seed["method"]))
    summary.table = summary.table.set_index("method").loc[order].reset_index()
    return summary


def plot_summary(summary: aggregate.Summary) -> bytes:
    """PNG bytes: grouped bars of the test metrics' means per method, error bars ± 1 sd."""
    metrics = [m for m in summary.metrics if m in METRIC_COLUMNS.values()]
    table = summary.table
    x = np.arange(len(table))
    width = 0.8 / len(metrics)
    fig = Figure(figsize=(1.8 * len(table) + 3, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, metric in enumerate(metrics):
        sd = table[f"{metric}.sd"]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, table[f"{metric}.mean"], width,
                      yerr=sd.to_numpy() if sd.notna().all() else None,  # n = 1: no error bars
                      capsize=3, label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(x, [f"{m}\n(n = {n})" for m, n in zip(table["method"], table["n"])])
    ax.set_ylim(0, 1.1)
    ax.axhline(1 / 8, color="grey", lw=0.8, ls="--", label="chance (8 classes)")
    ax.set_ylabel("score on the test split")
    ax.set_title("Teacher vs distilled students: mean ± sd over seeds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write_seed_comparison(per_seed: pd.DataFrame, summary: aggregate.Summary,
                          out_dir: str | Path) -> dict[str, Path]:
    """``comparison.{md,csv,png}`` (mean ± sd) and ``comparison_seeds.csv`` (every run), atomic."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv",
             "png": out_dir / "comparison.png", "seeds": out_dir / "comparison_seeds.csv"}
    atomic_write_text(paths["markdown"], aggregate.format_summary(summary, "markdown", digits=3))
    atomic_write_text(paths["csv"], aggregate.to_csv(summary))
    atomic_write_bytes(paths["png"], plot_summary(summary))
    atomic_write_text(paths["seeds"], per_seed.to_csv(index=False))
    return paths
