"""The row formats of dafast's JSON Lines: one pydantic model per format, used by every reader
(the stages, the benchmark, distillation and the bundled-data tests).

    CorpusRow      {"text": ...}                                       CPT
    SftRow         {"messages": [...]} or {"prompt": ..., "completion": ...}   SFT
    PreferenceRow  {"prompt": ..., "chosen": ..., "rejected": ...}     DPO, ORPO
    BenchmarkRow   {"id", "type", "category", "corpus_only", "question", "answer", "split"}
    QuestionRow    {"id", "question"}                                  judged conversations
    ConceptsRow    {"id", "concepts": [2-4 strings]}                   judged design prompts

Other keys of a row are ignored. A bad row raises DataError (BenchmarkError for a benchmark row)
as "WHERE: field 'X': message", WHERE being the row's "file:line"; the first problem is the one
reported.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag,
                      ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

ROLES = ("system", "user", "assistant")
TYPES = ("mc", "tf")
CATEGORIES = ("basic", "advanced")
TF_ANSWERS = ("True", "False")
SPLITS = ("tune", "held_out")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# An option line of an mc question: "A. Flagelliform silk".
_OPTION_LINE = re.compile(r"^([A-Z])\.\s+(\S.*?)\s*$", re.MULTILINE)


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the file, line and field."""


class BenchmarkError(DataError):
    """A benchmark file that cannot be used; the message names file, line and field."""


def _invalid(message: str) -> PydanticCustomError:
    # The message goes in as context: a literal template would read its braces as placeholders.
    return PydanticCustomError("dafast", "{message}", {"message": message})


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid("must be a non-empty string" + ("" if value is None else f", got {_shown(value)}"))
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"must be true or false, got {_shown(value)}")
    return value


def _message_list(value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise _invalid('must be a non-empty list of {"role", "content"} messages')
    return value


def _one_of(choices: tuple[str, ...], value: Any) -> str:
    if value not in choices:
        raise _invalid(f"must be one of {choices}, got {_shown(value)}")
    return value


Text = Annotated[str, BeforeValidator(_text)]
Flag = Annotated[bool, BeforeValidator(_flag)]


class Row(BaseModel):
    """A validated row of one of the formats."""
    # strict: "yes" is not a bool and 1 is not a string; extra keys are ignored (a corpus row's
    # id and title, a distilled question's source).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Message(Row):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: Text = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if not isinstance(value, dict) or set(value) - {"role", "content"} or "role" not in value:
            raise _invalid('must be an object with exactly "role" and "content"')
        return value

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, role: Any) -> str:
        if role not in ROLES:
            raise _invalid(f"must be one of {', '.join(ROLES)}, got {_shown(role)}")
        return role


Messages = Annotated[list[Message], BeforeValidator(_message_list)]
# A prompt, completion, chosen or rejected: a string or a message list. The tags appear in
# pydantic's error locations, so field_name() leaves them out.
_TAGS = ("<text>", "<messages>")
Turn = Annotated[Union[Annotated[Text, Tag(_TAGS[0])], Annotated[Messages, Tag(_TAGS[1])]],
                 Discriminator(lambda v: _TAGS[1] if isinstance(v, list) else _TAGS[0])]


def _ends_with_assistant(value: str | list[Message]) -> str | list[Message]:
    if isinstance(value, list) and value[-1].role != "assistant":
        raise _invalid("the last message must be the assistant's")
    return value


class CorpusRow(Row):
    text: Text = Field(None, validate_default=True)


class SftRow(Row):
    """A conversation (loss on the assistant turns) or a prompt and its completion."""
    messages: Messages | None = None
    prompt: Turn | None = None
    completion: Turn | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, row: Any) -> Any:
        if not isinstance(row, dict):
            return row
        if "messages" in row:
            return {"messages": row["messages"]}
        if "prompt" in row or "completion" in row:  # an absent one is reported by its field
            return {"prompt": row.get("prompt"), "completion": row.get("completion")}
        raise _invalid('an SFT row needs "messages", or "prompt" and "completion"')

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, messages: list[Message] | None) -> list[Message] | None:
        if messages is not None and not any(m.role == "assistant" for m in messages):
            raise _invalid("has no assistant message, so nothing to learn")
        return messages

    @field_validator("prompt", "completion", mode="before")
    @classmethod
    def _present(cls, value: Any) -> Any:
        return _text(value) if value is None else value

    @field_validator("completion")
    @classmethod
    def _completion(cls, value):
        return _ends_with_assistant(value)


class PreferenceRow(Row):
    prompt: Turn = Field(None, validate_default=True)
    chosen: Turn = Field(None, validate_default=True)
    rejected: Turn = Field(None, validate_default=True)

    @field_validator("chosen", "rejected")
    @classmethod
    def _answer(cls, value, info: ValidationInfo):
        _ends_with_assistant(value)
        if info.field_name == "rejected" and info.data.get("chosen") == value:
            raise _invalid("equals chosen, so the pair teaches nothing")
        return value


def split_of(qid: str) -> str:
    """The benchmark half of a question without a ``split`` field: the parity of its id's
    SHA-256, a fixed, model-independent and roughly even split."""
    return SPLITS[hashlib.sha256(qid.encode("utf-8")).digest()[0] % 2]


def parse_options(question: str) -> dict[str, str]:
    """The options of an mc question, letter -> text, in the order they appear."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question)}


class BenchmarkRow(Row):
    """One benchmark question (the format of dafast/eval/benchmark.py's docstring)."""
    id: Text
    type: Annotated[str, BeforeValidator(lambda v: _one_of(TYPES, v))]
    category: Annotated[str, BeforeValidator(lambda v: _one_of(CATEGORIES, v))]
    corpus_only: Flag = False
    question: Text
    answer: Text
    split: str | None = Field(None, validate_default=True)

    @field_validator("question")
    @classmethod
    def _options(cls, question: str, info: ValidationInfo) -> str:
        if info.data.get("type") == "mc":
            letters = "".join(parse_options(question))
            # Options must be A, B, C, ... in order: a gap or a repeat is a typo in the row.
            if len(letters) < 2 or letters != LETTERS[:len(letters)]:
                raise _invalid("an mc question needs option lines 'A. ...', 'B. ...', ... "
                               f"(consecutive letters from A, at least two); found {letters!r}")
        return question

    @field_validator("answer")
    @classmethod
    def _answer(cls, answer: str, info: ValidationInfo) -> str:
        if info.data.get("type") == "tf" and answer not in TF_ANSWERS:
            raise _invalid(f"a tf answer must be 'True' or 'False', got {answer!r}")
        if info.data.get("type") == "mc" and "question" in info.data:
            letters = "".join(parse_options(info.data["question"]))
            if answer not in letters:
                raise _invalid(f"{answer!r} is not among the options {letters!r}")
        return answer

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, split: Any, info: ValidationInfo) -> str:
        if split is None:
            return split_of(info.data.get("id", ""))
        return _one_of(SPLITS, split)

    @property
    def options(self) -> dict[str, str]:
        return parse_options(self.question) if self.type == "mc" else {}


class QuestionRow(Row):
    """An open question every variant answers and a judge scores (dafast.eval.judged)."""
    id: Text
    question: Text


class ConceptsRow(Row):
    """Concepts a variant combines into an image-generation prompt (dafast.eval.judged)."""
    id: Text
    concepts: list[Text] = Field(min_length=2, max_length=4)


MODELS: dict[str, type[Row]] = {"cpt": CorpusRow, "sft": SftRow, "dpo": PreferenceRow,
                                 "orpo": PreferenceRow, "benchmark": BenchmarkRow,
                                 "conversations": QuestionRow, "design": ConceptsRow}


def error_class(kind: str) -> type[DataError]:
    return BenchmarkError if kind == "benchmark" else DataError


def field_name(loc: tuple) -> str:
    """pydantic's error location as the row's field: ("messages", 0, "role") -> messages[0].role."""
    name = ""
    for part in loc:
        if part in _TAGS:
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _describe(error: dict) -> str:
    field = field_name(error["loc"])
    if error["type"] == "missing":
        return f"missing field {field!r}"
    return f"field {field!r}: {error['msg']}" if field else error["msg"]


def check_row(row: object, where: str, kind: str) -> Row:
    """One row of `kind` (cpt, sft, dpo, orpo, benchmark) as its model; DataError (BenchmarkError
    for a benchmark row) naming `where` and the field otherwise."""
    if kind not in MODELS:
        raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(MODELS)}")
    if not isinstance(row, dict):
        raise error_class(kind)(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    try:
        return MODELS[kind].model_validate(row)
    except ValidationError as e:
        raise error_class(kind)(f"{where}: {_describe(e.errors(include_url=False)[0])}") from None
