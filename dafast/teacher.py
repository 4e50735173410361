"""A teacher (and judge) over any OpenAI-compatible chat endpoint, with an on-disk cache.

    teacher = Teacher(TeacherConfig(base_url="http://127.0.0.1:8080/v1", model="local"))
    text = teacher.complete([{"role": "user", "content": "..."}])
    rows = teacher.complete_many([Request(messages, schema=SCHEMA, name="doc-001/sft"), ...])

- The endpoint is anything the ``openai`` client talks to: a hosted model, vLLM, llama.cpp's
  server, Ollama, or ``python -m dafast.serve`` (the local default). The key is read from the
  environment variable the config names; it is never stored, and never part of a cache key.
- Retries: the ``openai`` client's own, with exponential backoff and jitter, on connection errors,
  timeouts, 408, 409, 429 and 5xx answers. Other HTTP errors are not retried.
- Concurrency: at most ``concurrency`` requests in flight (a thread pool; the client is
  thread-safe).
- Cache: one JSON file per request under ``cache_dir``, named by a hash of what decides the
  answer (model, messages, sampling parameters, schema), not of where it is served from, so a
  restarted local server on another port still hits. Each entry is written to a temporary file
  and renamed, so a killed run leaves whole entries only and a rerun resumes from them. Errors
  are never cached.
- Errors: :class:`TeacherError` names the request (its ``name`` and cache key) and says what
  failed: the endpoint unreachable, a timeout, an HTTP error, an answer cut off, not JSON or not
  of the schema when JSON was asked for.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
# Local servers ignore the key, but the openai client refuses to start without one.
_NO_KEY = "not-needed"


class TeacherError(RuntimeError):
    """A request the teacher could not answer; the message names the request."""


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    base_url: str = DEFAULT_BASE_URL
    model: str = "smollm2-135m-instruct"
    api_key_env: str | None = None  # e.g. "OPENAI_API_KEY"; None: no key (a local server)
    cache_dir: str | os.PathLike | None = None  # None: $DAFAST_CACHE/teacher
    concurrency: int = 4
    retries: int = 3
    timeout: float = 300.0  # seconds per attempt

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")


@dataclasses.dataclass(frozen=True)
class Request:
    """One chat completion. ``schema`` (a JSON schema) asks for JSON and returns the parsed
    object; ``name`` says in errors and logs which request it is (e.g. "doc-001/sft")."""
    messages: list[dict]
    schema: dict | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    name: str = ""

    def params(self, model: str) -> dict:
        """What decides the answer, and so the cache key (no URL, no key)."""
        return {"model": model, "messages": self.messages, "schema": self.schema,
                "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "seed": self.seed}


def request_key(request: Request, model: str) -> str:
    blob = json.dumps(request.params(model), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Teacher:
    def __init__(self, config: TeacherConfig = TeacherConfig()):
        import openai

        self.config = config
        key = _NO_KEY
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise TeacherError(f"the API key variable {config.api_key_env!r} is not set "
                                   f"(the endpoint {config.base_url} needs it)")
        self._client = openai.OpenAI(base_url=config.base_url, api_key=key,
                                     timeout=config.timeout, max_retries=config.retries)
        if config.cache_dir is None:
            from dafast.models import cache_root
            self.cache_dir = cache_root() / "teacher"
        else:
            self.cache_dir = Path(config.cache_dir).expanduser()
        self.hits = 0  # answers served from the cache (for logs and tests)
        self.calls = 0  # answers fetched from the endpoint

    # --- the cache -------------------------------------------------------------------------

    def _entry(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str):
        path = self._entry(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return entry["response"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            # Entries are renamed into place whole, so this is damage from outside; refetch.
            return None

    def _store(self, key: str, request: Request, response) -> None:
        path = self._entry(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"request": request.params(self.config.model), "name": request.name,
                 "response": response}
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- requests --------------------------------------------------------------------------

    def complete(self, messages: list[dict] | Request, **kwargs):
        """The answer to one request: text, or the parsed object when a schema was given."""
        request = messages if isinstance(messages, Request) else Request(messages, **kwargs)
        key = request_key(request, self.config.model)
        cached = self._cached(key)
        if cached is not None:
            self.hits += 1
            return cached
        text = self._fetch(request, key)
        response = text
        if request.schema is not None:
            response = _parse_json(text, request.schema, self._label(request, key))
        self._store(key, request, response)
        self.calls += 1
        return response

    def complete_many(self, requests: list[Request]) -> list:
        """Answers in the order of ``requests``, at most ``concurrency`` in flight. On the first
        failure the requests not yet started are cancelled and the error raised; the answers
        already received stay cached, so a rerun resumes."""
        with concurrent.futures.ThreadPoolExecutor(self.config.concurrency) as pool:
            futures = [pool.submit(self.complete, r) for r in requests]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _label(self, request: Request, key: str) -> str:
        return f"request {request.name or '(unnamed)'} [{key[:12]}] to {self.config.base_url}"

    def _fetch(self, request: Request, key: str) -> str:
        import openai

        label = self._label(request, key)
        extra: dict[str, Any] = {}
        if request.schema is not None:
            extra["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": request.schema, "strict": True}}
        attempts = self.config.retries + 1
        try:
            completion = self._client.chat.completions.create(
                model=self.config.model, messages=request.messages,
                temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, seed=request.seed, **extra)
        except openai.APITimeoutError:
            raise TeacherError(f"{label}: no answer within {self.config.timeout:g} s "
                               f"({attempts} attempts)") from None
        except openai.APIConnectionError as e:
            raise TeacherError(f"{label}: cannot reach the endpoint ({attempts} attempts): "
                               f"{e.__cause__ or e}") from None
        except openai.APIStatusError as e:
            raise TeacherError(f"{label}: HTTP {e.status_code}: {_detail(e)}") from None
        except openai.APIError as e:  # e.g. a body that is not a chat completion
            raise TeacherError(f"{label}: {e}") from None
        choices = getattr(completion, "choices", None)
        if not choices or not isinstance(choices[0].message.content, str):
            raise TeacherError(f"{label}: the answer holds no message text")
        if request.schema is not None and choices[0].finish_reason == "length":
            raise TeacherError(f"{label}: the JSON answer was cut off at max_tokens="
                               f"{request.max_tokens}")
        return choices[0].message.content


def _detail(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", body)
    return str(body or error.message)[:500]


def _parse_json(text: str, schema: dict, label: str):
    """The answer as an object of ``schema``: an endpoint that ignores response_format (some
    do, silently) must not put malformed rows in the cache."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise TeacherError(f"{label}: JSON was asked for, the answer is not JSON ({e.msg} at "
                           f"column {e.colno}): {text[:200]!r}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise TeacherError(f"{label}: the answer does not follow the schema at {where}: "
                           f"{e.message[:200]}") from None
    except jsonschema.SchemaError as e:
        raise TeacherError(f"{label}: the request's JSON schema is invalid: {e.message}") from None
    return value
