"""The Sacred experiment of a KD script: engine keys + KD keys + method keys + defaults.

``isic_d_kd.py`` and ``isic_ssd_kd.py`` are each one call of :func:`make_kd_experiment`
with their method (:data:`raug.methods.dkd.DKD_METHOD`, :data:`raug.methods.ssdkd.SSD_KD_METHOD`);
the keys and their checks are in :mod:`raug.methods.kd_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raug.errors import ConfigError
from raug.methods.kd_config import KD_SHARED_CONFIG, kd_paths, teacher_checks
from raug.run.experiment import RaugExperiment, make_experiment
from raug.run.pretrained import add_imagenet_weights_hook
from raug.train.method import Method


def make_kd_experiment(
    name: str,
    method_config: Mapping[str, Any],
    quick_overrides: Mapping[str, Any],
    method: Method,
) -> RaugExperiment:
    """The Sacred experiment of a KD script.

    Validation, all before any run folder is created: the method's checks (the keys)
    in the engine's config hook; a second hook then checks the teacher file
    (:func:`raug.methods.kd_config.teacher_checks`) for the main command only, like the
    engine's data checks, so ``print_config`` works before a teacher exists; a third one
    fetches the student's ImageNet weights for ``_pretrained=True``
    (:mod:`raug.run.pretrained`, main command only).

    Args:
        name: experiment name.
        method_config: :data:`~raug.methods.kd_config.DKD_CONFIG` or ``SSDKD_CONFIG``.
        quick_overrides: :data:`~raug.methods.kd_config.DKD_QUICK` or ``SSDKD_QUICK``.
        method: what the script trains (its ``checks`` validate the keys).
    """
    ex = make_experiment(
        name,
        {**KD_SHARED_CONFIG, **dict(method_config)},
        quick_overrides,
        method=method,
        path_keys=("_teacher_ckpt", "_teacher_head"),
    )
    ex.config(kd_paths)

    @ex.config_hook
    def check_teacher_file(config, command_name, logger):
        # Sacred runs the hooks in order: the engine's (keys, data, save folder)
        # has passed when this one runs, so the keys used here are valid.
        if command_name == ex.default_command:
            problems = teacher_checks(config, warn=logger.warning)
            if problems:
                raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        return {}

    # Last: a download only starts once everything else about the run is valid.
    add_imagenet_weights_hook(ex, "_model_name_student")
    return ex
