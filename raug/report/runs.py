"""Table of Sacred runs: ``python -m raug.report.runs [FOLDER ...] [--sort KEY] [--format ...]``.

:func:`load_runs` finds FileStorageObserver run folders (``run.json`` +
``config.json``) below the given folders and returns one row per run; a
``mongodb://host:port[/db]`` entry among the paths (or :func:`load_runs_mongo`)
reads a MongoObserver database instead (default db ``sacred``). Columns:

* ``id``, ``folder`` (name of the run's ``_save_folder``),
  ``path``, ``script`` (experiment name), ``status`` (Sacred's record), ``state`` (the
  status, but ``DIED?`` for a RUNNING run whose heartbeat is older than
  :data:`STALE_BEATS` heartbeat intervals: killed with ``kill -9``, or hung; the table
  shows it in the ``status`` column), ``start``, ``stop``, ``heartbeat`` (UTC timestamps),
  ``duration_s``;
* every config key (nested keys dotted), e.g. ``_folder``, ``seed``, ``_kd_method``;
* every final metric of the run's result (``best_epoch``, ``test.balanced_accuracy``, ...),
  completed by ``<_save_folder>/metrics.json`` (per-class values) for the run that
  wrote it. The engine evaluates the BEST checkpoint (``val.*``, ``test.*``); values
  of the last checkpoint, where a run has them, are named ``last.val.*``, ``last.test.*``;
* ``best_val`` (the validation value of ``_best_metric`` at the best epoch; for a run
  without a result, RUNNING or not, the best so far in its per-epoch ``metrics.json``,
  with ``best_epoch``);
* ``split_hash``: the prepared split the run trained on (Sacred run info, written by
  :func:`raug.run.experiment.run_training`; ``None`` for runs that predate it).

A run whose ``run.json`` or ``config.json`` cannot be read (cut by a full disk or a kill
while Sacred rewrote it) is left out of the table, not fatal to it: the command prints
one ``skipped`` line per such run on stderr and the table of the others.

With ``--group-by KEY [KEY ...]`` the command prints a comparison table instead
(:mod:`raug.report.aggregate`): mean ± sample sd (ddof=1) and n of ``--metrics`` per
group of COMPLETED runs, the checkpoint the numbers come from, the runs left out,
and a WARNING (also on stderr) when the runs mix data splits.

Examples::

    python -m raug.report.runs results/ --sort test.balanced_accuracy --desc
    python -m raug.report.runs results/ --format markdown
    python -m raug.report.runs --mongo mongodb://localhost:27017 --db sacred
    python -m raug.report.runs sweeps/dkd sweeps/ssdkd --group-by _kd_method --format markdown --plot cmp.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from raug.files.paths import COMPLETED_MARKER
from raug.report import aggregate
from raug.train.early_stopping import metric_mode

log = logging.getLogger(__name__)

DISPLAY_COLUMNS = (
    "id", "folder", "script", "status", "start", "duration_s", "_model_name", "_model_name_student",
    "_kd_method", "_folder", "seed", "_img_size", "_epochs", "best_epoch", "best_val",
    "test.accuracy", "test.balanced_accuracy", "test.auc",
)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or UTF-8 cut mid-character
        raise ValueError(f"cannot read {path}: {exc}") from exc


MONGO_SCHEMES = ("mongodb://", "mongodb+srv://")
DEFAULT_MONGO_DB = "sacred"
DEFAULT_BEAT_INTERVAL_S = 10.0  # Sacred's SETTINGS.DEFAULT_BEAT_INTERVAL; the scripts keep it
STALE_BEATS = 3


def beat_interval(run: Mapping[str, Any]) -> float:
    """Seconds between the run's heartbeats: its ``--beat_interval`` option, else Sacred's default."""
    options = (run.get("meta") or {}).get("options") or {}
    try:
        return float(options.get("--beat_interval") or DEFAULT_BEAT_INTERVAL_S)
    except (TypeError, ValueError):
        return DEFAULT_BEAT_INTERVAL_S


def run_state(status: Any, last_beat: pd.Timestamp, interval_s: float, now: pd.Timestamp) -> Any:
    """Sacred's status, except ``DIED?`` for a RUNNING run whose heartbeat stopped.

    A process killed with ``kill -9`` (or lost with its machine) cannot update its record:
    it stays RUNNING forever. While it lives, Sacred rewrites the heartbeat every
    ``interval_s``; one older than :data:`STALE_BEATS` intervals means it is gone, or hung
    (hence the question mark). A run stopped by Ctrl-C or SIGTERM is INTERRUPTED already.
    """
    if status != "RUNNING" or pd.isna(last_beat):
        return status
    return "DIED?" if (now - last_beat).total_seconds() > STALE_BEATS * interval_s else status


def run_row(run: Mapping[str, Any], config: Mapping[str, Any], run_id: str, path: str,
            info: Mapping[str, Any] | None = None, now: pd.Timestamp | None = None) -> dict:
    """One table row from Sacred's run record, config and info (FileStorage or MongoDB layout).

    ``now`` (UTC) dates the heartbeats for ``state`` (default: the current time).
    """
    config = {k: v for k, v in config.items() if k != "__doc__"}
    save_folder = config.get("_save_folder")
    row: dict[str, Any] = {
        "id": run_id,
        "folder": Path(save_folder).name if isinstance(save_folder, str) else Path(path).parent.name,
        "path": path,
        "script": (run.get("experiment") or {}).get("name"),
        "status": run.get("status"),
        "start": pd.to_datetime(run.get("start_time"), utc=True),
        "stop": pd.to_datetime(run.get("stop_time"), utc=True),
        "heartbeat": pd.to_datetime(run.get("heartbeat"), utc=True),
    }
    last_beat = row["heartbeat"] if pd.notna(row["heartbeat"]) else row["start"]
    row["state"] = run_state(row["status"], last_beat, beat_interval(run),
                             pd.Timestamp.now(tz="UTC") if now is None else now)
    end = row["stop"] if pd.notna(row["stop"]) else row["heartbeat"]
    row["duration_s"] = (end - row["start"]).total_seconds() if pd.notna(end) and pd.notna(row["start"]) else math.nan
    row.update(_flatten(config))
    result = run.get("result")
    if isinstance(result, Mapping):
        row.update({k: v for k, v in _flatten(result).items() if not isinstance(v, Mapping)})
    best_metric = config.get("_best_metric", "loss")
    row["best_val"] = row.get(f"best.val_{best_metric}", math.nan)
    row["split_hash"] = (info or {}).get("split_hash")
    return row


def best_so_far(metrics: Mapping[str, Any], best_metric: str) -> dict[str, float]:
    """``best_val`` and ``best_epoch`` from a run's per-epoch Sacred metrics, or nothing.

    A run records its best value only when it ends; its ``val.<metric>`` curve shows how
    far a RUNNING (or dead) run got.
    """
    curve = metrics.get(f"val.{best_metric}")
    if not isinstance(curve, Mapping) or not curve.get("values"):
        return {}
    values = pd.Series(curve["values"], index=curve.get("steps"), dtype=float).dropna()
    if values.empty:
        return {}
    epoch = values.idxmin() if metric_mode(best_metric) == "min" else values.idxmax()
    return {"best_val": float(values[epoch]), "best_epoch": float(epoch)}


def _completed_metrics(config: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """``<_save_folder>/metrics.json`` if the COMPLETED marker says this run wrote it."""
    folder = config.get("_save_folder")
    if not isinstance(folder, str):
        return {}
    marker, metrics = Path(folder) / COMPLETED_MARKER, Path(folder) / "metrics.json"
    if not (marker.is_file() and metrics.is_file()):
        return {}
    try:
        if str(_read_json(marker).get("run_id")) != str(run_id):
            return {}
        return _read_json(metrics)
    except (ValueError, AttributeError):
        return {}


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """FileStorage run folders (holding ``run.json`` and ``config.json``) below ``paths``."""
    found: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        candidates = [root / "run.json"] if (root / "run.json").is_file() else []
        candidates += list(root.rglob("run.json"))
        found.update(p.parent for p in candidates if (p.parent / "config.json").is_file())
    return sorted(found)


def is_mongo_url(path: str | Path) -> bool:
    """Whether ``path`` is a MongoDB URL (``mongodb://`` or ``mongodb+srv://``)."""
    return isinstance(path, str) and path.startswith(MONGO_SCHEMES)


def mongo_db_name(url: str) -> str:
    """The database named in a MongoDB URL's path (``mongodb://h:27017/runs`` -> ``runs``), else ``sacred``."""
    return urlsplit(url).path.strip("/") or DEFAULT_MONGO_DB


@dataclass(frozen=True)
class SkippedRun:
    """A run folder left out of the table, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        """``skipped run /r/x/3: cannot read /r/x/3/run.json: ...`` (one line)."""
        return f"skipped run {self.path}: {self.reason}"


def load_runs(paths: str | Path | Iterable[str | Path],
              skipped: list[SkippedRun] | None = None) -> pd.DataFrame:
    """One row per Sacred run found under ``paths``.

    Args:
        paths: a folder or folders (e.g. ``results/``), searched recursively for
            FileStorage runs (a run folder itself works too), and/or MongoDB URLs
            ``mongodb://host:port[/db]`` (default db ``sacred``).
        skipped: receives the runs left out because their ``run.json`` or
            ``config.json`` cannot be read (default: each is logged as a warning).

    Returns:
        A DataFrame sorted by start time. Columns: ``id``, ``folder``, ``path``,
        ``script``, ``status``, ``state``, ``start``, ``stop``, ``heartbeat``, ``duration_s``,
        every config key (dotted), ``best_epoch`` and every final metric
        (``val.*``/``test.*`` of the best checkpoint, ``last.*`` where written,
        per-class values from ``metrics.json``), ``best_val``, ``split_hash``
        (details in the module docstring).

    Raises:
        FileNotFoundError: a folder does not exist.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = list(paths)
    mongo = [load_runs_mongo(url, mongo_db_name(url)) for url in paths if is_mongo_url(url)]
    folders = [p for p in paths if not is_mongo_url(p)]
    rows, now = [], pd.Timestamp.now(tz="UTC")
    for run_dir in find_run_dirs(folders):
        try:
            run, config = _read_record(run_dir)
        except ValueError as exc:
            note = SkippedRun(run_dir, str(exc))
            if skipped is None:
                log.warning("%s", note)
            else:
                skipped.append(note)
            continue
        info = _read_optional_json(run_dir / "info.json")
        row = run_row(run, config, run_dir.name, str(run_dir), info, now)
        if row["status"] == "COMPLETED":
            row.update({k: v for k, v in _completed_metrics(config, run_dir.name).items() if k not in row})
        elif pd.isna(row["best_val"]):
            row.update(best_so_far(_read_optional_json(run_dir / "metrics.json"),
                                   config.get("_best_metric", "loss")))
        rows.append(row)
    frames = [f for f in (*mongo, _frame(rows)) if not f.empty]
    if len(frames) > 1:
        return _frame(pd.concat(frames, ignore_index=True).to_dict("records"))
    return frames[0] if frames else _frame([])


def _read_record(run_dir: Path) -> tuple[dict, dict]:
    """``run.json`` and ``config.json`` of a run folder, both JSON objects.

    Raises:
        ValueError: either is unreadable, cut, or not an object (names the file).
    """
    record = []
    for name in ("run.json", "config.json"):
        data = _read_json(run_dir / name)
        if not isinstance(data, dict):
            raise ValueError(f"{run_dir / name} holds a {type(data).__name__}, not a JSON object")
        record.append(data)
    return record[0], record[1]


def _read_optional_json(path: Path) -> dict:
    # info.json (split_hash) and metrics.json (the best so far) only add columns: a cut
    # one costs those, not the run's row.
    if not path.is_file():
        return {}
    try:
        data = _read_json(path)
    except ValueError as exc:
        log.warning("%s (its run is listed without it)", exc)
        return {}
    return data if isinstance(data, dict) else {}


def load_runs_mongo(url: str, db_name: str = DEFAULT_MONGO_DB) -> pd.DataFrame:
    """One row per run stored by Sacred's MongoObserver in ``db_name`` at ``url``.

    The rows have the columns :func:`load_runs` gives the same runs from their folders: a
    COMPLETED run's per-class values come from its ``final_metrics.json`` artifact (GridFS,
    the copy of ``<_save_folder>/metrics.json``), another run's best value so far from its
    per-epoch metrics (the ``metrics`` collection), so the table needs no run folder.
    """
    import pymongo

    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        db = client[db_name]
        where = url if urlsplit(url).path.strip("/") else f"{url.rstrip('/')}/{db_name}"
        rows = [_mongo_row(db, doc, where) for doc in db["runs"].find({}, {"captured_out": 0})]
    finally:
        client.close()
    return _frame(rows)


METRICS_ARTIFACT = "final_metrics.json"  # raug.run.runner's artifact name for metrics.json


def _mongo_row(db: Any, doc: Mapping[str, Any], where: str) -> dict:
    """:func:`run_row` of one ``runs`` document, completed as :func:`load_runs` completes a folder's."""
    config = doc.get("config") or {}
    row = run_row(doc, config, str(doc["_id"]), where,
                  doc.get("info") if isinstance(doc.get("info"), Mapping) else {})
    if row["status"] == "COMPLETED":
        row.update({k: v for k, v in _artifact_json(db, doc, METRICS_ARTIFACT).items() if k not in row})
    elif pd.isna(row["best_val"]):
        curves = {m["name"]: m for m in db["metrics"].find({"run_id": doc["_id"]}) if "name" in m}
        row.update(best_so_far(curves, config.get("_best_metric", "loss")))
    return row


def _artifact_json(db: Any, doc: Mapping[str, Any], name: str) -> dict:
    """The run's artifact ``name`` (GridFS) as a JSON object; ``{}`` if absent or unreadable.

    By the file id the run document lists: servers differ in how they name GridFS's
    collections (``fs.files``; nx-27017 lists ``fs_files``), not in ``GridFS.get``.
    """
    import gridfs

    ids = [a.get("file_id") for a in doc.get("artifacts") or []
           if isinstance(a, Mapping) and a.get("name") == name]
    if not ids:
        return {}
    try:
        data = json.loads(gridfs.GridFS(db).get(ids[-1]).read())
    except (gridfs.errors.NoFile, ValueError):  # ValueError: bad JSON or UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["id", "path", "script", "status", "start", "stop", "duration_s"])
    return frame.sort_values("start", kind="stable", na_position="last").reset_index(drop=True)


# ----------------------------------------------------------------------------- command line


def display_frame(frame: pd.DataFrame, columns: Iterable[str] = DISPLAY_COLUMNS) -> pd.DataFrame:
    """The columns worth showing (those present), times rounded to the second.

    The ``status`` column shows ``state``: a dead run reads ``DIED?``, not RUNNING.
    """
    shown = frame[[c for c in columns if c in frame.columns]].copy()
    if "state" in frame and "status" in shown:
        shown["status"] = frame["state"]
    if "start" in shown:
        shown["start"] = shown["start"].dt.strftime("%Y-%m-%d %H:%M:%S")
    if "duration_s" in shown:
        shown["duration_s"] = shown["duration_s"].round(0)
    return shown


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if not value.is_integer() else str(int(value))
    return str(value)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def to_latex(frame: pd.DataFrame) -> str:
    """A booktabs ``tabular`` of the frame (special characters escaped)."""
    escape = aggregate.latex_escape
    lines = [f"\\begin{{tabular}}{{{'l' * len(frame.columns)}}}", r"\toprule",
             " & ".join(escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(_cell(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])


def to_text_table(frame: pd.DataFrame) -> str:
    """A plain aligned table."""
    cells = [list(map(str, frame.columns))] + [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(frame.columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m raug.report.runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["results"], help="folders to search (default: results)")
    parser.add_argument("--sort", default="start", help="column to sort by (default: start)")
    parser.add_argument("--desc", action="store_true", help="sort in descending order")
    parser.add_argument("--format", choices=aggregate.FORMATS, default="table")
    parser.add_argument("--all-columns", action="store_true", help="show every column")
    parser.add_argument("--mongo", metavar="URL", help="read a Sacred MongoDB instead of folders")
    parser.add_argument("--db", default="sacred", help="MongoDB database name (default: sacred)")
    grouped = parser.add_argument_group("comparison table (mean ± sd per group; raug.report.aggregate)")
    grouped.add_argument("--group-by", nargs="+", metavar="KEY",
                         help="config key(s) to group the COMPLETED runs by, e.g. _kd_method")
    grouped.add_argument("--metrics", nargs="+", metavar="METRIC", default=list(aggregate.DEFAULT_METRICS),
                         help="metrics to summarize (default: %(default)s)")
    grouped.add_argument("--checkpoint", choices=aggregate.CHECKPOINTS, default="best",
                         help="best (the engine's evaluation, chosen by _best_metric) or last "
                              "(last.* columns, where runs wrote them)")
    grouped.add_argument("--digits", type=int, default=4, help="decimals shown (default: 4)")
    grouped.add_argument("--plot", metavar="OUT.png",
                         help="box/strip plot per metric (several metrics: OUT-<metric>.png)")
    args = parser.parse_args(argv)
    if args.plot and not args.group_by:
        parser.error("--plot needs --group-by")

    skipped: list[SkippedRun] = []
    try:
        frame = load_runs_mongo(args.mongo, args.db) if args.mongo else load_runs(args.folders, skipped)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in skipped:  # before the table: a reader sees what is missing from it
        print(note, file=sys.stderr)
    if frame.empty:
        print("no readable Sacred runs found" if skipped else "no Sacred runs found", file=sys.stderr)
        return 1
    if args.group_by:
        return grouped_main(frame, args)
    if args.sort not in frame.columns:
        print(f"error: --sort {args.sort!r} is not a column; columns: {', '.join(frame.columns)}",
              file=sys.stderr)
        return 2
    frame = frame.sort_values(args.sort, ascending=not args.desc, kind="stable", na_position="last")
    shown = frame if args.all_columns else display_frame(frame)
    if args.format == "csv":
        sys.stdout.write(shown.to_csv(index=False))
    elif args.format == "markdown":
        print(to_markdown(shown))
    elif args.format == "latex":
        print(to_latex(shown))
    else:
        print(to_text_table(shown))
    return 0


def grouped_main(frame: pd.DataFrame, args: argparse.Namespace) -> int:
    """``--group-by``: the comparison table (notes under it; CSV keeps them on stderr only)."""
    try:
        summary = aggregate.summarize(frame, args.group_by, args.metrics, args.checkpoint)
    except aggregate.AggregateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.split_warning:
        print(f"WARNING: {summary.split_warning}", file=sys.stderr)
    sys.stdout.write(aggregate.format_summary(summary, args.format, args.digits))
    if args.format == "csv":
        print("\n".join(summary.notes()), file=sys.stderr)
    if args.plot:
        for path in aggregate.write_plots(frame, summary, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
