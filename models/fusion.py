"""Image + patient-metadata fusion: concat, MetaBlock, MetaNet, and the reducer block.

The seed's teacher script is MetaBlock's (Pacheco & Krohling, "An attention-based
mechanism to combine images and metadata in deep learning models applied to skin
cancer classification", IEEE JBHI 2021); its networks fuse the pooled image features
``x`` (N, C) with the metadata ``m`` (N, M) before the classifier:

* ``concat``: ``[reducer(x), m]`` (the reducer, when there is one, sees the image only).
* ``metablock``: ``x`` split into ``maps`` groups of ``C / maps`` values,
  ``sigmoid(tanh(x_g * f(m)_g) + g(m)_g)`` with ``f, g = BatchNorm(Linear(M, maps))``
  (one scale and shift per group), flattened back to C, then the reducer.
* ``metanet`` (Li et al., "Fusing metadata and dermoscopy images for skin disease
  diagnosis", ISBI 2020): ``x_g * sigmoid(W2 relu(W1 m))_g`` (1x1 convolutions on the
  metadata: one weight per group), flattened, then the reducer.
* reducer (``_neurons_reducer_block = n > 0``): ``Dropout(0.5)(ReLU(BN(Linear(C, n))))``.

``_comb_config`` is read as the seed reads it (:meth:`FusionSpec.from_config`): concat
takes the metadata width M; metablock ``[maps, M]`` or ``M`` (maps: C / 32, the seed's
64 for ResNet-50 and 40 for MobileNet-V2); metanet ``[M, hidden, maps]`` or ``M``
(maps: C / 64, hidden: 2 maps, the seed's 32 / 64 for ResNet-50 and 20 / 40 for
MobileNet-V2). Fixed here: the seed's list form of metablock read the number of maps
before setting it; its MobileNet-V2 metanet default built 32 weights for 20 groups; its
grouping needed exactly 32 (metablock) or 64 (metanet) values per group, here any
divisor of C works. Module names are the seed's (``comb``, ``reducer_block``; the
MetaNet convolutions and MetaBlock's ``fb``/``gb`` layers), so its fused checkpoints
load with the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

COMB_METHODS = ("concat", "metablock", "metanet")
# The list form of _comb_config per method (concat takes an int only, as in the seed).
LIST_FORMS: dict[str, str | None] = {"concat": None, "metablock": "[maps, M]",
                                     "metanet": "[M, hidden, maps]"}
REDUCER_DROPOUT = 0.5
# Values per group when _comb_config gives only the metadata width (the seed's defaults).
METABLOCK_GROUP, METANET_GROUP = 32, 64


class FusionConfigError(ValueError):
    """``_comb_method`` / ``_comb_config`` / ``_neurons_reducer_block`` do not fit together."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class FusionSpec:
    """What a network fuses and how; stored in checkpoints (``to_dict``/``from_dict``).

    Attributes:
        method: ``None`` (image only) or one of :data:`COMB_METHODS`.
        meta_features: M, the metadata width (0 without a method).
        maps: groups of the pooled features (metablock, metanet; else 0).
        hidden: MetaNet's hidden width (else 0).
        reducer: ``_neurons_reducer_block`` (0: no reducer).
    """

    method: str | None = None
    meta_features: int = 0
    maps: int = 0
    hidden: int = 0
    reducer: int = 0

    @property
    def uses_metadata(self) -> bool:
        return self.method is not None

    @classmethod
    def from_config(
        cls, comb_method: str | None, comb_config: Any, reducer: int, num_features: int
    ) -> FusionSpec:
        """Parse the seed's three keys for a network with ``num_features`` pooled features.

        Raises:
            FusionConfigError: naming the keys, for a method that does not exist, a
                ``_comb_config`` of the wrong form or size, ``maps`` that do not divide
                ``num_features``, or a negative reducer.
        """
        if not (isinstance(reducer, int) and not isinstance(reducer, bool) and reducer >= 0):
            raise FusionConfigError(f"_neurons_reducer_block={reducer!r} must be an int >= 0 "
                                    "(0: no reducer block)")
        if comb_method is None:
            if comb_config is not None:
                raise FusionConfigError(f"_comb_config={comb_config!r} is set but _comb_method is "
                                        "None: set a method or leave _comb_config=None")
            return cls(reducer=reducer)
        if comb_method not in COMB_METHODS:
            raise FusionConfigError(f"_comb_method={comb_method!r} is unknown; allowed None, "
                                    + ", ".join(repr(m) for m in COMB_METHODS))
        is_list = isinstance(comb_config, (list, tuple))
        values = list(comb_config) if is_list else [comb_config]
        list_form = LIST_FORMS[comb_method]
        if not all(_positive_int(v) for v in values) or (
                is_list and (list_form is None or len(values) != list_form.count(",") + 1)):
            forms = "M" if list_form is None else f"{list_form} or M"
            raise FusionConfigError(
                f"_comb_config={comb_config!r} does not fit _comb_method={comb_method!r}: "
                f"expected {forms} (positive ints; M = metadata features)")
        spec = cls._parse(comb_method, values, num_features, reducer)
        if spec.maps and num_features % spec.maps:
            raise FusionConfigError(
                f"_comb_config={comb_config!r}: {spec.maps} feature maps do not divide the "
                f"network's {num_features} pooled features (_comb_method={comb_method!r})")
        return spec

    @classmethod
    def _parse(cls, method: str, values: list[int], num_features: int, reducer: int) -> FusionSpec:
        if method == "concat":
            return cls(method, values[0], reducer=reducer)
        if method == "metablock":
            maps, meta = values if len(values) == 2 else (num_features // METABLOCK_GROUP, values[0])
            return cls(method, meta, maps=maps, reducer=reducer)
        if len(values) == 3:
            meta, hidden, maps = values
        else:
            maps = num_features // METANET_GROUP
            meta, hidden = values[0], 2 * maps
        return cls(method, meta, maps=maps, hidden=hidden, reducer=reducer)

    def out_features(self, num_features: int) -> int:
        """Width of the fused vector the classifier sees (``avg_pool`` of ``forward_kd``)."""
        width = self.reducer or num_features
        return width + self.meta_features if self.method == "concat" else width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FusionSpec:
        """The spec a checkpoint recorded; ``None`` (older checkpoints): image only."""
        return cls(**dict(data)) if data else cls()


def infer_fusion(state_dict: Mapping[str, torch.Tensor], num_features: int) -> FusionSpec:
    """The :class:`FusionSpec` a network state dict was built with, read from its shapes.

    For checkpoints that do not record it (the seed's fused networks): MetaBlock's
    ``comb.fb.0.weight`` is (maps, M); MetaNet's convolutions are (hidden, M, 1, 1) and
    (maps, hidden, 1, 1); the reducer's first layer is (n, C); concat is what is left
    when the classifier is wider than the reducer (or C) without a ``comb``.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    reducer = int(sd["reducer_block.0.weight"].shape[0]) if "reducer_block.0.weight" in sd else 0
    if "comb.fb.0.weight" in sd:
        maps, meta = sd["comb.fb.0.weight"].shape
        return FusionSpec("metablock", int(meta), maps=int(maps), reducer=reducer)
    if "comb.metanet.0.weight" in sd:
        hidden, meta = sd["comb.metanet.0.weight"].shape[:2]
        maps = sd["comb.metanet.2.weight"].shape[0]
        return FusionSpec("metanet", int(meta), maps=int(maps), hidden=int(hidden), reducer=reducer)
    extra = int(sd["classifier.weight"].shape[1]) - (reducer or num_features) \
        if "classifier.weight" in sd else 0
    return FusionSpec("concat", extra, reducer=reducer) if extra > 0 else FusionSpec(reducer=reducer)


class MetaBlock(nn.Module):
    """Per-group gate of the pooled features from the metadata (MetaBlock, JBHI 2021)."""

    def __init__(self, maps: int, meta_features: int):
        super().__init__()
        self.fb = nn.Sequential(nn.Linear(meta_features, maps), nn.BatchNorm1d(maps))
        self.gb = nn.Sequential(nn.Linear(meta_features, maps), nn.BatchNorm1d(maps))

    def forward(self, groups: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """``groups`` (N, maps, k), ``meta`` (N, M) -> (N, maps, k)."""
        scale, shift = self.fb(meta).unsqueeze(-1), self.gb(meta).unsqueeze(-1)
        return torch.sigmoid(torch.tanh(groups * scale) + shift)


class MetaNet(nn.Module):
    """Per-group weights in (0, 1) from the metadata (MetaNet, ISBI 2020)."""

    def __init__(self, meta_features: int, hidden: int, maps: int):
        super().__init__()
        # 1x1 convolutions on a 1x1 "image" of the metadata, as the paper and the seed.
        self.metanet = nn.Sequential(
            nn.Conv2d(meta_features, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, maps, 1), nn.Sigmoid()
        )

    def forward(self, groups: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """``groups`` (N, maps, k), ``meta`` (N, M) -> (N, maps, k)."""
        weights = self.metanet(meta[:, :, None, None]).flatten(1)
        return groups * weights.unsqueeze(-1)


def build_comb(spec: FusionSpec) -> nn.Module | None:
    """The grouping module of ``spec`` (``None`` for concat and image only)."""
    if spec.method == "metablock":
        return MetaBlock(spec.maps, spec.meta_features)
    if spec.method == "metanet":
        return MetaNet(spec.meta_features, spec.hidden, spec.maps)
    return None


def build_reducer(spec: FusionSpec, num_features: int) -> nn.Module | None:
    """``Linear(C, n) + BatchNorm1d + ReLU + Dropout(0.5)``, or ``None`` when n = 0."""
    if not spec.reducer:
        return None
    return nn.Sequential(nn.Linear(num_features, spec.reducer), nn.BatchNorm1d(spec.reducer),
                         nn.ReLU(), nn.Dropout(p=REDUCER_DROPOUT))


def fuse(
    spec: FusionSpec,
    comb: nn.Module | None,
    reducer: nn.Module | None,
    pooled: torch.Tensor,
    meta: torch.Tensor | None,
) -> torch.Tensor:
    """The classifier's input from the pooled image features and the metadata."""
    if spec.uses_metadata:
        if meta is None:
            raise ValueError(f"this network fuses metadata (_comb_method={spec.method!r}): "
                             "pass meta (N, {}) with the images".format(spec.meta_features))
        if meta.dim() != 2 or meta.shape[1] != spec.meta_features:
            raise ValueError(f"meta has shape {tuple(meta.shape)}; the network expects "
                             f"(N, {spec.meta_features})")
        meta = meta.to(pooled.dtype)
    elif meta is not None:
        raise ValueError("this network has no metadata fusion (_comb_method=None) but got meta")
    x = pooled
    if comb is not None:
        x = comb(x.reshape(x.shape[0], spec.maps, -1), meta).flatten(1)
    if reducer is not None:
        x = reducer(x)
    if spec.method == "concat":
        x = torch.cat([x, meta], dim=1)
    return x
