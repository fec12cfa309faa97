"""tools/sweep.py --launcher slurm against a real single-node SLURM (slurmctld + slurmd on this
host, started by the fixture as root; skipped where SLURM or root is missing).

Setup on Debian: ``apt-get install -y slurm-wlm munge`` (tools: docs/cluster.md).
"""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_sweep import FAKE_SCRIPT, argv_of
from test_sweep_launchers import PREEMPTIBLE

from raug.run.sweep import folder_state
from raug.run.sweep_cli import main

DAEMONS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
MUNGE_DIR = Path("/run/munge")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    return "\n".join([
        "ClusterName=raugtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}", f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
        "ReturnToService=2", "JobRequeue=1", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none", "JobAcctGatherType=jobacct_gather/none", "KillWait=5",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def munge_works() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0


def start_munged() -> int | None:
    """Start munged unless one answers already; its pid (to stop it), or None."""
    if munge_works():
        return None
    MUNGE_DIR.mkdir(exist_ok=True)
    shutil.chown(MUNGE_DIR, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
    deadline = time.monotonic() + 10
    while not munge_works():
        assert time.monotonic() < deadline, "munged did not start"
        time.sleep(0.2)
    return int((MUNGE_DIR / "munged.pid").read_text())


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster; the daemons are stopped by their pids after."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and SLURM (missing: {missing or 'root'}); "
                    "apt-get install -y slurm-wlm munge")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root))
    munged = start_munged()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([name, "-D", *extra, "-f", str(conf)], env=env,
                                stdout=(root / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
               for name, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                             text=True).stdout.strip() != "idle":
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield conf
        drain(env)
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=30)
        if munged is not None:
            os.kill(munged, 15)


def drain(env: dict) -> None:
    """Wait until the queue is empty: a job step cut off from its slurmd would linger."""
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", "--user", "root"], env=env, check=False)
            break
        time.sleep(0.5)
    time.sleep(2)  # the steps' slurmstepd exit just after their job has left the queue


def squeue_state(job: str, env: dict) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], env=env, capture_output=True,
                          text=True).stdout.strip()


def test_a_real_array_completes_and_a_rerun_submits_nothing(slurm_cluster, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    script = tmp_path / "fake_exp.py"
    script.write_text(FAKE_SCRIPT)
    out = tmp_path / "sweep"
    args = [str(script), "--folds", "1", "2", "--seeds", "0", "--out", str(out), "--launcher",
            "slurm", "--gpus-per-run", "0", "--cpus-per-run", "1", "--time-min", "5"]
    assert main([*args, "--wait"]) == 0
    jobs = json.loads((out / "_slurm" / "jobs.json").read_text())
    array = jobs["fold1-seed0"].split("_")[0]
    assert jobs == {"fold1-seed0": f"{array}_0", "fold2-seed0": f"{array}_1"}  # one array
    assert capsys.readouterr().out.splitlines()[-1] == (
        "sweep: 2 runs: 2 completed now, 0 skipped (already COMPLETED), 0 failed")
    assert main(args) == 0
    assert "sweep: 0 task(s) submitted" in capsys.readouterr().out
    assert main([*args, "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "2 cells: 0 pending, 0 running, 2 completed, 0 failed")


def test_scontrol_requeue_resumes_the_cell(slurm_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    env = dict(os.environ)
    (tmp_path / "fake_exp.py").write_text(FAKE_SCRIPT)
    script = tmp_path / "preemptible.py"
    script.write_text(PREEMPTIBLE)
    out = tmp_path / "sweep"
    args = [str(script), "--folds", "1", "--seeds", "0", "--out", str(out), "--launcher", "slurm",
            "--gpus-per-run", "0", "--cpus-per-run", "1", "--time-min", "5"]
    assert main(args) == 0
    job = json.loads((out / "_slurm" / "jobs.json").read_text())["fold1-seed0"]
    folder = out / "fold1-seed0"
    deadline = time.monotonic() + 120
    while not (folder / "attempt-1.json").is_file():  # the run is training
        assert time.monotonic() < deadline
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    while squeue_state(job, env) != "PD":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    capsys.readouterr()
    assert main([*args, "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(
        f"fold 1 seed 0: pending (job {job} in the queue; ")
    assert main(args) == 0  # queued: not submitted again
    assert "sweep: 0 task(s) submitted" in capsys.readouterr().out
    # A requeued job becomes eligible only ~2 min later; start it now instead.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    while folder_state(folder).state.value != "completed":
        assert time.monotonic() < deadline + 60, (out / "_slurm").glob("*/*log.err")
        time.sleep(0.5)
    assert argv_of(folder, 1)[-1] == "_resume=True"  # the requeued task resumed the cell
    assert not (folder / "attempt-2.json").exists()
    assert "_resume=True" not in json.loads((folder / "attempt-1.json").read_text())["argv"]
