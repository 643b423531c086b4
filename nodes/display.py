"""Text from files and workflows, shown as text.

Key names, file names and metadata inside a LoRA are chosen by whoever made the file; triggers and
prompts by whoever shared the workflow. Copied raw into a node's summary or an error, a newline
could fake a line of the report, an ANSI escape could recolour a terminal, and a right-to-left
override could make one name read as another. ``shown`` writes every control and bidirectional
formatting character of such a string as a visible escape (``\\n``, ``\\x1b``, ``\\u202e``);
``safe_text`` does the same for a whole report the pack wrote, keeping its own line breaks and tabs.
"""
from __future__ import annotations

import unicodedata

# Unicode's bidirectional formatting characters (embeddings, overrides, isolates, marks).
BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_unsafe(ch: str, keep: str = "") -> bool:
    return ch not in keep and (ch in BIDI or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"))


def _escape(ch: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (
        f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def shown(text) -> str:
    """``text`` (any object, made a string) with every control and bidi character escaped."""
    text = str(text)
    return "".join(_escape(c) if is_unsafe(c) else c for c in text)


def safe_text(text: str) -> str:
    """A report the pack wrote: as ``shown``, but its own line breaks and tabs stay."""
    return "".join(_escape(c) if is_unsafe(c, keep="\n\t") else c for c in text)


def first_unsafe(text: str):
    """(character, position) of the first control or bidi character, or None."""
    return next(((c, i) for i, c in enumerate(text) if is_unsafe(c)), None)
