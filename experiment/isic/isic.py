"""Teacher training: a ResNet-50 on ISIC 2019 with class-weighted cross-entropy.

Run from any directory (paths resolve against the repository root)::

    python experiment/isic/isic.py                       # the seed's defaults, 224 px, 150 epochs
    python experiment/isic/isic.py with quick _base_path=DIR _device=cpu   # CPU smoke run
    python experiment/isic/isic.py with _resume=True     # continue an interrupted run

Outputs go to ``_save_folder`` (default ``results/isic_teacher_fold<_folder>``, for a
``quick`` run ``results/quick/isic_teacher_fold<_folder>``); its
``best-checkpoint/best-checkpoint.pth`` is the teacher the KD scripts load by default.
Config keys and the output layout: ``docs/engine.md``.
"""

import models
from raug.methods.metadata import fusion_spec, metadata_problems
from raug.run.experiment import make_experiment
from raug.train.method import Method, RunContext
from raug.train.task import ClassificationTask


def check_model(config):
    """The model name is known and the metadata keys fit it (its ImageNet weights: the
    hook below, main command only)."""
    try:
        models.canonical_name(config["_model_name"])
    except ValueError as exc:
        return [f"_model_name={config['_model_name']!r} is invalid: {exc}"]
    return metadata_problems(config, "_model_name")


def teacher_task(ctx: RunContext) -> ClassificationTask:
    """ResNet-50 (or ``_model_name``) trained with the training folds' class weights."""
    model = models.create_model(
        ctx.config["_model_name"],
        num_classes=len(ctx.data.class_names),
        # a resumed run loads its own weights: no ImageNet file needed then
        pretrained=ctx.config["_pretrained"] and not ctx.config["_resume"],
        fusion=fusion_spec(ctx.config, "_model_name"),
    )
    return ClassificationTask(model, ctx.data.class_weight)


TEACHER = Method("teacher", teacher_task, checks=(check_model,))

# _pretrained=True: missing ImageNet weights are downloaded before the run folder exists.
ex = make_experiment("isic", {"_model_name": "resnet-50"}, method=TEACHER, save_name="isic_teacher",
                     weights_key="_model_name")


@ex.automain
def main(_run, _config):
    """Train the teacher, evaluate its best checkpoint on the validation fold and the test set."""
    return ex.train(_run, _config)
