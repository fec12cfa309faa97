"""Self-describing checkpoints, written atomically and loaded safely.

Every checkpoint the toolkit writes is a plain ``dict`` that ``torch.load(...,
weights_only=True)`` can read (tensors, numbers, strings, lists, dicts only):

``format``             ``"ssdkd-checkpoint"``; ``format_version`` an int.
``model_name``         canonical architecture name (``"resnet-50"``, ``"mobilenet"``).
``num_classes``        int; ``class_names`` list of class codes in label order.
``img_size``           training/evaluation input size in pixels.
``normalization``      ``{"mean": [r, g, b], "std": [r, g, b]}`` (0-1 pixel scale).
``data_preparation``   ``{"size": int | None, "split_hash": str}`` from the training data's
                       ``prep_info.json`` (``size`` None: originals); absent when unknown.
                       Prediction shrinks new images to the same ``size`` first.
``model_state_dict``   the network's ``state_dict`` (project layout = seed layout).
``extra_state_dicts``  ``{name: state_dict}`` for trained helpers (adapter, projection heads).
``epoch``              last completed epoch (1-based); ``metrics`` dict of floats.
``optimizer_state_dict``, ``scheduler_state_dict``, ``early_stop``, ``rng`` (resume state).
``config``             the Sacred config of the run (JSON-like).

``save_checkpoint`` writes to a temporary file in the same folder, fsyncs it
and ``os.replace``-s it over the target, so a crash leaves either the previous
file or the new one, never half of one; a full disk raises
:class:`raug.files.atomic.DiskFullError` (one line naming the file and the space left)
and leaves the previous checkpoint intact. ``load_checkpoint`` refuses pickles
that would run code (``weights_only=True``) and names the file in every error.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raug.files.atomic import atomic_write_with

FORMAT = "ssdkd-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, unsafe or of the wrong kind."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus the format tag) with ``torch.save``.

    Args:
        path: destination file; its folder is created.
        payload: a dict following the schema in this module's docstring.

    Returns:
        The destination path.

    Raises:
        DiskFullError: no space left; the previous file at ``path`` is unchanged.
    """
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    return atomic_write_with(path, lambda tmp: _torch_save(payload, tmp))


def _torch_save(payload: dict[str, Any], path: Path) -> None:
    # Through a Python file object, not a path: torch's own C++ file writer turns a full
    # disk into "RuntimeError: [enforce fail at inline_container.cc...]" with no errno,
    # while Python's write keeps the OSError(ENOSPC) in the exception chain.
    with open(path, "wb") as fh:
        torch.save(payload, fh)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; clear errors name the file.

    Raises:
        CheckpointError: missing, truncated/corrupt, or unsafe (code-executing) file,
            or a file that does not hold a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file "
            f"(weights_only=True rejected it, it may execute code): {exc}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def is_project_checkpoint(ckpt: dict) -> bool:
    """True for checkpoints written by :func:`save_checkpoint` (vs. the seed's format)."""
    return ckpt.get("format") == FORMAT


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) in a weights_only-safe form."""
    # The legacy global numpy RNG is what third-party code draws from, so it is saved too.
    np_state = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_to_tuples(state["python"]))
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU visible when saved: restore cuda:i from state i for the GPUs
        # both runs see (a run resumed with fewer or more visible GPUs still resumes).
        saved, visible = len(state["cuda"]), torch.cuda.device_count()
        if saved != visible:
            import logging

            logging.getLogger(__name__).warning(
                "checkpoint holds CUDA RNG states of %d GPU(s) but %d are visible: restoring "
                "those of cuda:0..cuda:%d", saved, visible, min(saved, visible) - 1)
        for index in range(min(saved, visible)):
            torch.cuda.set_rng_state(state["cuda"][index], index)


def _to_lists(obj):
    if isinstance(obj, tuple | list):
        return [_to_lists(o) for o in obj]
    return obj


def _to_tuples(obj):
    if isinstance(obj, list):
        return tuple(_to_tuples(o) for o in obj)
    return obj
