"""python -m dafast.distill end to end over HTTP: a stdlib teacher server with fixed answers
(so balance, de-duplication and dropping can be checked exactly), and one run with
dafast.serve on the embedded 135M model. Outputs are read back with dafast's own loaders."""

import collections
import http.server
import json
import threading

import pytest

from served import free_port, requires_server, serving

from dafast import data, distill
from dafast.eval.benchmark import load_benchmark
from dafast.teacher import Teacher, TeacherConfig, TeacherError

pytestmark = requires_server

DOCS = [f"Document {i}: fibre {i} is made of protein P{i} and is {i + 2} times stiffer." for i in range(4)]


def teacher_answer(body: dict) -> dict:
    """What a well-behaved teacher writes, by the schema it was asked for."""
    prompt = body["messages"][-1]["content"]
    doc = prompt.rsplit("Document ", 1)[1].split(":")[0]
    task = next(iter(body["response_format"]["json_schema"]["schema"]["properties"]))
    if task == "conversations":
        return {"conversations": [
            {"question": f"What is fibre {doc} made of?", "answer": f"Protein P{doc}."},
            {"question": "What   is a FIBRE?", "answer": "A long thin strand."},  # in every doc
            {"question": f"Empty answer {doc}?", "answer": "   "}]}  # invalid once stripped
    if task == "pairs":
        return {"pairs": [
            {"question": f"How stiff is fibre {doc}?", "correct_answer": f"{doc} + 2 times.",
             "wrong_answer": f"{doc} + 20 times."},
            {"question": f"Same {doc}?", "correct_answer": "same", "wrong_answer": "same"}]}
    return {"multiple_choice": [
                {"question": f"Fibre {doc} protein, question {k}?", "correct_option": f"P{doc}",
                 "wrong_options": [f"Q{doc}", f"R{doc}", f"S{doc}"], "level": "basic"}
                for k in range(3)],
            "true_false": [
                {"true_statement": f"Fibre {doc} is protein {k}.",
                 "false_statement": f"Fibre {doc} is sugar {k}.", "level": "advanced"}
                for k in range(3)]}


@pytest.fixture
def teacher_url():
    """A stdlib server answering as `teacher_answer`, or, after `broken.set()`, with JSON that
    does not follow the schema."""
    broken = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = {"oops": 1} if broken.is_set() else teacher_answer(body)
            reply = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                "model": body["model"], "choices": [{
                                    "index": 0, "finish_reason": "stop", "message": {
                                        "role": "assistant", "content": json.dumps(content)}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", broken
    server.shutdown()
    server.server_close()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                            for i, t in enumerate(DOCS)))
    return path


def test_outputs_are_valid_balanced_deduplicated_and_load(teacher_url, corpus, tmp_path):
    url, _ = teacher_url
    out = tmp_path / "out"
    teacher = Teacher(TeacherConfig(base_url=url, model="t", cache_dir=tmp_path / "cache"))
    manifest = distill.distill(corpus, out, teacher, with_benchmark=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "benchmark.jsonl", "manifest.json", "preferences.jsonl", "sft.jsonl"]

    sft = data.load_rows(out, "sft")  # a directory, as a recipe's sft.data=OUT_DIR gives it
    assert len(sft) == 4 + 1  # one per document, the shared question once
    assert manifest["files"]["sft.jsonl"]["dropped"] == {"invalid": 4, "duplicate": 3}
    prefs = data.load_rows(out, "dpo")
    assert len(prefs) == 4 and all(p["chosen"] != p["rejected"] for p in prefs)
    assert manifest["files"]["preferences.jsonl"]["dropped"]["invalid"] == 4

    questions = load_benchmark(out)
    mc = [q for q in questions if q.type == "mc"]
    tf = [q for q in questions if q.type == "tf"]
    assert len(mc) == 12 and len(tf) == 12
    # Letters balanced whatever the teacher did (it always wrote the correct option first).
    assert collections.Counter(q.answer for q in mc) == {"A": 3, "B": 3, "C": 3, "D": 3}
    for q in mc:
        assert q.options[q.answer].startswith("P") and q.corpus_only
    assert collections.Counter(q.answer for q in tf) == {"True": 6, "False": 6}
    for q in tf:
        assert ("protein" in q.question) == (q.answer == "True")
    assert len({q.id for q in questions}) == len(questions)

    # A recipe's stages read it: tokenised like the bundled SFT data.
    from transformers import AutoTokenizer
    from dafast.models import default_model_dir
    example = data.sft_example(sft[0], AutoTokenizer.from_pretrained(default_model_dir()))
    assert any(label != data.IGNORE_INDEX for label in example["labels"])


def test_rerun_costs_nothing_and_bad_answers_leave_nothing_half_written(
        teacher_url, corpus, tmp_path):
    url, broken = teacher_url
    cache = tmp_path / "cache"
    first = Teacher(TeacherConfig(base_url=url, model="t", cache_dir=cache))
    distill.distill(corpus, tmp_path / "out", first)
    assert first.calls == 8
    written = (tmp_path / "out" / "sft.jsonl").read_text()

    dead = f"http://127.0.0.1:{free_port()}/v1"
    again = Teacher(TeacherConfig(base_url=dead, model="t", cache_dir=cache, retries=0))
    distill.distill(corpus, tmp_path / "out", again, overwrite=True)
    assert again.calls == 0 and again.hits == 8
    assert (tmp_path / "out" / "sft.jsonl").read_text() == written

    # A teacher that answers JSON outside the schema: the run fails naming the request, the
    # output directory does not appear, no temporary directory is left, the cache is as it was.
    cached = {p: p.read_text() for p in cache.rglob("*") if p.is_file()}
    broken.set()
    with pytest.raises(TeacherError, match=r"request d\d/(sft|preferences) .*does not follow "
                                           r"the schema at the top level"):
        distill.distill(corpus, tmp_path / "fresh", Teacher(TeacherConfig(
            base_url=url, model="other", cache_dir=cache)))
    assert not (tmp_path / "fresh").exists()
    assert not list(tmp_path.glob(".fresh*"))
    assert {p: p.read_text() for p in cache.rglob("*") if p.is_file()} == cached


def test_cli_bad_endpoint_and_existing_output(corpus, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    args = [str(corpus), str(tmp_path / "out"), "--base-url", dead, "--retries", "0",
            "--cache-dir", str(tmp_path / "cache")]
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert "error: request d" in err and "cannot reach the endpoint" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert distill.main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_embedded_model_as_teacher(tmp_path):
    """The local default end to end: dafast.serve on SmolLM2-135M, one short document."""
    text = json.loads(data.resolve_source("builtin:biomat", "cpt").read_text().splitlines()[0])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "silk", "text": text["text"][:1200]}) + "\n")
    with serving("smollm2-135m-instruct", name="smollm2") as url:
        code = distill.main([str(corpus), str(tmp_path / "out"), "--base-url", url,
                             "--cache-dir", str(tmp_path / "cache"), "--count", "1",
                             "--max-chars", "100", "--benchmark"])
    assert code == 0
    assert data.load_rows(tmp_path / "out", "sft")
    assert data.load_rows(tmp_path / "out", "dpo")
    assert load_benchmark(tmp_path / "out")
