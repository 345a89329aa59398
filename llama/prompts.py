"""Prompt token layouts: infilling (PSM and SPM), Llama-2 [INST] chat, 70B-Instruct `<step>`
chat. Pure functions of (tokenizer, inputs) that also validate their inputs."""

from typing import List, Literal, Optional, Tuple, TypedDict

from .tokenizer import Tokenizer, check_text

Role = Literal["system", "user", "assistant"]


class Message(TypedDict, total=False):
    role: Role  # required
    content: str  # required
    destination: str  # optional; only the 70B-Instruct format uses it


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLE_ORDER_ERROR = (
    "model only supports 'system', 'user' and 'assistant' roles, "
    "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
)


def require_tokenizer(tokenizer: Optional[Tokenizer]) -> Tokenizer:
    """The tokenizer that text methods need; a model made by Llama.from_preset without
    tokenizer_path has none."""
    if tokenizer is None:
        raise ValueError(
            "this Llama has no tokenizer (Llama.from_preset without tokenizer_path), so only "
            "generate() and model take input; pass tokenizer_path=<folder>/tokenizer.model "
            "to use the text methods"
        )
    return tokenizer


def completion_prompt_tokens(tokenizer: Optional[Tokenizer], prompt: str) -> List[int]:
    """A completion prompt's tokens: BOS, then the text."""
    tokenizer = require_tokenizer(tokenizer)
    if not isinstance(prompt, str):
        raise ValueError(f"each prompt must be a str, got {type(prompt).__name__}")
    check_text(prompt, "prompt")
    return tokenizer.encode(prompt, bos=True, eos=False)


def require_infilling(tokenizer: Optional[Tokenizer]) -> None:
    if not require_tokenizer(tokenizer).supports_infilling:
        raise ValueError(
            "this tokenizer has no infilling pieces (▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>): "
            "the Python and 34B Code Llama models cannot infill; use the 7B or 13B base "
            "or Instruct models"
        )


def encode_user_text(tokenizer: Tokenizer, text: str, what: str, infilling: bool) -> List[int]:
    """Encode user text, refusing text that would turn into control tokens."""
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be a str, got {type(text).__name__}")
    check_text(text, what)
    ids = tokenizer.encode_infilling(text) if infilling else tokenizer.encode(text, False, False)
    bad = tokenizer.control_ids.intersection(ids)
    if bad:
        pieces = ", ".join(sorted(tokenizer.token_piece(i) for i in bad))
        raise ValueError(
            f"the {what} contains text that encodes to the control token(s) {pieces}; "
            f"remove or alter those markers"
        )
    return ids


def infilling_prompt_tokens(
    tokenizer: Tokenizer, pre: str, suf: str, suffix_first: bool = False
) -> List[int]:
    """PSM: <s> <PRE> pre <SUF>suf <MID>   SPM: <s> <PRE> <SUF>suf <MID> pre

    The prefix keeps SentencePiece's implicit leading space, the suffix does not.
    """
    require_infilling(tokenizer)
    pre_ids = encode_user_text(tokenizer, pre, "prefix", infilling=False)
    suf_ids = encode_user_text(tokenizer, suf, "suffix", infilling=True)
    t = tokenizer
    if suffix_first:
        return [t.bos_id, t.prefix_id, t.suffix_id] + suf_ids + [t.middle_id] + pre_ids
    return [t.bos_id, t.prefix_id] + pre_ids + [t.suffix_id] + suf_ids + [t.middle_id]


def _check_message(msg) -> None:
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise ValueError(f"each message must be a dict with 'role' and 'content', got {msg!r}")
    if not isinstance(msg["content"], str):
        raise ValueError(f"message content must be a str, got {type(msg['content']).__name__}")
    if not isinstance(msg.get("destination", ""), (str, type(None))):
        raise ValueError(f"message destination must be a str, got "
                         f"{type(msg['destination']).__name__}")


def _check_roles(dialog: Dialog, first_user: int) -> None:
    """From index first_user on, roles must alternate user/assistant and end with user."""
    if len(dialog) <= first_user:
        raise ValueError(
            "the dialog has no user message; a chat needs at least one message with role 'user'"
        )
    turns = dialog[first_user:]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m["role"] for m in turns] != expected:
        raise ValueError(ROLE_ORDER_ERROR)
    if turns[-1]["role"] != "user":
        raise ValueError(f"Last message must be from user, got {turns[-1]['role']}")


def chat_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Llama-2 format: <s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]"""
    for msg in dialog:
        _check_message(msg)
    if not dialog:
        raise ValueError("the dialog is empty; it needs at least one user message")
    has_system = dialog[0]["role"] == "system"
    _check_roles(dialog, 1 if has_system else 0)
    if has_system:
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + list(dialog[2:])
    tokens: List[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}",
                               bos=True, eos=False)
    return tokens


def with_system(dialog: Dialog) -> Dialog:
    """The 70B format always starts with a system message, empty if none was given."""
    if dialog and dialog[0]["role"] == "system":
        return list(dialog)
    return [{"role": "system", "content": ""}] + list(dialog)


def dialog_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """70B-Instruct format: each message is " Source: {role}[\\nDestination: {dest}]"
    [+ "\\n\\n " + content] followed by <step>, then " Source: assistant\\nDestination: user"
    and "\\n\\n ", each chunk encoded on its own."""
    if tokenizer.step_id is None:
        raise ValueError("this tokenizer has no <step> piece: it is not a 70B-Instruct model")
    for msg in dialog:
        _check_message(msg)
    dialog = with_system(dialog)
    _check_roles(dialog, 1)
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        header = f" Source: {msg['role'].strip()}"
        if msg.get("destination") is not None:
            header += f"\nDestination: {msg['destination'].strip()}"
        tokens += tokenizer.encode(header, bos=False, eos=False)
        if msg["content"]:
            tokens += tokenizer.encode("\n\n " + msg["content"].strip(), bos=False, eos=False)
        tokens.append(tokenizer.step_id)
    tokens += tokenizer.encode(" Source: assistant\nDestination: user", bos=False, eos=False)
    tokens += tokenizer.encode("\n\n ", bos=False, eos=False)
    return tokens


def chat_prompt(tokenizer: Tokenizer, dialog: Dialog) -> Tuple[List[int], bool]:
    """(prompt tokens, unsafe) of a dialog in the tokenizer's chat format: the 70B-Instruct
    `<step>` format when the tokenizer has `<step>`, else [INST].

    Unsafe (the dialog is refused) when a message's content or destination carries a chat
    tag, or when the built prompt holds control tokens beyond the format's own (one
    `<step>` per message in the 70B format, none in [INST]). Checking the built prompt,
    not each text alone, also catches text that turns into a control token only once it
    is stripped and placed, such as "\n<PRE>" on the infilling vocabulary."""
    tokenizer = require_tokenizer(tokenizer)
    if tokenizer.step_id is not None:
        prompt, own = dialog_prompt_tokens(tokenizer, dialog), len(with_system(dialog))
    else:
        prompt, own = chat_prompt_tokens(tokenizer, dialog), 0
    tagged = any(tag in (msg.get(field) or "") for msg in dialog
                 for field in ("content", "destination") for tag in SPECIAL_TAGS)
    control_ids = tokenizer.control_ids  # a property that builds the set: once, not per token
    controls = sum(t in control_ids for t in prompt)
    return prompt, tagged or controls > own
