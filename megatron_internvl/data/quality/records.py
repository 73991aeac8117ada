"""The text of one annotation line, by role, for the filters.

Shapes read (the dataset's `kind` from the meta file decides between the first two groups):

| kind | line | fields (role) | supervised (repetition) |
|---|---|---|---|
| chat | `{"conversations": [...], "image"/"video": ...}` | each turn (system / user / assistant) | assistant turns |
| chat | `{"question", "chosen", "rejected", "image"?}` (MPO preference pair) | question (user), chosen (assistant), rejected | chosen |
| pretrain | `{"text": "... <image> ...", "image": [...]}` | text (document) | the text without `<image>` |
| text | `{"text": "..."}` (or `text_field`) | text (document) | the text |

A rejected answer is meant to be worse than the chosen one, so repetition detection leaves it
alone; the heuristic rules (empty, formatting) still read it, since it is still rendered.
Lines the trainer would skip raise `Unreadable` with the trainer's skip reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from ..sources import parse_record
from ..templates import (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, TemplateError, normalize_turns,
                         place_image_placeholders, place_video_frames)


class Unreadable(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TextField:
    name: str          # "turn 3", "chosen", "text"
    role: str          # system | user | assistant | rejected | document
    text: str


@dataclass
class SampleView:
    kind: str                               # conversation | preference | pretrain | text
    fields: list[TextField]
    supervised: list[TextField]
    num_images: int = 0
    video: bool = False
    # set when the placeholders do not match the images the way the trainer counts them
    placeholder_problem: Optional[str] = None
    multimodal: bool = False
    answers: list[TextField] = field(default_factory=list)

    @property
    def total_chars(self) -> int:
        return sum(len(f.text) for f in self.fields)

    @property
    def sample_chars(self) -> int:
        """The sample's length for the length rule: every field but the user turns (a prompt,
        however long, is not what the model learns to produce)."""
        return sum(len(f.text) for f in self.fields if f.role != "user")


def _images(rec: dict) -> list[str]:
    img = rec.get("image")
    if img is None or img == [] or img == "":
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, list) and all(isinstance(p, str) and p for p in img):
        return list(img)
    raise Unreadable("bad_record", "'image' must be a path or a list of paths")


def read_view(raw: bytes, kind: str, text_field: str = "text") -> SampleView:
    """The view of one raw line of a dataset of `kind` (chat | pretrain | text)."""
    try:
        rec = parse_record(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise Unreadable("malformed_json", f"not a JSON object ({str(e)[:120]})") from None
    if kind in ("text", "pretrain"):
        text = rec.get(text_field)
        if not isinstance(text, str) or not text:
            raise Unreadable("bad_record", f"no non-empty string field {text_field!r}")
        doc = TextField(text_field, "document", text)
        if kind == "text":
            # a text corpus has no images: "<image>" in it is literal text
            return SampleView("text", [doc], [doc], answers=[doc])
        images = _images(rec)
        n = text.count(IMAGE_PLACEHOLDER)
        problem = None if n == len(images) else f"{n} <image> placeholder(s) but {len(images)} image(s)"
        sup = TextField(text_field, "document", text.replace(IMAGE_PLACEHOLDER, " "))
        return SampleView("pretrain", [doc], [sup], num_images=len(images), placeholder_problem=problem,
                          multimodal=bool(images), answers=[doc])
    if "conversations" not in rec and "chosen" in rec:
        return _preference(rec)
    try:
        turns = normalize_turns(rec.get("conversations"))
    except TemplateError as e:
        raise Unreadable(e.reason, str(e)) from None
    fields = [TextField(f"turn {k}", role, value) for k, (role, value) in enumerate(turns)]
    answers = [f for f in fields if f.role == "assistant"]
    view = SampleView("conversation", fields, answers, answers=answers)
    if rec.get("video") and rec.get("image"):
        raise Unreadable("bad_record", "a sample has either 'image' or 'video', not both")
    try:
        if rec.get("video"):
            if not isinstance(rec["video"], str):
                raise Unreadable("bad_record", "'video' must be a path string")
            view.video = view.multimodal = True
            place_video_frames(turns, 1)
        else:
            images = _images(rec)
            view.num_images = len(images)
            view.multimodal = bool(images)
            place_image_placeholders(turns, len(images))
    except TemplateError as e:
        view.placeholder_problem = str(e)
    if view.placeholder_problem is None:
        for f in answers:
            for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                if ph in f.text:
                    view.placeholder_problem = f"{ph} inside an answer ({f.name})"
                    break
    return view


def _preference(rec: dict) -> SampleView:
    fields = []
    for name, role in (("question", "user"), ("chosen", "assistant"), ("rejected", "rejected")):
        value = rec.get(name)
        if not isinstance(value, str):
            raise Unreadable("bad_record", f"preference pair needs a string {name!r}")
        fields.append(TextField(name, role, value))
    images = _images(rec)
    q = fields[0].text
    n = q.count(IMAGE_PLACEHOLDER)
    problem = None
    if not (n == len(images) or (n == 0 and len(images) == 1)):
        problem = f"{n} <image> placeholder(s) but {len(images)} image(s)"
    for f in fields[1:]:
        if IMAGE_PLACEHOLDER in f.text and problem is None:
            problem = f"<image> inside an answer ({f.name})"
    return SampleView("preference", fields, [fields[1]], num_images=len(images), placeholder_problem=problem,
                      multimodal=bool(images), answers=fields[1:])


def excerpt(raw: bytes, limit: int = 160) -> str:
    """A one-line preview of a line for the review file."""
    try:
        rec = json.loads(raw)
        if isinstance(rec, dict):
            if isinstance(rec.get("conversations"), list):
                text = " | ".join(str(t.get("value", "")) for t in rec["conversations"] if isinstance(t, dict))
            else:
                text = " | ".join(str(rec[k]) for k in ("text", "question", "chosen") if k in rec)
        else:
            text = str(rec)
    except ValueError:
        text = raw.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
