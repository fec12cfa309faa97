"""The runs table: FileStorage discovery, columns, CLI formats, the MongoDB reader."""

import io
import json
from datetime import UTC, datetime, timedelta

import gridfs
import pandas as pd
import pymongo
import pytest

from raug.report.runs import load_runs, load_runs_mongo, main, to_markdown


def fake_run(folder, run_id, name, status, config, result=None, start="2026-01-02T03:04:05.000000",
             stop="2026-01-02T03:05:35.500000"):
    run_dir = folder / str(run_id)
    run_dir.mkdir(parents=True)
    run = {"experiment": {"name": name}, "status": status, "start_time": start,
           "stop_time": stop if status != "RUNNING" else None,
           "heartbeat": stop, "result": result}
    (run_dir / "run.json").write_text(json.dumps(run))
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


@pytest.fixture
def results(tmp_path):
    teacher = tmp_path / "results" / "isic_teacher_fold2"
    fake_run(teacher, 1, "isic", "COMPLETED",
             {"_folder": 2, "seed": 1, "_img_size": 64, "_save_folder": str(teacher),
              "_best_metric": "loss", "nested": {"a": 1}},
             {"best_epoch": 3.0, "best.val_loss": 0.5, "test.accuracy": 0.7,
              "test.balanced_accuracy": 0.6, "test.auc": 0.9})
    (teacher / "COMPLETED").write_text(json.dumps({"run_id": "1"}))
    (teacher / "metrics.json").write_text(json.dumps({"test.auc.MEL": 0.95, "test.accuracy": 0.7}))
    student = tmp_path / "results" / "dkd"
    fake_run(student, 1, "isic_d_kd", "FAILED",
             {"_folder": 3, "seed": 2, "_kd_method": "d_kd", "_save_folder": str(student),
              "_best_metric": "balanced_accuracy"},
             start="2026-01-02T04:00:00.000000", stop="2026-01-02T04:00:10.000000")
    fake_run(student, 2, "isic_d_kd", "RUNNING",
             {"_folder": 3, "seed": 3, "_kd_method": "blkd", "_save_folder": str(student)},
             start="2026-01-02T05:00:00.000000", stop="2026-01-02T05:01:00.000000")
    (student / "_sources").mkdir()
    return tmp_path / "results"


def test_load_runs_columns(results):
    frame = load_runs(results)
    assert list(frame["script"]) == ["isic", "isic_d_kd", "isic_d_kd"]  # sorted by start
    assert list(frame["status"]) == ["COMPLETED", "FAILED", "RUNNING"]
    assert list(frame["folder"]) == ["isic_teacher_fold2", "dkd", "dkd"]
    teacher = frame.iloc[0]
    assert teacher["duration_s"] == pytest.approx(90.5)
    assert teacher["nested.a"] == 1
    assert teacher["test.balanced_accuracy"] == 0.6
    assert teacher["best_val"] == 0.5
    assert teacher["test.auc.MEL"] == 0.95  # completed from the save folder's metrics.json
    assert frame.iloc[1]["_kd_method"] == "d_kd"
    assert pd.isna(frame.iloc[1]["test.accuracy"])
    assert frame.iloc[2]["duration_s"] == pytest.approx(60.0)  # from the heartbeat
    assert frame["start"].dt.tz is not None


def test_metrics_json_of_another_run_is_not_attributed(results):
    (results / "isic_teacher_fold2" / "COMPLETED").write_text(json.dumps({"run_id": "7"}))
    assert "test.auc.MEL" not in load_runs(results).columns


def test_cli_formats_and_sort(results, capsys):
    assert main([str(results), "--format", "csv", "--sort", "seed", "--desc"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame["seed"]) == [3, 2, 1]
    assert {"id", "script", "status", "_kd_method", "test.balanced_accuracy"} <= set(frame.columns)

    assert main([str(results), "--format", "markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| id | folder | script | status |")
    assert out[1].startswith("|---|")
    assert len(out) == 5

    assert main([str(results)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["id", "folder", "script", "status"]
    assert "COMPLETED" in table[1]

    assert main([str(results), "--sort", "nope"]) == 2
    assert "not a column" in capsys.readouterr().err
    assert main([str(results / "missing")]) == 2


def test_markdown_cells():
    frame = pd.DataFrame({"a": [0.123456, float("nan")], "b": ["x", None]})
    assert to_markdown(frame).splitlines()[2:] == ["| 0.1235 | x |", "|  |  |"]


def test_mongo_reader(mongo_url):
    # Sacred's MongoObserver layout, written by hand: tests/test_mongo.py has real runs.
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    db = client["test_runs_reader"]
    metrics_id = gridfs.GridFS(db).put(json.dumps({"test.auc.MEL": 0.95}).encode())
    start = datetime(2026, 1, 2, 3, 4, 5)
    db["runs"].insert_many([
        {"_id": 1, "experiment": {"name": "isic"}, "status": "COMPLETED", "start_time": start,
         "stop_time": start + timedelta(seconds=90.5), "config": {"_folder": 2, "seed": 1},
         "result": {"test.accuracy": 0.7}, "captured_out": "log",
         "artifacts": [{"name": "final_metrics.json", "file_id": metrics_id}]},
        {"_id": 2, "experiment": {"name": "isic_d_kd"}, "status": "FAILED",
         "start_time": start + timedelta(hours=1), "stop_time": start + timedelta(hours=1, seconds=10),
         "config": {"_best_metric": "loss"}, "fail_trace": ["Traceback"], "artifacts": []},
    ])
    db["metrics"].insert_one({"run_id": 2, "name": "val.loss", "steps": [1, 2], "values": [0.9, 0.4]})
    client.close()

    frame = load_runs_mongo(mongo_url, "test_runs_reader")
    assert list(frame["id"]) == ["1", "2"]
    assert list(frame["status"]) == ["COMPLETED", "FAILED"]
    assert set(frame["path"]) == {f"{mongo_url}/test_runs_reader"}
    assert list(frame["duration_s"]) == [90.5, 10.0]
    assert frame.iloc[0]["test.auc.MEL"] == 0.95  # the final_metrics.json artifact
    assert (frame.iloc[1]["best_val"], frame.iloc[1]["best_epoch"]) == (0.4, 2.0)  # best so far
    assert "captured_out" not in frame
    pd.testing.assert_frame_equal(load_runs(f"{mongo_url}/test_runs_reader"), frame)


def test_a_cut_run_json_is_skipped_and_reported_not_fatal(results, capsys):
    # A full disk or a kill while Sacred rewrote run.json in place leaves it cut (here at 4096
    # bytes); the table of every other run must still come out.
    cut = fake_run(results / "dkd", 3, "isic_d_kd", "RUNNING", {"_folder": 4})
    run = {**json.loads((cut / "run.json").read_text()), "fail_trace": ["x" * 5000]}
    (cut / "run.json").write_text(json.dumps(run)[:4096])
    (results / "dkd" / "1" / "config.json").write_text("[1, 2]")  # valid JSON, not a config
    skipped = []
    frame = load_runs(results, skipped)
    assert list(frame["status"]) == ["COMPLETED", "RUNNING"]
    assert [s.path for s in skipped] == [results / "dkd" / "1", cut]
    assert "config.json holds a list, not a JSON object" in skipped[0].reason
    assert skipped[1].reason.startswith(f"cannot read {cut / 'run.json'}: ")

    assert main([str(results)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [str(s) for s in skipped]
    # its heartbeat (2026-01-02) stopped long ago: the table calls it dead, Sacred's record RUNNING
    assert [line.split()[3] for line in captured.out.splitlines()[1:]] == ["COMPLETED", "DIED?"]

    for run_dir in (results / "isic_teacher_fold2" / "1", results / "dkd" / "2"):
        (run_dir / "run.json").write_text("")
    assert main([str(results)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "no readable Sacred runs found"


def beat(seconds_ago: float) -> str:
    """A heartbeat ``seconds_ago`` in Sacred's format (naive UTC)."""
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).replace(tzinfo=None).isoformat()


def test_a_running_run_whose_heartbeat_stopped_shows_died(tmp_path, capsys):
    config = {"_save_folder": str(tmp_path / "x")}
    fake_run(tmp_path / "x", 1, "isic", "RUNNING", config, start=beat(600), stop=beat(5))
    fake_run(tmp_path / "x", 2, "isic", "RUNNING", config, start=beat(500), stop=beat(31))  # > 3 x 10 s
    slow = fake_run(tmp_path / "x", 3, "isic", "RUNNING", config, start=beat(400), stop=beat(100))
    run = json.loads((slow / "run.json").read_text())
    (slow / "run.json").write_text(json.dumps({**run, "meta": {"options": {"--beat_interval": "60"}}}))
    fake_run(tmp_path / "x", 4, "isic", "INTERRUPTED", config, start=beat(300), stop=beat(200))
    frame = load_runs(tmp_path)
    assert list(frame["status"]) == ["RUNNING", "RUNNING", "RUNNING", "INTERRUPTED"]  # Sacred's record
    assert list(frame["state"]) == ["RUNNING", "DIED?", "RUNNING", "INTERRUPTED"]
    assert main([str(tmp_path), "--format", "csv"]) == 0
    shown = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(shown["status"]) == ["RUNNING", "DIED?", "RUNNING", "INTERRUPTED"]


def test_a_run_without_result_shows_its_best_validation_value_so_far(tmp_path):
    curve = {"steps": [1, 2, 3], "values": [0.9, 0.5, 0.7], "timestamps": ["t"] * 3}
    acc = {"steps": [1, 2, 3], "values": [0.2, 0.6, 0.4], "timestamps": ["t"] * 3}
    for run_id, best_metric in ((1, "loss"), (2, "accuracy")):
        run_dir = fake_run(tmp_path / "x", run_id, "isic", "RUNNING",
                           {"_save_folder": str(tmp_path / "x"), "_best_metric": best_metric},
                           start=beat(100 - run_id), stop=beat(1))
        (run_dir / "metrics.json").write_text(json.dumps({"val.loss": curve, "val.accuracy": acc}))
    frame = load_runs(tmp_path)
    assert list(frame["best_val"]) == [0.5, 0.6]
    assert list(frame["best_epoch"]) == [2.0, 2.0]
