"""Distillation terms: pure functions, tensors in, scalar tensor out, weights applied outside.

One short cited file per term (paper title and link in each module's docstring):

* :func:`weighted_ce` (``ce.py``), :func:`soft_kd` (``soft_kd.py``)
* :func:`rkd_distance`, :func:`rkd_angle` (``rkd.py``)
* :func:`channel_relation` (``channel_relation.py``), :func:`fitnet` (``fitnet.py``)
* :func:`rotate_views`, :func:`view_labels`, :func:`view_similarity`,
  :func:`rotation_ss_loss` (``views.py``)
* :func:`ssd_kd_terms` (``ssd.py``), :func:`ssd_kd_loss` (``ssd_kd.py``)
* :func:`d_kd`, :func:`relational_kd` (``d_kd.py``)
* the weights, one frozen dataclass per loss: :class:`DKDWeights`, :class:`SSDKDWeights`,
  :class:`RelationalWeights` (``weights.py``)
* the ``_kd_method`` tables :data:`DKD_FAMILY`, :data:`SSD_KD_FAMILY`, :data:`KD_METHODS`
  (``methods.py``): terms, teacher, adapter and minimum batch of each method

Teacher inputs are detached inside every term; results keep the student's dtype, but
never below float32: float16/bfloat16 inputs are upcast and autocast is off inside the
terms (``_precision.py``), while float32 and float64 inputs are used as they are.
Every formula: ``docs/kd_math.md``.
"""

from .ce import weighted_ce
from .channel_relation import channel_relation
from .d_kd import d_kd, relational_kd
from .fitnet import fitnet
from .methods import DKD_FAMILY, KD_METHODS, SSD_KD_FAMILY, DKDMethod, SSDKDMethod, dkd_method
from .rkd import pairwise_distances, rkd_angle, rkd_distance, triplet_angles
from .soft_kd import soft_kd
from .ssd import error_level_mask, masked_kl, ssd_kd_terms
from .ssd_kd import ssd_kd_loss
from .views import (
    rotate_views,
    rotation_ss_loss,
    split_views,
    view_labels,
    view_similarity,
)
from .weights import DKDWeights, RelationalWeights, SSDKDWeights

__all__ = [
    "DKD_FAMILY",
    "KD_METHODS",
    "SSD_KD_FAMILY",
    "DKDMethod",
    "DKDWeights",
    "RelationalWeights",
    "SSDKDMethod",
    "SSDKDWeights",
    "channel_relation",
    "d_kd",
    "dkd_method",
    "error_level_mask",
    "fitnet",
    "masked_kl",
    "pairwise_distances",
    "relational_kd",
    "rkd_angle",
    "rkd_distance",
    "rotate_views",
    "rotation_ss_loss",
    "soft_kd",
    "split_views",
    "ssd_kd_loss",
    "ssd_kd_terms",
    "triplet_angles",
    "view_labels",
    "view_similarity",
    "weighted_ce",
]
