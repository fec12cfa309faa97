"""Distillation methods on the shared engine: D-KD (+ ablations) and SSD-KD.

* :mod:`raug.methods.teacher` -- inspect, validate, load and freeze the teacher
* :mod:`raug.methods.dkd` -- :class:`DKDTask` and ``isic_d_kd.py``'s method :data:`DKD_METHOD`
* :mod:`raug.methods.teacher_head` -- SSD-KD phase 1 (:class:`RotationHeadTask`),
  fit-or-reuse of the saved teacher head
* :mod:`raug.methods.ssdkd` -- :class:`SSDKDTask` and ``isic_ssd_kd.py``'s method
  :data:`SSD_KD_METHOD` (phase ``"teacher-head"``, then the student)
* :mod:`raug.methods.kd_config` -- the KD config keys of both scripts and their checks,
  derived from ``kd_losses``' weights classes and method tables

Nothing here imports Sacred: the scripts' experiments are built by ``raug.run.kd_experiment``.

Config keys, the ``_kd_method`` table and the outputs: ``docs/methods.md``.
"""

from raug.methods.dkd import DKD_METHOD, DKDTask, dkd_task
from raug.methods.ssdkd import SSD_KD_METHOD, SSDKDTask, ssdkd_task
from raug.methods.teacher import Teacher, frozen_forward, load_teacher
from raug.methods.teacher_head import RotationHeadTask, prepare_teacher_head

__all__ = [
    "DKD_METHOD",
    "SSD_KD_METHOD",
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
