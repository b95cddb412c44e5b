#!/usr/bin/env bash
# Prepare a Cloud TPU VM (every worker of a slice) for jlora training.
#
# Usage, on one VM:            bash tpu_scripts/setup.sh
#        on every worker:      ./tpu_scripts/launch.sh NAME ZONE "bash jlora/tpu_scripts/setup.sh"
#
# Environment:
#   JLORA_SRC   where jlora comes from: a pip requirement or a local checkout
#               (default: this checkout if the script runs from one, else the git URL
#               in JLORA_GIT)
#   JLORA_GIT   git URL used when no checkout is found
#   VENV        virtual environment to create (default ~/jlora-venv)
#   JAX_SPEC    the JAX requirement (default "jax[tpu]"; pin it, e.g. "jax[tpu]==0.10.2",
#               to match the version jlora was tested with)
set -euo pipefail

VENV="${VENV:-$HOME/jlora-venv}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${JLORA_SRC:-}" ]]; then
  if [[ -f "$HERE/../pyproject.toml" ]]; then
    JLORA_SRC="$(cd "$HERE/.." && pwd)"
  elif [[ -n "${JLORA_GIT:-}" ]]; then
    git clone --depth 1 "$JLORA_GIT" "$HOME/jlora"
    JLORA_SRC="$HOME/jlora"
  else
    echo "setup.sh: set JLORA_SRC (a checkout or pip requirement) or JLORA_GIT" >&2
    exit 2
  fi
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup.sh: jlora needs Python >= 3.10; found $("$PYTHON" --version)" >&2
  exit 2
fi
if [[ ! -d "$VENV" ]]; then
  "$PYTHON" -m venv "$VENV" || { sudo apt-get update -q && sudo apt-get install -y -q python3-venv \
    && "$PYTHON" -m venv "$VENV"; }
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip install -q --upgrade pip
# libtpu comes with jax[tpu] from the index JAX's installation guide names.
pip install -q "$JAX_SPEC" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
pip install -q -e "$JLORA_SRC" 2>/dev/null || pip install -q "$JLORA_SRC"
# gcsfs lets etils.epath (Orbax, train.py) read and write gs:// paths;
# transformers only for --tokenizer.
pip install -q gcsfs transformers

python - <<'PY'
import jax, jlora
print(f"jax {jax.__version__}, jlora {jlora.__version__}: process {jax.process_index()} "
      f"sees {jax.local_device_count()} local of {jax.device_count()} devices "
      f"({jax.devices()[0].device_kind})")
PY
echo "setup.sh: done; activate with: source $VENV/bin/activate"
