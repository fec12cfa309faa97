"""Engine config checks of issue #20: unknown keys, the seed's range, classes missing from a fold;
of issue #18: every problem in one error, quick runs' own folders.

Pure functions and :func:`raug.run.config.validate_config` on tiny prepared data; the
scripts' command lines are tried in ``test_isic_script.py`` and ``test_kd_scripts.py``.
"""

from pathlib import Path

import pandas as pd
import pytest
from sacred.config import ConfigDict, ConfigScope

from raug.data.loaders import TRAIN_CSV, fold_class_gaps
from raug.errors import ConfigError
from raug.files.paths import RESULTS_DIR
from raug.run.config import (
    QUICK_CONFIG,
    SEED_MAX,
    SHARED_CONFIG,
    closest_keys,
    quick_results_path,
    resume_mismatches,
    shared_checks,
    unknown_key_problems,
    validate_config,
)
from raug.run.experiment import declared_keys, quick_path_updates
from raug.testing import write_prepared_dataset

KNOWN = frozenset(SHARED_CONFIG) | {"_model_name"}


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("_lr", ["_lr_init"]),  # the only key it starts
        ("lr_init", ["_lr_init"]),  # leading underscores do not matter
        ("_lerning_rate", ["_lr_init"]),  # a misspelt common name of the key
        ("_batchsize", ["_batch_size"]),  # spelling
        ("_Folder", ["_folder"]),  # case
        ("_sched", ["_sched_factor", "_sched_min_lr", "_sched_patience"]),  # a few: all named
        ("_xyz", []),
        ("_", []),
    ],
)
def test_closest_keys_names_the_key_probably_meant(key, meant):
    assert closest_keys(key, KNOWN) == meant


def test_one_letter_is_nobodys_prefix():
    assert closest_keys("_T", {"_teacher_ckpt", "_tf_T", "_kd_T"}) == []
    assert closest_keys("_t", {"_T", "_lambd"}) == ["_T"]  # exact, once case is ignored


def test_unknown_keys_give_one_line_each_with_the_value_and_a_suggestion():
    config = {**SHARED_CONFIG, "_lr": -1, "_xyz": "a"}
    assert unknown_key_problems(config, KNOWN) == [
        "_lr=-1 is not a config key of this script; did you mean _lr_init?",
        "_xyz='a' is not a config key of this script; print_config lists the keys",
    ]
    assert unknown_key_problems(SHARED_CONFIG, KNOWN) == []


def test_declared_keys_gather_dicts_config_functions_and_named_configs():
    def derived(_folder):
        _derived = _folder + 1  # a Sacred config scope declares keys by assignment

    keys = declared_keys(
        [ConfigDict({"_folder": 2}), ConfigScope(derived)],
        {"preset": ConfigDict({"_only_in_preset": 1})},
    )
    assert keys == {"_folder", "_derived", "_only_in_preset"}


def test_validate_config_refuses_unknown_keys_only_when_asked(tmp_path):
    config = {**SHARED_CONFIG, "_save_folder": str(tmp_path), "_lr": -1}
    validate_config(config, check_files=False)  # programmatic callers without a key list
    with pytest.raises(ConfigError, match=r"_lr=-1 is not a config key of this script; did you mean _lr_init\?"):
        validate_config(config, check_files=False, known_keys=KNOWN)


# ----------------------------------------------------------------------------- seed


@pytest.mark.parametrize("seed", [2**40, SEED_MAX + 1, -1])
def test_seed_outside_numpys_range_is_refused(tmp_path, seed):
    config = {**SHARED_CONFIG, "_save_folder": str(tmp_path), "seed": seed}
    assert shared_checks(config) == [f"seed={seed} is invalid: expected an integer in [0, 4294967295]"]


def test_seed_range_limits_are_accepted(tmp_path):
    for seed in (0, SEED_MAX):
        assert shared_checks({**SHARED_CONFIG, "_save_folder": str(tmp_path), "seed": seed}) == []


# ----------------------------------------------------------------------------- classes per fold


def drop_rows(base: Path, diagnostic: str, in_val: bool, folder: int = 2) -> None:
    """Remove every image of ``diagnostic`` from fold ``folder`` (``in_val``) or from the others."""
    csv = base / TRAIN_CSV
    frame = pd.read_csv(csv, dtype={"image": str})
    hit = (frame["diagnostic"] == diagnostic) & ((frame["folder"] == folder) == in_val)
    frame[~hit].to_csv(csv, index=False)


@pytest.fixture
def data_config(tmp_path):
    """A valid config on 40 tiny prepared images (every class in every fold)."""
    base = write_prepared_dataset(tmp_path / "data", n_train=40, n_test=8, size=36)
    return {**SHARED_CONFIG, "_base_path": str(base), "_save_folder": str(tmp_path / "out"),
            "_device": "cpu"}


def test_fold_class_gaps():
    frame = pd.DataFrame({"folder": [1, 1, 2, 2], "diagnostic": ["AK", "NV", "NV", "MEL"]})
    no_train, no_val = fold_class_gaps(frame, 2)
    assert no_train == ["BCC", "BKL", "DF", "MEL", "SCC", "VASC"]
    assert no_val == ["AK", "BCC", "BKL", "DF", "SCC", "VASC"]


def test_class_without_training_images_is_refused_in_one_line(data_config):
    drop_rows(Path(data_config["_base_path"]), "DF", in_val=False)
    with pytest.raises(ConfigError) as info:
        validate_config(data_config)
    problem = str(info.value).splitlines()[1].strip()
    assert problem.startswith("_folder=2: the training folds [1, 3, 4, 5] of ")
    assert "hold no image of class(es) ['DF'], so their frequency class weights are undefined" in problem
    assert problem.endswith("or set _use_wce=False")
    assert len(str(info.value).splitlines()) == 2


def test_class_without_training_images_only_warns_without_class_weights(data_config):
    drop_rows(Path(data_config["_base_path"]), "DF", in_val=False)
    warnings = []
    validate_config({**data_config, "_use_wce": False}, warn=warnings.append)
    assert len(warnings) == 1
    assert "hold no image of class(es) ['DF']: the network never sees them in training" in warnings[0]


def test_class_missing_from_the_validation_fold_warns(data_config):
    drop_rows(Path(data_config["_base_path"]), "VASC", in_val=True)
    warnings = []
    validate_config(data_config, warn=warnings.append)
    assert len(warnings) == 1
    assert warnings[0].startswith("_folder=2: validation fold 2 of ")
    assert "holds no image of class(es) ['VASC']" in warnings[0]
    validate_config(data_config)  # without a receiver the warning is dropped, nothing raised


def test_complete_folds_neither_refuse_nor_warn(data_config):
    warnings = []
    validate_config(data_config, warn=warnings.append)
    assert warnings == []


# ----------------------------------------------------------------------------- resume


def test_runs_started_before_allow_split_mismatch_existed_still_resume():
    saved = {**SHARED_CONFIG, "_teacher_ckpt": "t.pth"}
    assert resume_mismatches(saved, {**saved, "_allow_split_mismatch": False}) == []


def test_runs_started_before_quick_existed_still_resume():
    saved = dict(SHARED_CONFIG)
    del saved["_quick"]
    assert resume_mismatches(saved, SHARED_CONFIG) == []


# ----------------------------------------------------------------------------- issue #18: one error, quick folders


def test_validation_lists_key_data_and_file_problems_in_one_error(tmp_path):
    config = {**SHARED_CONFIG, "_base_path": str(tmp_path / "none"),
              "_save_folder": str(tmp_path / "out"), "_img_size": 100}
    seen = []

    def teacher_file(cfg, warn):
        seen.append(cfg["_img_size"])
        return ["_teacher_ckpt='t.pth' does not exist"]

    with pytest.raises(ConfigError) as caught:
        validate_config(config, file_checks=[teacher_file], notes=lambda cfg: ["weights to fetch"])
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert lines[1].startswith("  _img_size=100 is invalid")
    assert lines[2] == (f"  _base_path={str(tmp_path / 'none')!r}: {tmp_path / 'none' / TRAIN_CSV} "
                        "not found (prepare the data with run_preprocess.sh or pass "
                        "_base_path=<prepared folder>)")
    assert lines[4:] == ["  _teacher_ckpt='t.pth' does not exist", "  weights to fetch"]
    assert seen == [100]  # the file check ran although the keys had a problem


def test_file_checks_and_notes_stay_silent_without_files_or_problems(data_config):
    never = []
    validate_config(data_config, check_files=False, file_checks=[lambda cfg, warn: never.append(1)])
    assert never == []  # inspection commands: no file check at all
    with pytest.raises(ConfigError) as caught:
        validate_config({**data_config, "_epochs": 0}, check_files=False,
                        notes=lambda cfg: ["weights to fetch"])
    assert "weights to fetch" not in str(caught.value)
    validate_config(data_config, file_checks=[lambda cfg, warn: []], notes=lambda cfg: ["unused"])


def test_quick_runs_keep_their_default_paths_under_results_quick(tmp_path):
    assert QUICK_CONFIG["_quick"] is True
    assert SHARED_CONFIG["_quick"] is False
    teacher = RESULTS_DIR / "isic_teacher_fold2" / "best-checkpoint" / "best-checkpoint.pth"
    assert quick_results_path(teacher) == (
        RESULTS_DIR / "quick" / "isic_teacher_fold2" / "best-checkpoint" / "best-checkpoint.pth")
    assert quick_results_path(RESULTS_DIR / "quick" / "x") == RESULTS_DIR / "quick" / "x"
    assert quick_results_path(tmp_path / "results" / "x") == tmp_path / "results" / "x"
    config = {"_quick": True, "_save_folder": str(RESULTS_DIR / "a_fold2"), "_base_path": "/d",
              "_teacher_head": None}
    keys = ["_save_folder", "_base_path", "_teacher_head"]
    assert quick_path_updates(config, keys) == {"_save_folder": str(RESULTS_DIR / "quick" / "a_fold2")}
    assert quick_path_updates({**config, "_quick": False}, keys) == {}
