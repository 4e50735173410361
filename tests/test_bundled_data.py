"""Validation of every bundled dataset (each folder of dafast/data/, e.g. biomat and keldara).

Rows are read with dafast's own reader and row models (dafast.sources, dafast.formats), so the
files are checked by the code that trains and evaluates on them; what is tested here on top is
what the bundled sets promise beyond the formats. No tokenizer, no model. Every failure names the
dataset, the file and the line number of the offending row. Size limits are proportions (of the
corpus's documents, of the benchmark's questions), so small and large datasets meet the same rules.
"""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from dafast import sources

DATA_ROOT = Path(__file__).parents[1] / "dafast/data"
DATASETS = sorted(d.name for d in DATA_ROOT.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
FILES = ("corpus.jsonl", "sft.jsonl", "preferences.jsonl", "benchmark.jsonl")

# Below these sizes the balance checks (letters, True/False, corpus-only) say little.
MIN_DOCUMENTS, MIN_QUESTIONS = 20, 40
DOC_WORDS = (150, 700)

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


# The reader kind of each file: its rows are checked against that kind's row model.
KINDS = {"corpus.jsonl": "cpt", "sft.jsonl": "sft", "preferences.jsonl": "dpo",
         "benchmark.jsonl": "benchmark"}


def read_jsonl(data_dir, file):
    """(line number, row) of the file, each row valid for its reader (dafast.formats)."""
    path = data_dir / file
    assert path.is_file(), f"missing {path}"
    return sources.read_jsonl(path, KINDS[file])


def check_keys(name, n, obj, keys):
    """The bundled files carry exactly these keys (the formats allow more)."""
    assert set(obj) == set(keys), f"{name}:{n}: keys {sorted(obj)} != {sorted(keys)}"


def check_strings(name, n, obj, keys):
    for k in keys:
        assert isinstance(obj[k], str) and obj[k].strip(), f"{name}:{n}: {k!r} is not a non-empty string"


@pytest.fixture(scope="module", params=DATASETS)
def data_dir(request):
    return DATA_ROOT / request.param


@pytest.fixture(scope="module")
def corpus(data_dir):
    name = f"{data_dir.name}/corpus.jsonl"
    rows = read_jsonl(data_dir, "corpus.jsonl")
    for n, o in rows:
        check_keys(name, n, o, ("id", "title", "text"))
        check_strings(name, n, o, ("id", "title"))
    return rows


@pytest.fixture(scope="module")
def sft(data_dir):
    name = f"{data_dir.name}/sft.jsonl"
    rows = read_jsonl(data_dir, "sft.jsonl")
    for n, o in rows:
        check_keys(name, n, o, ("messages",))
        msgs = o["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0, f"{name}:{n}: {len(msgs)} messages"
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            assert m["role"] == want, f"{name}:{n}: message {i} has role {m['role']!r}, expected {want!r}"
    return rows


@pytest.fixture(scope="module")
def prefs(data_dir):
    name = f"{data_dir.name}/preferences.jsonl"
    rows = read_jsonl(data_dir, "preferences.jsonl")
    for n, o in rows:
        check_keys(name, n, o, ("prompt", "chosen", "rejected"))
        check_strings(name, n, o, ("prompt", "chosen", "rejected"))  # no message lists here
    return rows


@pytest.fixture(scope="module")
def bench(data_dir):
    name = f"{data_dir.name}/benchmark.jsonl"
    rows = read_jsonl(data_dir, "benchmark.jsonl")
    for n, o in rows:
        check_keys(name, n, o, ("id", "type", "category", "corpus_only", "question", "answer"))
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


def test_corpus(corpus, data_dir):
    name = f"{data_dir.name}/corpus.jsonl"
    assert len(corpus) >= MIN_DOCUMENTS, f"{name}: {len(corpus)} documents"
    ids = Counter(o["id"] for _, o in corpus)
    assert not [i for i, c in ids.items() if c > 1], f"{name}: duplicate document ids"
    titles = Counter(o["title"] for _, o in corpus)
    assert not [t for t, c in titles.items() if c > 1], f"{name}: duplicate document titles"
    for n, o in corpus:
        words = len(o["text"].split())
        assert DOC_WORDS[0] <= words <= DOC_WORDS[1], f"{name}:{n}: document of {words} words"


def test_readme_matches_data(data_dir, corpus):
    """The dataset's README states its row counts (the files table) and the corpus's word count;
    both must match the files, so a dataset edited without its README fails here."""
    readme = data_dir / "README.md"
    assert readme.is_file(), f"missing {readme}"
    text = readme.read_text(encoding="utf-8")
    stated = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^\| `(\w+\.jsonl)` \| ([\d,]+) ", text, re.M)}
    assert set(stated) == set(FILES), f"{readme}: files table lists {sorted(stated)}"
    for file, count in stated.items():
        rows = len(read_jsonl(data_dir, file))
        assert rows == count, f"{readme}: states {count} rows for {file}, the file has {rows}"
    words = re.search(r"the corpus has ([\d,]+) words", text)
    assert words, f"{readme}: no 'the corpus has N words'"
    actual = sum(len(o["text"].split()) for _, o in corpus)
    assert int(words.group(1).replace(",", "")) == actual, f"{readme}: states {words.group(1)} words, the corpus has {actual}"


def test_sft(sft, corpus, data_dir):
    name = f"{data_dir.name}/sft.jsonl"
    assert len(sft) >= len(corpus), f"{name}: {len(sft)} conversations for {len(corpus)} documents"
    seen = Counter(norm(o["messages"][0]["content"]) for _, o in sft)
    dups = [q for q, c in seen.items() if c > 1]
    assert not dups, f"{name}: duplicate first user turns: {dups[:3]}"


def test_preferences(prefs, corpus, data_dir):
    name = f"{data_dir.name}/preferences.jsonl"
    assert len(prefs) >= len(corpus), f"{name}: {len(prefs)} pairs for {len(corpus)} documents"
    for n, o in prefs:
        assert norm(o["chosen"]) != norm(o["rejected"]), f"{name}:{n}: chosen == rejected"
    seen = Counter(norm(o["prompt"]) for _, o in prefs)
    assert not [p for p, c in seen.items() if c > 1], f"{name}: duplicate preference prompts"


def test_benchmark_rows(bench, corpus, data_dir):
    name = f"{data_dir.name}/benchmark.jsonl"
    assert len(bench) >= max(MIN_QUESTIONS, len(corpus)), f"{name}: {len(bench)} questions"
    ids = Counter(o["id"] for _, o in bench)
    assert not [i for i, c in ids.items() if c > 1], f"{name}: duplicate question ids"
    stems = Counter(norm(stem_of(o)) for _, o in bench)
    assert not [s for s, c in stems.items() if c > 1], f"{name}: duplicate questions"
    for n, o in bench:
        if o["type"] == "mc":
            stem, opts = split_mc(o["question"])
            assert stem, f"{name}:{n}: no question before the options"
            assert list(opts) == ["A", "B", "C", "D"], f"{name}:{n}: options {list(opts)}"
            assert len({norm(t) for t in opts.values()}) == 4, f"{name}:{n}: repeated option"
            assert o["answer"] in opts, f"{name}:{n}: answer {o['answer']!r}"
        else:
            assert o["answer"] in ("True", "False"), f"{name}:{n}: answer {o['answer']!r}"
            assert not OPTION.search(o["question"].split("\n")[-1]), f"{name}:{n}: tf with options"


def test_benchmark_balance(bench, data_dir):
    name = data_dir.name
    qs = [o for _, o in bench]
    mc = [o for o in qs if o["type"] == "mc"]
    tf = [o for o in qs if o["type"] == "tf"]
    assert 0.5 <= len(mc) / len(qs) <= 0.7, f"{name}: {len(mc)} mc of {len(qs)}"
    letters = Counter(o["answer"] for o in mc)
    for L in "ABCD":
        assert 0.15 <= letters[L] / len(mc) <= 0.35, f"{name}: letter balance {dict(letters)}"
    trues = sum(o["answer"] == "True" for o in tf)
    assert 0.35 <= trues / len(tf) <= 0.65, f"{name}: {trues} True of {len(tf)} tf"
    corpus_only = sum(o["corpus_only"] for o in qs)
    assert 0.4 <= corpus_only / len(qs) <= 0.6, f"{name}: {corpus_only} corpus-only of {len(qs)}"
    cats = Counter(o["category"] for o in qs)
    assert cats["basic"] and cats["advanced"] >= 0.2 * len(qs), f"{name}: categories {dict(cats)}"
    # Both halves of the benchmark have both kinds of question.
    for flag in (True, False):
        kinds = Counter(o["type"] for o in qs if o["corpus_only"] == flag)
        assert kinds["mc"] and kinds["tf"], f"{name}: corpus_only={flag}: {dict(kinds)}"


# ---------------------------------------------------------------- separation of the splits


def test_no_benchmark_question_in_training_prompts(bench, sft, prefs, data_dir):
    prompts = {norm(m["content"]) for _, o in sft for m in o["messages"] if m["role"] == "user"}
    prompts |= {norm(o["prompt"]) for _, o in prefs}
    for n, o in bench:
        assert norm(stem_of(o)) not in prompts, f"{data_dir.name}/benchmark.jsonl:{n}: question appears in SFT/preferences"


def test_corpus_only_terms_absent_from_training_data(bench, sft, prefs, corpus, data_dir):
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
            leaks.append(f"{data_dir.name}/benchmark.jsonl:{n} ({o['id']}): all of {sorted(key_terms(o))} occur in SFT/preferences")
    assert not leaks, "\n".join(leaks)


def test_benchmark_terms_in_corpus(bench, corpus, data_dir):
    """Every question's distinctive terms are mostly found in the corpus (its facts come from it)."""
    in_corpus = vocab(o["title"] + " " + o["text"] for _, o in corpus)
    bad = []
    for n, o in bench:
        terms = key_terms(o)
        missing = terms - in_corpus
        if terms and len(missing) > len(terms) / 2:
            bad.append(f"{data_dir.name}/benchmark.jsonl:{n} ({o['id']}): not in corpus: {sorted(missing)}")
    assert not bad, "\n".join(bad)
