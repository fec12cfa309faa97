"""Ctrl-C of the main job: the running step may finish its own cleanup, one line, no traceback."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A step that needs a second to stop after SIGINT (as a training run saving its record does).
STEP = '''
import pathlib, signal, sys, time
def stop(signum, frame):
    time.sleep(1.0)  # longer than subprocess.run's 0.25 s grace before it kills the child
    pathlib.Path(sys.argv[2]).write_text("stopped cleanly")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
pathlib.Path(sys.argv[1]).write_text("")
time.sleep(60)
'''

# The main job with its plan replaced by that one step.
JOB = '''
import importlib.util, sys
spec = importlib.util.spec_from_file_location("main_job", sys.argv[1])
main_job = importlib.util.module_from_spec(spec)
sys.modules["main_job"] = main_job
spec.loader.exec_module(main_job)
# a .py file runs in a fork of this process (its preload skipped here: it only saves time)
code = ("-c", sys.argv[2]) if not sys.argv[2].endswith(".py") else (sys.argv[2],)
step = main_job.Step("slow step", (sys.executable, *code, sys.argv[3], sys.argv[4]), 1.0)
main_job.plan = lambda args: [step]
main_job.forkrun.preload = lambda: None
sys.exit(main_job.main(["--out", sys.argv[5], "--data", sys.argv[5]]))
'''


@pytest.mark.parametrize("as_file", [False, True], ids=["subprocess", "fork"])
def test_ctrl_c_waits_for_the_step_and_prints_one_line(tmp_path, as_file):
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    step = textwrap.dedent(STEP)
    if as_file:
        (tmp_path / "step.py").write_text(step)
        step = str(tmp_path / "step.py")
    job = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(JOB), str(ROOT / "tools" / "main_job.py"),
         step, str(ready), str(stopped), str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # a test run from a background shell (`cmd &`) inherits SIGINT ignored: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), job.communicate()
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert stopped.read_text() == "stopped cleanly"  # not killed 0.25 s after the Ctrl-C
    assert err.strip().splitlines() == [
        "main job interrupted: run the same command again to continue (finished steps are skipped, "
        "an interrupted training resumes from its last checkpoint)"]
