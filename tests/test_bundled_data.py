"""Validation of the bundled biological-materials dataset (dafast/data/biomat/).

Standard library and pytest only: no loader, no tokenizer, no torch. Every failure names the
file and the line number of the offending row.
"""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).parents[1] / "dafast/data/biomat"

# Word counts stand in for token counts: the target is 40k-80k tokens, at about 1.3 tokens a word.
MIN_WORDS, MAX_WORDS = 30_000, 62_000

WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
OPTION = re.compile(r"^([A-Z])\. (\S.*)$")
# Common words that never count as distinctive key terms of a question.
STOP = set("""
about above after again against along also although among another answer around because been
before being below between both cannot could different does doing during each either every
example false following found from further given have having into itself known least less like
longer mainly makes many more most much must never other otherwise over rather same several
should since some such than that their them then there these they thing those though three
through together true under until usually very what when where whereas which while whose
without would write your made make often only part form forms formed called because roughly
typically percent times higher lower larger smaller greater first second third
with this were what have than then into only each most more much many some such both used
same like over well long high lose loss four five type good best mean seen show kind
""".split())


def read_jsonl(name):
    path = DATA / name
    assert path.is_file(), f"missing {path}"
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{name}:{n}: empty line"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                pytest.fail(f"{name}:{n}: not valid JSON: {e}")
            assert isinstance(obj, dict), f"{name}:{n}: not a JSON object"
            rows.append((n, obj))
    return rows


def check_keys(name, n, obj, spec):
    assert set(obj) == set(spec), f"{name}:{n}: keys {sorted(obj)} != {sorted(spec)}"
    for k, t in spec.items():
        assert isinstance(obj[k], t), f"{name}:{n}: {k!r} is {type(obj[k]).__name__}, expected {t}"
        if isinstance(obj[k], str):
            assert obj[k].strip(), f"{name}:{n}: {k!r} is empty"


@pytest.fixture(scope="module")
def corpus():
    rows = read_jsonl("corpus.jsonl")
    for n, o in rows:
        check_keys("corpus.jsonl", n, o, {"id": str, "title": str, "text": str})
    return rows


@pytest.fixture(scope="module")
def sft():
    rows = read_jsonl("sft.jsonl")
    for n, o in rows:
        check_keys("sft.jsonl", n, o, {"messages": list})
        msgs = o["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0, f"sft.jsonl:{n}: {len(msgs)} messages"
        for i, m in enumerate(msgs):
            assert isinstance(m, dict), f"sft.jsonl:{n}: message {i} is not an object"
            check_keys("sft.jsonl", n, m, {"role": str, "content": str})
            want = "user" if i % 2 == 0 else "assistant"
            assert m["role"] == want, f"sft.jsonl:{n}: message {i} has role {m['role']!r}, expected {want!r}"
    return rows


@pytest.fixture(scope="module")
def prefs():
    rows = read_jsonl("preferences.jsonl")
    for n, o in rows:
        check_keys("preferences.jsonl", n, o, {"prompt": str, "chosen": str, "rejected": str})
    return rows


@pytest.fixture(scope="module")
def bench():
    rows = read_jsonl("benchmark.jsonl")
    spec = {"id": str, "type": str, "category": str, "corpus_only": bool, "question": str, "answer": str}
    for n, o in rows:
        check_keys("benchmark.jsonl", n, o, spec)
        assert o["type"] in ("mc", "tf"), f"benchmark.jsonl:{n}: type {o['type']!r}"
        assert o["category"] in ("basic", "advanced"), f"benchmark.jsonl:{n}: category {o['category']!r}"
    return rows


def split_mc(question):
    """(stem, {letter: option text}) of a multiple-choice question."""
    lines = question.split("\n")
    opts = {}
    stem = []
    for ln in lines:
        m = OPTION.match(ln)
        if m:
            opts[m.group(1)] = m.group(2)
        else:
            assert not opts, f"text after the options: {ln!r}"
            stem.append(ln)
    return "\n".join(stem).strip(), opts


def stem_of(q):
    if q["type"] == "mc":
        return split_mc(q["question"])[0]
    return re.sub(r"^true or false:\s*", "", q["question"], flags=re.I).strip()


def norm(text):
    return " ".join(WORD.findall(text.lower()))


def terms(text, bare_numbers=False):
    """Words (a plural 's' dropped) and quantities: each number joined to the next word that is
    not a number or a range word, so "4 to 5 micrometres" gives "4 micrometre", "5 micrometre".
    A number with no word after it stands alone, as does every number when bare_numbers is set."""
    toks = [t[:-1] if len(t) > 4 and t.endswith("s") and not t.endswith("ss") else t
            for t in WORD.findall(text.lower())]
    out = set()
    for i, t in enumerate(toks):
        if t[0].isdigit():
            nxt = next((u for u in toks[i + 1:] if not u[0].isdigit() and u not in ("to", "and", "or")), "")
            out.add(f"{t} {nxt}" if nxt else t)
            if bare_numbers:
                out.add(t)
        else:
            out.add(t)
    return out


def vocab(texts):
    v = set()
    for t in texts:
        v |= terms(t, bare_numbers=True)
    return v


def key_terms(q):
    """Distinctive terms of a question: quantities and uncommon words (4+ letters) of its stem and
    its correct option (mc) or its statement (tf)."""
    text = stem_of(q)
    if q["type"] == "mc":
        text += " " + split_mc(q["question"])[1].get(q["answer"], "")
    return {t for t in terms(text) if (t[0].isdigit() or len(t) >= 4) and t not in STOP}


def sft_pref_texts(sft, prefs):
    texts = [m["content"] for _, o in sft for m in o["messages"]]
    texts += [o[k] for _, o in prefs for k in ("prompt", "chosen", "rejected")]
    return texts


# ---------------------------------------------------------------- shapes and counts


def test_corpus(corpus):
    assert 60 <= len(corpus) <= 120, f"{len(corpus)} documents"
    ids = Counter(o["id"] for _, o in corpus)
    assert not [i for i, c in ids.items() if c > 1], "duplicate document ids"
    titles = Counter(o["title"] for _, o in corpus)
    assert not [t for t, c in titles.items() if c > 1], "duplicate document titles"
    words = sum(len(o["text"].split()) for _, o in corpus)
    assert MIN_WORDS <= words <= MAX_WORDS, f"corpus has {words} words"
    for n, o in corpus:
        assert len(o["text"].split()) >= 150, f"corpus.jsonl:{n}: document too short"


def test_sft(sft):
    assert len(sft) >= 300, f"{len(sft)} SFT conversations"
    seen = Counter(norm(o["messages"][0]["content"]) for _, o in sft)
    dups = [q for q, c in seen.items() if c > 1]
    assert not dups, f"duplicate first user turns: {dups[:3]}"


def test_preferences(prefs):
    assert len(prefs) >= 200, f"{len(prefs)} preference pairs"
    for n, o in prefs:
        assert norm(o["chosen"]) != norm(o["rejected"]), f"preferences.jsonl:{n}: chosen == rejected"
    seen = Counter(norm(o["prompt"]) for _, o in prefs)
    assert not [p for p, c in seen.items() if c > 1], "duplicate preference prompts"


def test_benchmark_rows(bench):
    assert len(bench) >= 150, f"{len(bench)} benchmark questions"
    ids = Counter(o["id"] for _, o in bench)
    assert not [i for i, c in ids.items() if c > 1], "duplicate question ids"
    stems = Counter(norm(stem_of(o)) for _, o in bench)
    assert not [s for s, c in stems.items() if c > 1], "duplicate questions"
    for n, o in bench:
        if o["type"] == "mc":
            stem, opts = split_mc(o["question"])
            assert stem, f"benchmark.jsonl:{n}: no question before the options"
            assert list(opts) == ["A", "B", "C", "D"], f"benchmark.jsonl:{n}: options {list(opts)}"
            assert len({norm(t) for t in opts.values()}) == 4, f"benchmark.jsonl:{n}: repeated option"
            assert o["answer"] in opts, f"benchmark.jsonl:{n}: answer {o['answer']!r}"
        else:
            assert o["answer"] in ("True", "False"), f"benchmark.jsonl:{n}: answer {o['answer']!r}"
            assert not OPTION.search(o["question"].split("\n")[-1]), f"benchmark.jsonl:{n}: tf with options"


def test_benchmark_balance(bench):
    qs = [o for _, o in bench]
    mc = [o for o in qs if o["type"] == "mc"]
    tf = [o for o in qs if o["type"] == "tf"]
    assert 0.5 <= len(mc) / len(qs) <= 0.7, f"{len(mc)} mc of {len(qs)}"
    letters = Counter(o["answer"] for o in mc)
    for L in "ABCD":
        assert 0.15 <= letters[L] / len(mc) <= 0.35, f"letter balance {dict(letters)}"
    trues = sum(o["answer"] == "True" for o in tf)
    assert 0.35 <= trues / len(tf) <= 0.65, f"{trues} True of {len(tf)} tf"
    corpus_only = sum(o["corpus_only"] for o in qs)
    assert 0.4 <= corpus_only / len(qs) <= 0.6, f"{corpus_only} corpus-only of {len(qs)}"
    cats = Counter(o["category"] for o in qs)
    assert cats["basic"] and cats["advanced"] >= 0.2 * len(qs), f"categories {dict(cats)}"
    # Both halves of the benchmark have both kinds of question.
    for flag in (True, False):
        kinds = Counter(o["type"] for o in qs if o["corpus_only"] == flag)
        assert kinds["mc"] and kinds["tf"], f"corpus_only={flag}: {dict(kinds)}"


# ---------------------------------------------------------------- separation of the splits


def test_no_benchmark_question_in_training_prompts(bench, sft, prefs):
    prompts = {norm(m["content"]) for _, o in sft for m in o["messages"] if m["role"] == "user"}
    prompts |= {norm(o["prompt"]) for _, o in prefs}
    for n, o in bench:
        assert norm(stem_of(o)) not in prompts, f"benchmark.jsonl:{n}: question appears in SFT/preferences"


def test_corpus_only_terms_absent_from_training_data(bench, sft, prefs, corpus):
    """Each corpus-only question must hinge on at least one distinctive term (a number or an
    uncommon word from its stem and its correct option or statement) that occurs in the corpus
    and nowhere in the SFT or preference data: a cheap guard against facts leaking into them."""
    trained = vocab(sft_pref_texts(sft, prefs))
    in_corpus = vocab(o["title"] + " " + o["text"] for _, o in corpus)
    leaks = []
    for n, o in bench:
        if not o["corpus_only"]:
            continue
        unseen = (key_terms(o) & in_corpus) - trained
        if not unseen:
            leaks.append(f"benchmark.jsonl:{n} ({o['id']}): all of {sorted(key_terms(o))} occur in SFT/preferences")
    assert not leaks, "\n".join(leaks)


def test_benchmark_terms_in_corpus(bench, corpus):
    """Every question's distinctive terms are mostly found in the corpus (its facts come from it)."""
    in_corpus = vocab(o["title"] + " " + o["text"] for _, o in corpus)
    bad = []
    for n, o in bench:
        terms = key_terms(o)
        missing = terms - in_corpus
        if terms and len(missing) > len(terms) / 2:
            bad.append(f"benchmark.jsonl:{n} ({o['id']}): not in corpus: {sorted(missing)}")
    assert not bad, "\n".join(bad)
