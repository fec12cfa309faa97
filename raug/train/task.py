"""The task: what a training method gives the engine, as one ``nn.Module``.

A task holds the modules a method trains and the ones it only runs, and its two
step functions; :func:`raug.train.engine.fit` never knows which method runs.

* ``trained``: ``nn.ModuleDict`` of everything optimised and checkpointed.
  ``trained["model"]`` is the network that predicts (its state is a checkpoint's
  ``model_state_dict``; the others go to ``extra_state_dicts`` under their names).
* ``frozen``: ``nn.ModuleDict`` of modules that move with the task but are never
  optimised or checkpointed (a distillation teacher): ``requires_grad`` off, and
  in eval mode whatever mode the task is put in.
* ``class_weight``: the (K,) cross-entropy weights as a (non-persistent) buffer,
  or ``None``; ``task.to(device)`` moves it with the modules.
* ``train_step(batch)`` -> ``{"loss": scalar tensor with grad, "logits": (N, K)
  (optional), <part>: scalar tensor or number, ...}``; the engine does the
  backward pass and the optimizer step. ``forward(batch)`` is ``train_step``, so
  the engine wraps the whole task in one ``DistributedDataParallel`` under torchrun.
* ``eval_step(batch)`` -> ``{"loss": scalar, "logits": (N, K) (optional), ...}``,
  called under ``torch.inference_mode()`` on un-augmented batches.

``batch`` is the collated dataset dict already on the device:
``{"image": (N, 3, S, S), "label": (N,), "meta": (N, 11), "id": list[str]}``.
Steps keep no global state, so the same task runs under data parallelism.
See ``docs/engine.md`` for a worked example.

A :class:`Method` is what a script trains: its config checks, its preliminary
:class:`Phase` s and the builder of its main task, each called with the run's
:class:`RunContext` by :func:`raug.run.runner.run_training`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def meta_kwargs(model: nn.Module, meta: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """``{"meta": meta}`` for a network that fuses metadata (``uses_metadata``), else ``{}``.

    Every network call of the tasks goes through it (``model(x, **meta_kwargs(...))``,
    ``forward_kd`` alike), so image-only networks, and test doubles without a ``meta``
    argument, are called exactly as before, and a fused network always gets the
    batch's metadata (``models.fusion``; ``docs/metadata.md``).
    """
    return {"meta": meta} if getattr(model, "uses_metadata", False) else {}


class ModuleTable(nn.ModuleDict):
    """``nn.ModuleDict`` with ``dict.get``."""

    def get(self, key: str, default: nn.Module | None = None) -> nn.Module | None:
        """The module under ``key``, or ``default``."""
        return self[key] if key in self else default  # noqa: SIM401 (ModuleDict has no get)


class Task(nn.Module):
    """Base class of every method's task: trained and frozen modules, class weights, steps."""

    def __init__(
        self,
        trained: Mapping[str, nn.Module],
        frozen: Mapping[str, nn.Module] | None = None,
        class_weight: torch.Tensor | None = None,
    ):
        """Register the modules (``trained`` must hold ``"model"``) and the class weights."""
        super().__init__()
        if "model" not in trained:
            raise ValueError(f"a task's trained modules must include 'model'; got {sorted(trained)}")
        self.trained = ModuleTable(trained)
        self.frozen = ModuleTable(frozen or {})
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        self.register_buffer("class_weight", class_weight, persistent=False)

    @property
    def model(self) -> nn.Module:
        """The network that predicts (``trained["model"]``)."""
        return self.trained["model"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the trained modules' parameters that require grad."""
        return [p for p in self.trained.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> Task:
        """Trained modules in ``mode``; frozen ones stay in eval mode."""
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, batch: dict) -> dict:
        """``train_step``: the call that ``DistributedDataParallel`` wraps."""
        return self.train_step(batch)

    def train_step(self, batch: dict) -> dict:
        """Override: loss and parts of a training batch (see the module docstring)."""
        raise NotImplementedError

    def eval_step(self, batch: dict) -> dict:
        """Override: loss (and logits) of an evaluation batch (see the module docstring)."""
        raise NotImplementedError

    def part_weights(self) -> dict[str, float]:
        """``{part: its weight in the training loss}`` for the named parts ``train_step`` returns.

        The engine names a part's weight when the part grows by orders of magnitude or
        becomes non-finite, so that the user sees which knob to turn; a part of weight 0 (a
        count, e.g. ``n_tf``) is not watched for growth. Default: none declared.
        """
        return {}

    def weighted_ce_step(self, batch: dict) -> dict:
        """The predicting model's class-weighted cross-entropy: every KD task's ``eval_step``.

        Model selection then does not depend on the KD weights, and methods compare
        like for like.
        """
        logits = self.model(batch["image"], **meta_kwargs(self.model, batch.get("meta")))
        loss = F.cross_entropy(logits, batch["label"], weight=self.class_weight)
        return {"loss": loss, "logits": logits}


class ClassificationTask(Task):
    """Plain (optionally class-weighted) cross-entropy training of one classifier."""

    def __init__(self, model: nn.Module, class_weight: torch.Tensor | None = None):
        """Train ``model`` with ``F.cross_entropy(weight=class_weight)``.

        Args:
            model: any module mapping ``(N, 3, S, S)`` images to ``(N, K)`` logits.
            class_weight: (K,) cross-entropy weights or ``None``.
        """
        super().__init__({"model": model}, class_weight=class_weight)

    def _step(self, batch: dict) -> dict:
        return self.weighted_ce_step(batch)

    def train_step(self, batch: dict) -> dict:
        """Weighted cross-entropy on a training batch."""
        return self._step(batch)

    def eval_step(self, batch: dict) -> dict:
        """Weighted cross-entropy on an evaluation batch."""
        return self._step(batch)
