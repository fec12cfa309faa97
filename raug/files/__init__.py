"""Files: atomic writes, self-describing checkpoints, the save-folder lock, the path rules.

The bottom layer: imports nothing else from ``raug``.
"""
