"""dafast.teacher against real HTTP servers: dafast.serve on a tiny model, and stdlib servers
that misbehave (sleep, answer garbage, fail) for the error paths. No mocks of the client."""

import http.server
import json
import threading
import time

import pytest

from served import free_port, requires_server

from dafast.teacher import Request, Teacher, TeacherConfig, TeacherError, request_key

pytestmark = requires_server


def ask(text, **kwargs):
    return Request([{"role": "user", "content": text}], max_tokens=4, **kwargs)


def entries(cache):
    return sorted(p for p in cache.rglob("*") if p.is_file())


@pytest.fixture
def misbehaving():
    """Start a stdlib HTTP server whose POST answer is `reply(handler)`; yields a starter."""
    servers = []

    def start(reply):
        hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                hits.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body = reply(len(hits))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", hits

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def completion(content, finish_reason="stop"):
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": finish_reason,
                                    "message": {"role": "assistant", "content": content}}]}
                      ).encode()


def test_rerun_is_served_from_cache_with_the_server_gone(tiny_server, tmp_path):
    requests = [ask(f"question {i}", name=f"q{i}") for i in range(3)]
    first = Teacher(TeacherConfig(base_url=tiny_server, model="tiny", cache_dir=tmp_path))
    answers = first.complete_many(requests)
    assert first.calls == 3 and first.hits == 0
    assert all(isinstance(a, str) for a in answers)
    assert len(entries(tmp_path)) == 3

    # Same requests, a dead endpoint (as after the server stopped): all from the cache.
    dead = f"http://127.0.0.1:{free_port()}/v1"
    again = Teacher(TeacherConfig(base_url=dead, model="tiny", cache_dir=tmp_path, retries=0))
    assert again.complete_many(requests) == answers
    assert again.hits == 3 and again.calls == 0
    # Another model or other sampling is another request.
    with pytest.raises(TeacherError, match="q0"):
        again.complete(ask("question 0", name="q0", temperature=0.5))


def test_interrupted_run_resumes(tiny_server, tmp_path):
    good = [ask(f"item {i}", name=f"item-{i}") for i in range(2)]
    broken = ask("item 2", name="item-2", schema={"type": "no-such-type"})
    config = TeacherConfig(base_url=tiny_server, model="tiny", cache_dir=tmp_path, concurrency=1)
    with pytest.raises(TeacherError, match=r"item-2 \[.*HTTP 400"):
        Teacher(config).complete_many(good + [broken])
    kept = entries(tmp_path)
    assert len(kept) == 2  # the answers before the failure, whole; nothing of the failed one
    assert all(json.loads(p.read_text())["response"] is not None for p in kept)

    fixed = good + [ask("item 2", name="item-2")]
    resumed = Teacher(config)
    resumed.complete_many(fixed)
    assert resumed.hits == 2 and resumed.calls == 1


def test_json_answers_follow_the_schema(tiny_server, tmp_path):
    schema = {"type": "object", "properties": {"truth": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["truth", "n"], "additionalProperties": False}
    teacher = Teacher(TeacherConfig(base_url=tiny_server, model="tiny", cache_dir=tmp_path))
    # A random model, so only the grammar can make this valid JSON of the schema.
    answer = teacher.complete(Request([{"role": "user", "content": "Is silk strong?"}],
                                      schema=schema, max_tokens=32, name="json"))
    assert set(answer) == {"truth", "n"} and answer["truth"] in ("yes", "no")
    assert 0 <= answer["n"] <= 9


def test_connection_refused_names_the_request(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    teacher = Teacher(TeacherConfig(base_url=dead, cache_dir=tmp_path, retries=1))
    with pytest.raises(TeacherError, match=r"request doc-7/sft \[[0-9a-f]{12}\] to .*cannot "
                                           r"reach the endpoint \(2 attempts\)"):
        teacher.complete(ask("x", name="doc-7/sft"))
    assert entries(tmp_path) == []


def test_timeout_is_a_clear_error_and_caches_nothing(misbehaving, tmp_path):
    def slow(_):
        time.sleep(3)
        return 200, completion("late")

    url, hits = misbehaving(slow)
    teacher = Teacher(TeacherConfig(base_url=url, cache_dir=tmp_path, retries=0, timeout=0.5))
    start = time.monotonic()
    with pytest.raises(TeacherError, match=r"request slow-one .*no answer within 0.5 s"):
        teacher.complete(ask("x", name="slow-one"))
    assert time.monotonic() - start < 2.5
    assert entries(tmp_path) == []


def test_malformed_json_is_a_clear_error_and_caches_nothing(misbehaving, tmp_path):
    url, _ = misbehaving(lambda _: (200, completion('{"answer": "cut off')))
    teacher = Teacher(TeacherConfig(base_url=url, cache_dir=tmp_path, retries=0))
    with pytest.raises(TeacherError, match=r"request doc-1/preferences .*not JSON"):
        teacher.complete(ask("x", name="doc-1/preferences", schema={"type": "object"}))
    assert entries(tmp_path) == []
    # The same text asked for as text is fine, and cached.
    assert teacher.complete(ask("x", name="plain")) == '{"answer": "cut off'
    assert len(entries(tmp_path)) == 1


def test_cut_off_json_and_non_completion_bodies(misbehaving, tmp_path):
    url, _ = misbehaving(lambda _: (200, completion('{"a": 1}', finish_reason="length")))
    teacher = Teacher(TeacherConfig(base_url=url, cache_dir=tmp_path, retries=0))
    with pytest.raises(TeacherError, match=r"request cut .*cut off at max_tokens=4"):
        teacher.complete(ask("x", name="cut", schema={"type": "object"}))
    url, _ = misbehaving(lambda _: (200, b'{"hello": "not a completion"}'))
    teacher = Teacher(TeacherConfig(base_url=url, cache_dir=tmp_path, retries=0))
    with pytest.raises(TeacherError, match=r"request garbage .*no message text"):
        teacher.complete(ask("x", name="garbage"))
    assert entries(tmp_path) == []


def test_server_errors_are_retried_with_backoff_then_reported(misbehaving, tmp_path):
    url, hits = misbehaving(lambda n: (503, b'{"error": {"message": "overloaded"}}') if n < 3
                            else (200, completion("finally")))
    teacher = Teacher(TeacherConfig(base_url=url, cache_dir=tmp_path, retries=2))
    assert teacher.complete(ask("x", name="flaky")) == "finally"
    assert len(hits) == 3

    url, hits = misbehaving(lambda n: (500, b'{"error": {"message": "broken model"}}'))
    teacher = Teacher(TeacherConfig(base_url=url, cache_dir=tmp_path / "b", retries=1))
    with pytest.raises(TeacherError, match=r"request down .*HTTP 500: broken model"):
        teacher.complete(ask("x", name="down"))
    assert len(hits) == 2
    assert entries(tmp_path / "b") == []


def test_key_comes_from_the_environment_and_is_never_stored(misbehaving, tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match="DAFAST_TEST_KEY"):
        Teacher(TeacherConfig(api_key_env="DAFAST_TEST_KEY", cache_dir=tmp_path))
    monkeypatch.setenv("DAFAST_TEST_KEY", "sk-secret-123")
    url, _ = misbehaving(lambda _: (200, completion("ok")))
    teacher = Teacher(TeacherConfig(base_url=url, api_key_env="DAFAST_TEST_KEY",
                                    cache_dir=tmp_path))
    request = ask("x", name="keyed")
    assert teacher.complete(request) == "ok"
    (entry,) = entries(tmp_path)
    assert "sk-secret" not in entry.read_text()
    assert entry.stem == request_key(request, teacher.config.model)
