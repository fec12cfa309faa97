"""Sacred's inspection commands work offline on the default config (issue #18, item 2).

``_pretrained=True`` without cached ImageNet weights, no prepared data, no teacher: the
commands that only show the config never look at files, never download, and refuse only
what is wrong with the config itself.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "experiment" / "isic"


def inspect(script, command, tmp_path, *updates):
    """``python <script> <command> with _base_path=<missing> <updates>`` with an empty torch hub."""
    hub = tmp_path / "torch_home"
    hub.mkdir()
    missing = tmp_path / "no_data"
    cmd = [sys.executable, str(SCRIPTS / script), command, "with", f"_base_path={missing}", *updates]
    env = {**os.environ, "TORCH_HOME": str(hub)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list(hub.iterdir()) == []  # nothing downloaded
    assert not missing.exists()
    return proc


@pytest.mark.parametrize("script", ["isic.py", "isic_d_kd.py", "isic_ssd_kd.py"])
def test_print_config_of_the_default_config_works_offline(script, tmp_path):
    proc = inspect(script, "print_config", tmp_path)
    assert "  _pretrained = True" in proc.stdout
    assert f"  _base_path = '{tmp_path / 'no_data'}'" in proc.stdout
    if script != "isic.py":  # the default teacher does not exist here
        teacher = REPO / "results" / "isic_teacher_fold2" / "best-checkpoint" / "best-checkpoint.pth"
        assert f"  _teacher_ckpt = '{teacher}'" in proc.stdout


def test_print_named_configs_works_offline(tmp_path):
    proc = inspect("isic_ssd_kd.py", "print_named_configs", tmp_path)
    assert "Named Configurations" in proc.stdout
    assert "  quick" in proc.stdout.splitlines()


def test_save_config_takes_its_file_name_and_writes_the_config(tmp_path):
    # in-process (the subprocess tests above cover the command line): save_config's
    # parameter config_filename is a key of that command, not an unknown key
    spec = importlib.util.spec_from_file_location("script_isic_d_kd_save", SCRIPTS / "isic_d_kd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = tmp_path / "saved.json"
    module.ex.run("save_config", config_updates={"config_filename": str(target),
                                                 "_base_path": str(tmp_path / "no_data")})
    saved = json.loads(target.read_text())
    assert saved["_base_path"] == str(tmp_path / "no_data")
    assert saved["_pretrained"] is True
    assert saved["_kd_method"] == "d_kd"
