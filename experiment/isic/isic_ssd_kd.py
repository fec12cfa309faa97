"""Student training by SSD-KD: teacher projection head (phase 1), then the student (phase 2).

Run from any directory (paths resolve against the repository root)::

    python experiment/isic/isic_ssd_kd.py with '_kd_method="ssd_kd"' '_lambd_drkd=1' '_lambd_crkd=1000'
    python experiment/isic/isic_ssd_kd.py with quick _base_path=DIR    # CPU smoke run

Phase 1 fits the teacher's projection head on the rotation task and saves it
(``<_save_folder>/teacher-head/teacher-head.pth`` or ``_teacher_head``); a rerun
with the same teacher reuses it. Phase 2 trains the student, its projection
head and the adapter with the SSD-KD loss. Outputs go to ``_save_folder``
(default ``results/student_ssd_kd_fold<_folder>``; ``quick`` runs: under ``results/quick/``),
laid out like isic.py's.
Config keys and view semantics: ``docs/methods.md``.
"""

from raug.methods.kd_config import SSDKD_CONFIG, SSDKD_QUICK
from raug.methods.ssdkd import SSD_KD_METHOD
from raug.run.kd_experiment import make_kd_experiment

ex = make_kd_experiment("isic_ssd_kd", SSDKD_CONFIG, SSDKD_QUICK, SSD_KD_METHOD)


@ex.automain
def main(_run, _config):
    """Fit (or reuse) the teacher head, distil into the student, evaluate the best student."""
    return ex.train(_run, _config)
