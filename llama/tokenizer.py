"""SentencePiece tokenizer with Code Llama's infilling and 70B-Instruct `<step>` pieces."""

import os
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

# A character whose encoding starts with the dummy-prefix piece, so that encoding "☺" + s
# and dropping the first two ids yields s without SentencePiece's implicit leading space.
_ANCHOR = "☺"


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path}; pass tokenizer_path=<model dir>/tokenizer.model"
            )
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:  # sentencepiece's messages omit the file
            raise ValueError(f"{model_path} cannot be read as a SentencePiece model ({e}): it "
                             f"is empty or damaged; download it again") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        # Absent pieces (Python and 34B models) map to the unk id 0, hence `or None`.
        self.prefix_id: Optional[int] = self.sp_model.piece_to_id("▁<PRE>") or None
        self.middle_id: Optional[int] = self.sp_model.piece_to_id("▁<MID>") or None
        self.suffix_id: Optional[int] = self.sp_model.piece_to_id("▁<SUF>") or None
        self.eot_id: Optional[int] = self.sp_model.piece_to_id("▁<EOT>") or None
        self.step_id: Optional[int] = self.sp_model.piece_to_id("<step>") or None

    @property
    def supports_infilling(self) -> bool:
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    @property
    def control_ids(self) -> set:
        """Ids that steer the model and must not come out of encoding user text."""
        ids = (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id, self.step_id)
        return {i for i in ids if i is not None}

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        check_text(s)
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode([i for i in t if i != self.pad_id])

    def token_piece(self, t: int) -> str:
        return self.sp_model.id_to_piece(t)

    def encode_infilling(self, s: str) -> List[int]:
        """Encode without the implicit leading space (used for the suffix)."""
        check_text(s)
        return self.sp_model.encode(_ANCHOR + s)[2:]

    def decode_infilling(self, t: List[int]) -> str:
        """Decode keeping a leading space that SentencePiece would strip."""
        return self.sp_model.decode([self.sp_model.piece_to_id(_ANCHOR)] + t)[1:]


def check_text(s: str, what: str = "text") -> None:
    """Refuse a str that is not valid Unicode text: a lone surrogate such as "\\ud800"
    (from bytes decoded with errors="surrogateescape", or a JSON escape) has no UTF-8
    form, and SentencePiece would fail on it with an unrelated-looking RuntimeError."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        excerpt = s if len(s) <= 60 else s[:60] + "..."
        raise ValueError(
            f"the {what} {excerpt!r} holds the lone surrogate {s[e.start]!r} at character "
            f"{e.start}, which is not valid Unicode text; decode the input properly (for "
            f"example errors='replace') or remove that character"
        ) from None
