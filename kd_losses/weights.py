"""The weights of the distillation losses, each defined once, with its default.

A loss takes one weights object (``d_kd(..., weights=DKDWeights(...))``), the
task holds one, and the KD scripts' config keys and defaults are derived from
the fields marked ``key`` (:func:`config_defaults`): ``_lambd`` is
``DKDWeights.lambd``, and so on. Fields without a key are the paper's fixed
constants (RKD's 25/50, SSD-KD's 0.1/0.9/2.7/10). Every formula:
``docs/kd_math.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

W = TypeVar("W")


def _key(default: float, allowed: str) -> Any:
    """A weight that is a config key (``_<name>``); ``allowed``: ``">=0"``, ``">0"`` or ``"[0,1]"``."""
    return field(default=default, metadata={"key": True, "allowed": allowed})


@dataclass(frozen=True)
class RelationalWeights:
    """``hr = lambd_drkd (w_dist rkd_distance + w_angle rkd_angle) + lambd_crkd channel_relation``.

    A part whose weight is 0 is neither computed nor logged.
    """

    lambd_drkd: float = _key(1.0, ">=0")
    lambd_crkd: float = _key(1000.0, ">=0")
    w_dist: float = 25.0
    w_angle: float = 50.0

    @property
    def uses_rkd(self) -> bool:
        """The RKD distance/angle pair is active."""
        return self.lambd_drkd != 0

    @property
    def uses_channel_relation(self) -> bool:
        """The channel relation (through the adapter) is active."""
        return self.lambd_crkd != 0

    def only(self, rkd: bool, channel_relation: bool) -> RelationalWeights:
        """These weights with the parts not selected set to 0 (an ablation's block)."""
        return dataclasses.replace(
            self,
            lambd_drkd=self.lambd_drkd if rkd else 0.0,
            lambd_crkd=self.lambd_crkd if channel_relation else 0.0,
        )


@dataclass(frozen=True)
class DKDWeights:
    """D-KD: ``(1 - lambd) CE_w + lambd T^2 kd + hr`` (FitNet: ``CE_w + lambd_fitnet hint``)."""

    lambd: float = _key(0.5, "[0,1]")
    T: float = _key(5.0, ">0")
    lambd_fitnet: float = _key(1.0, ">=0")
    relational: RelationalWeights = field(default_factory=RelationalWeights)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DKDWeights:
        """The weights of an ``isic_d_kd.py`` config (``_lambd``, ``_T``, ...)."""
        return from_config(cls, config)


@dataclass(frozen=True)
class SSDKDWeights:
    """SSD-KD phase 2: ``w_ce ce + w_kd kd + w_tf tf + w_ss ss + hr_w hr``.

    ``kd_T``/``tf_T``/``ss_T``: temperatures (each term includes its ``T^2``);
    ``ratio_tf``/``ratio_ss``: share of wrongly ranked rows kept by the error-level ranking.
    """

    kd_T: float = _key(4.0, ">0")
    tf_T: float = _key(4.0, ">0")
    ss_T: float = _key(0.5, ">0")
    ratio_tf: float = _key(1.0, "[0,1]")
    ratio_ss: float = _key(0.75, "[0,1]")
    hr_w: float = _key(1.0, ">=0")
    w_ce: float = 0.1
    w_kd: float = 0.9
    w_tf: float = 2.7
    w_ss: float = 10.0
    relational: RelationalWeights = field(default_factory=RelationalWeights)

    @property
    def uses_channel_relation(self) -> bool:
        """The channel relation (hence the adapter) is active inside ``hr``."""
        return self.hr_w != 0 and self.relational.uses_channel_relation

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SSDKDWeights:
        """The weights of an ``isic_ssd_kd.py`` config (``_kd_T``, ``_hr_w``, ...)."""
        return from_config(cls, config)


def config_key(name: str) -> str:
    """The config key of a weight field: ``lambd`` -> ``_lambd``."""
    return f"_{name}"


def keyed_fields(cls: type) -> dict[str, dataclasses.Field]:
    """``{config key: field}`` of the weights that are config keys, nested blocks included."""
    fields: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        if f.name == "relational":
            fields.update(keyed_fields(RelationalWeights))
        elif f.metadata.get("key"):
            fields[config_key(f.name)] = f
    return fields


def config_defaults(cls: type) -> dict[str, float]:
    """``{config key: default}`` of ``cls``'s keyed weights (the scripts' config defaults)."""
    return {key: f.default for key, f in keyed_fields(cls).items()}


def from_config(cls: type[W], config: Mapping[str, Any]) -> W:
    """An instance of the weights class ``cls`` from the config keys of its keyed fields."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "relational":
            values[f.name] = from_config(RelationalWeights, config)
        elif f.metadata.get("key"):
            values[f.name] = float(config[config_key(f.name)])
    return cls(**values)


def weight_problems(cls: type, config: Mapping[str, Any]) -> list[str]:
    """One line per keyed weight of ``cls`` whose config value is not an allowed number."""
    problems = []
    for key, f in keyed_fields(cls).items():
        value = config.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
        ok = ok and abs(value) != float("inf")
        allowed = f.metadata["allowed"]
        if ok:
            ok = {">=0": value >= 0, ">0": value > 0, "[0,1]": 0 <= value <= 1}[allowed]
        if not ok:
            text = {">=0": "a number >= 0", ">0": "a number > 0", "[0,1]": "a number in [0, 1]"}
            problems.append(f"{key}={value!r} is invalid: expected {text[allowed]}")
    return problems


__all__ = [
    "DKDWeights",
    "RelationalWeights",
    "SSDKDWeights",
    "config_defaults",
    "config_key",
    "from_config",
    "keyed_fields",
    "weight_problems",
]
