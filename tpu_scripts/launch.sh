#!/usr/bin/env bash
# Run one command on every worker of a (multi-host) Cloud TPU slice at once.
#
# Usage: tpu_scripts/launch.sh TPU_NAME ZONE "COMMAND" [extra gcloud flags]
#
#   # copy this checkout to every worker, set it up, then train:
#   tpu_scripts/launch.sh my-v5p-32 us-east5-a --copy
#   tpu_scripts/launch.sh my-v5p-32 us-east5-a "bash jlora/tpu_scripts/setup.sh"
#   tpu_scripts/launch.sh my-v5p-32 us-east5-a \
#     "source ~/jlora-venv/bin/activate && python jlora/tpu_scripts/train.py --fsdp -1 ..."
#
# JAX programs on a slice must start on all workers (jax.distributed.initialize()
# waits for every process); this uses `gcloud compute tpus tpu-vm ssh --worker=all`.
# Output of every worker is streamed, prefixed by gcloud; the command's exit status is
# gcloud's. Set PROJECT to pass --project. Use `--copy` as the command to scp this
# checkout (without .venv and .git) to ~/jlora on every worker.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
NAME="$1"; ZONE="$2"; COMMAND="$3"; shift 3
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")

if [[ "$COMMAND" == "--copy" ]]; then
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  ARCHIVE="$(mktemp -d)/jlora.tar.gz"
  tar -C "$ROOT/.." --exclude=.venv --exclude=.git --exclude='__pycache__' \
    -czf "$ARCHIVE" "$(basename "$ROOT")"
  gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:~/jlora.tar.gz" --zone "$ZONE" \
    --worker=all "${PROJECT_FLAG[@]}" "$@"
  COMMAND="rm -rf ~/jlora && mkdir -p ~/jlora && tar -xzf ~/jlora.tar.gz -C ~/jlora --strip-components=1"
fi

exec gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all \
  "${PROJECT_FLAG[@]}" --command "$COMMAND" "$@"
