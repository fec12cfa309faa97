"""Metadata fusion through the scripts (issue #17): keys, checks, teacher -> student runs."""

import json
import re
from pathlib import Path

import pytest
import torch

import models
from raug.errors import ConfigError
from raug.methods.metadata import fusion_spec, metadata_problems, teacher_metadata_problem
from test_kd_scripts import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"_img_size": 32, "_device": "cpu", "_num_workers": 0, "_epochs": 1}
META = {"_use_meta_data": True, "_comb_method": "metablock", "_comb_config": 11}


def _keys(**kw):
    return {"_model_name": "resnet-50", "_use_meta_data": False, "_comb_method": None,
            "_comb_config": None, "_neurons_reducer_block": 0, **kw}


@pytest.mark.parametrize(("keys", "message"), [
    ({"_use_meta_data": True}, "_use_meta_data=True needs _comb_method"),
    ({"_comb_method": "concat", "_comb_config": 11}, "_comb_method='concat' fuses metadata but "
                                                     "_use_meta_data=False"),
    ({**META, "_comb_config": [64, 11, 5]}, r"_comb_config=\[64, 11, 5\] does not fit"),
    ({**META, "_comb_config": [48, 11]}, "48 feature maps do not divide the network's 2048"),
    ({**META, "_comb_config": 81}, "gives 81 metadata features but the prepared data has 11 columns"),
    ({"_neurons_reducer_block": 1.5}, "_neurons_reducer_block=1.5 must be an int >= 0"),
    ({"_comb_config": 11}, "_comb_config=11 is set but _comb_method is None"),
])
def test_inconsistent_metadata_keys_are_refused_naming_them(keys, message):
    problems = metadata_problems(_keys(**keys), "_model_name")
    assert len(problems) == 1
    assert re.search(message, problems[0]), problems


def test_consistent_keys_pass_and_describe_the_network():
    assert metadata_problems(_keys(), "_model_name") == []
    assert metadata_problems(_keys(**META, _model_name="mobilenet"), "_model_name") == []
    spec = fusion_spec(_keys(**META, _model_name="mobilenet", _neurons_reducer_block=32),
                       "_model_name")
    assert spec == models.FusionSpec("metablock", 11, maps=40, reducer=32)


def test_a_teacher_fusing_another_metadata_width_is_refused():
    assert teacher_metadata_problem("t.pth", models.FusionSpec("concat", 81)).startswith(
        "_teacher_ckpt='t.pth' fuses 81 metadata features (concat) but the prepared data has 11")
    assert teacher_metadata_problem("t.pth", models.FusionSpec("concat", 11)) is None
    assert teacher_metadata_problem("t.pth", models.FusionSpec()) is None


def test_metadata_keys_are_checked_before_any_run_folder(prepared_isic, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match="_use_meta_data=True needs _comb_method"):
        load_script("isic").run(named_configs=["quick"], config_updates={
            **FAST, "_base_path": str(prepared_isic), "_save_folder": str(out),
            "_use_meta_data": True})
    assert not out.exists()


@pytest.fixture(scope="module")
def meta_runs(prepared_isic, tmp_path_factory):
    """A MetaBlock teacher, a fused (concat) D-KD student and an image-only SSD-KD student."""
    root = tmp_path_factory.mktemp("meta_runs")
    common = {**FAST, "_base_path": str(prepared_isic)}
    load_script("isic").run(named_configs=["quick"], config_updates={
        **common, **META, "_save_folder": str(root / "teacher"), "_batch_size": 48})
    teacher = root / "teacher" / "best-checkpoint" / "best-checkpoint.pth"
    kd = {**common, "_teacher_ckpt": str(teacher), "_lambd_drkd": 1, "_lambd_crkd": 1000}
    load_script("isic_d_kd").run(named_configs=["quick"], config_updates={
        **kd, "_kd_method": "d_kd", "_save_folder": str(root / "dkd"), "_batch_size": 24,
        "_use_meta_data": True, "_comb_method": "concat", "_comb_config": 11,
        "_neurons_reducer_block": 16})
    load_script("isic_ssd_kd").run(named_configs=["quick"], config_updates={
        **kd, "_kd_method": "ssd_kd", "_save_folder": str(root / "ssd"), "_batch_size": 12,
        "_epochs_tune": 1})
    return root


def _best(folder: Path) -> dict:
    return torch.load(folder / "best-checkpoint" / "best-checkpoint.pth", map_location="cpu",
                      weights_only=True)


def _completed(folder: Path) -> dict:
    run = json.loads((folder / "1" / "run.json").read_text())
    assert run["status"] == "COMPLETED"
    return run


def test_the_teacher_records_its_fusion_and_reloads_with_it(meta_runs):
    _completed(meta_runs / "teacher")
    ckpt = _best(meta_runs / "teacher")
    spec = models.FusionSpec("metablock", 11, maps=64)
    assert ckpt["fusion"] == spec.to_dict()
    assert models.checkpoint_fusion(ckpt, "resnet-50") == spec
    net = models.create_model("resnet-50", 8, fusion=spec)
    models.load_weights(net, ckpt)  # strict: every fusion key present, shapes right


def test_a_fused_student_distils_from_the_metadata_teacher(meta_runs):
    _completed(meta_runs / "dkd")
    config = json.loads((meta_runs / "dkd" / "1" / "config.json").read_text())
    assert (config["_use_meta_data"], config["_comb_method"]) == (True, "concat")
    ckpt = _best(meta_runs / "dkd")
    # the keys described the student; the teacher's fusion came from its checkpoint
    assert ckpt["fusion"] == models.FusionSpec("concat", 11, reducer=16).to_dict()
    assert ckpt["model_state_dict"]["classifier.weight"].shape == (8, 16 + 11)


def test_an_image_only_student_distils_from_the_metadata_teacher_with_ssd_kd(meta_runs):
    run = _completed(meta_runs / "ssd")
    ckpt = _best(meta_runs / "ssd")
    assert ckpt["fusion"] == models.FusionSpec().to_dict()
    assert not any(k.startswith("comb.") for k in ckpt["model_state_dict"])
    assert run["result"]["test.n"] > 0
    head = torch.load(meta_runs / "ssd" / "teacher-head" / "teacher-head.pth", map_location="cpu",
                      weights_only=True)
    assert head["kind"] == "ssd-kd-teacher-head"
