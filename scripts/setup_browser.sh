#!/usr/bin/env bash
# What the browser test needs, installed idempotently (called by scripts/setup.sh):
#   1. Debian's chromium (apt-get, when /usr/bin/chromium is missing and apt-get can run);
#   2. a virtual environment with Playwright's Python library (.venv-browser, or $LORACLR_BROWSER_VENV),
#      which drives that chromium (no browser download: Playwright is pointed at /usr/bin/chromium);
#   3. the ComfyUI frontend chosen by $LORACLR_FRONTEND, when it is not the pinned one:
#      a version ("1.58.1") or "latest" (the newest comfyui-frontend-package on PyPI), unpacked into
#      .cache/frontend/<version>; the test serves it with --front-end-root.
# A step that cannot be done is reported and left to the browser test, which fails in CI ($CI set)
# and skips, naming the reason, elsewhere.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BVENV="${LORACLR_BROWSER_VENV:-$ROOT/.venv-browser}"
CHROMIUM="${LORACLR_CHROMIUM:-/usr/bin/chromium}"
PLAYWRIGHT_VERSION="1.65.2"
log() { echo "[setup-browser] $*" >&2; }

if [ ! -x "$CHROMIUM" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        log "installing chromium with apt-get"
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >&2 \
            || log "could not install chromium (the browser test will say so)"
    else
        log "no $CHROMIUM and no apt-get: install chromium yourself or set LORACLR_CHROMIUM"
    fi
fi

stamp="$BVENV/.loraclr-playwright-$PLAYWRIGHT_VERSION"
if [ ! -f "$stamp" ]; then
    log "creating $BVENV with playwright==$PLAYWRIGHT_VERSION"
    { python3.11 -m venv "$BVENV" 2>/dev/null || python3 -m venv "$BVENV"; } \
        && "$BVENV/bin/python" -m pip install -q --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION" requests \
        && touch "$stamp" || log "could not install Playwright (the browser test will say so)"
fi

FRONTEND="${LORACLR_FRONTEND:-pinned}"
if [ "$FRONTEND" != "pinned" ]; then
    version="$FRONTEND"
    if [ "$FRONTEND" = "latest" ]; then
        version="$("$BVENV/bin/python" -m pip index versions comfyui-frontend-package 2>/dev/null \
                   | sed -n 's/^comfyui-frontend-package (\(.*\))$/\1/p')"
        [ -n "$version" ] || { log "could not ask PyPI for the newest comfyui-frontend-package"; exit 0; }
    fi
    dest="$ROOT/.cache/frontend/$version"
    if [ ! -f "$dest/comfyui_frontend_package/static/index.html" ]; then
        log "installing comfyui-frontend-package==$version into $dest"
        rm -rf "$dest"
        "$BVENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$dest" \
            "comfyui-frontend-package==$version" || log "could not install comfyui-frontend-package==$version"
    fi
    echo "$version" > "$ROOT/.cache/frontend/$FRONTEND.selected"
fi
exit 0
