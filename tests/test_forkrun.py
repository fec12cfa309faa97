"""Scripts run in forks of a preloaded process behave as ``python script.py``: the same
``__main__``, argv, working directory, ``sys.path[0]``, exit status, output and numbers."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raug.run import forkrun

pytestmark = pytest.mark.skipif(not forkrun.can_fork(), reason="forking is used on Linux only")

# Reports what the interpreter set up for it, then exits as argv[2] says.
REPORT = '''
import json, os, sys
out = sys.argv[1]
with open(out, "w") as f:
    json.dump({"name": __name__, "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
               "file": __file__}, f)
how = sys.argv[2]
if how == "code":
    sys.exit(3)
if how == "message":
    sys.exit("stopped: bad input")
if how == "raise":
    raise ValueError("boom")
json.LEAKED_FROM_CHILD = True  # must not reach the parent
print("normal end")
'''


@pytest.fixture
def report_script(tmp_path):
    """REPORT in a folder of its own, run from another folder."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "report.py"
    script.write_text(REPORT)
    (tmp_path / "work").mkdir()
    return script


@pytest.mark.parametrize(("how", "status"), [("ok", 0), ("code", 3), ("message", 1), ("raise", 1)])
def test_a_forked_script_sees_and_returns_what_a_subprocess_does(report_script, tmp_path, capfd, how, status):
    work = tmp_path / "work"
    sub = subprocess.run([sys.executable, str(report_script), str(tmp_path / "sub.json"), how],
                         cwd=work, capture_output=True, text=True)
    child = forkrun.start((sys.executable, str(report_script), str(tmp_path / "fork.json"), how), cwd=work)
    assert child.wait() == sub.returncode == status
    assert child.wait() == status  # the status stays available
    out, err = capfd.readouterr()
    sub_view = json.loads((tmp_path / "sub.json").read_text())
    fork_view = json.loads((tmp_path / "fork.json").read_text())
    assert fork_view == {"name": "__main__", "argv": [str(report_script), str(tmp_path / "fork.json"), how],
                         "cwd": str(work), "path0": str(report_script.parent), "file": str(report_script)}
    assert {**fork_view, "argv": fork_view["argv"][2:]} == {**sub_view, "argv": sub_view["argv"][2:]}
    assert out == sub.stdout
    if how == "raise":
        assert err.splitlines()[-1] == sub.stderr.splitlines()[-1] == "ValueError: boom"
    else:
        assert err == sub.stderr


def test_the_child_changes_nothing_in_the_parent(report_script, tmp_path):
    argv, cwd = list(sys.argv), Path.cwd()
    assert forkrun.start((sys.executable, str(report_script), str(tmp_path / "r.json"), "ok"),
                         cwd=tmp_path / "work").wait() == 0
    assert not hasattr(json, "LEAKED_FROM_CHILD")
    assert (sys.argv, Path.cwd()) == (argv, cwd)


# torch's threads and results in a fork of a process that imported (not used) torch:
# what main_job does. Run from a clean interpreter, as the pytest process has used torch.
TORCH_STEP = '''
import sys, torch
g = torch.Generator().manual_seed(0)
a = torch.randn(256, 256, generator=g)
print(torch.get_num_threads(), float((a @ a).double().sum()), float(torch.nn.functional.conv2d(
    torch.randn(8, 16, 32, 32, generator=g), torch.randn(32, 16, 3, 3, generator=g)).double().sum()))
'''
PARENT = '''
import sys
from raug.run import forkrun
forkrun.preload(["torch"])
sys.exit(forkrun.start((sys.executable, sys.argv[1]), cwd=".").wait())
'''


def test_torch_in_a_fork_uses_the_same_threads_and_gives_the_same_numbers(tmp_path):
    step = tmp_path / "step.py"
    step.write_text(TORCH_STEP)
    direct = subprocess.run([sys.executable, str(step)], capture_output=True, text=True, check=True)
    forked = subprocess.run([sys.executable, "-c", textwrap.dedent(PARENT), str(step)],
                            capture_output=True, text=True, check=True, timeout=120)
    assert forked.stdout == direct.stdout  # thread count and bit-identical sums
    assert int(direct.stdout.split()[0]) >= 1


def test_only_python_script_commands_are_forked(tmp_path):
    assert forkrun.is_script_command((sys.executable, "experiment/isic/isic.py", "with", "quick"))
    assert not forkrun.is_script_command(("bash", "run_preprocess.sh"))
    assert not forkrun.is_script_command((sys.executable, "-c", "print(1)"))
    assert not forkrun.is_script_command(("/other/python", "script.py"))
    with pytest.raises(ValueError, match=r"not a python script command: bash x\.sh"):
        forkrun.start(("bash", "x.sh"), cwd=tmp_path)


def test_forking_is_linux_only(monkeypatch):
    monkeypatch.setattr(forkrun.sys, "platform", "darwin")
    assert not forkrun.can_fork()
