"""The seed's metadata keys, checked together, and the network they describe.

``_use_meta_data`` (False), ``_neurons_reducer_block`` (0), ``_comb_method`` (None) and
``_comb_config`` (None) are shared by the three scripts; they describe the network the
script trains (``isic.py``: ``_model_name``; the KD scripts: the student,
``_model_name_student``). A KD teacher's fusion comes from its checkpoint
(:func:`models.checkpoint_fusion`). Semantics: :mod:`models.fusion`, ``docs/metadata.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import models
from raug.data.loaders import META_COLUMNS

# The seed's defaults (image only); raug.run.config.SHARED_CONFIG takes them from here.
METADATA_DEFAULTS: dict[str, Any] = {
    "_use_meta_data": False,
    "_comb_method": None,  # None / "concat" / "metablock" / "metanet"
    "_comb_config": None,  # concat: M; metablock: [maps, M] or M; metanet: [M, hidden, maps] or M
    "_neurons_reducer_block": 0,  # n > 0: Linear(C, n) + BN + ReLU + Dropout(0.5) before the classifier
}
METADATA_KEYS = tuple(METADATA_DEFAULTS)


def _keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The four keys of ``config``, defaults for those it lacks (a partial config in a check)."""
    return {key: config.get(key, default) for key, default in METADATA_DEFAULTS.items()}


def fusion_spec(config: Mapping[str, Any], model_key: str) -> models.FusionSpec:
    """The :class:`models.FusionSpec` of the network named by ``config[model_key]``.

    Raises:
        models.FusionConfigError: the keys do not fit (see :func:`metadata_problems`).
        ValueError: unknown model name.
    """
    name = models.canonical_name(config[model_key])
    keys = _keys(config)
    return models.FusionSpec.from_config(
        keys["_comb_method"], keys["_comb_config"], keys["_neurons_reducer_block"],
        models.NUM_FEATURES[name],
    )


def metadata_problems(config: Mapping[str, Any], model_key: str) -> list[str]:
    """One line per inconsistency of the metadata keys, naming them (pure).

    Metadata on without a method, a method without metadata, a ``_comb_config`` of the
    wrong form or one whose maps do not divide the network's pooled features, a reducer
    that is not an int >= 0, and a metadata width other than the prepared columns'.
    """
    keys = _keys(config)
    use, method = keys["_use_meta_data"], keys["_comb_method"]
    if use is True and method is None:
        return ["_use_meta_data=True needs _comb_method: one of "
                + ", ".join(repr(m) for m in models.COMB_METHODS)
                + f" (and _comb_config, e.g. {len(META_COLUMNS)} metadata features)"]
    if use is False and method is not None:
        return [f"_comb_method={method!r} fuses metadata but _use_meta_data=False: set "
                "_use_meta_data=True or _comb_method=None"]
    try:
        spec = fusion_spec(config, model_key)
    except models.FusionConfigError as exc:
        return [str(exc)]
    except (ValueError, KeyError):  # unknown model: the model check names it
        return []
    if spec.uses_metadata and spec.meta_features != len(META_COLUMNS):
        return [f"_comb_config={keys['_comb_config']!r} gives {spec.meta_features} metadata "
                f"features but the prepared data has {len(META_COLUMNS)} columns "
                f"({', '.join(META_COLUMNS)})"]
    return []


def teacher_metadata_problem(source: str, fusion: models.FusionSpec) -> str | None:
    """A teacher that fuses metadata of another width than the prepared columns (pure)."""
    if fusion.uses_metadata and fusion.meta_features != len(META_COLUMNS):
        return (f"_teacher_ckpt={source!r} fuses {fusion.meta_features} metadata features "
                f"({fusion.method}) but the prepared data has {len(META_COLUMNS)} columns: "
                "use a teacher trained on this data's metadata")
    return None
