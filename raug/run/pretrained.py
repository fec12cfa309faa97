"""The scripts' pre-run step for ``_pretrained=True``: fetch missing ImageNet weights.

Runs as a Sacred config hook of the main command only, after the key checks and
before any observer has created a run folder: a missing file is downloaded into the
torch hub cache (:func:`models.ensure_imagenet_weights`; under torchrun by local rank 0
while the other local ranks wait), and a failed download stops the script with one
line naming the URL, the cache path and the two ways out. ``print_config`` and other
commands never download.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sacred import Experiment

import models
from raug.errors import ConfigError


def needs_imagenet_weights(config: Mapping[str, Any]) -> bool:
    """Whether a run of ``config`` starts from ImageNet weights (a resumed run loads its own)."""
    return config.get("_pretrained") is True and config.get("_resume") is False


def fetch_imagenet_weights(config: Mapping[str, Any], model_key: str) -> None:
    """Make the ImageNet weights of ``config[model_key]`` available in the hub cache.

    Args:
        config: the run's config (keys already validated).
        model_key: the key naming the network that starts from ImageNet weights.

    Raises:
        ConfigError: the weights are not cached and the download failed (one line).
    """
    if not needs_imagenet_weights(config):
        return
    try:
        models.ensure_imagenet_weights(config[model_key])
    except models.PretrainedWeightsNotFound as exc:
        # The message is the whole story (URL, path, ways out): no traceback, no chain.
        raise ConfigError(str(exc)) from None


def add_imagenet_weights_hook(ex: Experiment, model_key: str) -> None:
    """Register :func:`fetch_imagenet_weights` as a config hook of ``ex``'s main command.

    Register it after the hooks that validate the keys: Sacred runs hooks in order and
    stops at the first error, so a download only starts for an otherwise valid run.
    """

    @ex.config_hook
    def imagenet_weights(config, command_name, logger):
        if command_name == ex.default_command:
            fetch_imagenet_weights(config, model_key)
        return {}
