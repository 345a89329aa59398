"""The text of one generated row as tokens arrive: stop strings and streamed deltas.

SentencePiece text is only stable once a token completes it: a character split over
byte-fallback tokens decodes to U+FFFD until its last byte arrives. So each row keeps an
anchor, the longest token prefix whose text ended on a whole character and so can never
change, and decodes only the tokens after it (with the anchor's last token in front, so
that spaces decode as they do mid-text). Each token costs O(1) decoding, and the row
hands out only text that cannot change any more, nor turn out to begin a stop string.
"""

from typing import Callable, List, Sequence

REPLACEMENT = "\ufffd"


class TextRow:
    def __init__(self, decode: Callable[[List[int]], str], stop: Sequence[str] = (),
                 prefix: Sequence[int] = ()):
        """decode: token ids -> text. stop: strings that end the row (excluded from the
        text). prefix: tokens decoded in front of the generated ones (the prompt, with
        echo), in which stop strings are not searched."""
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.prefix = list(prefix)
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.text = decode(self.prefix) if self.prefix else ""
        self.generated_from = len(self.text)  # stop strings are searched from here on
        self.emitted = 0  # characters already handed out by delta()
        self.stopped = False
        # prefix + tokens[:anchor] decode to text[:anchor_chars], for good.
        self.anchor = 0
        self.anchor_chars = len(self.text) if not self.text.endswith(REPLACEMENT) else 0
        if not self.anchor_chars:
            self.anchor = -len(self.prefix)  # decode the prefix again with the tokens

    def decode_all(self) -> str:
        """The text of prefix + tokens, decoding only what follows the anchor."""
        ids = self.prefix + self.tokens
        start = len(self.prefix) + self.anchor
        if start == 0:
            return self.decode(ids)
        # Decode from the anchor's last token, then drop that token's own text.
        tail = self.decode(ids[start - 1:])[len(self.decode(ids[start - 1:start])):]
        return self.text[: self.anchor_chars] + tail

    def add(self, token: int, logprob: float) -> bool:
        """Append a token; True if a stop string now ends this row."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        text = self.decode_all()
        if self.stop:
            # Only a match that overlaps the new text can be new. Partial characters at
            # the old end may have shrunk into one, so count from the last whole one.
            old_end = len(self.text.rstrip(REPLACEMENT))
            start = max(self.generated_from, old_end - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                text = text[: min(hits)]
                self.stopped = True
                # Keep the tokens that lie wholly before the stop string.
                while self.tokens and len(self.decode(self.prefix + self.tokens)) > len(text):
                    self.tokens.pop()
                    self.logprobs.pop()
        self.text = text
        if not text.endswith(REPLACEMENT) and not self.stopped:
            self.anchor, self.anchor_chars = len(self.tokens), len(text)
        return self.stopped

    def delta(self, final: bool = False) -> str:
        """Text not handed out before. Unless `final`, it holds back a trailing partial
        character and any tail that could still grow into a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            while end > self.emitted and self.text[end - 1] == REPLACEMENT:
                end -= 1
            end -= self.stop_prefix_len(end)
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def stop_prefix_len(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop
        string (searched only within the generated text)."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.generated_from), longest, -1):
                if self.text.endswith(s[:n], 0, end):
                    longest = n
                    break
        return longest
