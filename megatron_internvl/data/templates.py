"""Conversation templates, image placeholder expansion and supervision masks.

A template renders a conversation into segments `(text, supervised)`. Consecutive segments
with the same flag are tokenized as one string; a change of flag is a tokenization boundary,
so a label boundary never falls inside a token. Every `<image>` placeholder becomes
`<img>` + `<IMG_CONTEXT>` x (num_image_token * tiles) + `</img>`, never supervised.

Labels here are *unshifted* (label[t] is token t or -100); dataset.py shifts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_internvl.config.errors import InternVLError

from .tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IGNORE_INDEX = -100

# The system messages the released InternVL checkpoints were trained with.
_INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


class TemplateError(InternVLError, ValueError):
    """A sample the template cannot render; `reason` is the skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    name: str
    chat: bool
    system_message: Optional[str] = None
    # Text after each turn's <|im_end|>: "\n" for internvl2_5, "" for the MPT-style ones.
    turn_sep: str = "\n"
    # BOS first when the tokenizer's config does not say (its add_bos_token wins; see wants_bos).
    bos: bool = False
    # Strip whitespace around turn values (what InternVL does for its InternLM2/Hermes-2 data).
    strip: bool = False


TEMPLATES = {
    "internvl2_5": Template("internvl2_5", chat=True, system_message=_INTERNVL2_5_SYSTEM, turn_sep="\n"),
    "internlm2-chat": Template("internlm2-chat", chat=True, system_message=_INTERNVL2_SYSTEM,
                               turn_sep="", bos=True, strip=True),
    "Hermes-2": Template("Hermes-2", chat=True, system_message=_INTERNVL2_SYSTEM, turn_sep="", strip=True),
    "plain": Template("plain", chat=False),
}

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}.")
    return TEMPLATES[name]


def normalize_turns(conversations) -> list[tuple[str, str]]:
    """InternVL `conversations` -> [(role, value)] with role in system/user/assistant."""
    if not isinstance(conversations, list) or not conversations:
        raise TemplateError("bad_record", "`conversations` is missing or empty")
    out = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TemplateError("bad_record", f"turn {k} lacks 'from'/'value'")
        role = ROLES.get(turn["from"])
        if role is None:
            raise TemplateError("bad_record", f"turn {k} has unknown role {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise TemplateError("bad_record", f"turn {k} value is not a string")
        out.append((role, turn["value"]))
    if not any(r == "assistant" for r, _ in out):
        raise TemplateError("no_assistant_turn", "conversation has no assistant ('gpt') turn")
    return out


def count_placeholders(turns: Sequence[tuple[str, str]]) -> int:
    return sum(v.count(IMAGE_PLACEHOLDER) for _, v in turns)


def _first_user(turns) -> int:
    for k, (r, _) in enumerate(turns):
        if r == "user":
            return k
    raise TemplateError("bad_record", "conversation has no user ('human') turn to carry the image")


def place_image_placeholders(turns: list[tuple[str, str]], num_images: int) -> list[tuple[str, str]]:
    """Check `<image>` count against the images; a lone image without one gets `<image>\\n`
    prepended to the first user turn."""
    n = count_placeholders(turns)
    if n == 0 and num_images == 1:
        k = _first_user(turns)
        turns = list(turns)
        turns[k] = (turns[k][0], IMAGE_PLACEHOLDER + "\n" + turns[k][1])
        return turns
    if n != num_images:
        raise TemplateError(
            "image_token_mismatch", f"{n} <image> placeholder(s) but {num_images} image(s)"
        )
    return turns


def place_video_frames(turns: list[tuple[str, str]], num_frames: int) -> list[tuple[str, str]]:
    """Replace `<video>` (or prepend, if absent) with `Frame-1: <image>\\n...` lines."""
    if count_placeholders(turns):
        raise TemplateError("image_token_mismatch", "video sample contains <image> placeholders")
    frames = "".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))
    turns = list(turns)
    hits = [k for k, (_, v) in enumerate(turns) if VIDEO_PLACEHOLDER in v]
    if len(hits) > 1 or (hits and turns[hits[0]][1].count(VIDEO_PLACEHOLDER) > 1):
        raise TemplateError("image_token_mismatch", "more than one <video> placeholder")
    if hits:
        k = hits[0]
        v = turns[k][1]
        v = v.replace(VIDEO_PLACEHOLDER + "\n", frames, 1) if VIDEO_PLACEHOLDER + "\n" in v \
            else v.replace(VIDEO_PLACEHOLDER, frames, 1)
        turns[k] = (turns[k][0], v)
    else:
        k = _first_user(turns)
        turns[k] = (turns[k][0], frames + turns[k][1])
    return turns


def render_chat(template: Template, turns: Sequence[tuple[str, str]],
                system_message: Optional[str] = None) -> list[tuple[str, bool]]:
    """ChatML segments. System and user turns are unsupervised; in an assistant turn the
    answer and its `<|im_end|>` are supervised, the `<|im_start|>assistant\\n` prefix and
    the separator after `<|im_end|>` are not."""
    sep = template.turn_sep
    clean = (lambda s: s.strip()) if template.strip else (lambda s: s)
    segs: list[tuple[str, bool]] = []
    turns = list(turns)
    if turns and turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    else:
        system = system_message if system_message is not None else template.system_message
    if system is not None:
        segs.append((f"<|im_start|>system\n{clean(system)}<|im_end|>{sep}", False))
    for role, value in turns:
        if role == "system":
            raise TemplateError("bad_record", "system turn after the first turn")
        if role == "user":
            segs.append((f"<|im_start|>user\n{clean(value)}<|im_end|>{sep}", False))
        else:
            segs.append(("<|im_start|>assistant\n", False))
            segs.append((f"{clean(value)}<|im_end|>", True))
            if sep:
                segs.append((sep, False))
    return segs


@dataclass
class Tokenized:
    input_ids: np.ndarray         # int64 [L]
    labels: np.ndarray            # int64 [L], unshifted, -100 where not supervised
    image_spans: list[tuple[int, int]]   # [start, end) of each image's IMG_CONTEXT run
    # Token offsets just after each supervised run (an answer and its <|im_end|>): the
    # places a too-long conversation may be cut without splitting a turn or an image.
    turn_ends: list[int]


def tokenize_segments(tok: Tokenizer, segments: Sequence[tuple[str, bool]],
                      image_tokens: Sequence[int], *, bos: bool = False, eos: bool = False,
                      expand_images: bool = True) -> Tokenized:
    """Tokenize rendered segments; `image_tokens[k]` IMG_CONTEXT tokens for the k-th `<image>`."""
    merged: list[list] = []
    for text, sup in segments:
        if merged and merged[-1][1] == sup:
            merged[-1][0] += text
        else:
            merged.append([text, sup])
    ids: list[int] = []
    mask: list[bool] = []
    spans: list[tuple[int, int]] = []
    turn_ends: list[int] = []
    if bos:
        if tok.bos_id is None:
            raise ValueError("the template starts samples with BOS but the tokenizer has no BOS token; set bos_token "
                             "(or add_bos_token=false) in its tokenizer_config.json")
        ids.append(tok.bos_id)
        mask.append(False)
    k = 0
    for text, sup in merged:
        parts = text.split(IMAGE_PLACEHOLDER) if expand_images else [text]
        for j, part in enumerate(parts):
            if j:
                if k >= len(image_tokens):
                    raise TemplateError(
                        "image_token_mismatch",
                        f"more <image> placeholders than images ({len(image_tokens)})",
                    )
                n = int(image_tokens[k])
                k += 1
                ids.append(tok.img_start_id)
                spans.append((len(ids), len(ids) + n))
                ids.extend([tok.img_context_id] * n)
                ids.append(tok.img_end_id)
                mask.extend([False] * (n + 2))
            if part:
                p = tok.encode(part)
                ids.extend(p)
                mask.extend([sup] * len(p))
        if sup:
            turn_ends.append(len(ids))
    if k != len(image_tokens):
        raise TemplateError(
            "image_token_mismatch", f"{k} <image> placeholder(s) but {len(image_tokens)} image(s)"
        )
    if eos:
        if tok.eos_id is None:
            raise ValueError("template needs an EOS token but the tokenizer has none")
        ids.append(tok.eos_id)
        mask.append(True)
    arr = np.asarray(ids, dtype=np.int64)
    labels = np.where(np.asarray(mask, dtype=bool), arr, IGNORE_INDEX).astype(np.int64)
    return Tokenized(arr, labels, spans, turn_ends)


def wants_bos(tok: Tokenizer, template: Optional[Template] = None) -> bool:
    """Whether a sample starts with BOS: the tokenizer's own ``add_bos_token`` when its
    tokenizer_config.json sets it, else the template's default.

    InternVL prepends ``tokenizer.bos_token`` to the first piece whenever the tokenizer has
    ``add_bos_token`` (InternLM2/2.5 tokenizers do, under every template, ``internvl2_5``
    included; Qwen2's do not), so the same sample gets the same first token here.
    """
    if tok.add_bos_token is not None:
        return tok.add_bos_token
    return template.bos if template is not None else False


def tokenize_conversation(tok: Tokenizer, template: Template, turns: Sequence[tuple[str, str]],
                          image_tokens: Sequence[int], system_message: Optional[str] = None) -> Tokenized:
    segs = render_chat(template, turns, system_message)
    return tokenize_segments(tok, segs, image_tokens, bos=wants_bos(tok, template))


def tokenize_plain(tok: Tokenizer, text: str, image_tokens: Sequence[int], expand_images: bool = True) -> Tokenized:
    """Pre-training text: no template, every text token supervised, EOS appended; BOS first
    (never a target) when the tokenizer's config asks for it."""
    return tokenize_segments(tok, [(text, True)], image_tokens, bos=wants_bos(tok), eos=True,
                             expand_images=expand_images)
