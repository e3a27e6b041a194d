"""Token rows through the tokenizer's own formatting, as the Model Zoo's preprocessor builds them.

- ``chat``: the conversation as ``[{"role", "content"}]`` messages through
  ``tokenizer.apply_chat_template`` (the tokenizer's template, or one given by
  ``--chat_template`` / ``processing.chat_template``; ChatML when the tokenizer has none, as the
  Model Zoo does), tokenized without added special tokens. The assistant replies are supervised,
  each with the end-of-turn token that follows it (``end_of_turn_token``, else the tokenizer's
  eos) when no image lies between.
- ``prompt_completion`` (the Model Zoo's phase-1 hook): ``prompt + sep_token + completion + eos``
  per turn, tokenized with the tokenizer's special tokens; completions and their eos supervised.

Each image token in the formatted text becomes ``num_patches`` placeholder tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The Model Zoo's fallback when the tokenizer has no chat template (ChatML).
CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass
class Turn:
    """One turn after image placement: ``images`` image tokens go before ``text`` (turn_start),
    or ``inline`` holds the text with the image token where the marks stood."""

    role: str                  # user | assistant | system
    text: str
    images: int = 0
    inline: Optional[str] = None


def _content(turn: Turn, image_token: str) -> str:
    if turn.inline is not None:
        return turn.inline
    return image_token * turn.images + turn.text


def _marker(n: int) -> str:
    return f"\x02region{n}\x03"


def chat_text(tok, turns: list[Turn], image_token: str, template: Optional[str],
              end_of_turn: Optional[str]) -> tuple[str, list[tuple[int, int]]]:
    """The formatted conversation and the character spans of the supervised replies."""
    messages, texts = [], []
    for turn in turns:
        content = _content(turn, image_token)
        if turn.role == "assistant":
            content = _marker(len(texts)) + content
            texts.append(turn.text)
        messages.append({"role": turn.role, "content": content})
    chosen = template or getattr(tok, "chat_template", None) or CHATML
    formatted = tok.apply_chat_template(messages, tokenize=False, chat_template=chosen)
    spans = []
    for n, text in enumerate(texts):
        at = formatted.find(_marker(n))
        if at < 0:
            raise ValueError("the chat template dropped an assistant reply")
        formatted = formatted[:at] + formatted[at + len(_marker(n)):]
        spans.append((at, at + len(text)))
    eot = end_of_turn or tok.eos_token
    return formatted, _with_end_of_turn(formatted, spans, eot, image_token)


def chat_prompt(tok, turn: Turn, image_token: str, template: Optional[str]) -> str:
    """One user turn formatted for generation (the template's assistant header appended)."""
    chosen = template or getattr(tok, "chat_template", None) or CHATML
    return tok.apply_chat_template([{"role": "user", "content": _content(turn, image_token)}], tokenize=False,
                                   add_generation_prompt=True, chat_template=chosen)


def _with_end_of_turn(text: str, spans, eot: Optional[str], image_token: str) -> list[tuple[int, int]]:
    """Extend each span over the end-of-turn token that follows it before the next span."""
    if not eot:
        return spans
    out = []
    for i, (start, end) in enumerate(spans):
        limit = spans[i + 1][0] if i + 1 < len(spans) else len(text)
        at = text.find(eot, end, limit)
        if at >= 0 and image_token not in text[end:at]:
            end = at + len(eot)
        out.append((start, end))
    return out


def prompt_completion_text(turns: list[Turn], image_token: str, sep_token: str, eos_token: Optional[str],
                           keep_prompt_text: bool) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for turn in turns:
        if turn.role == "user":
            content = _content(turn, image_token) if keep_prompt_text or not turn.images else image_token * turn.images
            text += content + (sep_token or "")
        elif turn.role == "assistant":
            start = len(text)
            text += turn.text + (eos_token or "")
            spans.append((start, len(text)))
    return text, spans


def tokens_from_text(tok, text: str, spans: list[tuple[int, int]], add_special: bool, image_token_id: int,
                     placeholder: int, num_patches: int) -> tuple[list[int], list[int], list[list[int]]]:
    """(ids, supervised per token, image positions): tokens overlapping a span are supervised;
    each image token becomes ``num_patches`` placeholders."""
    enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, sup, locs = [], [], []
    for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token == image_token_id:
            locs.append(list(range(len(ids), len(ids) + num_patches)))
            ids += [placeholder] * num_patches
            sup += [0] * num_patches
            continue
        ids.append(token)
        sup.append(int(b > a and any(a < e and b > s for s, e in spans)))
    return ids, sup, locs
