"""Checkpoint I/O: atomic writes, weights_only loading, RNG round trips."""

# The legacy global numpy RNG is exactly what capture_rng_state must save.
# ruff: noqa: NPY002

import os
import pickle
import random

import numpy as np
import pytest
import torch

from raug.files.checkpoint import (
    CheckpointError,
    capture_rng_state,
    is_project_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.arange(4)}
    path = save_checkpoint(tmp_path / "a" / "ck.pth", {"model_state_dict": sd, "epoch": 3,
                                                       "class_names": ["AK", "BCC"]})
    ck = load_checkpoint(path)
    assert is_project_checkpoint(ck)
    assert ck["epoch"] == 3
    assert ck["class_names"] == ["AK", "BCC"]
    torch.testing.assert_close(ck["model_state_dict"]["w"], sd["w"], rtol=0, atol=0)
    # no temp files left behind
    assert sorted(os.listdir(path.parent)) == ["ck.pth"]


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = save_checkpoint(tmp_path / "rng.pth", {"rng": state})
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


# torch notes that the hand-made pickle uses protocol 5; the refusal is what is tested.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_code_executing_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": _Evil()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_checkpoint(path)


def test_truncated_and_missing_files_name_the_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pth", {"model_state_dict": {"w": torch.ones(100)}})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"bad\.pth.*(truncated|corrupt)"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match=r"missing\.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_files_get_normal_permissions_not_mkstemp_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "perm.pth", {"epoch": 1})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
