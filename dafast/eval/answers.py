"""The paper's answer protocol: how a question is put to a model and how its reply is read.

Prompt (Lu, Luu, Buehler, arXiv 2409.03444): the user message

    You respond with one word or letter. Select the correct answer to this question: {question}

goes through the tokenizer's chat template with the generation prompt, and the assistant's
reply is then started for the model with ANSWER_PREFIX, "The correct answer is:". Putting the
prefix in the assistant turn (rather than in the user message) is what makes a small chat model
answer at once with " C." or " False." instead of restating the question, and it gives the
log-likelihood column a natural place to score the continuations " A", " B", ... / " True",
" False" (a space, as lm-evaluation-harness's target delimiter). A tokenizer without a chat
template gets the plain text "{user message}\\n{ANSWER_PREFIX}" with its usual special tokens.

The reply is read by :func:`parse_answer`; the rules are in its docstring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

USER_TEMPLATE = (
    "You respond with one word or letter. Select the correct answer to this question: {question}"
)
ANSWER_PREFIX = "The correct answer is:"
# Separates ANSWER_PREFIX from a scored continuation, as lm-evaluation-harness's target_delimiter.
CONTINUATION_DELIMITER = " "


def prompt_text(tokenizer, question: str) -> str:
    """The full prompt: chat-templated user message, generation prompt, then ANSWER_PREFIX."""
    user = USER_TEMPLATE.format(question=question)
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return chat + ANSWER_PREFIX
    return f"{user}\n{ANSWER_PREFIX}"


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of :func:`prompt_text`.

    A chat template already writes its special tokens, so they are not added again; plain text
    gets the tokenizer's usual ones (a Llama base model's BOS).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    text = prompt_text(tokenizer, question)
    return tokenizer(text, add_special_tokens=not has_template)["input_ids"]


def continuations(choices: tuple[str, ...]) -> list[str]:
    """The texts scored after the prompt for each choice: " A", " B", ... or " True", " False"."""
    return [CONTINUATION_DELIMITER + choice for choice in choices]


# --- reading a reply -------------------------------------------------------------------------

# Markdown emphasis and quotes carry no meaning in a one-word answer: "**A**", "`True`".
_MARKUP = re.compile(r"[*_`\"\u201c\u201d]")
# A reply that restates the question's frame: "Answer: D", "The correct answer is C",
# "Option B", "Final answer - A". Stripped from the start, possibly more than once.
_LEAD_IN = re.compile(
    r"^(?:the\s+)?(?:correct\s+|right\s+|final\s+|best\s+)?(?:answer|option|choice)\b"
    r"(?:\s+is)?\s*[:=\-]?\s*",
    re.IGNORECASE,
)
# The same phrase anywhere, for replies that lead with other words: "I think the answer is C".
_ANSWER_PHRASE = re.compile(
    r"\b(?:answer|option|choice|statement)\s+is\s*:?\s*|\banswer\s*:\s*", re.IGNORECASE
)
# A letter at the start, possibly bracketed: "C", "b)", "(C)", "[D]".
_LETTER = re.compile(r"^(?P<open>[(\[])?(?P<letter>[A-Za-z])(?P<close>[)\]])?(?P<rest>.*)$", re.S)
# "True"/"False" at the start, but not an echo of the question's "True or false:".
_TRUE_FALSE = re.compile(r"^(true|false)\b(?!\s*(?:or|/)\s*(?:true|false))", re.IGNORECASE)
# Words of at least this many characters must match before a reply counts as an option's text.
_MIN_OPTION_MATCH = 8


def _clean(text: str) -> str:
    text = _MARKUP.sub("", text).strip()
    while True:
        stripped = _LEAD_IN.sub("", text, count=1).strip()
        if stripped == text:
            return text
        text = stripped


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _option_by_text(text: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text the reply starts with (or, if cut off, begins); else None."""
    reply = _normalise(text.split("\n", 1)[0])
    if len(reply) < _MIN_OPTION_MATCH:
        return None
    hits = [
        letter for letter, option in options.items()
        if (o := _normalise(option)) and (reply.startswith(o) or o.startswith(reply))
    ]
    return hits[0] if len(hits) == 1 else None


def _letter_at_start(text: str, letters: str, options: Mapping[str, str]) -> str | None:
    match = _LETTER.match(text)
    if not match or match.group("letter").upper() not in letters:
        return None
    letter, rest = match.group("letter").upper(), match.group("rest")
    if match.group("open") or match.group("close"):
        return letter  # "(C)", "b)": a bracket marks a letter, never a word
    if not rest or rest[0] in ".:,;!?":
        return letter  # "C", "C.", "a." -- alone or closed by punctuation
    if not rest[0].isspace():
        return None  # "Because", "Both": a word that starts with the letter
    after = rest.lstrip()
    if match.group("letter").islower() and after[:1].isalpha():
        return None  # "a spider ...": lower case followed by a word reads as prose
    if letter == "A" and after[:1].isalpha():
        # "A spider ..." is the English article unless what follows is option A's own text
        # ("A Flagelliform silk"); anything else is too ambiguous to score.
        return "A" if options and _option_by_text(after, {"A": options.get("A", "")}) else None
    return letter  # "C Major ampullate silk", "D - ..."


def parse_answer(
    text: str, qtype: str, options: Mapping[str, str] | None = None
) -> str | None:
    """Read a model's reply: an option letter for ``qtype="mc"``, "True"/"False" for "tf".

    None means unparseable (scored as wrong). ``options`` (letter -> text, as
    :attr:`Question.options`) sets the valid letters (default A-D) and allows answers given as
    an option's text.

    Rules, applied after dropping markdown emphasis/quotes, surrounding whitespace and a leading
    "Answer:" / "The correct answer is" / "Option":
    - mc: a letter at the start counts when bracketed ("(C)", "b)"), alone, or followed by
      punctuation ("B.", "A. Flagelliform silk") or by a space and more text ("C Major ...").
      A letter that begins a word ("Because") never counts. A lower-case letter followed by a
      word ("a spider") is prose. "A" followed by a word is read as the English article
      ("A spider ...") and gives None, unless the words are option A's text.
      Otherwise the reply may be one option's text (or its start, if generation was cut off),
      matched on at least 8 characters; two matching options give None.
    - tf: "True"/"False" at the start, any case ("true.", "False, because ...").
    - both: failing the above, the first "answer is X" / "answer: X" / "statement is X" phrase
      anywhere in the reply is read with the same rules ("I think the answer is C").
    Yes/No, "T"/"F" and an echoed "True or false: ..." are None.
    """
    if qtype not in ("mc", "tf"):
        raise ValueError(f"qtype must be 'mc' or 'tf', got {qtype!r}")
    options = dict(options or {})
    letters = "".join(options) or "ABCD"

    def read(candidate: str) -> str | None:
        candidate = _clean(candidate)
        if qtype == "tf":
            match = _TRUE_FALSE.match(candidate)
            return match.group(1).capitalize() if match else None
        return _letter_at_start(candidate, letters, options) or (
            _option_by_text(candidate, options) if options else None
        )

    answer = read(text)
    if answer is None:
        phrase = _ANSWER_PHRASE.search(text)
        if phrase:
            answer = read(text[phrase.end():])
    return answer
