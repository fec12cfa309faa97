"""Distillation terms: pure functions, tensors in, scalar tensor out, weights applied outside.

One short cited file per term (paper title and link in each module's docstring):

* :func:`weighted_ce` (``ce.py``), :func:`soft_kd` (``soft_kd.py``)
* :func:`rkd_distance`, :func:`rkd_angle` (``rkd.py``)
* :func:`channel_relation` (``channel_relation.py``), :func:`fitnet` (``fitnet.py``)
* :func:`rotate_views`, :func:`view_labels`, :func:`view_similarity`,
  :func:`rotation_ss_loss` (``views.py``)
* :func:`ssd_kd_terms` (``ssd.py``), :func:`ssd_kd_loss` (``ssd_kd.py``)
* :func:`d_kd`, :data:`KD_METHODS`, :func:`relational_kd` (``d_kd.py``)

Teacher inputs are detached inside every term; results keep the student's dtype.
"""

from .ce import weighted_ce
from .channel_relation import channel_relation
from .d_kd import KD_METHODS, d_kd, relational_kd
from .fitnet import fitnet
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

__all__ = [
    "KD_METHODS",
    "channel_relation",
    "d_kd",
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
