"""Student training by D-KD (and its ablations): a frozen ResNet-50 teacher, a MobileNet-V2 student.

Run from any directory (paths resolve against the repository root)::

    python experiment/isic/isic_d_kd.py with '_kd_method="d_kd"' '_lambd_drkd=1' '_lambd_crkd=1000'
    python experiment/isic/isic_d_kd.py with _kd_method=blkd          # an ablation
    python experiment/isic/isic_d_kd.py with quick _base_path=DIR      # CPU smoke run

The teacher is ``_teacher_ckpt`` (default: the best checkpoint of isic.py's
default run for ``_folder``, refused if that run was a ``quick`` one or used another
``_img_size``). Outputs go to ``_save_folder`` (default
``results/student_<_kd_method>_fold<_folder>``; ``quick`` runs: under ``results/quick/``),
laid out like isic.py's.
Config keys and the ``_kd_method`` table: ``docs/methods.md``.
"""

from raug.methods.dkd import DKD_METHOD
from raug.methods.kd_config import DKD_CONFIG, DKD_QUICK
from raug.run.kd_experiment import make_kd_experiment

ex = make_kd_experiment("isic_d_kd", DKD_CONFIG, DKD_QUICK, DKD_METHOD)


@ex.automain
def main(_run, _config):
    """Distil the teacher into the student, evaluate the best student on val and test."""
    return ex.train(_run, _config)
