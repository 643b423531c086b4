"""Removing the trigger from a caption on token ids.

The CAT term needs the caption *without* the trigger. Removing it from the text and re-tokenizing
would shift every later token and change how neighbouring words are split; removing it from the
token ids keeps the rest of the caption exactly as the model saw it. Handled:

* every occurrence of every trigger (a trigger may span several tokens, e.g. "<sks>" or "sks dog"),
* wrapping brackets around a trigger ("<sks>", "(sks)", "[sks]"),
* a separator right after a removed trigger ("sks, a dog" → "a dog"; "<sks>, a dog" → "a dog").

Everything is plain lists of ints; the caller supplies the tokenizer's ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class TriggerNotFound(ValueError):
    pass


@dataclass
class TriggerRemover:
    triggers: list  # list of token-id sequences, one per trigger
    wrappers: dict = field(default_factory=dict)  # opening id -> closing id(s), e.g. "<" -> ">"
    separators: set = field(default_factory=set)  # ids dropped right after a removed trigger, e.g. ","

    def __post_init__(self):
        self.triggers = [list(t) for t in self.triggers if len(t) > 0]
        if not self.triggers:
            raise ValueError("no trigger tokens given")
        # longest first, so "sks dog" wins over "sks"
        self.triggers.sort(key=len, reverse=True)
        # a closing bracket can have several token ids (BPE spells it differently before a comma)
        self.wrappers = {k: ({v} if isinstance(v, int) else set(v)) for k, v in self.wrappers.items()}

    def _scan(self, ids: list[int]) -> tuple[list[int], int]:
        """Indices of the tokens to keep, and the number of triggers found."""
        kept, i, found = [], 0, 0
        ids = list(ids)
        while i < len(ids):
            hit = next((t for t in self.triggers if ids[i:i + len(t)] == t), None)
            if hit is None:
                kept.append(i)
                i += 1
                continue
            found += 1
            end = i + len(hit)
            # a bracket pair around the trigger goes with it
            if kept and ids[kept[-1]] in self.wrappers and end < len(ids) and ids[end] in self.wrappers[ids[kept[-1]]]:
                kept.pop()
                end += 1
            while end < len(ids) and ids[end] in self.separators:
                end += 1
            i = end
        # a separator left dangling at the end of the caption (e.g. "a dog, sks")
        if found:
            while kept and ids[kept[-1]] in self.separators:
                kept.pop()
        return kept, found

    def remove(self, ids: list[int]) -> tuple[list[int], int]:
        """Returns (ids without the triggers, number of triggers removed)."""
        kept, found = self._scan(ids)
        return [ids[i] for i in kept], found

    def kept_indices(self, ids: list[int], caption: str = "") -> list[int]:
        """Indices of the tokens that stay; raises TriggerNotFound if no trigger is in ``ids``."""
        kept, found = self._scan(ids)
        if not found:
            raise TriggerNotFound(f"caption {caption!r} does not contain the trigger")
        return kept
