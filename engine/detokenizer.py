"""Incremental detokenization and stop strings for one generated sequence."""

from __future__ import annotations

# Prompt tokens decoded with the first outputs, so a leading space or a multi-byte character decodes
# as it will in the full text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns token ids into text one step at a time, holding back incomplete characters."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append new token ids; return the text they complete (possibly empty)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop_string(text: str, new_len: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """The earliest stop string completed by the last new_len characters, and where the text ends."""
    hit: tuple[str, int] | None = None
    for stop in stops:
        idx = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
        if idx != -1 and (hit is None or idx < hit[1]):
            hit = (stop, idx)
    if hit is None:
        return None
    stop, idx = hit
    return stop, idx + len(stop) if include else idx
