"""Sacred's MongoObserver (``-m HOST:PORT:DB``) end to end, against a real wire-protocol server.

nx-27017 (tests/mongo_server.py) stands in for MongoDB. Every run here is observed by both
the MongoObserver and one FileStorage (``-F``), so the database can be checked against the
run folders: config, per-epoch metrics, status, fail trace, artifacts byte for byte, and
``python -m raug.report.runs`` gives the same table from ``mongodb://`` as from the folders.
"""

import io
import json
import shutil
from urllib.parse import urlsplit

import gridfs
import pandas as pd
import pymongo
import pytest
from test_kd_scripts import FAST, SEED_DKD, load_script, ok, run_script

from raug.data.loaders import DataError
from raug.report.runs import load_runs, main

DB = "sacred_test_mongo"
# Timestamps: BSON keeps milliseconds, FileStorage's run.json microseconds.
TIME_COLUMNS = ("start", "stop", "heartbeat", "duration_s")
SMALL_ARTIFACTS = ("final_metrics.json", "history.csv", "test_predictions.csv")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def failing_data(prepared_isic, root):
    """A copy of the prepared data whose test images are not images: a run passes the config
    checks, trains and validates its epochs (metrics recorded), then fails on the test set."""
    base = root / "ISIC2019"
    shutil.copytree(prepared_isic, base)
    for image in (base / "test" / "imgs").glob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    return base


@pytest.fixture(scope="module")
def observed(prepared_isic, mongo_url, tmp_path_factory):
    """Runs 1-3 in ``DB`` and in the folder ``sacred/``: a quick teacher (isic.py) and a
    D-KD student from it, as a user types them with ``-m 127.0.0.1:PORT:DB -F DIR``; then
    a MobileNet teacher (in-process, cheap) that fails on a corrupt test set."""
    root = tmp_path_factory.mktemp("mongo_runs")
    sacred = root / "sacred"
    mongo = f"{urlsplit(mongo_url).netloc}:{DB}"  # -m's HOST:PORT:DB
    observers = ["-m", mongo, "-F", str(sacred)]
    common = [f"_base_path={prepared_isic}", *FAST, "_epochs=1"]
    teacher = root / "teacher" / "best-checkpoint" / "best-checkpoint.pth"
    ok(run_script("isic", *common, f"_save_folder={root / 'teacher'}", "_batch_size=48", *observers))
    ok(run_script("isic_d_kd", *SEED_DKD, *common, f"_teacher_ckpt={teacher}",
                  f"_save_folder={root / 'dkd'}", "_batch_size=24", *observers))
    with pytest.raises(DataError, match="cannot decode image"):
        load_script("isic").run(named_configs=["quick"], config_updates={
            "_base_path": str(failing_data(prepared_isic, root)), "_model_name": "mobilenet",
            "_img_size": 32, "_device": "cpu", "_num_workers": 0, "_epochs": 1,
            "_batch_size": 48, "_save_folder": str(root / "failed")},
            options={"--mongo_db": mongo, "--file_storage": str(sacred)})
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000, socketTimeoutMS=60000)
    yield {"url": f"{mongo_url}/{DB}", "db": client[DB], "sacred": sacred}
    client.close()


def folder_run(observed, run_id):
    """run.json, config.json and metrics.json of the FileStorage copy of run ``run_id``."""
    run_dir = observed["sacred"] / str(run_id)
    return [json.loads((run_dir / f"{name}.json").read_text()) for name in ("run", "config", "metrics")]


@pytest.mark.parametrize(("run_id", "script"), [(1, "isic"), (2, "isic_d_kd")])
def test_a_completed_run_is_in_the_database_as_in_its_folder(observed, run_id, script):
    db = observed["db"]
    run, config, metrics = folder_run(observed, run_id)
    doc = db["runs"].find_one({"_id": run_id})
    assert (doc["status"], doc["experiment"]["name"]) == ("COMPLETED", script)
    assert (doc["config"]["_img_size"], doc["config"]["_epochs"], doc["config"]["_quick"]) == (32, 1, True)
    assert doc["config"] == config
    assert doc["result"] == run["result"]

    curves = {m["name"]: m for m in db["metrics"].find({"run_id": run_id})}
    assert set(curves) == set(metrics)
    assert {"train.loss", "val.loss", "val.balanced_accuracy", "lr"} <= set(curves)
    for name, curve in curves.items():
        assert (curve["steps"], curve["values"]) == (metrics[name]["steps"], metrics[name]["values"]), name
    assert curves["val.loss"]["steps"] == [1]

    artifacts = {a["name"]: a["file_id"] for a in doc["artifacts"]}
    assert list(artifacts) == run["artifacts"]
    assert "best-checkpoint.pth" in artifacts
    files = gridfs.GridFS(db)
    for name in SMALL_ARTIFACTS:  # byte-exact copies (the checkpoint is too big to read back cheaply)
        stored = files.get(artifacts[name]).read()
        assert stored == (observed["sacred"] / str(run_id) / name).read_bytes(), name
    assert files.get(artifacts["best-checkpoint.pth"]).length == (
        observed["sacred"] / str(run_id) / "best-checkpoint.pth").stat().st_size


def test_the_student_records_its_teacher_and_the_kd_terms(observed):
    doc = observed["db"]["runs"].find_one({"_id": 2})
    teacher = observed["db"]["runs"].find_one({"_id": 1})
    assert doc["config"]["_teacher_ckpt"].startswith(teacher["config"]["_save_folder"])
    assert (doc["config"]["_kd_method"], doc["config"]["_lambd_crkd"]) == ("d_kd", 1000)
    names = {m["name"] for m in observed["db"]["metrics"].find({"run_id": 2})}
    assert {"train.kd", "train.rkd_distance", "train.channel_relation"} <= names


def test_a_failed_run_is_marked_failed_with_its_fail_trace(observed):
    run, _, metrics = folder_run(observed, 3)
    doc = observed["db"]["runs"].find_one({"_id": 3})
    assert doc["status"] == run["status"] == "FAILED"
    assert doc["fail_trace"] == run["fail_trace"]
    assert "DataError: cannot decode image" in doc["fail_trace"][-1]
    assert doc["stop_time"] is not None
    assert doc["config"]["_model_name"] == "mobilenet"
    curves = {m["name"]: m["values"] for m in observed["db"]["metrics"].find({"run_id": 3})}
    assert curves["val.loss"] == metrics["val.loss"]["values"]  # it trained its epoch first


def test_the_runs_table_from_mongodb_is_the_table_from_the_folders(observed):
    from_db = load_runs(observed["url"]).set_index("id")
    from_folders = load_runs(observed["sacred"]).set_index("id")
    assert list(from_db.index) == list(from_folders.index) == ["1", "2", "3"]
    assert list(from_db["status"]) == ["COMPLETED", "COMPLETED", "FAILED"]
    # Only the path must differ: a folder in one, the database's URL in the other.
    assert set(from_db["path"]) == {observed["url"]}
    assert list(from_folders["path"]) == [str(observed["sacred"] / i) for i in ("1", "2", "3")]
    assert "test.auc.NV" in from_db  # from the final_metrics.json artifact, as from metrics.json
    assert from_db.loc["3", "best_val"] == from_folders.loc["3", "best_val"]  # best so far
    for column in TIME_COLUMNS:
        gap = (from_db[column] - from_folders[column]).abs()
        gap = gap.dt.total_seconds() if column != "duration_s" else gap
        assert gap.max() < 1e-3, column
    drop = ["path", *TIME_COLUMNS]
    pd.testing.assert_frame_equal(from_db.drop(columns=drop), from_folders.drop(columns=drop),
                                  check_like=True)


def cli(capsys, *argv):
    """``python -m raug.report.runs <argv>``'s standard output."""
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_the_cli_prints_the_same_tables_from_mongodb_and_from_the_folders(observed, capsys):
    url, folders = observed["url"], str(observed["sacred"])
    for options in (["--group-by", "script"], ["--group-by", "script", "--metrics", "test.auc.NV"]):
        assert cli(capsys, url, *options) == cli(capsys, folders, *options), options
    from_db = pd.read_csv(io.StringIO(cli(capsys, url, "--format", "csv")))
    from_folders = pd.read_csv(io.StringIO(cli(capsys, folders, "--format", "csv")))
    assert list(from_db["status"]) == ["COMPLETED", "COMPLETED", "FAILED"]
    # duration_s is shown rounded to the second: a millisecond can move it across .5
    pd.testing.assert_frame_equal(from_db.drop(columns="duration_s"),
                                  from_folders.drop(columns="duration_s"))
    assert (from_db["duration_s"] - from_folders["duration_s"]).abs().max() <= 1
