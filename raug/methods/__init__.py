"""Distillation methods on the shared engine: D-KD (+ ablations) and SSD-KD.

* :mod:`raug.methods.teacher` -- inspect, validate, load and freeze the teacher
* :mod:`raug.methods.dkd` -- :class:`DKDTask` and ``isic_d_kd.py``'s task builder
* :mod:`raug.methods.teacher_head` -- SSD-KD phase 1 (:class:`RotationHeadTask`),
  fit-or-reuse of the saved teacher head
* :mod:`raug.methods.ssdkd` -- :class:`SSDKDTask` and ``isic_ssd_kd.py``'s task builder
* :mod:`raug.methods.kd_config` -- the KD config keys of both scripts and their checks

Config keys, the ``_kd_method`` table and the outputs: ``docs/methods.md``.
"""

from raug.methods.dkd import DKDTask, dkd_task
from raug.methods.ssdkd import SSDKDTask, ssdkd_task
from raug.methods.teacher import Teacher, frozen_forward, load_teacher
from raug.methods.teacher_head import RotationHeadTask, prepare_teacher_head

__all__ = [
    "DKDTask",
    "RotationHeadTask",
    "SSDKDTask",
    "Teacher",
    "dkd_task",
    "frozen_forward",
    "load_teacher",
    "prepare_teacher_head",
    "ssdkd_task",
]
