#!/usr/bin/env bash
# The test command: set everything up (idempotent), then run the whole suite
# (unit: pure torch; comfy: in-process ComfyUI; server: a real ComfyUI server over HTTP).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY="$(bash "$ROOT/scripts/setup.sh" | tail -n 1)"
VENV="${LORACLR_VENV:-$ROOT/.venv}"
cd "$ROOT"
COMFYUI_PATH="$COMFY" exec "$VENV/bin/python" -m pytest tests -q "$@"
