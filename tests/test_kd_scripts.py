"""isic_d_kd.py / isic_ssd_kd.py end to end (the seed's command lines) and their config validation."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import models
from raug.data.loaders import CLASS_NAMES
from raug.errors import ConfigError
from raug.files.checkpoint import is_project_checkpoint, load_checkpoint, save_checkpoint
from raug.isic2019 import split_hash
from raug.methods import kd_config
from raug.methods.kd_config import (
    DKD_CONFIG,
    KD_SHARED_CONFIG,
    SSDKD_CONFIG,
    dkd_checks,
    ssdkd_checks,
    teacher_checks,
)
from raug.methods.teacher import (
    default_teacher_ckpt,
    inspect_teacher,
    load_teacher,
    recorded_split_hash,
)
from raug.run.config import SHARED_CONFIG
from raug.run.experiment import declared_keys
from raug.train.metrics import balanced_accuracy

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "experiment" / "isic"
FAST = ["_img_size=32", "_device=cpu", "_num_workers=0"]
SEED_DKD = ['_kd_method="d_kd"', "_lambd_drkd=1", "_lambd_crkd=1000"]
SEED_SSD = ['_kd_method="ssd_kd"', "_lambd_drkd=1", "_lambd_crkd=1000"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_script(name, *args):
    """``python <name>.py with quick <args>`` as a user types it, from experiment/isic."""
    cmd = [sys.executable, f"{name}.py", "with", "quick", *args]
    # One OpenMP thread: on shared cores, more threads spin-wait on each other (5x slower).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=SCRIPTS, env=env, capture_output=True, text=True, timeout=900)


def load_script(name):
    """Import a script's module (its ``ex``) without running it."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ex


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(prepared_isic, tmp_path_factory):
    """A quick teacher by isic.py, then one D-KD and one SSD-KD student from it."""
    root = tmp_path_factory.mktemp("kd_runs")
    base = Path(prepared_isic)
    common = [f"_base_path={base}", *FAST]
    load_script("isic").run(named_configs=["quick"], config_updates={
        "_base_path": str(base), "_img_size": 32, "_device": "cpu", "_num_workers": 0,
        "_save_folder": str(root / "teacher"), "_epochs": 1, "_batch_size": 48})
    teacher = root / "teacher" / "best-checkpoint" / "best-checkpoint.pth"
    with_teacher = [*common, f"_teacher_ckpt={teacher}"]
    dkd = ok(run_script("isic_d_kd", *SEED_DKD, *with_teacher, f"_save_folder={root / 'dkd'}",
                        "_batch_size=24"))
    ssd = ok(run_script("isic_ssd_kd", *SEED_SSD, *with_teacher, f"_save_folder={root / 'ssd'}",
                        "_epochs=1", "_epochs_tune=2", "_batch_size=12"))
    return {"root": root, "base": base, "teacher": teacher, "dkd": root / "dkd",
            "ssd": root / "ssd", "procs": {"dkd": dkd, "ssd": ssd}}


def check_run(folder, name, epochs, train_parts):
    """The Sacred run completed and logged every part per epoch; returns (run, metrics)."""
    run_dir = folder / "1"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["experiment"]["name"] == name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = list(range(1, epochs + 1))
    for part in ("loss", "accuracy", "balanced_accuracy", *train_parts):
        assert metrics[f"train.{part}"]["steps"] == steps, part
        assert np.all(np.isfinite(metrics[f"train.{part}"]["values"])), part
    for key in ("val.loss", "val.balanced_accuracy", "val.auc", "lr"):
        assert metrics[key]["steps"] == steps, key
    for key in ("test.accuracy", "test.balanced_accuracy", "test.auc"):
        assert metrics[key]["values"] == [pytest.approx(run["result"][key])]
    final = json.loads((folder / "metrics.json").read_text())
    assert final["test.balanced_accuracy"] == pytest.approx(run["result"]["test.balanced_accuracy"])
    assert (folder / "COMPLETED").is_file()
    assert (folder / "history.png").read_bytes().startswith(b"\x89PNG")
    return run, metrics


def check_student_checkpoints(folder, extras):
    """Best and last checkpoints: weights_only, student in model_state_dict, helpers in extras."""
    for rel in ("best-checkpoint/best-checkpoint.pth", "last-checkpoint/last-checkpoint.pth"):
        raw = torch.load(folder / rel, map_location="cpu", weights_only=True)
        assert is_project_checkpoint(raw)
        assert raw["model_name"] == "mobilenet"
        assert raw["class_names"] == list(CLASS_NAMES)
        assert raw["img_size"] == 32
        assert set(raw["extra_state_dicts"]) == set(extras)
        models.load_weights(models.create_model("mobilenet", 8), raw)
        adapter = models.ConvReg((1280, 1, 1), (2048, 1, 1))
        adapter.load_state_dict(raw["extra_state_dicts"]["adapter"])
        if "proj_head" in extras:
            models.ProjectionHead(1280).load_state_dict(raw["extra_state_dicts"]["proj_head"])


def check_predictions(folder, run):
    frame = pd.read_csv(folder / "test_pred" / "predictions.csv")
    assert list(frame.columns) == ["image", "REAL", "PRED", *CLASS_NAMES]
    probs = frame[list(CLASS_NAMES)].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    index = {c: i for i, c in enumerate(CLASS_NAMES)}
    bacc = balanced_accuracy(frame["REAL"].map(index), frame["PRED"].map(index))
    assert bacc == pytest.approx(run["result"]["test.balanced_accuracy"])


def test_dkd_seed_command_runs_and_writes_isic_py_outputs(runs):
    folder = runs["dkd"]
    run, _ = check_run(folder, "isic_d_kd", 2,
                       ("ce", "kd", "rkd_distance", "rkd_angle", "channel_relation"))
    config = json.loads((folder / "1" / "config.json").read_text())
    assert (config["_kd_method"], config["_lambd_drkd"], config["_lambd_crkd"]) == ("d_kd", 1, 1000)
    assert config["_teacher_ckpt"] == str(runs["teacher"])
    check_student_checkpoints(folder, {"adapter"})
    check_predictions(folder, run)
    assert "loaded and frozen" in (folder / "1" / "cout.txt").read_text()


def test_ssd_seed_command_runs_both_phases_and_writes_isic_py_outputs(runs):
    folder = runs["ssd"]
    run, metrics = check_run(folder, "isic_ssd_kd", 1,
                             ("ce", "kd", "tf", "ss", "hr", "n_tf", "n_ss", "rkd_distance",
                              "rkd_angle", "channel_relation"))
    for key in ("phase1.train.loss", "phase1.train.ss_acc", "phase1.val.loss", "phase1.val.ss_acc",
                "phase1.lr"):
        assert metrics[key]["steps"] == [1, 2], key
    assert metrics["phase1.reused"]["values"] == [0.0]
    check_student_checkpoints(folder, {"adapter", "proj_head"})
    check_predictions(folder, run)

    head = load_checkpoint(folder / "teacher-head" / "teacher-head.pth")
    assert head["kind"] == "ssd-kd-teacher-head"
    assert head["teacher"]["path"] == str(runs["teacher"])
    assert head["teacher"]["sha256"] == hashlib.sha256(runs["teacher"].read_bytes()).hexdigest()
    assert head["fit"]["_epochs_tune"] == 2
    assert head["best_value"] == pytest.approx(min(metrics["phase1.val.loss"]["values"]))
    models.ProjectionHead(2048).load_state_dict(head["model_state_dict"])
    assert "fitting the teacher's projection head" in (folder / "1" / "cout.txt").read_text()


@pytest.mark.slow  # ~15-25 s on shared cores; test_ssdkd.py covers reuse at the function level
def test_a_second_ssd_run_reuses_the_saved_teacher_head(runs):
    head = runs["ssd"] / "teacher-head" / "teacher-head.pth"
    before = (head.read_bytes(), head.stat().st_mtime_ns)
    ok(run_script("isic_ssd_kd", f"_base_path={runs['base']}", *FAST,
                  f"_teacher_ckpt={runs['teacher']}", f"_save_folder={runs['root'] / 'ssd2'}",
                  f"_teacher_head={head}", "_epochs=1", "_epochs_tune=2", "_batch_size=12"))
    assert (head.read_bytes(), head.stat().st_mtime_ns) == before
    cout = (runs["root"] / "ssd2" / "1" / "cout.txt").read_text()
    assert "teacher head reused" in cout
    assert "fitting" not in cout


def test_default_teacher_is_where_isic_py_writes_its_best_checkpoint():
    run = load_script("isic").run("print_config", config_updates={"_pretrained": False, "_folder": 3})
    expected = Path(run.config["_save_folder"]) / "best-checkpoint" / "best-checkpoint.pth"
    assert default_teacher_ckpt(3) == str(expected)
    # print_config works before the teacher exists (the file is checked for the main command)
    assert not expected.exists()
    for script, method in (("isic_d_kd", "d_kd"), ("isic_ssd_kd", "ssd_kd")):
        kd = load_script(script).run("print_config", config_updates={"_pretrained": False, "_folder": 3})
        assert kd.config["_teacher_ckpt"] == str(expected)
        assert kd.config["_save_folder"] == str(REPO / "results" / f"student_{method}_fold3")


# ----------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def teacher_files(runs):
    """The quick teacher, a student checkpoint (wrong architecture) and broken files."""
    folder = runs["root"] / "bad_teachers"
    folder.mkdir(exist_ok=True)
    corrupt = folder / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    net = models.create_model("mobilenet", 8)
    permuted = save_checkpoint(folder / "permuted.pth", {
        "model_name": "mobilenet", "num_classes": 8, "class_names": list(reversed(CLASS_NAMES)),
        "model_state_dict": net.state_dict()})
    return {"good": str(runs["teacher"]), "student": str(runs["dkd"] / "best-checkpoint" / "best-checkpoint.pth"),
            "corrupt": str(corrupt), "permuted": str(permuted), "missing": str(folder / "none.pth")}


def dkd_config(teacher, **kw):
    return {**SHARED_CONFIG, **KD_SHARED_CONFIG, **DKD_CONFIG, "_pretrained": False,
            "_save_folder": "/tmp/unused", "_teacher_ckpt": teacher, **kw}


def ssd_config(teacher, **kw):
    return {**dkd_config(teacher), **SSDKD_CONFIG, **kw}


DKD_BAD = [
    ({"_kd_method": "dkd"}, "_kd_method='dkd' is invalid: allowed ['none', 'blkd', 'rkd', 'crkd', 'd_kd', 'fitnet']"),
    ({"_model_name_student": "vgg"}, "_model_name_student='vgg' is invalid: unknown model name"),
    ({"_model_name_teacher": "resnet-18"}, "_model_name_teacher='resnet-18' is invalid"),
    ({"_lambd_crkd": -1.0}, "_lambd_crkd=-1.0 is invalid: expected a number >= 0"),
    ({"_lambd_drkd": "1"}, "_lambd_drkd='1' is invalid: expected a number >= 0"),
    ({"_lambd": 1.5}, "_lambd=1.5 is invalid: expected a number in [0, 1]"),
    ({"_lambd_drkd": float("inf")}, "_lambd_drkd=inf is invalid: expected a number >= 0"),
    ({"_T": 0}, "_T=0 is invalid: expected a number > 0"),
    ({"_lambd_fitnet": -0.1}, "_lambd_fitnet=-0.1 is invalid: expected a number >= 0"),
    ({"_batch_size": 2}, "_batch_size=2 is invalid for _kd_method='d_kd': the RKD angle needs >= 3"),
    ({"_layer_s": "layer3"}, "_layer_s='layer3' is invalid: only 'feats_7x7'"),
]


@pytest.mark.parametrize(("override", "message"), DKD_BAD)
def test_dkd_config_errors_name_the_key_and_the_allowed_values(teacher_files, override, message):
    problems = dkd_checks(dkd_config(teacher_files["good"], **override))
    assert len(problems) == 1, problems
    assert problems[0].startswith(message)
    assert "\n" not in problems[0]


SSD_BAD = [
    ({"_kd_method": "d_kd"}, "_kd_method='d_kd' is invalid for isic_ssd_kd.py: allowed ['ssd_kd']"),
    ({"_ss_T": -0.5}, "_ss_T=-0.5 is invalid: expected a number > 0"),
    ({"_kd_T": 0.0}, "_kd_T=0.0 is invalid: expected a number > 0"),
    ({"_ratio_tf": 1.5}, "_ratio_tf=1.5 is invalid: expected a number in [0, 1]"),
    ({"_hr_w": -1}, "_hr_w=-1 is invalid: expected a number >= 0"),
    ({"_epochs_tune": 0}, "_epochs_tune=0 is invalid: expected an integer >= 1"),
    ({"_teacher_head": 3}, "_teacher_head=3 is invalid"),
]


@pytest.mark.parametrize(("override", "message"), SSD_BAD)
def test_ssd_config_errors_name_the_key_and_the_allowed_values(teacher_files, override, message):
    problems = ssdkd_checks(ssd_config(teacher_files["good"], **override))
    assert len(problems) == 1, problems
    assert problems[0].startswith(message)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing", "does not exist: train the teacher first"),
        ("corrupt", "cannot be read: checkpoint"),
        ("student", "is a 'mobilenet' checkpoint but _model_name_teacher='resnet-50'"),
    ],
)
def test_teacher_file_errors(teacher_files, which, message):
    assert dkd_checks(dkd_config(teacher_files[which])) == []  # keys alone are fine
    for problems in (teacher_checks(dkd_config(teacher_files[which])),
                     teacher_checks(ssd_config(teacher_files[which]))):
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"_teacher_ckpt={teacher_files[which]!r}")
        assert message in problems[0]


def test_teacher_with_another_class_set_is_refused(teacher_files):
    problems = teacher_checks(dkd_config(teacher_files["permuted"], _model_name_teacher="mobilenet"))
    assert len(problems) == 1
    assert f"trained on classes {list(reversed(CLASS_NAMES))}" in problems[0]


def test_seed_format_resnet_teacher_passes_the_checks_and_loads(runs, teacher_files):
    project = load_checkpoint(runs["teacher"])
    seed_file = runs["root"] / "bad_teachers" / "seed_format.pth"
    torch.save({"epoch": 3, "model_state_dict": project["model_state_dict"]}, seed_file)
    assert teacher_checks(dkd_config(str(seed_file))) == []
    teacher = load_teacher(seed_file, "resnet-50", CLASS_NAMES, folder=2)
    assert teacher.summary.kind == "seed"
    for key, value in project["model_state_dict"].items():
        assert torch.equal(teacher.model.state_dict()[key], value), key


def test_valid_configs_pass_and_method_none_needs_no_teacher(teacher_files):
    for config in (dkd_config(teacher_files["good"]), ssd_config(teacher_files["good"])):
        assert teacher_checks(config) == []
    assert dkd_checks(dkd_config(teacher_files["good"])) == []
    assert ssdkd_checks(ssd_config(teacher_files["good"])) == []
    none = dkd_config(teacher_files["missing"], _kd_method="none", _batch_size=2)
    assert dkd_checks(none) == []
    assert teacher_checks(none) == []
    # the RKD angle's batch rule only applies when RKD is active
    assert dkd_checks(dkd_config(teacher_files["good"], _kd_method="crkd", _batch_size=2)) == []
    # SSD-KD's ">= 2 images" is the engine's shared _batch_size rule (next test)
    assert ssdkd_checks(ssd_config(teacher_files["good"], _batch_size=1)) == []


def test_ssd_batch_of_one_image_is_refused_by_the_shared_check(runs, teacher_files):
    ex = load_script("isic_ssd_kd")
    with pytest.raises(ConfigError, match=r"_batch_size=1 is invalid: expected an integer >= 2"):
        ex.run(named_configs=["quick"], config_updates={
            "_base_path": str(runs["base"]), "_teacher_ckpt": teacher_files["good"],
            "_batch_size": 1, "_save_folder": str(runs["root"] / "never")})
    assert not (runs["root"] / "never").exists()


@pytest.mark.parametrize(("script", "which", "message"), [
    ("isic_d_kd", "student", "is a 'mobilenet' checkpoint"),
    ("isic_ssd_kd", "missing", "does not exist: train the teacher first"),
])
def test_bad_teacher_fails_before_any_run_folder(runs, teacher_files, script, which, message):
    out = runs["root"] / f"never_{script}"
    with pytest.raises(ConfigError, match=message):
        load_script(script).run(named_configs=["quick"], config_updates={
            "_base_path": str(runs["base"]), "_teacher_ckpt": teacher_files[which],
            "_save_folder": str(out)})
    assert not out.exists()


def test_cli_error_is_one_line_per_problem_and_leaves_no_folder(runs, tmp_path):
    out = tmp_path / "never"
    proc = run_script("isic_d_kd", "_kd_method=dkd", "_T=-1", f"_base_path={runs['base']}",
                      f"_save_folder={out}", f"_teacher_ckpt={runs['teacher']}")
    assert proc.returncode != 0
    assert "_kd_method='dkd' is invalid: allowed ['none', 'blkd', 'rkd', 'crkd', 'd_kd', 'fitnet']" in proc.stderr
    assert "_T=-1 is invalid: expected a number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- issue #20: leakage, damaged teachers, keys

OTHER_HASH = "f" * 64


def tiny_teacher(path, *, outputs=8, recorded_hash=None, seed_format=False, quick=None):
    """A ResNet-50 teacher file as the checks see it: its description and classifier, no backbone."""
    state = {"features.4.0.conv1.weight": torch.zeros(1),  # the key that marks the ResNet-50 layout
             "classifier.weight": torch.zeros(outputs, 2048), "classifier.bias": torch.zeros(outputs)}
    if seed_format:
        torch.save({"epoch": 1, "model_state_dict": state}, path)
        return str(path)
    config = {"_folder": 2} if recorded_hash is None else {"_folder": 2, "_split_hash": recorded_hash}
    if quick is not None:
        config["_quick"] = quick
    return str(save_checkpoint(path, {
        "model_name": "resnet-50", "num_classes": 8, "class_names": list(CLASS_NAMES), "img_size": 32,
        "config": config, "model_state_dict": state}))


@pytest.fixture(scope="module")
def tiny_teachers(prepared_isic, tmp_path_factory):
    """Teacher files (no backbone: they pass or fail the checks, never load) for ``prepared_isic``."""
    folder = tmp_path_factory.mktemp("tiny_teachers")
    data_hash = split_hash(prepared_isic)
    return {
        "base": str(prepared_isic), "data_hash": data_hash, "root": folder,
        "same": tiny_teacher(folder / "same.pth", recorded_hash=data_hash),
        "other": tiny_teacher(folder / "other.pth", recorded_hash=OTHER_HASH),
        "five": tiny_teacher(folder / "five.pth", outputs=5, recorded_hash=data_hash),
        "seed": tiny_teacher(folder / "seed.pth", seed_format=True),
        "quick": tiny_teacher(folder / "quick.pth", recorded_hash=data_hash, quick=True),
    }


def on_data(teachers, which, make=dkd_config, **kw):
    """A KD config on the tiny teachers' data with teacher ``which``."""
    return make(teachers[which], _base_path=teachers["base"], **kw)


@pytest.mark.parametrize("make", [dkd_config, ssd_config])
def test_teacher_from_another_preparation_is_refused_naming_both_hashes(tiny_teachers, make):
    warnings = []
    problems = teacher_checks(on_data(tiny_teachers, "other", make), warn=warnings.append)
    assert problems == [
        f"_teacher_ckpt={tiny_teachers['other']!r} was trained on a different preparation "
        f"(split_hash ffffffffffff… vs the data's {tiny_teachers['data_hash'][:12]}…): its training "
        "images may include this run's test images. Use a teacher trained on this data, or set "
        "_allow_split_mismatch=True if you mean it"
    ]
    assert warnings == []


def test_allow_split_mismatch_turns_the_refusal_into_a_warning(tiny_teachers):
    warnings = []
    config = on_data(tiny_teachers, "other", _allow_split_mismatch=True)
    assert teacher_checks(config, warn=warnings.append) == []
    assert len(warnings) == 1
    assert warnings[0].startswith(f"_allow_split_mismatch=True: the teacher {tiny_teachers['other']} ")
    assert warnings[0].endswith("the test metrics may be optimistic")
    assert dkd_checks(on_data(tiny_teachers, "other", _allow_split_mismatch="yes")) == [
        "_allow_split_mismatch='yes' is invalid: expected True or False"]


def test_teacher_of_this_preparation_passes_without_a_word(tiny_teachers):
    warnings = []
    assert teacher_checks(on_data(tiny_teachers, "same"), warn=warnings.append) == []
    assert warnings == []
    # the student alone loads no teacher: nothing to compare
    assert teacher_checks(on_data(tiny_teachers, "other", _kd_method="none")) == []


def test_teacher_without_a_recorded_split_hash_only_warns(tiny_teachers):
    warnings = []
    assert teacher_checks(on_data(tiny_teachers, "seed"), warn=warnings.append) == []
    assert len(warnings) == 1
    assert f"the teacher {tiny_teachers['seed']} records no split_hash" in warnings[0]


def test_recorded_split_hash_prefers_the_hash_of_the_csvs_the_run_read():
    both = {"config": {"_split_hash": "csv"}, "data_preparation": {"split_hash": "prep"}}
    assert recorded_split_hash(both) == "csv"
    assert recorded_split_hash({"data_preparation": {"split_hash": "prep"}}) == "prep"
    assert recorded_split_hash({"config": {}, "data_preparation": None}) is None


def test_teacher_whose_weights_contradict_its_classes_is_refused(tiny_teachers):
    summary = inspect_teacher(tiny_teachers["five"])
    assert (summary.num_classes, summary.head_outputs) == (8, 5)
    problems = teacher_checks(on_data(tiny_teachers, "five"))
    assert problems == [
        f"_teacher_ckpt={tiny_teachers['five']!r} records num_classes=8 and 8 class_names but its "
        "classifier weights have 5 outputs: the file is damaged or mislabelled"
    ]


@pytest.mark.parametrize(("script", "which", "updates", "message"), [
    ("isic_d_kd", "other", {}, "was trained on a different preparation"),
    ("isic_ssd_kd", "other", {}, "was trained on a different preparation"),
    ("isic_d_kd", "five", {}, "classifier weights have 5 outputs"),
    ("isic_d_kd", "same", {"_lerning_rate": 0.5}, r"_lerning_rate=0.5 is not a config key of this script; did you mean _lr_init\?"),
    ("isic_ssd_kd", "same", {"_lambd": 0.5}, "_lambd=0.5 is not a config key of this script"),
])
def test_issue_20_refusals_come_before_any_run_folder(tiny_teachers, script, which, updates, message):
    out = tiny_teachers["root"] / f"never_{script}_{which}"
    with pytest.raises(ConfigError, match=message):
        load_script(script).run(named_configs=["quick"], config_updates={
            "_base_path": tiny_teachers["base"], "_teacher_ckpt": tiny_teachers[which],
            "_save_folder": str(out), "_img_size": 32, "_epochs": 1, **updates})
    assert not out.exists()


def test_leaking_teacher_on_the_command_line_stops_in_one_line(tiny_teachers):
    out = tiny_teachers["root"] / "never_cli"
    proc = run_script("isic_d_kd", f"_base_path={tiny_teachers['base']}", *FAST, "_epochs=1",
                      f"_teacher_ckpt={tiny_teachers['other']}", f"_save_folder={out}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "different preparation" in line]
    assert len(lines) == 1
    assert "_allow_split_mismatch=True" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(("script", "method"), [("isic_d_kd", DKD_CONFIG), ("isic_ssd_kd", SSDKD_CONFIG)])
def test_every_declared_key_is_accepted(script, method):
    ex = load_script(script)
    keys = declared_keys(ex.configurations, ex.named_configs)
    # (__doc__: a config function's docstring, which Sacred lets a command line set)
    assert keys == {*SHARED_CONFIG, *KD_SHARED_CONFIG, *method, "_teacher_ckpt", "__doc__"}
    assert "_allow_split_mismatch" in keys
    # keys set by the kd_paths function and Sacred's seed pass like any other
    run = ex.run("print_config", config_updates={"_teacher_ckpt": "t.pth", "_save_folder": "s",
                                                 "seed": 7, "_allow_split_mismatch": True})
    assert run.config["_allow_split_mismatch"] is True


# ----------------------------------------------------------------------------- issue #18: smoke runs apart, one error


def test_quick_runs_default_to_their_own_folders_and_teacher():
    quick = REPO / "results" / "quick"
    teacher = load_script("isic").run("print_config", named_configs=["quick"])
    assert teacher.config["_quick"] is True
    assert teacher.config["_save_folder"] == str(quick / "isic_teacher_fold2")
    kd = load_script("isic_d_kd").run("print_config", named_configs=["quick"], config_updates={"_folder": 3})
    assert kd.config["_save_folder"] == str(quick / "student_d_kd_fold3")
    assert kd.config["_teacher_ckpt"] == str(quick / "isic_teacher_fold3" / "best-checkpoint" / "best-checkpoint.pth")
    # values the user gives are kept as given
    given = load_script("isic_ssd_kd").run("print_config", named_configs=["quick"], config_updates={
        "_save_folder": "results/mine", "_teacher_ckpt": "results/t.pth"})
    assert given.config["_save_folder"] == str(REPO / "results" / "mine")
    assert given.config["_teacher_ckpt"] == str(REPO / "results" / "t.pth")
    real = load_script("isic_d_kd").run("print_config")
    assert (real.config["_quick"], real.config["_save_folder"]) == (False, str(REPO / "results" / "student_d_kd_fold2"))


def test_default_teacher_from_a_quick_run_or_another_size_is_refused_unless_named(tiny_teachers):
    quick = tiny_teachers["quick"]
    real_run = on_data(tiny_teachers, "quick", _img_size=32)
    assert inspect_teacher(quick).quick is True
    assert teacher_checks(real_run, named=False) == [
        f"_teacher_ckpt={quick!r} (the default teacher) was trained by a quick smoke run: train the "
        f"teacher (python experiment/isic/isic.py with _folder=2) or name it with _teacher_ckpt={quick} "
        "to use it anyway"]
    assert teacher_checks(real_run, named=True) == []
    assert teacher_checks({**real_run, "_quick": True}, named=False) == []  # a quick run's own teacher
    same = tiny_teachers["same"]
    assert inspect_teacher(same).quick is None  # recorded before _quick existed: not a quick run
    assert teacher_checks(on_data(tiny_teachers, "same", _img_size=224), named=False) == [
        f"_teacher_ckpt={same!r} (the default teacher) was trained at 32 px but this run uses "
        f"_img_size=224: set _img_size=32, train a teacher at 224 px, or name it with "
        f"_teacher_ckpt={same} to use it anyway"]
    assert teacher_checks(on_data(tiny_teachers, "same", _img_size=224), named=True) == []


def test_the_default_teacher_lookup_refuses_a_quick_teacher_before_any_run_folder(tiny_teachers, monkeypatch):
    monkeypatch.setattr(kd_config, "default_teacher_ckpt", lambda folder: tiny_teachers["quick"])
    out = tiny_teachers["root"] / "never_default_quick"
    updates = {"_base_path": tiny_teachers["base"], "_save_folder": str(out), "_img_size": 32,
               "_pretrained": False, "_device": "cpu", "_epochs": 0}  # _epochs=0: stop at the checks
    with pytest.raises(ConfigError) as by_default:
        load_script("isic_d_kd").run(config_updates=updates)
    assert "(the default teacher) was trained by a quick smoke run" in str(by_default.value)
    assert "_epochs=0 is invalid" in str(by_default.value)
    with pytest.raises(ConfigError) as named:
        load_script("isic_d_kd").run(config_updates={**updates, "_teacher_ckpt": tiny_teachers["quick"]})
    assert "_epochs=0 is invalid" in str(named.value)
    assert "smoke run" not in str(named.value)
    assert not out.exists()


def test_bad_data_path_missing_teacher_and_missing_weights_are_reported_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    out, data, teacher = tmp_path / "never", tmp_path / "no_data", tmp_path / "no_teacher.pth"
    with pytest.raises(ConfigError) as caught:
        load_script("isic_ssd_kd").run(config_updates={
            "_base_path": str(data), "_teacher_ckpt": str(teacher), "_save_folder": str(out),
            "_device": "cpu", "_lr": 0.1})
    weights = tmp_path / "empty_hub" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert str(caught.value).splitlines() == [
        "invalid configuration:",
        "  _lr=0.1 is not a config key of this script; did you mean _lr_init?",
        f"  _base_path={str(data)!r}: {data / 'train' / 'ISIC2019_parsed_train.csv'} not found (prepare "
        "the data with run_preprocess.sh or pass _base_path=<prepared folder>)",
        f"  _base_path={str(data)!r}: {data / 'test' / 'ISIC2019_parsed_test.csv'} not found (prepare "
        "the data with run_preprocess.sh or pass _base_path=<prepared folder>)",
        f"  _teacher_ckpt={str(teacher)!r} does not exist: train the teacher first (python "
        "experiment/isic/isic.py with _folder=<fold>) or pass _teacher_ckpt=<teacher checkpoint>",
        f"  _pretrained=True: the ImageNet weights of _model_name_student='mobilenet' are not in the "
        f"torch hub cache ({weights}); a valid run downloads them from "
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth (offline: copy the file "
        "there or set _pretrained=False)",
    ]
    assert not out.exists()
    assert not weights.exists()
