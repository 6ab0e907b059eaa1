"""Chat rows -> text: a row's message list rendered with the tokenizer's chat template, as :class:`ChatText`,
which carries where the assistant's turns are in the text (so only they are trained, see
:mod:`selkd.cache.tokenizing`). The spans come from the template's ``{% generation %}`` markers where it
has them, else from rendering the conversation up to each assistant turn.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from selkd.cache.errors import DataError, one_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The key of a chat row's message list.
MESSAGES_KEY = "messages"


def is_chat(value: Any) -> bool:
    """Whether ``value`` is a chat message list: a non-empty list of dicts that each have a ``role``."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


class ChatText(str):
    """A chat row rendered with the tokenizer's chat template: the text, and ``spans``, the character
    ranges ``[start, end)`` of the assistant's turns in it (int64 [n, 2], sorted, not overlapping). A
    token of the text that overlaps a span is an assistant token (:mod:`selkd.cache.tokenizing`)."""

    spans: np.ndarray

    def __new__(cls, text: str, spans: np.ndarray) -> ChatText:
        out = super().__new__(cls, text)
        out.spans = spans
        return out


_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _template(tokenizer: PreTrainedTokenizerBase, where: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise DataError(
            f"{where}: row has a chat {MESSAGES_KEY!r} list but the tokenizer has no chat template; "
            "use a tokenizer with a chat template or pre-render the rows into the text field"
        )
    return template if isinstance(template, str) else str(template)


def _generation_spans(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The assistant spans a template with ``{% generation %}`` markers gives: the character ranges of
    the tokens inside them."""
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
    )
    offsets = np.asarray(out["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return offsets[np.asarray(out["assistant_masks"], dtype=np.bool_)]


def _turn_spans(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, text: str, where: str
) -> np.ndarray:
    """The assistant spans of a template without generation markers: assistant turn i spans from the
    end of the conversation before it rendered with the generation prompt to the end of the
    conversation up to it (so its closing tokens, e.g. an end-of-turn marker, are trained too)."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(prompt) and upto.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template renders the conversation before assistant turn {i} differently from "
                "the whole conversation, so its prompt and response cannot be told apart; use a template with "
                "{% generation %} markers"
            )
        end = len(os.path.commonprefix([upto, text]))  # noqa: RUF071 (characters, as meant)
        if end > len(prompt):
            spans.append((len(prompt), end))
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def render_chat(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, where: str) -> ChatText:
    """The rendered row and its assistant spans: from the template's generation markers where it has
    them, else from rendering the conversation up to each assistant turn."""
    template = _template(tokenizer, where)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(text, str):
            raise DataError(f"{where}: the chat template returned {type(text).__name__}, expected text")
        if _GENERATION_MARKER.search(template):
            spans = _generation_spans(messages, tokenizer)
        else:
            spans = _turn_spans(messages, tokenizer, text, where)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where}: the tokenizer's chat template failed on this row: {one_line(err)}") from err
    return ChatText(text, spans)
