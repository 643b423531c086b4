#!/usr/bin/env bash
# The main job: set everything up (idempotent), then run the example merge workflow headless on a
# real ComfyUI server with the micro model; prints where the merged LoRA and the image are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY="$(bash "$ROOT/scripts/setup.sh" | tail -n 1)"
VENV="${LORACLR_VENV:-$ROOT/.venv}"
exec "$VENV/bin/python" "$ROOT/scripts/run_example.py" --comfy "$COMFY" "$@"
