"""raug: the shared engine behind every experiment script (data, training loop, metrics, runs)."""

import warnings

# Sacred 0.8.7 imports pkg_resources at import time; setuptools<81 (pinned in requirements.txt)
# still ships it but warns on every import. The warning is about Sacred, not about the user's
# run, so keep it out of every log.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
