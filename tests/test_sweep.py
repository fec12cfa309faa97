"""tools/sweep.py: plan, command lines, skip/resume/retry logic, teachers, and a real 2-fold sweep."""

import contextlib
import io
import json
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from test_runlock import kill, start_holder

from raug.files import runlock
from raug.files.checkpoint import load_checkpoint
from raug.isic2019 import split_hash
from raug.report.runs import load_runs
from raug.report.runs import main as runs_main
from raug.run.sweep import (
    EXPERIMENT_DIR,
    Combo,
    GridAxis,
    State,
    SweepError,
    build_command,
    find_teachers,
    folder_state,
    parse_grid,
    plan_sweep,
    resolve_script,
    run_sweep,
    sacred_assignment,
    split_values,
    subprocess_runner,
)
from raug.run.sweep_cli import main

REPO = Path(__file__).resolve().parents[1]

# A stand-in for an experiment script: parses `with k=v ...` like Sacred, writes the
# FileStorage layout the sweep reads (run.json, config.json, COMPLETED marker, last
# checkpoint) and refuses a new run over a finished folder like the engine does.
# `fail_fold=F`: fails on fold F before any checkpoint; `crash_fold=F`: writes the
# last checkpoint, leaves the Sacred run RUNNING and exits 1 (a kill).
FAKE_SCRIPT = textwrap.dedent('''
    import ast, json, sys
    from pathlib import Path

    def value(text):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    args = sys.argv[sys.argv.index("with") + 1:]
    config = {"_resume": False, "_best_metric": "loss"}
    for token in args:
        key, sep, text = token.partition("=")
        if sep:
            config[key] = value(text)
    save = Path(config["_save_folder"])
    save.mkdir(parents=True, exist_ok=True)
    blockers = [p for p in ("COMPLETED", "best-checkpoint/best-checkpoint.pth",
                            "last-checkpoint/last-checkpoint.pth") if (save / p).exists()]
    if blockers and not config["_resume"]:
        sys.exit(f"refused: {save} already holds a run {blockers}")
    ids = [int(p.name) for p in save.iterdir() if p.name.isdigit()]
    run_id = max(ids, default=0) + 1
    run_dir = save / str(run_id)
    run_dir.mkdir()
    (save / f"argv-{run_id}.json").write_text(json.dumps(sys.argv[1:]))
    (run_dir / "config.json").write_text(json.dumps(config))

    def record(status, result=None):
        run = {"experiment": {"name": Path(sys.argv[0]).stem}, "status": status,
               "start_time": f"2026-01-01T00:00:{run_id:02d}.000000",
               "stop_time": "2026-01-01T00:01:00.000000", "heartbeat": "2026-01-01T00:01:00.000000",
               "result": result}
        (run_dir / "run.json").write_text(json.dumps(run))

    (run_dir / "cout.txt").write_text("training\\n")
    if config["_folder"] == config.get("fail_fold"):
        record("FAILED")
        sys.exit(1)
    (save / "last-checkpoint").mkdir(exist_ok=True)
    (save / "last-checkpoint" / "last-checkpoint.pth").write_bytes(b"last")
    if config["_folder"] == config.get("crash_fold"):
        record("RUNNING")
        sys.exit(1)
    (save / "best-checkpoint").mkdir(exist_ok=True)
    (save / "best-checkpoint" / "best-checkpoint.pth").write_bytes(b"best")
    (save / "COMPLETED").write_text(json.dumps({"run_id": run_id}))
    record("COMPLETED", {"test.balanced_accuracy": config["_folder"] / 10 + config["seed"] / 100})
''')


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake_exp.py"
    path.write_text(FAKE_SCRIPT)
    return path


def argv_of(folder: Path, run_id: int) -> list[str]:
    return json.loads((folder / f"argv-{run_id}.json").read_text())


# ----------------------------------------------------------------------------- values and commands


def test_grid_values_are_parsed_like_sacred_and_quoted_back():
    axes = parse_grid(["_kd_method=none,d_kd", "_lambd=0.5,1", "_layers=[1, 2],[3]", "_T='a,b'"])
    assert axes == [
        GridAxis("_kd_method", ("none", "d_kd")),
        GridAxis("_lambd", (0.5, 1)),
        GridAxis("_layers", ([1, 2], [3])),
        GridAxis("_T", ("a,b",)),
    ]
    assert split_values('"x",[1,(2,3)], y') == ['"x"', "[1,(2,3)]", "y"]
    assert sacred_assignment("_kd_method", "none") == '_kd_method="none"'
    assert sacred_assignment("_lambd", 0.5) == "_lambd=0.5"
    assert sacred_assignment("_amp", None) == "_amp=None"
    assert sacred_assignment("_pretrained", True) == "_pretrained=True"


@pytest.mark.parametrize(("spec", "message"), [
    ("_kd_method", "expected KEY=V1,V2"),
    ("seed=1,2", "set by the sweep"),
    ("_lambd=1,,2", "empty value"),
    ("bad key=1", "expected KEY=V1,V2"),
])
def test_bad_grid_is_refused(spec, message):
    with pytest.raises(SweepError, match=message):
        parse_grid([spec])


def test_scripts_resolve_by_bare_name(tmp_path):
    assert resolve_script("isic_d_kd") == EXPERIMENT_DIR / "isic_d_kd.py"
    assert resolve_script("isic.py") == EXPERIMENT_DIR / "isic.py"
    assert resolve_script(str(EXPERIMENT_DIR / "isic_ssd_kd.py")) == EXPERIMENT_DIR / "isic_ssd_kd.py"
    with pytest.raises(SweepError, match="nope"):
        resolve_script("nope")


def test_command_line_and_folder_name(tmp_path):
    combo = Combo(2, 0, (("_kd_method", "d_kd"), ("_lambd", 0.5)))
    assert combo.name == "fold2-seed0-_kd_method=d_kd-_lambd=0.5"
    assert combo.label == "fold 2 seed 0 _kd_method=d_kd _lambd=0.5"
    save = tmp_path / combo.name
    cmd = build_command(Path("/x/isic_d_kd.py"), combo, save, ["quick", "_device=cpu"],
                        teacher=Path("/t/best.pth"), resume=True)
    assert cmd == [sys.executable, "/x/isic_d_kd.py", "with", "_folder=2", "seed=0",
                   '_kd_method="d_kd"', "_lambd=0.5", '_teacher_ckpt="/t/best.pth"', "quick",
                   "_device=cpu", f'_save_folder="{save}"', "_resume=True"]


@pytest.mark.parametrize("override", ["_folder=3", "seed=1", "_save_folder=x", "_kd_method=rkd"])
def test_overrides_that_fight_the_sweep_are_refused(tmp_path, fake_script, override):
    with pytest.raises(SweepError, match=override.split("=")[0]):
        plan_sweep(fake_script, [1], [0], tmp_path / "out", parse_grid(["_kd_method=none"]), [override])


# ----------------------------------------------------------------------------- skip / resume / retry


def test_failed_runs_are_reported_and_rerun_finishes_the_sweep(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    args = [str(fake_script), "--folds", "1", "2", "3", "--seeds", "0", "--out", str(out),
            "--grid", "_kd_method=none,d_kd", "--", "quick", "fail_fold=2", "crash_fold=3"]
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 6
    assert lines[0].startswith("[1/6] fold 1 seed 0 _kd_method=none ... COMPLETED in ")
    assert lines[0].endswith(" s")
    fold2 = out / "fold2-seed0-_kd_method=none"
    assert lines[2] == (f"[3/6] fold 2 seed 0 _kd_method=none ... FAILED (exit 1), see "
                        f"{fold2 / 'sweep.log'} (Sacred run {fold2 / '1'})")
    assert lines[4].startswith("[5/6] fold 3 seed 0 _kd_method=none ... FAILED (exit 1), see ")
    assert "sweep: 6 runs: 2 completed now, 0 skipped (already COMPLETED), 4 failed" in captured.err
    assert "FAILED: fold 3 seed 0 _kd_method=d_kd (exit 1)" in captured.err
    assert argv_of(out / "fold1-seed0-_kd_method=d_kd", 1) == [
        "with", "_folder=1", "seed=0", '_kd_method="d_kd"', "quick", "fail_fold=2", "crash_fold=3",
        f'_save_folder="{out / "fold1-seed0-_kd_method=d_kd"}"']
    assert folder_state(fold2).state is State.RETRY
    assert folder_state(out / "fold3-seed0-_kd_method=none").state is State.RESUME

    # Rerun without the failures: completed runs are skipped, fold 3 resumes, fold 2 starts again.
    args = args[:-2]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ... ", 1)[1] for line in lines[:2]] == ["skipped (already COMPLETED)"] * 2
    assert lines[2].startswith("[3/6] fold 2 seed 0 _kd_method=none ... COMPLETED in ")
    assert lines[4].startswith(
        "[5/6] fold 3 seed 0 _kd_method=none ... last run RUNNING; resuming from "
        "last-checkpoint/last-checkpoint.pth ... COMPLETED in ")
    assert argv_of(out / "fold3-seed0-_kd_method=none", 2)[-1] == "_resume=True"
    assert "_resume=True" not in argv_of(fold2, 2)
    assert not (out / "fold1-seed0-_kd_method=none" / "argv-2.json").exists()  # not rerun

    # A third run starts nothing.
    assert main(args) == 0
    assert capsys.readouterr().out.count("... skipped (already COMPLETED)") == 6
    frame = load_runs(out)
    assert (frame["status"] == "COMPLETED").sum() == 6
    assert sorted(frame["status"]) == ["COMPLETED"] * 6 + ["FAILED", "FAILED", "RUNNING", "RUNNING"]


def test_marker_of_a_run_that_never_completed_means_resume(tmp_path, fake_script):
    out = tmp_path / "sweep"
    plan = plan_sweep(fake_script, [1], [0], out)
    assert run_sweep(plan, out).exit_code == 0
    folder = out / "fold1-seed0"
    run = json.loads((folder / "1" / "run.json").read_text())
    run["status"] = "RUNNING"  # killed after writing COMPLETED, before Sacred's completed event
    (folder / "1" / "run.json").write_text(json.dumps(run))
    assert folder_state(folder).state is State.RESUME
    plan = plan_sweep(fake_script, [1], [0], out)
    assert plan[0].command[-1] == "_resume=True"


def test_truncated_run_json_does_not_stop_the_sweep(tmp_path, fake_script):
    out = tmp_path / "sweep"
    assert main([str(fake_script), "--folds", "1", "--seeds", "0", "--out", str(out), "--",
                 "crash_fold=1"]) == 1
    folder = out / "fold1-seed0"
    (folder / "1" / "run.json").write_text('{"status": "RUNN')  # killed while Sacred wrote it
    assert folder_state(folder).state is State.RESUME
    assert main([str(fake_script), "--folds", "1", "--seeds", "0", "--out", str(out)]) == 0
    assert argv_of(folder, 2)[-1] == "_resume=True"


def test_unresumable_folder_is_moved_aside(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    folder = out / "fold1-seed0"
    (folder / "best-checkpoint").mkdir(parents=True)
    (folder / "best-checkpoint" / "best-checkpoint.pth").write_bytes(b"old")  # no last checkpoint
    assert folder_state(folder).state is State.STALE
    plan = plan_sweep(fake_script, [1], [0], out)
    assert "_resume=True" not in plan[0].command
    assert run_sweep(plan, out).exit_code == 0
    assert "without a last checkpoint: moved to" in capsys.readouterr().out
    stale = list((out / "_stale").iterdir())
    assert len(stale) == 1
    assert stale[0].name.startswith("fold1-seed0-")
    assert (stale[0] / "best-checkpoint" / "best-checkpoint.pth").read_bytes() == b"old"
    assert folder_state(folder).state is State.COMPLETED


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    assert main([str(fake_script), "--folds", "1", "--seeds", "4", "5", "--out", str(out),
                 "--dry-run", "--", '_kd_method="none"']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/2] fold 1 seed 4: new (no folder yet)"
    assert shlex.split(lines[1]) == [sys.executable, str(fake_script), "with", "_folder=1", "seed=4",
                                     '_kd_method="none"', f'_save_folder="{out / "fold1-seed4"}"']
    assert not out.exists()


def test_subprocess_runner_appends_output_to_the_log(tmp_path):
    log = tmp_path / "a" / "sweep.log"
    assert subprocess_runner([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], log) == 3
    assert "hello" in log.read_text()


# ----------------------------------------------------------------------------- teachers


def fake_teacher(root: Path, fold: int, seed: int, status="COMPLETED", script="isic") -> Path:
    save = root / f"fold{fold}-seed{seed}"
    (save / "1").mkdir(parents=True)
    (save / "1" / "run.json").write_text(json.dumps(
        {"experiment": {"name": script}, "status": status, "start_time": "2026-01-01T00:00:00"}))
    (save / "1" / "config.json").write_text(json.dumps({"_folder": fold, "seed": seed,
                                                        "_save_folder": str(save)}))
    (save / "best-checkpoint").mkdir()
    ckpt = save / "best-checkpoint" / "best-checkpoint.pth"
    ckpt.write_bytes(b"teacher")
    return ckpt


def test_teacher_per_fold(tmp_path, fake_script):
    teachers = tmp_path / "teachers"
    t1s0, t1s1 = fake_teacher(teachers, 1, 0), fake_teacher(teachers, 1, 1)
    t2s3 = fake_teacher(teachers, 2, 3)
    fake_teacher(teachers, 3, 0, status="FAILED")
    fake_teacher(teachers / "students", 3, 1, script="isic_d_kd")
    mapping = find_teachers(teachers, [1, 2], [0, 1])
    assert mapping == {(1, 0): t1s0, (1, 1): t1s1, (2, 0): t2s3, (2, 1): t2s3}
    with pytest.raises(SweepError, match=r"fold\(s\) \[3\].*folds \[1, 2\]"):
        find_teachers(teachers, [1, 3], [0])

    kd_script = tmp_path / "isic_d_kd.py"
    kd_script.write_text(FAKE_SCRIPT)
    plan = plan_sweep(kd_script, [2], [0], tmp_path / "out", teachers=teachers)
    assert f'_teacher_ckpt="{t2s3}"' in plan[0].command
    with pytest.raises(SweepError, match="_teacher_ckpt is chosen by --teachers"):
        plan_sweep(kd_script, [2], [0], tmp_path / "out", overrides=["_teacher_ckpt=x"], teachers=teachers)
    with pytest.raises(SweepError, match="--teachers is for the KD scripts"):
        plan_sweep(fake_script, [2], [0], tmp_path / "out", teachers=teachers)


# ----------------------------------------------------------------------------- one writer per folder

# A run that holds its save folder's lock like the engine does, reports its pid, then trains
# (sleeps) for a minute.
SLEEPY_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from raug.files import runlock
    args = dict(a.split("=", 1) for a in sys.argv[sys.argv.index("with") + 1:] if "=" in a)
    save = Path(args["_save_folder"].strip('"'))
    lock = runlock.acquire(save)
    (save / "child.pid").write_text(str(__import__("os").getpid()))
    time.sleep(60)
''')


def is_dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has released everything, its lock included


@pytest.mark.parametrize("how", [
    pytest.param(signal.SIGKILL, marks=pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")),
    signal.SIGTERM,
])
def test_a_killed_sweep_takes_its_run_with_it(tmp_path, how):
    script = tmp_path / "sleepy.py"
    script.write_text(SLEEPY_SCRIPT)
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, str(REPO / "tools" / "sweep.py"), str(script),
                              "--folds", "1", "--seeds", "0", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file = out / "fold1-seed0" / "child.pid"
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline
        assert sweep.poll() is None
        time.sleep(0.1)
    child = int(pid_file.read_text())
    try:
        assert runlock.is_locked(out / "fold1-seed0")
        sweep.send_signal(how)
        err = sweep.communicate(timeout=30)[1]
        if how == signal.SIGTERM:
            assert sweep.returncode == 128 + signal.SIGTERM
            assert err.strip() == ("terminated: the current run was stopped; rerun the same "
                                   "command to finish the sweep")
        deadline = time.monotonic() + 10
        while not is_dead(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert is_dead(child), "the sweep's run outlived the sweep"
        assert not runlock.is_locked(out / "fold1-seed0")
        assert not runlock.is_locked(out)  # the sweep's own lock died with it too
    finally:
        kill(child)


def test_a_rerun_never_starts_a_second_writer_into_a_live_run(tmp_path, fake_script, capsys,
                                                               monkeypatch):
    out = tmp_path / "sweep"
    args = [str(fake_script), "--folds", "1", "--seeds", "0", "--out", str(out), "--", "crash_fold=1"]
    assert main(args) == 1  # leaves a last checkpoint: the rerun would resume
    folder = out / "fold1-seed0"
    capsys.readouterr()
    orphan, _ = start_holder(folder)  # e.g. the run of a sweep killed where no parent-death signal exists
    try:
        assert main([*args[:-2], "--dry-run"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == (
            f"[1/1] fold 1 seed 0: busy (in use by {runlock.holder(folder).describe()})")
        monkeypatch.setattr("raug.run.sweep.BUSY_WAIT_S", 0.3)
        assert main(args[:-2]) == 1
        captured = capsys.readouterr()
        assert captured.out.splitlines() == [
            f"[1/1] fold 1 seed 0 ... busy: in use by pid {orphan.pid} on host "
            f"{runlock.holder(folder).host}, started {runlock.holder(folder).started}: "
            f"{runlock.holder(folder).command}; not started (rerun the sweep once that run has ended)"]
        assert captured.err.splitlines() == [
            "sweep: 1 runs: 0 completed now, 0 skipped (already COMPLETED), 0 failed, 1 busy "
            "(not started: another run writes there)", "  BUSY: fold 1 seed 0"]
        assert not (folder / "argv-2.json").exists()  # nothing was started
    finally:
        kill(orphan.pid)
        orphan.wait()
    assert main(args[:-2]) == 0
    assert argv_of(folder, 2)[-1] == "_resume=True"


def test_a_run_that_ends_while_the_sweep_waits_is_examined_afresh(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    folder = out / "fold1-seed0"
    orphan, _ = start_holder(folder)
    plan = plan_sweep(fake_script, [1], [0], out)
    assert plan[0].state.state is State.BUSY
    assert plan[0].command is None
    (folder / "last-checkpoint").mkdir()  # what the live run leaves when it ends
    (folder / "last-checkpoint" / "last-checkpoint.pth").write_bytes(b"last")
    threading.Timer(0.5, orphan.kill).start()
    report = run_sweep(plan, out, busy_wait_s=30)
    orphan.wait()
    assert report.exit_code == 0
    assert "resuming from last-checkpoint/last-checkpoint.pth ... COMPLETED in " in capsys.readouterr().out
    assert argv_of(folder, 1)[-1] == "_resume=True"


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    other, _ = start_holder(out)  # a sweep already running there
    try:
        assert main([str(fake_script), "--folds", "1", "--seeds", "0", "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"error: --out {out} is in use by another sweep ({runlock.holder(out).describe()}); "
            "wait for it to finish\n")
        assert not (out / "fold1-seed0").exists()
    finally:
        kill(other.pid)
        other.wait()


# ----------------------------------------------------------------------------- a real sweep


def real_sweep_command(out: Path, base: Path, folds: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "sweep.py"), "isic.py", "--folds", *folds,
            "--seeds", "0", "--out", str(out), "--grid", "_model_name=mobilenet", "--",
            "quick", f"_base_path={base}", "_device=cpu", "_img_size=32", "_epochs=1",
            "_batch_size=32"]


@pytest.fixture(scope="module")
def real_sweep(prepared_isic, tmp_path_factory):
    """isic.py (MobileNet, 32 px, 1 epoch) on fold 1 through tools/sweep.py, run twice."""
    out = tmp_path_factory.mktemp("real_sweep") / "teachers"
    cmd = real_sweep_command(out, prepared_isic, ["1"])
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    second = io.StringIO()
    with contextlib.redirect_stdout(second):  # in-process: the rerun only inspects folders
        code = main(cmd[2:])
    return {"out": out, "first": first, "second": (code, second.getvalue()), "base": prepared_isic}


def test_real_sweep_completes_and_rerun_starts_nothing(real_sweep):
    first, second = real_sweep["first"], real_sweep["second"]
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert first.stdout.startswith("[1/1] fold 1 seed 0 _model_name=mobilenet ... COMPLETED in ")
    assert second[0] == 0
    assert second[1].startswith("[1/1] fold 1 seed 0 _model_name=mobilenet ... skipped (already COMPLETED)")
    runs = [p.name for p in real_sweep["out"].glob("*/[0-9]*")]
    assert runs == ["1"]  # the second sweep created no Sacred run


def test_load_runs_on_the_real_sweep(real_sweep):
    frame = load_runs(real_sweep["out"])
    assert len(frame) == 1
    assert list(frame["status"]) == ["COMPLETED"]
    assert list(frame["_folder"]) == [1]
    assert set(frame["seed"]) == {0}
    assert set(frame["script"]) == {"isic"}
    assert set(frame["best_epoch"]) == {1.0}
    digest = split_hash(real_sweep["base"])
    assert set(frame["split_hash"]) == {digest}
    for row in frame.to_dict("records"):
        save = Path(row["_save_folder"])
        metrics = json.loads((save / "metrics.json").read_text())
        assert row["test.balanced_accuracy"] == pytest.approx(metrics["test.balanced_accuracy"])
        assert row["val.auc"] == pytest.approx(metrics["val.auc"])
        assert row["test.auc.NV"] == pytest.approx(metrics["test.auc.NV"])  # per class, metrics.json
        assert row["duration_s"] > 0
        ckpt = load_checkpoint(save / "best-checkpoint" / "best-checkpoint.pth")
        assert ckpt["config"]["_split_hash"] == digest


def grouped_csv(out: Path, capsys) -> tuple[pd.DataFrame, str]:
    assert runs_main([str(out), "--group-by", "_model_name", "--metrics", "test.balanced_accuracy",
                      "test.auc", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    return pd.read_csv(io.StringIO(captured.out)), captured.err


def test_grouped_table_of_the_real_sweep(real_sweep, capsys):
    table, notes = grouped_csv(real_sweep["out"], capsys)
    runs = load_runs(real_sweep["out"])
    assert list(table["_model_name"]) == ["mobilenet"]
    assert list(table["n"]) == [1]
    assert list(table["checkpoint"]) == ["best"]
    assert table["test.balanced_accuracy.mean"][0] == pytest.approx(runs["test.balanced_accuracy"][0])
    assert table["test.auc.sd"].isna().all()  # n = 1: no sample sd
    assert "WARNING" not in notes  # one split
    assert "checkpoint: best on the validation fold by _best_metric = loss" in notes


@pytest.mark.slow
def test_extending_the_real_sweep_by_a_fold(real_sweep, capsys):
    """Adding fold 2 to the same sweep runs only fold 2; the table then has n = 2 and an sd."""
    cmd = real_sweep_command(real_sweep["out"], real_sweep["base"], ["1", "2"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("... skipped (already COMPLETED)")
    assert lines[1].startswith("[2/2] fold 2 seed 0 _model_name=mobilenet ... COMPLETED in ")
    table, _ = grouped_csv(real_sweep["out"], capsys)
    runs = load_runs(real_sweep["out"])
    assert sorted(runs["_folder"]) == [1, 2]
    assert list(table["n"]) == [2]
    for metric in ("test.balanced_accuracy", "test.auc"):
        assert table[f"{metric}.mean"][0] == pytest.approx(runs[metric].mean())
        assert table[f"{metric}.sd"][0] == pytest.approx(runs[metric].std(ddof=1))
