"""Paper-style tables from a runs table: mean ± sd per group, formats, box/strip plots.

Input is the frame of :func:`raug.report.runs.load_runs` (one row per Sacred run).
:func:`summarize` keeps the COMPLETED runs, groups them by config keys and
computes, per metric, the mean and the *sample* standard deviation
(``ddof=1``) with the group's ``n``. A group of one run has no sample sd: it
is ``NaN`` in the data, shown as ``–`` in text formats and left empty in CSV.

Which checkpoint: the engine evaluates the BEST checkpoint (selected on the
validation fold by ``_best_metric``) and names those values ``val.*`` /
``test.*``; values of the last checkpoint, where a run has them, are named
``last.val.*`` / ``last.test.*``. ``checkpoint="last"`` reads those.

Every table states the checkpoint and carries notes: runs left out (not
COMPLETED, by status) and a WARNING when the runs in it come from different
prepared splits (``split_hash``) or do not record one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from raug.files.atomic import atomic_write_bytes

DEFAULT_METRICS = ("test.balanced_accuracy", "test.accuracy", "test.auc")
CHECKPOINTS = ("best", "last")
LAST_PREFIX = "last."
SPLIT_HASH_COLUMN = "split_hash"
DASH = "–"
FORMATS = ("table", "markdown", "csv", "latex")
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


class AggregateError(ValueError):
    """A group key or metric is not a column of the runs table."""


@dataclass
class Summary:
    """A grouped table and what a reader must know about it.

    Attributes:
        table: one row per group: the group keys, ``n``, then ``<metric>.mean`` and
            ``<metric>.sd`` for every metric (sd ``NaN`` when ``n == 1``).
        group_by: the grouping config keys.
        metrics: the metrics as asked (``test.balanced_accuracy``, ...).
        checkpoint: ``"best"`` or ``"last"``.
        best_metrics: ``_best_metric`` value -> number of runs (how "best" was chosen).
        excluded: status -> number of runs left out (not COMPLETED).
        superseded: how many of the excluded runs share their save folder with a
            COMPLETED run (an interrupted run that was later resumed or retried).
        duplicates: COMPLETED runs left out because a later COMPLETED run of the same
            save folder exists (a finished run evaluated again with ``_resume=True``).
        split_warning: why the runs may not be comparable (``None`` when they share one split).
    """

    table: pd.DataFrame
    group_by: list[str]
    metrics: list[str]
    checkpoint: str
    best_metrics: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    superseded: int = 0
    duplicates: int = 0
    split_warning: str | None = None

    def checkpoint_note(self) -> str:
        """Which checkpoint the numbers come from, in words."""
        if self.checkpoint == "last":
            return "checkpoint: last (the final epoch)"
        chosen = ", ".join(f"{k} ({v} runs)" if len(self.best_metrics) > 1 else k
                           for k, v in self.best_metrics.items())
        return f"checkpoint: best on the validation fold by _best_metric = {chosen or 'unknown'}"

    def notes(self) -> list[str]:
        """The lines printed under the table (checkpoint, statistic, exclusions, split warning)."""
        lines = [
            self.checkpoint_note(),
            f"cells: mean ± sample sd (ddof=1) over the n COMPLETED runs of the group; "
            f"sd {DASH} when n = 1",
        ]
        if self.excluded:
            total = sum(self.excluded.values())
            detail = ", ".join(f"{n} {status}" for status, n in sorted(self.excluded.items()))
            line = f"excluded: {total} run(s) not COMPLETED ({detail})"
            if self.superseded:
                line += f"; {self.superseded} of them in a folder whose run later COMPLETED"
            lines.append(line)
        if self.duplicates:
            lines.append(f"not counted twice: {self.duplicates} earlier COMPLETED run(s) of a save "
                         "folder that was evaluated again (its latest run counts)")
        if self.split_warning:
            lines.append(f"WARNING: {self.split_warning}")
        return lines


def metric_column(metric: str, checkpoint: str = "best") -> str:
    """Column holding ``metric`` for ``checkpoint`` (``test.auc`` -> ``last.test.auc`` for last)."""
    if checkpoint not in CHECKPOINTS:
        raise AggregateError(f"checkpoint={checkpoint!r} is invalid: allowed {list(CHECKPOINTS)}")
    bare = metric.removeprefix(LAST_PREFIX)
    return f"{LAST_PREFIX}{bare}" if checkpoint == "last" else bare


def split_hash_warning(frame: pd.DataFrame) -> str | None:
    """Why the runs of ``frame`` may come from different prepared splits, or ``None``.

    Args:
        frame: runs (the ``split_hash`` column, absent or ``NaN`` for runs that
            did not record one).
    """
    if frame.empty:
        return None
    hashes = frame[SPLIT_HASH_COLUMN] if SPLIT_HASH_COLUMN in frame else pd.Series(np.nan, frame.index)
    missing = int(hashes.isna().sum())
    counts = hashes.dropna().astype(str).value_counts(sort=False).sort_index()
    if len(counts) <= 1 and missing == 0:
        return None
    parts = [f"split_hash {h[:12]}… ({n} runs)" for h, n in counts.items()]
    if missing:
        parts.append(f"no split_hash recorded ({missing} runs)")
    if len(counts) > 1:
        return "the runs come from DIFFERENT data splits: " + ", ".join(parts)
    return "cannot confirm that the runs share one data split: " + ", ".join(parts)


def save_folders(frame: pd.DataFrame) -> pd.Series:
    """Each run's ``_save_folder`` (one training outcome per folder), else its run folder's parent."""
    parents = frame["path"].map(lambda p: str(Path(str(p)).parent)) if "path" in frame else None
    if "_save_folder" in frame:
        folders = frame["_save_folder"].astype(object)
        return folders.where(folders.notna(), parents) if parents is not None else folders
    return parents if parents is not None else pd.Series(frame.index.astype(str), frame.index)


def completed_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETED runs, one per save folder (the latest by start time).

    A finished run resumed again re-runs its evaluation as a new COMPLETED Sacred
    run of the same save folder; counting both would weigh that training twice.
    """
    status = frame["status"] if "status" in frame else pd.Series("COMPLETED", frame.index)
    done = frame[status.eq("COMPLETED")]
    if done.empty:
        return done
    order = done.sort_values("start", kind="stable") if "start" in done else done
    keep = ~save_folders(order).duplicated(keep="last")
    return order[keep.to_numpy()].sort_index()


def summarize(
    frame: pd.DataFrame,
    group_by: Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    checkpoint: str = "best",
) -> Summary:
    """Mean, sample sd (ddof=1) and n of ``metrics`` per group of COMPLETED runs.

    Args:
        frame: the runs table (:func:`raug.report.runs.load_runs`).
        group_by: config keys to group by (a run without the key falls in group ``NaN``).
        metrics: metric names as the engine writes them (``test.balanced_accuracy``).
        checkpoint: ``"best"`` (the engine's evaluation) or ``"last"`` (``last.*`` columns).

    Returns:
        The :class:`Summary`; groups in sorted order.

    Raises:
        AggregateError: a group key or metric column is missing (names the key and
            lists what exists).
    """
    group_by, metrics = list(group_by), list(metrics)
    if not group_by:
        raise AggregateError("group_by is empty: name at least one config key")
    columns = {m: metric_column(m, checkpoint) for m in metrics}
    status = frame["status"] if "status" in frame else pd.Series("COMPLETED", frame.index)
    done = status.eq("COMPLETED")
    completed = completed_runs(frame)
    folders = save_folders(frame)
    missing = [k for k in group_by if k not in frame.columns]
    missing += [c for c in columns.values() if c not in completed.columns or completed[c].isna().all()]
    if missing:
        known = ", ".join(sorted(map(str, frame.columns)))
        raise AggregateError(
            f"not in the runs table (or never written by a COMPLETED run): {', '.join(missing)}; "
            f"columns: {known}"
        )
    rows = []
    for key, group in completed.groupby(group_by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group_by, key))
        row["n"] = len(group)
        for metric, column in columns.items():
            values = pd.to_numeric(group[column], errors="coerce").dropna()
            row[f"{metric}.mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}.sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*group_by, "n", *(f"{m}.{s}" for m in metrics for s in ("mean", "sd"))])
    best = completed["_best_metric"] if "_best_metric" in completed else pd.Series(dtype=object)
    return Summary(
        table=table,
        group_by=group_by,
        metrics=metrics,
        checkpoint=checkpoint,
        best_metrics={str(k): int(v) for k, v in best.dropna().value_counts().sort_index().items()},
        excluded={str(k): int(v) for k, v in status[~done].fillna("UNKNOWN").value_counts().items()},
        superseded=int((~done & folders.isin(set(folders[done]))).sum()),
        duplicates=int(done.sum()) - len(completed),
        split_warning=split_hash_warning(completed),
    )


# ----------------------------------------------------------------------------- formats


def _number(value: float, digits: int) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _group_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return str(value)


def display_rows(summary: Summary, digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """Header and text cells: group keys, ``n``, then ``mean ± sd`` per metric."""
    header = [*summary.group_by, "n", *summary.metrics]
    body = []
    for row in summary.table.to_dict("records"):
        cells = [_group_cell(row[k]) for k in summary.group_by] + [str(row["n"])]
        cells += [f"{_number(row[f'{m}.mean'], digits)} ± {_number(row[f'{m}.sd'], digits)}"
                  for m in summary.metrics]
        body.append(cells)
    return header, body


def to_markdown(summary: Summary, digits: int = 4) -> str:
    """GitHub markdown table, then the notes as a list."""
    header, body = display_rows(summary, digits)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < len(summary.group_by) else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join([*lines, "", *(f"- {note}" for note in summary.notes())])


def to_text(summary: Summary, digits: int = 4) -> str:
    """Plain aligned table, then the notes."""
    header, body = display_rows(summary, digits)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    return "\n".join([*lines, "", *summary.notes()])


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(summary: Summary, digits: int = 4) -> str:
    """A booktabs ``tabular`` (``$\\pm$`` between mean and sd); notes as ``%`` comments."""
    header, body = display_rows(summary, digits)
    align = "l" * len(summary.group_by) + "r" * (len(header) - len(summary.group_by))
    lines = [f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for cells in body:
        cells = [latex_escape(c).replace(" ± ", r" $\pm$ ") for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join([*lines, *(f"% {note}" for note in summary.notes())])


def to_csv(summary: Summary) -> str:
    """Machine-readable: group keys, ``checkpoint``, ``n``, ``<metric>.mean``, ``<metric>.sd``.

    Full precision; an undefined sd (``n == 1``) is an empty cell. The notes are
    not part of the CSV (print them to stderr).
    """
    table = summary.table.copy()
    table.insert(len(summary.group_by), "checkpoint", summary.checkpoint)
    return table.to_csv(index=False)


def format_summary(summary: Summary, fmt: str = "table", digits: int = 4) -> str:
    """``summary`` as ``table``, ``markdown``, ``csv`` or ``latex`` text."""
    if fmt == "csv":
        return to_csv(summary)
    writers = {"table": to_text, "markdown": to_markdown, "latex": to_latex}
    if fmt not in writers:
        raise AggregateError(f"format {fmt!r} is invalid: allowed {list(FORMATS)}")
    return writers[fmt](summary, digits) + "\n"


# ----------------------------------------------------------------------------- plots


def plot_metric(frame: pd.DataFrame, group_by: Sequence[str], column: str, title: str) -> Figure:
    """Box plot per group with every run as a point (fixed jitter, so the figure is reproducible).

    Args:
        frame: the COMPLETED runs.
        group_by: grouping keys (the x axis: one box per group).
        column: the metric column (the y axis).
        title: figure title (says the checkpoint).
    """
    groups = list(frame.groupby(list(group_by), dropna=False, sort=True))
    labels = [", ".join(_group_cell(k) for k in (key if isinstance(key, tuple) else (key,)))
              for key, _ in groups]
    values = [pd.to_numeric(g[column], errors="coerce").dropna().to_numpy() for _, g in groups]
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 1.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(values, tick_labels=labels, showfliers=False, widths=0.5)
    jitter = np.random.default_rng(0)
    for i, vals in enumerate(values, start=1):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(vals)), vals, s=18, alpha=0.8, zorder=3)
    ax.set(title=title, xlabel=" / ".join(group_by), ylabel=column)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) > 3:
        ax.tick_params(axis="x", labelrotation=30)
    return fig


def plot_paths(out: str | Path, metrics: Sequence[str]) -> list[Path]:
    """``out`` for one metric; ``<stem>-<metric><suffix>`` per metric for several."""
    out = Path(out)
    if len(metrics) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{m}{out.suffix or '.png'}") for m in metrics]


def write_plots(frame: pd.DataFrame, summary: Summary, out: str | Path) -> list[Path]:
    """One PNG per metric of ``summary`` (atomic writes); returns the paths written."""
    completed = completed_runs(frame)
    paths = plot_paths(out, summary.metrics)
    for metric, path in zip(summary.metrics, paths):
        column = metric_column(metric, summary.checkpoint)
        fig = plot_metric(completed, summary.group_by, column,
                          f"{metric} ({summary.checkpoint} checkpoint)")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(path, buf.getvalue())
    return paths
