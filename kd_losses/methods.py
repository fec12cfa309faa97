"""The ``_kd_method`` tables: one row per method, everything else derives from them.

A row says which terms the method's loss adds (and so the parts it logs), whether
it needs the teacher and the adapter, the smallest batch it accepts, and its
weights class. The losses (:func:`kd_losses.d_kd`, :func:`kd_losses.ssd_kd_loss`),
the config checks and task wiring of ``raug.methods``, the scripts' allowed
values and the table in ``docs/methods.md`` (:func:`methods_markdown`) all read
these rows; nothing else lists the methods.

Adding a D-KD ablation: a loss file for its new term (if any), a row in
:data:`DKD_FAMILY`, a field in :class:`~kd_losses.weights.DKDWeights` for a new
weight, and tests (``docs/methods.md`` walks through one: soft KD plus the FitNet hint).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .weights import DKDWeights, RelationalWeights, SSDKDWeights

RKD_MIN_BATCH = 3  # the RKD angle compares triplets of samples
MIN_BATCH = 2  # every method: the engine's shared minimum (_batch_size >= 2)


@dataclass(frozen=True)
class DKDMethod:
    """A row of the D-KD family (``isic_d_kd.py``): which terms join ``CE_w``.

    Attributes:
        name: the ``_kd_method`` value.
        soft_kd: ``(1 - lambd) CE_w + lambd T^2 kd`` instead of ``CE_w`` alone.
        rkd: adds ``lambd_drkd (25 rkd_distance + 50 rkd_angle)`` on ``avg_pool``.
        channel_relation: adds ``lambd_crkd channel_relation`` on the adapted ``feats_7x7``.
        fitnet: adds ``lambd_fitnet fitnet`` (hint MSE) on the adapted ``feats_7x7``.
        summary: the loss in one line (``docs/methods.md``).
    """

    name: str
    summary: str
    soft_kd: bool = False
    rkd: bool = False
    channel_relation: bool = False
    fitnet: bool = False

    family = "d_kd"
    weights_class = DKDWeights

    def relational(self, weights: DKDWeights) -> RelationalWeights | None:
        """The relational block's weights with this method's parts only (``None``: no block)."""
        if not (self.rkd or self.channel_relation):
            return None
        return weights.relational.only(self.rkd, self.channel_relation)

    def terms(self, weights: DKDWeights) -> tuple[str, ...]:
        """The unweighted parts the loss returns (and the engine logs), besides ``loss``."""
        terms = ["ce"]
        if self.soft_kd:
            terms.append("kd")
        block = self.relational(weights)
        if block is not None and block.uses_rkd:
            terms += ["rkd_distance", "rkd_angle"]
        if block is not None and block.uses_channel_relation:
            terms.append("channel_relation")
        if self.fitnet:
            terms.append("fitnet")
        return tuple(terms)

    @property
    def needs_teacher(self) -> bool:
        """Every term but ``CE_w`` compares with the teacher."""
        return self.soft_kd or self.rkd or self.channel_relation or self.fitnet

    def needs_adapter(self, weights: DKDWeights) -> bool:
        """Feature-map terms compare the student's ``feats_7x7`` through the adapter."""
        return "channel_relation" in self.terms(weights) or self.fitnet

    def min_batch(self, weights: DKDWeights) -> int:
        """The smallest ``_batch_size`` the terms are defined for."""
        return RKD_MIN_BATCH if "rkd_angle" in self.terms(weights) else MIN_BATCH


@dataclass(frozen=True)
class SSDKDMethod:
    """A row of the SSD-KD family (``isic_ssd_kd.py``): phase 1 head fit, phase 2 loss."""

    name: str
    summary: str

    family = "ssd_kd"
    weights_class = SSDKDWeights
    needs_teacher = True

    def terms(self, weights: SSDKDWeights) -> tuple[str, ...]:
        """The parts of :func:`kd_losses.ssd_kd_loss` (``ce..ss`` with their ``T^2``)."""
        terms = ["ce", "kd", "tf", "ss", "hr"]
        if weights.hr_w != 0 and weights.relational.uses_rkd:
            terms += ["rkd_distance", "rkd_angle"]
        if weights.uses_channel_relation:
            terms.append("channel_relation")
        return (*terms, "n_tf", "n_ss")

    def needs_adapter(self, weights: SSDKDWeights) -> bool:
        """The adapter feeds only the channel relation inside ``hr``."""
        return weights.uses_channel_relation

    def min_batch(self, weights: SSDKDWeights) -> int:
        """Each rotated view is matched among the batch's images: at least 2 of them."""
        return MIN_BATCH


DKD_FAMILY: dict[str, DKDMethod] = {
    m.name: m
    for m in (
        DKDMethod("none", "CE_w (the student alone; no teacher)"),
        DKDMethod("blkd", "(1 - lambd) CE_w + lambd T^2 kd", soft_kd=True),
        DKDMethod("rkd", "blkd + lambd_drkd (25 rkd_distance + 50 rkd_angle)",
                  soft_kd=True, rkd=True),
        DKDMethod("crkd", "blkd + lambd_crkd channel_relation", soft_kd=True,
                  channel_relation=True),
        DKDMethod("d_kd", "blkd + both relational parts (the paper's D-KD)", soft_kd=True,
                  rkd=True, channel_relation=True),
        DKDMethod("fitnet", "CE_w + lambd_fitnet fitnet (hint MSE)", fitnet=True),
    )
}

SSD_KD_FAMILY: dict[str, SSDKDMethod] = {
    "ssd_kd": SSDKDMethod(
        "ssd_kd", "0.1 ce + 0.9 kd + 2.7 tf + 10 ss + hr_w hr over the 4 rotated views"
    ),
}

KD_METHODS = tuple(DKD_FAMILY)


def dkd_method(name: str) -> DKDMethod:
    """The D-KD row of ``name``.

    Raises:
        ValueError: not a D-KD method (the message lists the valid ones).
    """
    if name not in DKD_FAMILY:
        raise ValueError(f"unknown KD method {name!r}; valid: {', '.join(DKD_FAMILY)}")
    return DKD_FAMILY[name]


def methods_markdown(families: Mapping[str, Mapping[str, DKDMethod | SSDKDMethod]] | None = None) -> str:
    """The ``_kd_method`` table of ``docs/methods.md``, generated from the rows."""
    families = families or {"isic_d_kd.py": DKD_FAMILY, "isic_ssd_kd.py": SSD_KD_FAMILY}
    lines = ["| script | `_kd_method` | loss | teacher | adapter (default weights) | parts logged (default weights) | min `_batch_size` |",
             "|---|---|---|---|---|---|---|"]
    for script, rows in families.items():
        for m in rows.values():
            w = m.weights_class()
            lines.append(
                f"| `{script}` | `{m.name}` | {m.summary} | {'yes' if m.needs_teacher else 'no'} "
                f"| {'yes' if m.needs_adapter(w) else 'no'} | {', '.join(m.terms(w))} "
                f"| {m.min_batch(w)} |"
            )
    return "\n".join(lines)


__all__ = [
    "DKD_FAMILY",
    "KD_METHODS",
    "RKD_MIN_BATCH",
    "SSD_KD_FAMILY",
    "DKDMethod",
    "SSDKDMethod",
    "dkd_method",
    "methods_markdown",
]
