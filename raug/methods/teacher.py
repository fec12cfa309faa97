"""The distillation teacher: inspect, validate, load, freeze and run a trained checkpoint.

Accepted files (all read with ``weights_only=True``):

* project checkpoints written by ``experiment/isic/isic.py`` (``model_name``,
  ``class_names``, ``config`` with the validation fold ``_folder``, ...);
* the seed's published checkpoints ``{"epoch": ..., "model_state_dict": sd}`` and
  bare state dicts: architecture and class count are read from the keys and the
  classifier's shape; their classes are taken to be the seed's alphabetical
  order (:data:`raug.data.loaders.CLASS_NAMES`), which is all the seed ever used.

A frozen teacher is in eval mode with ``requires_grad_(False)`` and runs under
``torch.inference_mode()`` (:func:`frozen_forward`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from raug.errors import ConfigError
from raug.files.checkpoint import CheckpointError, is_project_checkpoint, load_checkpoint
from raug.files.paths import default_save_folder, resolve_repo_path
from raug.methods.metadata import teacher_metadata_problem
from raug.train.engine import BEST_CHECKPOINT
from raug.train.task import meta_kwargs

log = logging.getLogger(__name__)

# isic.py's save_name: its default run writes results/isic_teacher_fold<_folder>/.
TEACHER_SAVE_NAME = "isic_teacher"


def default_teacher_ckpt(folder: int) -> str:
    """Where ``isic.py``'s default run for validation fold ``folder`` writes its best checkpoint."""
    return str(default_save_folder(TEACHER_SAVE_NAME, folder) / BEST_CHECKPOINT)


@dataclass(frozen=True)
class TeacherSummary:
    """What a teacher checkpoint says about itself.

    Attributes:
        kind: ``"project"`` (written by this toolkit), ``"seed"`` (``{"epoch",
            "model_state_dict"}``) or ``"state_dict"`` (bare).
        model_name: canonical architecture name, or ``None`` when not recognisable.
        num_classes: classifier outputs, or ``None`` when unknown.
        class_names: class codes in label order (``None``: not recorded, the seed's order assumed).
        folder: the validation fold the teacher was selected on (``None``: not recorded).
        img_size: the input size it was trained at (``None``: not recorded).
        split_hash: the ``split_hash`` of the prepared data it was trained on (``None``:
            not recorded, e.g. the seed's checkpoints).
        head_outputs: outputs of the classifier weights actually stored (``None``: no
            classifier found); may disagree with a damaged file's ``num_classes``.
        quick: whether a ``quick`` smoke run trained it (its config's ``_quick``; ``None``:
            not recorded, e.g. runs before the key existed).
        fusion: its metadata fusion (recorded, or read from the weights' shapes:
            :func:`models.checkpoint_fusion`); image only when the network is unknown.
    """

    kind: str
    model_name: str | None
    num_classes: int | None
    class_names: tuple[str, ...] | None
    folder: int | None
    img_size: int | None
    split_hash: str | None = None
    head_outputs: int | None = None
    quick: bool | None = None
    fusion: models.FusionSpec = field(default_factory=models.FusionSpec)


# classifier weights: project/seed layout, torchvision ResNet-50, torchvision MobileNet-V2
_HEAD_KEYS = ("classifier.weight", "fc.weight", "classifier.1.weight")


def recorded_split_hash(ckpt: Mapping[str, Any]) -> str | None:
    """The ``split_hash`` of the data a project checkpoint was trained on, if recorded.

    ``config["_split_hash"]`` (hashed from the CSVs when the run started) is preferred
    to ``data_preparation["split_hash"]`` (copied from ``prep_info.json``).
    """
    for section, key in (("config", "_split_hash"), ("data_preparation", "split_hash")):
        block = ckpt.get(section)
        value = block.get(key) if isinstance(block, Mapping) else None
        if isinstance(value, str) and value:
            return value
    return None


def summarize_checkpoint(ckpt: Mapping[str, Any]) -> TeacherSummary:
    """Read architecture, classes, fold, size and data hash from a loaded checkpoint (pure)."""
    if "model_state_dict" in ckpt:
        sd = ckpt["model_state_dict"]
        kind = "project" if is_project_checkpoint(dict(ckpt)) else "seed"
    else:
        sd, kind = ckpt, "state_dict"
    sd = sd if isinstance(sd, Mapping) else {}
    keys = {k.removeprefix("module."): k for k in sd}
    arch, _ = models.detect_layout(keys)
    meta = ckpt if kind != "state_dict" else {}
    name = meta.get("model_name")
    try:
        model_name = models.canonical_name(name) if name else arch
    except ValueError:
        model_name = str(name)
    head = next((sd[keys[k]] for k in _HEAD_KEYS if k in keys), None)
    head_outputs = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim else None
    num_classes = meta.get("num_classes")
    if num_classes is None:
        num_classes = head_outputs
    names = meta.get("class_names")
    config = meta.get("config")
    config = config if isinstance(config, Mapping) else {}
    folder = config.get("_folder")
    img_size = meta.get("img_size")
    return TeacherSummary(
        kind=kind,
        model_name=model_name,
        num_classes=None if num_classes is None else int(num_classes),
        class_names=None if names is None else tuple(str(n) for n in names),
        folder=None if folder is None else int(folder),
        img_size=None if img_size is None else int(img_size),
        split_hash=recorded_split_hash(meta),
        head_outputs=head_outputs,
        quick=config.get("_quick"),
        fusion=_fusion_of(ckpt if kind != "state_dict" else sd, model_name),
    )


def _fusion_of(ckpt: Mapping[str, Any], model_name: str | None) -> models.FusionSpec:
    try:
        return models.checkpoint_fusion(ckpt, model_name)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError):
        return models.FusionSpec()  # not a network this toolkit builds: other checks say so


def summary_problems(
    summary: TeacherSummary, source: str, model_name: str, class_names: Sequence[str]
) -> list[str]:
    """One-line problems of a teacher for ``_model_name_teacher`` and the data's classes."""
    expected = models.canonical_name(model_name)
    problems = []
    if summary.model_name is None:
        problems.append(
            f"_teacher_ckpt={source!r} holds no recognisable network weights "
            f"(expected a {expected!r} checkpoint from isic.py or the seed)"
        )
    elif summary.model_name != expected:
        problems.append(
            f"_teacher_ckpt={source!r} is a {summary.model_name!r} checkpoint but "
            f"_model_name_teacher={model_name!r}; pass the matching checkpoint or model name"
        )
    if summary.class_names is not None and list(summary.class_names) != list(class_names):
        problems.append(
            f"_teacher_ckpt={source!r} was trained on classes {list(summary.class_names)}, "
            f"the data has {list(class_names)}"
        )
    elif summary.num_classes is not None and summary.num_classes != len(class_names):
        problems.append(
            f"_teacher_ckpt={source!r} has {summary.num_classes} classes, "
            f"the data has {len(class_names)} ({list(class_names)})"
        )
    claimed = head_claim_problem(summary)
    if claimed:
        problems.append(f"_teacher_ckpt={source!r} {claimed}")
    metadata = teacher_metadata_problem(source, summary.fusion)
    if metadata:
        problems.append(metadata)
    return problems


def head_claim_problem(summary: TeacherSummary) -> str | None:
    """What a checkpoint's classifier weights contradict in its own description, if anything.

    A file that says 8 classes but stores 5-class weights passes every other check
    and fails only when loaded, inside the run: this catches it with the config.
    """
    if summary.head_outputs is None:
        return None
    claims = []
    if summary.num_classes is not None and summary.num_classes != summary.head_outputs:
        claims.append(f"num_classes={summary.num_classes}")
    if summary.class_names is not None and len(summary.class_names) != summary.head_outputs:
        claims.append(f"{len(summary.class_names)} class_names")
    if not claims:
        return None
    return (f"records {' and '.join(claims)} but its classifier weights have "
            f"{summary.head_outputs} outputs: the file is damaged or mislabelled")


def split_findings(
    source: str, teacher_hash: str | None, data_hash: str, allow_mismatch: bool
) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` about the preparation a teacher was trained on (pure).

    Args:
        source: the teacher file (named in the lines).
        teacher_hash: its recorded ``split_hash`` (:attr:`TeacherSummary.split_hash`).
        data_hash: the ``split_hash`` of this run's prepared data.
        allow_mismatch: ``_allow_split_mismatch``: a mismatch only warns.

    Another preparation draws another test split, so the teacher's training images
    may include this run's test images and the student's test metrics inherit that
    leak. A teacher that records no hash (the seed's files) cannot be checked: warning.
    """
    if teacher_hash is None:
        return [], [f"the teacher {source} records no split_hash (a seed or older checkpoint): "
                    "nothing shows that its training images exclude this run's test images"]
    if teacher_hash == data_hash:
        return [], []
    hashes = f"split_hash {teacher_hash[:12]}… vs the data's {data_hash[:12]}…"
    if allow_mismatch:
        return [], [f"_allow_split_mismatch=True: the teacher {source} was trained on a different "
                    f"preparation ({hashes}); the test metrics may be optimistic"]
    return [
        f"_teacher_ckpt={source!r} was trained on a different preparation ({hashes}): its "
        "training images may include this run's test images. Use a teacher trained on this "
        "data, or set _allow_split_mismatch=True if you mean it"
    ], []


@functools.lru_cache(maxsize=4)
def _cached_summary(path: str, size: int, mtime_ns: int) -> TeacherSummary:
    # Keyed on size and mtime so that a rewritten file is read again; the cache
    # spares the config check and the run a second full read of a large file.
    del size, mtime_ns
    return summarize_checkpoint(load_checkpoint(path))


def inspect_teacher(path: str | os.PathLike) -> TeacherSummary:
    """Summary of the teacher file at ``path``.

    Raises:
        CheckpointError: missing, corrupt or unsafe file (named in the message).
    """
    path = resolve_repo_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    stat = path.stat()
    return _cached_summary(str(path), stat.st_size, stat.st_mtime_ns)


def teacher_file_problems(
    path: str | os.PathLike, model_name: str, class_names: Sequence[str]
) -> list[str]:
    """Problems with ``_teacher_ckpt``: missing, unreadable, other architecture or classes."""
    resolved = resolve_repo_path(path)
    if not resolved.is_file():
        return [
            f"_teacher_ckpt={str(resolved)!r} does not exist: train the teacher first "
            "(python experiment/isic/isic.py with _folder=<fold>) or pass "
            "_teacher_ckpt=<teacher checkpoint>"
        ]
    try:
        summary = inspect_teacher(resolved)
    except CheckpointError as exc:
        return [f"_teacher_ckpt={str(resolved)!r} cannot be read: {exc}"]
    return summary_problems(summary, str(resolved), model_name, class_names)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter; returns ``module``."""
    module.eval()
    module.requires_grad_(False)
    return module


def frozen_forward(
    module: nn.Module, x: torch.Tensor, meta: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``module.forward_kd(x)`` under ``torch.inference_mode()``, as ordinary constant tensors.

    ``meta`` reaches the module only when it fuses metadata
    (:func:`raug.train.task.meta_kwargs`).

    Inference tensors cannot be saved for backward, and the losses save the
    teacher's outputs (e.g. ``F_t`` in the channel-relation product). A clone
    made outside inference mode is an ordinary tensor without autograd history:
    a constant target that costs one copy of the outputs.
    """
    with torch.inference_mode():
        out = module.forward_kd(x, **meta_kwargs(module, meta))
    return {name: value.clone() for name, value in out.items()}


@dataclass
class Teacher:
    """A loaded, frozen teacher and what its file says about it."""

    model: nn.Module
    path: Path
    summary: TeacherSummary


def load_teacher(
    path: str | os.PathLike,
    model_name: str,
    class_names: Sequence[str],
    folder: int | None = None,
    img_size: int | None = None,
) -> Teacher:
    """Build ``model_name``, load the checkpoint at ``path`` into it and freeze it.

    Args:
        path: teacher checkpoint (``_teacher_ckpt``); relative paths start at the repo root.
        model_name: ``_model_name_teacher``.
        class_names: the data's class codes in label order.
        folder: the run's validation fold; a teacher selected on another fold gets a
            warning (it has seen the student's validation images during training,
            which biases the student's model selection).
        img_size: the run's input size; a teacher trained at another size gets a warning.

    Returns:
        The frozen teacher (CPU, eval mode, ``requires_grad`` off).

    Raises:
        ConfigError: missing or unreadable file, other architecture, other classes or
            weights that do not fit (the message names the file).
    """
    resolved = resolve_repo_path(path)
    problems = teacher_file_problems(resolved, model_name, class_names)
    if problems:
        raise ConfigError("invalid teacher:\n  " + "\n  ".join(problems))
    summary = inspect_teacher(resolved)
    # the teacher's own fusion (its checkpoint's), whatever the student's keys say
    model = models.create_model(model_name, num_classes=len(class_names), fusion=summary.fusion)
    try:
        models.load_weights(model, resolved)
    except (models.WeightsError, CheckpointError) as exc:
        raise ConfigError(f"_teacher_ckpt={str(resolved)!r} does not load: {exc}") from exc
    if folder is not None and summary.folder is not None and summary.folder != folder:
        log.warning(
            "the teacher %s was selected on validation fold %d but this run validates on "
            "_folder=%d: the teacher trained on the student's validation images, which "
            "biases the student's model selection",
            resolved, summary.folder, folder,
        )
    if img_size is not None and summary.img_size is not None and summary.img_size != img_size:
        log.warning("the teacher %s was trained at %d px, this run uses _img_size=%d",
                    resolved, summary.img_size, img_size)
    log.info("teacher %s (%s checkpoint, %s%s) loaded and frozen", resolved, summary.kind,
             summary.model_name,
             f", fuses metadata: {summary.fusion}" if summary.fusion.uses_metadata else "")
    return Teacher(freeze(model), resolved, summary)


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> dict[str, Any]:
    """Identity of a file: absolute path, size, mtime and the sha256 of its bytes."""
    path = resolve_repo_path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    stat = path.stat()
    return {
        "path": str(path),
        "size": int(stat.st_size),
        "mtime_ns": int(stat.st_mtime_ns),
        "sha256": digest.hexdigest(),
    }
