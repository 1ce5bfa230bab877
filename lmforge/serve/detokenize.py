"""Streaming text out of token ids: incremental detokenisation and stop strings.

* ``IncrementalDetokenizer`` turns tokens into text deltas without ever emitting half a UTF-8 character (byte-level BPE
  splits multi-byte characters across tokens; the decoder shows an unfinished one as U+FFFD, so we wait for more; a
  completion that ends inside a character drops that unfinished tail, so streamed and whole texts agree).
* ``StopStringMatcher`` holds back text that could be the start of a stop string, so a stop string that spans token
  boundaries is caught and never emitted.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode a growing token list into text deltas (the prefix/read-offset scheme vLLM and TGI use)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (may be '')."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back, at the end of a completion.  An unfinished character at the very end (a
        completion cut by ``max_tokens`` or a stop token in the middle of a multi-byte character) is dropped rather
        than shown as U+FFFD, as the streaming deltas never show it: the text never ends in half a character."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):].rstrip(REPLACEMENT)


class StopStringMatcher:
    """Feed text deltas in; get back the text that is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything accepted so far (truncated at a stop string)
        self.emitted = 0  # chars of self.text already returned

    def _held_back(self) -> int:
        """Length of the longest suffix of the unemitted text that is a proper prefix of some stop string."""
        pending = len(self.text) - self.emitted
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, pending), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            self.text += delta
            self.emitted = len(self.text)
            return delta, False
        start = max(self.emitted, len(self.text) - self.max_len + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted:cut]
            self.text = self.text[:cut]
            self.emitted = cut
            return out, True
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
