"""Reports: evaluation files and figures of a trained model, run tables, comparisons.

* :mod:`raug.report.evaluate`, :mod:`raug.report.plots` -- per-split predictions, metrics, figures
* :mod:`raug.report.runs`, :mod:`raug.report.aggregate` -- tables of runs (``python -m raug.report.runs``)
* :mod:`raug.report.compare` -- teacher/students side by side (test metrics, footprint)
* :mod:`raug.report.seeds` -- the main job's mean ± sd over seeds (tables, chart)

Imports :mod:`raug.files` and :mod:`raug.train` only.
"""
