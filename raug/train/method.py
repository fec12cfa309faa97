"""A method: what a script trains, as its config checks, its phases and its main task.

:func:`raug.run.runner.run_training` runs a :class:`Method`: it validates the config
with ``checks`` (unless the experiment already did), runs each :class:`Phase` in
order with the run's :class:`RunContext`, then builds the main task with
``build_task(ctx)`` and trains it with :func:`raug.train.engine.fit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from raug.data.loaders import IsicData
from raug.train.engine import FitSettings
from raug.train.outputs import RunOutputs
from raug.train.task import Task

# A config check: config -> one-line problems; a warning sink: one line -> None.
Check = Callable[[Mapping[str, Any]], Iterable[str]]
Warn = Callable[[str], None]


@dataclass
class RunContext:
    """What a method's phases and task builder receive.

    ``phase_results[name]``: what each earlier :class:`Phase` returned.
    """

    config: dict[str, Any]
    device: torch.device
    data: IsicData
    outputs: RunOutputs
    settings: FitSettings
    run: Any = None
    phase_results: dict[str, Any] = field(default_factory=dict)


TaskBuilder = Callable[[RunContext], Task]


@dataclass(frozen=True)
class Phase:
    """A stage that runs before the method's main training, in declaration order.

    ``run(ctx)`` does the stage's work with its own checkpoints and resume (e.g. SSD-KD's
    teacher-head fit: a :func:`raug.train.engine.fit` of its own that writes, resumes and reuses
    its files); what it returns is ``ctx.phase_results[name]`` for the later stages.
    """

    name: str
    run: Callable[[RunContext], Any]


@dataclass(frozen=True)
class Method:
    """What a script trains: its config checks, its phases, and its main task.

    Attributes:
        name: shown in the log (``"teacher"``, ``"d_kd"``, ``"ssd_kd"``).
        build_task: ``RunContext -> Task`` for the main training, after the phases.
        phases: preliminary stages (:class:`Phase`), run in order.
        checks: the script's config checks, ``config -> iterable of one-line problems``;
            the Sacred glue runs them in its config hook, :func:`run_training` when it is
            called without an experiment (``validated=False``).
    """

    name: str
    build_task: TaskBuilder
    phases: tuple[Phase, ...] = ()
    checks: tuple[Check, ...] = ()


def as_method(spec: Method | TaskBuilder, extra_checks: Iterable[Check] = ()) -> Method:
    """``spec`` as a :class:`Method` (a bare task builder becomes a method without phases)."""
    if isinstance(spec, Method):
        return replace(spec, checks=(*spec.checks, *extra_checks)) if extra_checks else spec
    name = getattr(spec, "__name__", "task")
    return Method(name=name, build_task=spec, checks=tuple(extra_checks))
