#!/usr/bin/env bash
# Prepare ISIC 2019 for training: official files under --root (default
# data/ISIC2019 of this repository) -> train/ and test/ with the parsed CSVs and
# resized images. Works from any directory; relative --root paths are relative
# to the current directory. Options: --root DIR, --size PX|none (default 320),
# --workers N, --group-by-lesion, --no-progress, --download [--base-url URL]
# (first fetch the official files into --root; details: --help, docs/data.md).
#
# Interpreter: $PYTHON if set, else the repository's .venv/bin/python (created by
# tools/env.sh), else python3; it must have the project installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python || true)"
fi
if [ -z "$PY" ] || ! "$PY" -c "import raug.isic2019" 2>/dev/null; then
    echo "error: no Python with the project installed (tried '${PY:-none}');" \
         "run 'bash tools/env.sh' or set PYTHON" >&2
    exit 2
fi
# The first argument after the -c program is the default --root; -c rather than -m
# because the package imports the module and runpy would warn about re-running it.
exec "$PY" -c 'import sys
from raug.isic2019.prepare import main
sys.exit(main(sys.argv[2:], default_root=sys.argv[1]))' "$ROOT/data/ISIC2019" "$@"
