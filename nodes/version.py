"""The pack's version, read from pyproject.toml: the one place it is written."""
from __future__ import annotations

import os
import re

_PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def pack_version(path: str = _PYPROJECT) -> str:
    """``[project] version`` of pyproject.toml (read as text: tomllib is Python 3.11+ only)."""
    section = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[project]":
                m = re.match(r'version\s*=\s*"([^"]+)"', line)
                if m:
                    return m.group(1)
    raise RuntimeError(f"no [project] version in {path}")


PACK_VERSION = pack_version()
