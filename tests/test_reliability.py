"""Reliability: config validation, refusal to overwrite, kill -9 + resume, failures, atomic writes."""

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
import torch

from raug.errors import ConfigError
from raug.files.checkpoint import CheckpointError, load_checkpoint
from raug.run.config import SHARED_CONFIG, check_save_folder, validate_config
from raug.run.experiment import ProgressBarFilter
from raug.run.runner import HistoryOutputs, load_resume_state
from raug.testing import write_prepared_dataset
from raug.train.engine import FitSettings, NonFiniteLossError
from raug.train.outputs import RunOutputs

TINY_SCRIPT = '''
"""Tiny experiment (TinyNet on a tiny prepared dataset) for the reliability tests."""
import os
import time

import torch

from raug.run.experiment import make_experiment
from raug.run.runner import run_training
from raug.train.task import ClassificationTask
from raug.testing import TinyNet

ex = make_experiment("tiny", {"_explode_epoch": 0}, save_name="tiny")


class SlowTask(ClassificationTask):
    def __init__(self, model, weight, explode_epoch):
        super().__init__(model, weight)
        self.explode_epoch = explode_epoch
        self.epoch = 0

    def train(self, mode=True):  # nn.Module.eval() calls train(False)
        super().train(mode)
        if mode:
            self.epoch += 1

    def train_step(self, batch):
        time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
        out = super().train_step(batch)
        if self.epoch == self.explode_epoch:
            out["loss"] = out["loss"] * float("nan")
        return out


def build(ctx):
    torch.manual_seed(ctx.config["seed"])
    model = TinyNet(num_classes=len(ctx.data.class_names))
    return SlowTask(model, ctx.data.class_weight, ctx.config["_explode_epoch"])


@ex.automain
def main(_run, _config):
    return run_training(_run, _config, build)
'''

TINY_CONFIG = {"_img_size": 32, "_batch_size": 8, "_num_workers": 0, "_pretrained": False,
               "_device": "cpu", "_lr_init": 0.05, "_early_stop": 10, "_sched_patience": 10}
TINY_ARGS = [f"{key}={value}" for key, value in TINY_CONFIG.items()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = write_prepared_dataset(root / "data", n_train=48, n_test=16, size=36)
    script = root / "tiny.py"
    script.write_text(textwrap.dedent(TINY_SCRIPT))
    spec = importlib.util.spec_from_file_location("tiny_experiment", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"data": data, "script": script, "ex": module.ex}


def updates(tiny, folder, **kw):
    return {**TINY_CONFIG, "_base_path": str(tiny["data"]), "_save_folder": str(folder), **kw}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- validation


def good_config(tmp_path):
    data = write_prepared_dataset(tmp_path / "d", n_train=40, n_test=8, size=36)
    return {**SHARED_CONFIG, "_base_path": str(data), "_save_folder": str(tmp_path / "out"),
            "_device": "cpu"}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("_folder", 7, r"_folder=7 is invalid: the folds in .*ISIC2019_parsed_train.csv are \[1, 2, 3, 4, 5\]"),
        ("_img_size", 100, r"_img_size=100 is invalid: expected a positive multiple of 32"),
        ("_img_size", -32, r"_img_size=-32 is invalid"),
        ("_best_metric", "f1", r"_best_metric='f1' is invalid: allowed: \['loss', 'accuracy'"),
        ("_device", "tpu", r"_device='tpu' is unknown; allowed: 'auto', 'cpu'"),
        ("_lr_init", -0.1, r"_lr_init=-0.1 is invalid: expected a number > 0"),
        ("_epochs", 0, r"_epochs=0 is invalid: expected an integer >= 1"),
        ("_batch_size", 1, r"_batch_size=1 is invalid: expected an integer >= 2"),
        ("_amp", "fp8", r"_amp='fp8' is invalid"),
        ("_use_wce", "yes", r"_use_wce='yes' is invalid: expected True or False"),
        ("_base_path", "/nonexistent/x", r"/nonexistent/x.*ISIC2019_parsed_train.csv not found"),
    ],
)
def test_validate_config_names_key_and_allowed_values(tmp_path, key, value, message):
    config = good_config(tmp_path)
    validate_config(config)
    with pytest.raises(ConfigError, match=message):
        validate_config({**config, key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"_device='cuda:1' but CUDA is not available"):
        validate_config({**good_config(tmp_path), "_device": "cuda:1"})


def test_extra_checks_extend_validation(tmp_path):
    def kd_check(config):
        return [] if config.get("_kd_method") in ("d_kd",) else [f"_kd_method={config.get('_kd_method')!r} is invalid"]

    with pytest.raises(ConfigError, match="_kd_method=None is invalid"):
        validate_config(good_config(tmp_path), extra_checks=[kd_check])


# ----------------------------------------------------------------------------- refusal


def test_new_run_refuses_a_finished_save_folder_and_touches_nothing(tiny, tmp_path):
    folder = tmp_path / "done"
    (folder / "best-checkpoint").mkdir(parents=True)
    (folder / "best-checkpoint" / "best-checkpoint.pth").write_bytes(b"weights")
    (folder / "COMPLETED").write_text("{}")
    (folder / "notes.txt").write_text("keep me")
    before = snapshot(folder)
    with pytest.raises(ConfigError, match=r"already holds a run.*_resume=True.*_save_folder=<new folder>"):
        tiny["ex"].run(config_updates=updates(tiny, folder))
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETED", "best-checkpoint", "notes.txt"]


def test_check_save_folder_rules(tmp_path):
    check_save_folder(tmp_path / "empty", resume=False)
    (tmp_path / "f" / "last-checkpoint").mkdir(parents=True)
    (tmp_path / "f" / "last-checkpoint" / "last-checkpoint.pth").write_bytes(b"x")
    check_save_folder(tmp_path / "f", resume=True)
    with pytest.raises(ConfigError, match=r"last-checkpoint/last-checkpoint\.pth"):
        check_save_folder(tmp_path / "f", resume=False)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "COMPLETED").write_text("{}")
    with pytest.raises(ConfigError, match="does not exist"):
        check_save_folder(tmp_path / "g", resume=True)


# ----------------------------------------------------------------------------- crashes


def interruptible() -> None:
    """Default SIGINT in the child: a test run from a background shell (``cmd &``) inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(tiny, folder, *extra, env=None):
    cmd = [sys.executable, str(tiny["script"]), "with", *TINY_ARGS,
           f"_base_path={tiny['data']}", f"_save_folder={folder}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=interruptible)


def last_epoch(folder: Path) -> int:
    path = folder / "last-checkpoint" / "last-checkpoint.pth"
    try:
        return load_checkpoint(path)["epoch"] if path.is_file() else 0
    except CheckpointError:
        return 0


@pytest.mark.slow
def test_kill_minus_9_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    straight = tiny["ex"].run(config_updates=updates(tiny, tmp_path / "a", _epochs=4))
    assert straight.status == "COMPLETED"

    folder = tmp_path / "b"
    proc = run_script(tiny, folder, "_epochs=4", env={"TINY_SLEEP": "0.15"})
    deadline = time.monotonic() + 120
    while last_epoch(folder) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = last_epoch(folder)
    assert 2 <= killed_at < 4, proc.stdout.read()
    assert json.loads((folder / "1" / "run.json").read_text())["status"] == "RUNNING"

    resumed = tiny["ex"].run(config_updates=updates(tiny, folder, _epochs=4, _resume=True))
    assert resumed.status == "COMPLETED"
    assert resumed.result == straight.result
    a = pd.read_csv(tmp_path / "a" / "history.csv")
    b = pd.read_csv(folder / "history.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    # the resumed Sacred run carries the whole curve, re-logged from the checkpoint
    metrics = json.loads((folder / "2" / "metrics.json").read_text())
    assert metrics["val.loss"]["steps"] == [1, 2, 3, 4]
    wa = load_checkpoint(tmp_path / "a" / "best-checkpoint" / "best-checkpoint.pth")["model_state_dict"]
    wb = load_checkpoint(folder / "best-checkpoint" / "best-checkpoint.pth")["model_state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_loss_fails_the_sacred_run_and_keeps_the_last_checkpoint(tiny, tmp_path):
    folder = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 0 \(training\): loss=nan"):
        tiny["ex"].run(config_updates=updates(tiny, folder, _epochs=3, _explode_epoch=2))
    run = json.loads((folder / "1" / "run.json").read_text())
    assert run["status"] == "FAILED"
    assert "epoch 2, batch 0" in "".join(run["fail_trace"])
    assert load_checkpoint(folder / "last-checkpoint" / "last-checkpoint.pth")["epoch"] == 1
    assert not (folder / "COMPLETED").exists()


def test_corrupt_last_checkpoint_on_resume_names_the_file(tmp_path):
    path = tmp_path / "last-checkpoint" / "last-checkpoint.pth"
    path.parent.mkdir()
    torch.save({"x": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    config = {"_save_folder": str(tmp_path), "_resume": True}
    with pytest.raises(CheckpointError, match=r"last-checkpoint\.pth is truncated or corrupt"):
        load_resume_state(config, FitSettings(epochs=1))


def test_resume_refuses_a_different_config(tmp_path):
    from raug.files.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last-checkpoint" / "last-checkpoint.pth",
                    {"config": {"_folder": 2, "_epochs": 3, "seed": 1}})
    config = {"_save_folder": str(tmp_path), "_resume": True, "_folder": 3, "_epochs": 9, "seed": 1}
    with pytest.raises(ConfigError, match=r"_folder: checkpoint 2 vs now 3"):
        load_resume_state(config, FitSettings(epochs=9))


def test_atomic_text_write_leaves_old_file_on_crash(tmp_path, monkeypatch):
    outputs = RunOutputs(tmp_path)
    outputs.write_json("metrics.json", {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        outputs.write_json("metrics.json", {"a": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_history_files_follow_every_last_checkpoint(tmp_path):
    outputs = HistoryOutputs(tmp_path, is_main=True)
    rows = [{"epoch": 1, "lr": 0.1, "train.loss": 2.0, "val.loss": 1.5}]
    outputs.save_checkpoint(FitSettings.best_path, {"history": rows})
    assert not (tmp_path / "history.csv").exists()  # the best checkpoint comes first
    outputs.save_checkpoint(FitSettings.last_path, {"history": rows})
    assert (tmp_path / "history.png").is_file()
    rows.append({"epoch": 2, "lr": 0.1, "train.loss": 1.8, "val.loss": 1.2})
    outputs.save_checkpoint(FitSettings.last_path, {"history": rows})
    assert list(pd.read_csv(tmp_path / "history.csv")["val.loss"]) == [1.5, 1.2]


def test_non_main_rank_writes_nothing(tmp_path):
    outputs = RunOutputs(tmp_path / "x", is_main=False)
    outputs.write_json("m.json", {"a": 1})
    outputs.save_checkpoint("c.pth", {"a": 1})
    assert not (tmp_path / "x").exists()


def test_progress_bar_filter_only_appends_log_lines():
    f = ProgressBarFilter()
    chunks = ["INFO - a\n\repoch 1/2 train:   0%|    | 0/4 [00:00<?, ?it/s]",
              "\repoch 1/2 train:  50%|##  | 2/4 [00:01<00:01, 1.0it/s, loss=1.2]\r      \r",
              "INFO - raug.train.engine - epoch 1/2 | tra", "in loss 1.2\nINFO - done\n"]
    captured, seen = "", []
    for chunk in chunks:
        captured = f(captured + chunk)
        assert all(captured.startswith(s) for s in seen)
        seen.append(captured)
    assert captured == "INFO - a\nINFO - raug.train.engine - epoch 1/2 | train loss 1.2\nINFO - done\n"


def test_default_observer_writes_into_the_save_folder_unless_F_is_given(tiny, tmp_path):
    default = tmp_path / "default"
    run = tiny["ex"].run(config_updates=updates(tiny, default, _epochs=1))
    assert run.status == "COMPLETED"
    assert json.loads((default / "1" / "run.json").read_text())["status"] == "COMPLETED"
    assert json.loads((default / "1" / "config.json").read_text())["_save_folder"] == str(default)

    elsewhere, out = tmp_path / "sacred", tmp_path / "out"
    run = tiny["ex"].run(config_updates=updates(tiny, out, _epochs=1),
                         options={"--file_storage": str(elsewhere)})
    assert run.status == "COMPLETED"
    assert (elsewhere / "1" / "run.json").is_file()
    assert not (out / "1").exists()
    assert (out / "COMPLETED").is_file()
    assert (out / "test_pred" / "predictions.csv").is_file()


def test_mongo_observer_round_trip(tiny, tmp_path, mongo_url):
    from raug.report.runs import load_runs_mongo

    db = f"raug_test_{os.getpid()}"
    run = tiny["ex"].run(config_updates=updates(tiny, tmp_path / "m", _epochs=1),
                         options={"--mongo_db": f"{urlsplit(mongo_url).netloc}:{db}"})
    assert run.status == "COMPLETED"
    assert not (tmp_path / "m" / "1").exists()  # -m replaces the default observer
    frame = load_runs_mongo(mongo_url, db)
    assert list(frame["status"]) == ["COMPLETED"]
    assert frame.iloc[0]["test.accuracy"] == run.result["test.accuracy"]


# ----------------------------------------------------------------------------- interrupts, -m


def wait_for(condition, proc, timeout=120):
    """Poll ``condition`` while ``proc`` runs; fail with its output if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert condition(), proc.communicate()[0]


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def interrupt_run(tiny, folder: Path, signum: int) -> str:
    """Start a 5-epoch run, send ``signum`` once an epoch is done; check the record, return the
    resume command the run printed."""
    proc = run_script(tiny, folder, "_epochs=5", env={"TINY_SLEEP": "0.3"})
    wait_for(lambda: (folder / "history.png").is_file(), proc)  # written after every epoch
    proc.send_signal(signum)
    out = proc.communicate(timeout=60)[0]

    assert proc.returncode == 128 + signum, out
    assert "Traceback" not in out
    assert json.loads((folder / "1" / "run.json").read_text())["status"] == "INTERRUPTED"
    kept = load_checkpoint(folder / "last-checkpoint" / "last-checkpoint.pth")  # intact
    assert 1 <= kept["epoch"] < 5
    # history.csv follows the checkpoints (one epoch behind if stopped between the two writes)
    history = pd.read_csv(folder / "history.csv")
    assert len(history) in (kept["epoch"] - 1, kept["epoch"])
    assert list(history["val.loss"]) == [row["val.loss"] for row in kept["history"][:len(history)]]

    last = folder / "last-checkpoint" / "last-checkpoint.pth"
    resume = shlex.join(["python", str(tiny["script"]), "with", "_resume=True", f"_save_folder={folder}",
                         *TINY_ARGS, f"_base_path={tiny['data']}", "_epochs=5"])
    assert lines_with(out, "save folder ") == [
        f"INFO - raug.run.experiment - save folder {folder}; if interrupted, continue with: {resume}; "
        f"list the runs: python -m raug.report.runs {folder}"]
    assert lines_with(out, "INTERRUPTED") == [
        f"WARNING - raug.run.experiment - run 1 INTERRUPTED; outputs in {folder}; the last checkpoint "
        f"{last} is intact; continue with: {resume}"]
    return resume


def test_ctrl_c_records_interrupted_and_prints_the_resume_command(tiny, tmp_path):
    interrupt_run(tiny, tmp_path / "run", signal.SIGINT)


def test_sigterm_is_an_interrupt_and_the_printed_command_resumes(tiny, tmp_path):
    folder = tmp_path / "run"
    resume = interrupt_run(tiny, folder, signal.SIGTERM)
    done = subprocess.run([sys.executable, *shlex.split(resume)[1:]], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((folder / "2" / "run.json").read_text())["status"] == "COMPLETED"
    assert lines_with(done.stderr, "COMPLETED;") == [
        f"INFO - raug.run.experiment - run 2 COMPLETED; outputs in {folder}; "
        f"list the runs: python -m raug.report.runs {folder}"]


def closed_port() -> int:
    """A local port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_m_without_a_server_fails_in_seconds_before_the_run(tiny, tmp_path):
    port = closed_port()
    folder = tmp_path / "mongo"
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        tiny["ex"].run(config_updates=updates(tiny, folder, _epochs=1),
                       options={"--mongo_db": f"127.0.0.1:{port}:raug_test"})
    assert time.monotonic() - start < 10  # Sacred alone waits 30 s, then fails twice
    assert str(error.value) == (
        f"-m 127.0.0.1:{port}:raug_test: no MongoDB server answers at 127.0.0.1:{port} within 2 s "
        f"(127.0.0.1:{port}: [Errno 111] Connection refused); start the server or correct "
        "host:port, or run without -m to record the run in _save_folder")
    assert not folder.exists()


def test_m_without_a_server_prints_one_line(tiny, tmp_path):
    port = closed_port()
    proc = run_script(tiny, tmp_path / "mongo", "-m", f"127.0.0.1:{port}:raug_test")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1
    assert len(out.strip().splitlines()) == 1, out  # Sacred ends the message with a blank line
    assert out.startswith(f"raug.run.experiment.ConfigError: -m 127.0.0.1:{port}:raug_test: no MongoDB")
    assert not (tmp_path / "mongo").exists()
