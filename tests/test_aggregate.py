"""Comparison tables: mean ± sd (ddof=1) per group, exclusions, split-hash warning, formats, plots."""

import io
import json
import math

import pandas as pd
import pytest

from raug.report.aggregate import (
    AggregateError,
    format_summary,
    metric_column,
    split_hash_warning,
    summarize,
    write_plots,
)
from raug.report.runs import load_runs, main, mongo_db_name

PNG = b"\x89PNG\r\n\x1a\n"
H1, H2 = "a" * 64, "b" * 64


def runs_frame() -> pd.DataFrame:
    """Seven runs: d_kd x3 (one FAILED), ssd_kd x2, none x1, and a RUNNING one."""
    rows = [
        ("d_kd", 1, "COMPLETED", 0.70, 0.80),
        ("d_kd", 2, "COMPLETED", 0.74, 0.84),
        ("d_kd", 3, "COMPLETED", 0.75, 0.86),
        ("d_kd", 4, "FAILED", math.nan, math.nan),
        ("ssd_kd", 1, "COMPLETED", 0.78, 0.90),
        ("ssd_kd", 2, "COMPLETED", 0.80, 0.88),
        ("none", 1, "COMPLETED", 0.60, 0.70),
        ("none", 2, "RUNNING", math.nan, math.nan),
    ]
    return pd.DataFrame({
        "id": [str(i) for i in range(len(rows))],
        "path": [f"/s/{m}-fold{f}/1" for m, f, *_ in rows],
        "_save_folder": [f"/s/{m}-fold{f}" for m, f, *_ in rows],
        "start": pd.to_datetime([f"2026-01-01T00:00:0{i}" for i in range(len(rows))], utc=True),
        "_kd_method": [r[0] for r in rows],
        "_folder": [r[1] for r in rows],
        "status": [r[2] for r in rows],
        "test.balanced_accuracy": [r[3] for r in rows],
        "test.auc": [r[4] for r in rows],
        "test.accuracy": [r[3] + 0.05 for r in rows],
        "_best_metric": "loss",
        "split_hash": H1,
    })


def test_numbers_match_pandas_by_hand():
    frame = runs_frame()
    summary = summarize(frame, ["_kd_method"], ["test.balanced_accuracy", "test.auc"])
    table = summary.table.set_index("_kd_method")
    done = frame[frame["status"] == "COMPLETED"]
    for method, group in done.groupby("_kd_method"):
        assert table.loc[method, "n"] == len(group)
        for metric in ("test.balanced_accuracy", "test.auc"):
            assert table.loc[method, f"{metric}.mean"] == pytest.approx(group[metric].mean())
            if len(group) > 1:
                assert table.loc[method, f"{metric}.sd"] == pytest.approx(group[metric].std(ddof=1))
    # explicit values: d_kd = 0.70, 0.74, 0.75 (the FAILED run left out)
    assert table.loc["d_kd", "test.balanced_accuracy.mean"] == pytest.approx(0.73)
    assert table.loc["d_kd", "test.balanced_accuracy.sd"] == pytest.approx(math.sqrt(0.0007))
    assert math.isnan(table.loc["none", "test.auc.sd"])  # n = 1
    assert list(table.index) == ["d_kd", "none", "ssd_kd"]
    assert summary.excluded == {"FAILED": 1, "RUNNING": 1}
    assert summary.split_warning is None


def test_group_by_two_keys_and_last_checkpoint():
    frame = runs_frame()
    frame["last.test.auc"] = frame["test.auc"] - 0.1
    summary = summarize(frame, ["_kd_method", "_folder"], ["test.auc"], checkpoint="last")
    assert len(summary.table) == 6
    row = summary.table[(summary.table["_kd_method"] == "ssd_kd") & (summary.table["_folder"] == 2)]
    assert row["test.auc.mean"].item() == pytest.approx(0.78)
    assert summary.checkpoint_note() == "checkpoint: last (the final epoch)"
    assert metric_column("test.auc", "last") == "last.test.auc"
    assert metric_column("last.test.auc", "best") == "test.auc"


def test_missing_column_is_named():
    with pytest.raises(AggregateError, match="_lambd"):
        summarize(runs_frame(), ["_lambd"])
    with pytest.raises(AggregateError, match=r"last\.test\.auc"):
        summarize(runs_frame(), ["_kd_method"], ["test.auc"], checkpoint="last")


def test_resumed_and_reevaluated_runs_are_counted_once():
    frame = runs_frame()
    # A finished d_kd fold-1 run evaluated again (a second COMPLETED run in the same save folder)
    again = frame.iloc[[0]].assign(id="9", path="/s/d_kd-fold1/2", **{"test.balanced_accuracy": 0.90},
                                   start=pd.Timestamp("2026-01-02", tz="UTC"))
    # The RUNNING none-fold-2 run was later resumed and COMPLETED in the same folder
    resumed = frame.iloc[[7]].assign(id="10", path="/s/none-fold2/2", status="COMPLETED",
                                     **{"test.balanced_accuracy": 0.64, "test.auc": 0.72},
                                     start=pd.Timestamp("2026-01-03", tz="UTC"))
    summary = summarize(pd.concat([frame, again, resumed], ignore_index=True), ["_kd_method"])
    table = summary.table.set_index("_kd_method")
    assert table.loc["d_kd", "n"] == 3
    assert table.loc["d_kd", "test.balanced_accuracy.mean"] == pytest.approx((0.90 + 0.74 + 0.75) / 3)
    assert table.loc["none", "n"] == 2
    assert summary.duplicates == 1
    assert summary.superseded == 1
    notes = summary.notes()
    assert "excluded: 2 run(s) not COMPLETED (1 FAILED, 1 RUNNING); 1 of them in a folder whose run " \
           "later COMPLETED" in notes
    assert any(n.startswith("not counted twice: 1 earlier COMPLETED run") for n in notes)


def test_split_hash_warning():
    frame = runs_frame()
    assert split_hash_warning(frame) is None
    frame.loc[1, "split_hash"] = H2
    warning = split_hash_warning(frame)
    assert warning == ("the runs come from DIFFERENT data splits: split_hash aaaaaaaaaaaa… (7 runs), "
                       "split_hash bbbbbbbbbbbb… (1 runs)")
    frame.loc[1, "split_hash"] = None
    assert split_hash_warning(frame) == ("cannot confirm that the runs share one data split: "
                                         "split_hash aaaaaaaaaaaa… (7 runs), no split_hash recorded (1 runs)")
    # only the runs in the table count: the odd one out is the FAILED run
    frame.loc[1, "split_hash"] = H1
    frame.loc[3, "split_hash"] = H2
    assert summarize(frame, ["_kd_method"]).split_warning is None
    frame.loc[0, "split_hash"] = H2
    summary = summarize(frame, ["_kd_method"])
    assert summary.split_warning.startswith("the runs come from DIFFERENT data splits")
    assert summary.notes()[-1] == f"WARNING: {summary.split_warning}"
    assert "WARNING: the runs come from DIFFERENT" in format_summary(summary, "markdown")


def small_summary():
    frame = runs_frame()
    frame = frame[frame["_kd_method"] != "d_kd"]
    return summarize(frame, ["_kd_method"], ["test.balanced_accuracy", "test.auc"])


def test_markdown_format():
    assert format_summary(small_summary(), "markdown").splitlines() == [
        "| _kd_method | n | test.balanced_accuracy | test.auc |",
        "|---|---:|---:|---:|",
        "| none | 1 | 0.6000 ± – | 0.7000 ± – |",
        "| ssd_kd | 2 | 0.7900 ± 0.0141 | 0.8900 ± 0.0141 |",
        "",
        "- checkpoint: best on the validation fold by _best_metric = loss",
        "- cells: mean ± sample sd (ddof=1) over the n COMPLETED runs of the group; sd – when n = 1",
        "- excluded: 1 run(s) not COMPLETED (1 RUNNING)",
    ]


def test_latex_format():
    assert format_summary(small_summary(), "latex", digits=2).splitlines() == [
        r"\begin{tabular}{lrrr}",
        r"\toprule",
        r"\_kd\_method & n & test.balanced\_accuracy & test.auc \\",
        r"\midrule",
        r"none & 1 & 0.60 $\pm$ – & 0.70 $\pm$ – \\",
        r"ssd\_kd & 2 & 0.79 $\pm$ 0.01 & 0.89 $\pm$ 0.01 \\",
        r"\bottomrule",
        r"\end{tabular}",
        "% checkpoint: best on the validation fold by _best_metric = loss",
        "% cells: mean ± sample sd (ddof=1) over the n COMPLETED runs of the group; sd – when n = 1",
        "% excluded: 1 run(s) not COMPLETED (1 RUNNING)",
    ]


def test_csv_format():
    text = format_summary(small_summary(), "csv")
    assert text.splitlines()[0] == ("_kd_method,checkpoint,n,test.balanced_accuracy.mean,"
                                    "test.balanced_accuracy.sd,test.auc.mean,test.auc.sd")
    assert text.splitlines()[1] == "none,best,1,0.6,,0.7,"
    table = pd.read_csv(io.StringIO(text))
    assert table["test.auc.sd"][1] == pytest.approx(pd.Series([0.90, 0.88]).std(ddof=1))


def test_plots_are_written(tmp_path):
    frame = runs_frame()
    summary = summarize(frame, ["_kd_method"], ["test.balanced_accuracy", "test.auc"])
    paths = write_plots(frame, summary, tmp_path / "cmp.png")
    assert [p.name for p in paths] == ["cmp-test.balanced_accuracy.png", "cmp-test.auc.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
    one = summarize(frame, ["_kd_method"], ["test.auc"])
    assert write_plots(frame, one, tmp_path / "one.png") == [tmp_path / "one.png"]
    assert not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- the CLI on run folders


def sacred_run(save, run_id, status, config, result=None, info=None, start="2026-01-01T00:00:00"):
    run_dir = save / str(run_id)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "experiment": {"name": "isic_d_kd"}, "status": status, "start_time": start,
        "stop_time": "2026-01-01T00:10:00", "heartbeat": "2026-01-01T00:10:00", "result": result}))
    (run_dir / "config.json").write_text(json.dumps({**config, "_save_folder": str(save)}))
    if info is not None:
        (run_dir / "info.json").write_text(json.dumps(info))


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for fold, method, bacc in [(1, "none", 0.5), (2, "none", 0.6), (1, "d_kd", 0.7), (2, "d_kd", 0.9)]:
        sacred_run(root / f"fold{fold}-{method}", 1, "COMPLETED",
                   {"_folder": fold, "_kd_method": method, "_best_metric": "balanced_accuracy"},
                   {"best_epoch": 2.0, "test.balanced_accuracy": bacc, "test.accuracy": bacc + 0.1,
                    "test.auc": 0.8}, {"split_hash": H1})
    sacred_run(root / "fold3-d_kd", 1, "FAILED", {"_folder": 3, "_kd_method": "d_kd"}, info={"split_hash": H1})
    return root


def test_load_runs_reads_the_split_hash(sweep_dir):
    sacred_run(sweep_dir / "old", 1, "COMPLETED", {"_folder": 1, "_kd_method": "none"})
    frame = load_runs(sweep_dir)
    assert frame["split_hash"].tolist().count(H1) == 5
    assert frame["split_hash"].isna().sum() == 1


def test_cli_group_by(sweep_dir, capsys, tmp_path):
    assert main([str(sweep_dir), "--group-by", "_kd_method", "--format", "markdown",
                 "--metrics", "test.balanced_accuracy", "--plot", str(tmp_path / "p.png")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[:4] == [
        "| _kd_method | n | test.balanced_accuracy |",
        "|---|---:|---:|",
        "| d_kd | 2 | 0.8000 ± 0.1414 |",
        "| none | 2 | 0.5500 ± 0.0707 |",
    ]
    assert "- checkpoint: best on the validation fold by _best_metric = balanced_accuracy" in out
    assert "- excluded: 1 run(s) not COMPLETED (1 FAILED)" in out
    assert "WARNING" not in err
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG

    sacred_run(sweep_dir / "other-split", 1, "COMPLETED", {"_folder": 3, "_kd_method": "none"},
               {"test.balanced_accuracy": 0.1}, {"split_hash": H2})
    assert main([str(sweep_dir), "--group-by", "_kd_method", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert pd.read_csv(io.StringIO(out))["n"].tolist() == [2, 3]
    assert err.startswith("WARNING: the runs come from DIFFERENT data splits")
    assert "WARNING" not in out  # CSV stays parseable: notes on stderr

    assert main([str(sweep_dir), "--group-by", "_nope"]) == 2
    assert "_nope" in capsys.readouterr().err


def test_cli_without_group_by_is_unchanged_and_knows_latex(sweep_dir, capsys):
    assert main([str(sweep_dir), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| id | folder | script | status |")
    assert main([str(sweep_dir), "--format", "latex"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{l")
    assert lines[2].startswith(r"id & folder & script & status & start & duration\_s")
    assert len(lines) == 4 + 5 + 2


def test_mongo_url_db_name():
    assert mongo_db_name("mongodb://localhost:27017") == "sacred"
    assert mongo_db_name("mongodb://localhost:27017/") == "sacred"
    assert mongo_db_name("mongodb://user:pw@host:27017/kd_runs?authSource=admin") == "kd_runs"
