"""The five task kinds: what a label schema, an item's input and an answer look like.

- ``single_label``: schema ``{"labels": [≥ 2 names]}``; input ``{"text"}`` and/or
  ``{"image_url"}``; answer ``{"label": name}``.
- ``multi_label``: schema ``{"labels": [≥ 1 name]}``; input as single_label; answer
  ``{"labels": [distinct names]}`` (may be empty: none applies).
- ``span`` (NER): schema ``{"labels": [...]}``; input ``{"text"}``; answer
  ``{"spans": [{"start", "end", "label"}]}`` with ``0 <= start < end <= len(text)``,
  spans not overlapping.
- ``bbox``: schema ``{"labels": [...]}``; input ``{"image_url", "width", "height"}`` in
  pixels; answer ``{"boxes": [{"x", "y", "w", "h", "label"}]}`` inside the image.
- ``transcription``: schema ``{"max_length": n}`` (default 10,000); input exactly one
  of ``{"audio_url"}`` and ``{"image_url"}``; answer ``{"text": at most n chars}``.

Labels are 1 to 100 characters, distinct, at most 200 per task. Answers are checked against
the task's schema *and* the item's input (a span must lie inside the item's text), so
the same function serves an annotator's submission and a requester's gold answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

Kind = Literal["single_label", "multi_label", "span", "bbox", "transcription"]
KINDS: tuple[Kind, ...] = ("single_label", "multi_label", "span", "bbox", "transcription")
LabelName = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
MAX_TEXT = 100_000


class InvalidAnswer(ValueError):
    """An input or answer that does not fit the task's kind and schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- label schemas -------------------------------------------------------------------
class LabelList(_Strict):
    labels: list[LabelName] = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _distinct(self) -> LabelList:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self


class TranscriptionSchema(_Strict):
    max_length: int = Field(10_000, ge=1, le=MAX_TEXT)


def validate_label_schema(kind: Kind, schema: dict[str, Any]) -> dict[str, Any]:
    """The normalised label schema of ``kind``; raises :class:`InvalidAnswer`."""
    model: type[BaseModel] = TranscriptionSchema if kind == "transcription" else LabelList
    try:
        parsed = model.model_validate(schema)
    except ValidationError as exc:
        raise InvalidAnswer(_first_error(exc)) from None
    if kind == "single_label" and isinstance(parsed, LabelList) and len(parsed.labels) < 2:
        raise InvalidAnswer("a single_label task needs at least two labels")
    return parsed.model_dump()


# -- item inputs ---------------------------------------------------------------------
class ClassificationInput(_Strict):
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT)] | None = None
    image_url: Url | None = None

    @model_validator(mode="after")
    def _something(self) -> ClassificationInput:
        if self.text is None and self.image_url is None:
            raise ValueError("give text, image_url or both")
        return self


class SpanInput(_Strict):
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]


class BboxInput(_Strict):
    image_url: Url
    width: int = Field(ge=1, le=100_000)
    height: int = Field(ge=1, le=100_000)


class TranscriptionInput(_Strict):
    audio_url: Url | None = None
    image_url: Url | None = None

    @model_validator(mode="after")
    def _one(self) -> TranscriptionInput:
        if (self.audio_url is None) == (self.image_url is None):
            raise ValueError("give exactly one of audio_url and image_url")
        return self


INPUTS: dict[str, type[_Strict]] = {
    "single_label": ClassificationInput,
    "multi_label": ClassificationInput,
    "span": SpanInput,
    "bbox": BboxInput,
    "transcription": TranscriptionInput,
}


def validate_input(kind: str, value: Any) -> dict[str, Any]:
    """An item's input in normalised form; raises :class:`InvalidAnswer`."""
    try:
        return INPUTS[kind].model_validate(value).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InvalidAnswer(_first_error(exc)) from None


# -- answers -------------------------------------------------------------------------
class SingleLabelAnswer(_Strict):
    label: str


class MultiLabelAnswer(_Strict):
    labels: list[str] = Field(max_length=200)


class Span(_Strict):
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    label: str


class SpanAnswer(_Strict):
    spans: list[Span] = Field(max_length=1000)


class Box(_Strict):
    x: float = Field(ge=0)
    y: float = Field(ge=0)
    w: float = Field(gt=0)
    h: float = Field(gt=0)
    label: str


class BboxAnswer(_Strict):
    boxes: list[Box] = Field(max_length=1000)


class TranscriptionAnswer(_Strict):
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT)]


ANSWERS: dict[str, type[_Strict]] = {
    "single_label": SingleLabelAnswer,
    "multi_label": MultiLabelAnswer,
    "span": SpanAnswer,
    "bbox": BboxAnswer,
    "transcription": TranscriptionAnswer,
}


def validate_answer(
    kind: str, schema: dict[str, Any], item_input: dict[str, Any], answer: Any
) -> dict[str, Any]:
    """The normalised answer for one item; raises :class:`InvalidAnswer` with the reason."""
    try:
        parsed = ANSWERS[kind].model_validate(answer)
    except ValidationError as exc:
        raise InvalidAnswer(_first_error(exc)) from None
    labels = set(schema.get("labels", ()))
    if isinstance(parsed, SingleLabelAnswer):
        _known(labels, [parsed.label])
    elif isinstance(parsed, MultiLabelAnswer):
        _known(labels, parsed.labels)
        if len(set(parsed.labels)) != len(parsed.labels):
            raise InvalidAnswer("labels must be distinct")
    elif isinstance(parsed, SpanAnswer):
        _known(labels, [s.label for s in parsed.spans])
        length = len(item_input.get("text", ""))
        last_end = 0
        for span in sorted(parsed.spans, key=lambda s: (s.start, s.end)):
            if not span.start < span.end <= length:
                raise InvalidAnswer(
                    f"span {span.start}-{span.end} is outside the text (0-{length})"
                )
            if span.start < last_end:
                raise InvalidAnswer("spans overlap")
            last_end = span.end
    elif isinstance(parsed, BboxAnswer):
        _known(labels, [b.label for b in parsed.boxes])
        width, height = item_input.get("width", 0), item_input.get("height", 0)
        for box in parsed.boxes:
            if box.x + box.w > width or box.y + box.h > height:
                raise InvalidAnswer(f"box at ({box.x}, {box.y}) leaves the {width}x{height} image")
    elif isinstance(parsed, TranscriptionAnswer):
        limit = int(schema.get("max_length", 10_000))
        if len(parsed.text) > limit:
            raise InvalidAnswer(f"text is longer than {limit} characters")
    return parsed.model_dump()


def _known(labels: set[str], used: list[str]) -> None:
    unknown = sorted(set(used) - labels)
    if unknown:
        raise InvalidAnswer(f"unknown label(s): {', '.join(unknown[:5])}")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err['msg']}" if where else str(err["msg"])


# -- comparing answers ---------------------------------------------------------------
IOU_MATCH = 0.5
"""Two boxes (or spans of the same label) match when their intersection over union is
at least this; the usual threshold of object-detection benchmarks."""


def agreement(kind: str, answer: Any, reference: Any) -> float:
    """How far ``answer`` agrees with ``reference`` (a gold answer), from 0 to 1.

    - ``single_label``: 1 if the labels are equal, else 0;
    - ``multi_label``: Jaccard similarity of the label sets (1 when both are empty);
    - ``span`` and ``bbox``: F1 of a greedy one-to-one matching of same-label regions
      whose IoU is at least :data:`IOU_MATCH` (1 when both are empty);
    - ``transcription``: 1 - normalised Levenshtein distance after folding case and
      whitespace.

    Both answers must already be normalised by :func:`validate_answer`.
    """
    if kind == "single_label":
        return 1.0 if answer["label"] == reference["label"] else 0.0
    if kind == "multi_label":
        a, b = set(answer["labels"]), set(reference["labels"])
        return 1.0 if not a and not b else len(a & b) / len(a | b)
    if kind == "span":
        return _region_f1(
            [(s["label"], (s["start"], s["end"])) for s in answer["spans"]],
            [(s["label"], (s["start"], s["end"])) for s in reference["spans"]],
            _span_iou,
        )
    if kind == "bbox":
        return _region_f1(
            [(b["label"], (b["x"], b["y"], b["w"], b["h"])) for b in answer["boxes"]],
            [(b["label"], (b["x"], b["y"], b["w"], b["h"])) for b in reference["boxes"]],
            _box_iou,
        )
    if kind == "transcription":
        a_text, b_text = _fold(answer["text"]), _fold(reference["text"])
        longest = max(len(a_text), len(b_text))
        return 1.0 if longest == 0 else 1.0 - _levenshtein(a_text, b_text) / longest
    raise ValueError(f"unknown kind {kind!r}")


GOLD_PASS = 0.8
"""An answer to a gold item counts as correct when its :func:`agreement` with the gold
answer is at least this (exactly equal for single labels)."""


def correct(kind: str, answer: Any, gold: Any) -> bool:
    """Whether an answer to a gold item counts as correct."""
    return agreement(kind, answer, gold) >= GOLD_PASS


def category(kind: str, answer: Any) -> str:
    """A hashable class of an answer for categorical aggregation (majority vote,
    Dawid-Skene): the label, the sorted label set, or the canonical JSON otherwise."""
    if kind == "single_label":
        return str(answer["label"])
    if kind == "multi_label":
        return "|".join(sorted(answer["labels"]))
    return json.dumps(answer, sort_keys=True, separators=(",", ":"))


def _region_f1(
    found: list[tuple[str, tuple[float, ...]]],
    truth: list[tuple[str, tuple[float, ...]]],
    iou: Any,
) -> float:
    if not found and not truth:
        return 1.0
    if not found or not truth:
        return 0.0
    pairs = sorted(
        (
            (iou(f, t), i, j)
            for i, (f_label, f) in enumerate(found)
            for j, (t_label, t) in enumerate(truth)
            if f_label == t_label
        ),
        reverse=True,
    )
    used_found: set[int] = set()
    used_truth: set[int] = set()
    for score, i, j in pairs:
        if score < IOU_MATCH:
            break
        if i not in used_found and j not in used_truth:
            used_found.add(i)
            used_truth.add(j)
    matched = len(used_found)
    return 2 * matched / (len(found) + len(truth))


def _span_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
