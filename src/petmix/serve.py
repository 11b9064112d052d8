"""``petmix serve RUN``: a finished run behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed
(server-sent events) or not. Every answer comes from ``petmix.load(RUN).generate`` (greedy, as the run
was evaluated), so the server answers exactly what the Python API answers; each choice carries
``router_weights``, the router's weights over the blocks named by the task each block learned.

- ``/v1/completions`` takes complete prompts, as ``load(RUN).generate`` does.
- ``/v1/chat/completions`` takes one user message (the input) and, optionally, a system message (the
  task definition), and formats them with the run's prompt template, as ``petmix predict`` does. The
  models are task models, not chat models: a conversation history is refused rather than guessed at.
- ``task`` (an extra request field) formats the prompt as that task of the run and gives the task id to
  methods that need it at test time (per-task-lora and the like).

One worker thread owns the model. When it is free it takes every queued request (up to ``max_batch``);
while another request is still being read it waits for it, at most ``max_wait_ms``; then the requests with
the same generation settings run as one batch (requests that come while a batch runs wait for the next). A batch that fails is retried one request
at a time, so one bad input fails alone. Sampling settings (temperature, top_p, ...) are accepted and
ignored: decoding is greedy, like the run's evaluation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from petmix.api import TrainedModel
from petmix.data.collate import encode_prompts
from petmix.data.task import Task
from petmix.data.templates import format_prompt
from petmix.errors import PetmixError

log = logging.getLogger(__name__)


# ---- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


# ---- requests ---------------------------------------------------------------------------------
class _Request(BaseModel):
    # strict: "5" is not a number and 1 is not a boolean, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # chat's newer name for max_tokens
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    temperature: float | None = None  # accepted and ignored: decoding is greedy
    top_p: float | None = None
    seed: int | None = None
    user: str | None = None
    task: str | None = None  # petmix: format as / route for this task of the run


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple[Any, ...]) -> str:
    """``messages[0].content`` from pydantic's location, without its union-member tags (``str``, ``list[str]``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) not in _TYPE_TAGS and "[" not in str(part):
            out += ("." if out else "") + str(part)
    return out


async def _parse(request: Request, kind: type[_Request]) -> _Request:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from None


# ---- the worker -------------------------------------------------------------------------------
@dataclass
class Job:
    """One prompt to answer; the worker reports to ``events`` (an asyncio queue) from its thread."""

    prompt: str
    ids: list[int]  # the prompt's tokens as generation sees them (row matching, usage)
    max_tokens: int
    task: str | None
    stops: list[str]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    ended: bool = False  # end-of-sequence seen
    sent: str = ""  # text already streamed
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting any more
            self.cancelled = True


def visible_text(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """The part of ``text`` that may be shown: cut at the first stop string (then True); while streaming,
    hold back an end that could be the start of a stop string."""
    cuts = [text.find(s) for s in stops if s and s in text]
    if cuts:
        return text[: min(cuts)], True
    if final:
        return text, False
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


class _RowStreamer:
    """A transformers streamer for one batch: records each row's new tokens and streams text deltas.

    ``generate`` first puts the prompt (decoders) or the decoder start token (encoder-decoders), then one
    token per row per step; rows that ended get padding, which is ignored after their end token."""

    def __init__(self, jobs: list[Job], tokenizer, eos: set[int]):
        self.jobs, self.tokenizer, self.eos, self.started = jobs, tokenizer, eos, False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:
            self.started = True
            return
        step = value.reshape(len(self.jobs), -1)[:, -1].tolist()
        for job, token in zip(self.jobs, step):
            if job.ended or len(job.tokens) >= job.max_tokens:
                continue
            if token in self.eos:
                job.ended = True
                continue
            job.tokens.append(int(token))
            if job.stream and not job.cancelled:
                text = self.tokenizer.decode(job.tokens, skip_special_tokens=True).strip()
                shown, _ = visible_text(text, job.stops, final=False)
                if not shown.endswith("\ufffd") and shown.startswith(job.sent) and len(shown) > len(job.sent):
                    job.emit(("delta", shown[len(job.sent):]))
                    job.sent = shown

    def end(self) -> None:
        pass


class Worker:
    """Owns the model; answers queued jobs in micro-batches on one thread."""

    def __init__(self, model: TrainedModel, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        tok = model.backbone.tokenizer
        eos = tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.batches = 0  # batches run (for tests and logs)
        self.arriving = 0  # requests being read and checked, not yet queued (changed on the event loop only)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="petmix-serve-worker", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the running batch finish (at most ``timeout`` seconds: Ctrl-C must not hang on a long one)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("a batch is still running after %.0f s; leaving it (the worker thread is a daemon)", timeout)
            self.thread = None
        while True:  # whatever is still queued is told so, rather than left waiting
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(("error", APIError(503, "the server is shutting down", kind="server_error")))

    @contextmanager
    def arrival(self) -> Iterator[Callable[[list[Job]], None]]:
        """Counts a request as on its way in until its jobs are queued (or it is refused)."""
        self.arriving += 1
        done = False

        def submit(jobs: list[Job]) -> None:
            nonlocal done
            for job in jobs:
                self.queue.put(job)
            if not done:
                done = True
                self.arriving -= 1

        try:
            yield submit
        finally:
            if not done:
                self.arriving -= 1

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    # wait for company only while a request is on its way in (parsed, not yet queued)
                    remaining = deadline - time.monotonic()
                    if self.arriving <= 0 or remaining <= 0:
                        break
                    try:
                        job = self.queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                if not job.cancelled:
                    groups.setdefault((job.max_tokens, job.task), []).append(job)
            for group in groups.values():
                self._run(group)
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        by_ids: dict[tuple[int, ...], list[Job]] = {}
        for job in jobs:
            job.tokens, job.ended = [], False
            by_ids.setdefault(tuple(job.ids), []).append(job)

        def streamer_for(batch: dict[str, torch.Tensor]) -> _RowStreamer:
            # generate() sorts and splits its prompts: find each row's job by its tokens
            pending = {k: list(v) for k, v in by_ids.items()}
            rows = [pending[tuple(ids[mask.bool()].tolist())].pop(0)
                    for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
            return _RowStreamer(rows, self.model.backbone.tokenizer, self.eos)

        try:
            answers = self.model.generate([j.prompt for j in jobs], task=jobs[0].task,
                                          max_new_tokens=jobs[0].max_tokens, streamer_for=streamer_for)
        except Exception as err:  # noqa: BLE001 - one request's failure must not end the worker
            if len(jobs) > 1:
                log.warning("a batch of %d failed (%s); answering its requests one by one", len(jobs), err)
                for job in jobs:
                    self._run([job])
                return
            log.exception("request failed")
            message = str(err) if isinstance(err, PetmixError) else f"generation failed: {type(err).__name__}: {err}"
            status = 400 if isinstance(err, PetmixError) else 500
            jobs[0].emit(("error", APIError(status, message, kind="invalid_request_error" if status == 400
                                            else "server_error")))
            return
        self.batches += 1
        for job, answer in zip(jobs, answers):
            text, stopped = visible_text(answer.text, job.stops, final=True)
            reason = "length" if not stopped and not job.ended and len(job.tokens) >= job.max_tokens else "stop"
            job.emit(("done", text, answer.router_weights, len(job.tokens), reason))


# ---- the app ----------------------------------------------------------------------------------
@dataclass
class ServeState:
    model: TrainedModel
    model_id: str
    worker: Worker
    context: int | None  # the backbone's positions (decoders: prompt + answer; encoder-decoders: answer)
    results: dict[str, Any]  # the run's results.json (task definitions and templates for chat prompts)
    created: int = field(default_factory=lambda: int(time.time()))


def context_length(model: TrainedModel) -> int | None:
    cfg = model.backbone.model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop sequences", param="stop")
    return [s for s in stops if s]


def _check_common(req: _Request, state: ServeState) -> int:
    if req.model != state.model_id:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, "n: only n=1 is supported (decoding is greedy: every choice would be the same)",
                       param="n")
    if req.task is not None and req.task not in state.model.tasks:
        raise APIError(400, f"task: {req.task!r} is not a task of this run ({', '.join(state.model.tasks)})",
                       param="task")
    if req.task is None and state.model.method.task_id_at_test:
        raise APIError(400, f"task: method {state.model.method.name} is given the task id at test time; "
                       f"set task to one of {state.model.tasks}", param="task")
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    if max_tokens is None:
        return int(state.model.config["max_new_tokens"])
    if max_tokens <= 0:
        raise APIError(400, f"max_tokens must be at least 1, not {max_tokens}", param="max_tokens")
    return max_tokens


def _make_jobs(state: ServeState, prompts: list[str], max_tokens: int, req: _Request, param: str) -> list[Job]:
    cfg = state.model.config
    backbone = state.model.backbone
    try:
        rendered = [backbone.render(p, cfg["chat"]) for p in prompts]
    except PetmixError as err:
        raise APIError(400, str(err), param=param) from None
    ids = encode_prompts(backbone.tokenizer, rendered, cfg["max_source_len"])
    if state.context is not None:
        for k, x in enumerate(ids):
            used = 0 if backbone.is_seq2seq else len(x)  # an encoder-decoder's answer has its own positions
            if used + max_tokens > state.context:
                raise APIError(400, f"this model's context is {state.context} tokens; the prompt"
                               f"{f' {k}' if len(ids) > 1 else ''} takes {len(x)} and max_tokens asks for "
                               f"{max_tokens} more", param="max_tokens", code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    return [Job(p, x, max_tokens, req.task, _stops(req.stop), req.stream, loop) for p, x in zip(prompts, ids)]


def _chat_prompt(req: ChatRequest, state: ServeState) -> str:
    definitions = [m.text() for m in req.messages if m.role in ("system", "developer")]
    users = [m for m in req.messages if m.role == "user"]
    others = [m.role for m in req.messages if m.role not in ("system", "developer", "user")]
    if others or len(users) != 1:
        raise APIError(400, "messages: send one user message (the input) and optionally a system message (the "
                       "task definition); petmix models answer single inputs, not conversations",
                       param="messages")
    text = users[0].text()
    if not text.strip():
        raise APIError(400, "messages: the user message is empty", param="messages")
    per_task = state.results.get("per_task", {})
    info = per_task.get(req.task) if req.task else next(iter(per_task.values()), {})
    definition = "\n".join(definitions) if definitions else (info.get("definition", "") if req.task else "")
    shell = Task("input", definition, "rougeL", [], [], info.get("template", "plain"))
    return format_prompt(shell, text)


async def _collect(jobs: list[Job], request: Request) -> list[tuple]:
    results = []
    try:
        for job in jobs:
            event = await job.events.get()
            if event[0] == "error":
                raise event[1]
            results.append(event)
    finally:
        for job in jobs:
            job.cancelled = True  # nothing waits for them any more
    return results


def _usage(jobs: list[Job], results: list[tuple]) -> dict[str, int]:
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(r[3] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(jobs: list[Job], make_chunk: Callable[[int, str | None, tuple | None], dict[str, Any]],
                  usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None) -> AsyncIterator[str]:
    """Chunks of every choice as they come; a failure ends the stream with an error event."""
    pending = {i: j for i, j in enumerate(jobs)}
    results: dict[int, tuple] = {}
    getters: dict[asyncio.Task, int] = {}
    try:
        for i in pending:
            first = make_chunk(i, None, None)
            if first:
                yield _sse(first)
        while pending:
            for i, job in pending.items():
                if i not in getters.values():
                    getters[asyncio.ensure_future(job.events.get())] = i
            done, _ = await asyncio.wait(list(getters), return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = getters.pop(fut)
                event = fut.result()
                if event[0] == "delta":
                    yield _sse(make_chunk(i, event[1], None))
                elif event[0] == "error":
                    err: APIError = event[1]
                    yield _sse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                          "code": err.code}})
                    return
                else:
                    job = pending.pop(i)
                    rest = event[1][len(job.sent):] if event[1].startswith(job.sent) else ""
                    if not event[1].startswith(job.sent):
                        log.warning("streamed text %r is not a prefix of the answer %r", job.sent, event[1])
                    results[i] = event
                    yield _sse(make_chunk(i, rest, event))
        if usage_chunk is not None:
            yield _sse(usage_chunk(_usage(jobs, [results[i] for i in range(len(jobs))])))
        yield _sse("[DONE]")
    finally:
        for fut in getters:
            fut.cancel()
        for job in jobs:
            job.cancelled = True


def create_app(model: TrainedModel, model_id: str, max_batch: int = 16, max_wait_ms: float = 5.0) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the worker that owns ``model``."""
    from contextlib import asynccontextmanager

    from petmix.runs import read_json

    results_path = model.run_dir / "results.json"
    state = ServeState(model, model_id, Worker(model, max_batch, max_wait_ms), context_length(model),
                       read_json(results_path) if results_path.is_file() else {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="petmix", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.petmix = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
                        ).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal error: {type(err).__name__}", kind="server_error").response()

    def _model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": state.created, "owned_by": "petmix",
                "method": model.method.name, "backbone": model.backbone.name, "blocks": model.block_names,
                "tasks": model.tasks}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return _model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        with state.worker.arrival() as submit:
            return await _completions(request, submit)

    async def _completions(request: Request, submit: Callable[[list[Job]], None]):
        req = await _parse(request, CompletionRequest)
        assert isinstance(req, CompletionRequest)
        max_tokens = _check_common(req, state)
        for name, value, default in (("echo", req.echo, False), ("logprobs", req.logprobs, None),
                                     ("suffix", req.suffix, None)):
            if value != default:
                raise APIError(400, f"{name} is not supported by petmix serve", param=name)
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of: only 1 is supported (decoding is greedy)", param="best_of")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise APIError(400, "prompt: must be a non-empty string (or a list of them)", param="prompt")
        jobs = _make_jobs(state, prompts, max_tokens, req, "prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        submit(jobs)
        head = {"id": cid, "object": "text_completion", "created": created, "model": model_id}
        if req.stream:
            def chunk(i: int, text: str | None, done: tuple | None) -> dict[str, Any]:
                if text is None:
                    return {}
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": done[4] if done else None}
                if done:
                    choice["router_weights"] = done[2]
                return {**head, "choices": [choice]}

            usage = (lambda u: {**head, "choices": [], "usage": u}) if (req.stream_options or {}).get(
                "include_usage") else None
            return StreamingResponse(_stream(jobs, chunk, usage), media_type="text/event-stream")
        results = await _collect(jobs, request)
        choices = [{"index": i, "text": r[1], "logprobs": None, "finish_reason": r[4], "router_weights": r[2]}
                   for i, r in enumerate(results)]
        return {**head, "choices": choices, "usage": _usage(jobs, results)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        with state.worker.arrival() as submit:
            return await _chat(request, submit)

    async def _chat(request: Request, submit: Callable[[list[Job]], None]):
        req = await _parse(request, ChatRequest)
        assert isinstance(req, ChatRequest)
        max_tokens = _check_common(req, state)
        if req.logprobs:
            raise APIError(400, "logprobs is not supported by petmix serve", param="logprobs")
        prompt = _chat_prompt(req, state)
        jobs = _make_jobs(state, [prompt], max_tokens, req, "messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        submit(jobs)
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model_id}
        if req.stream:
            head["object"] = "chat.completion.chunk"

            def chunk(i: int, text: str | None, done: tuple | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": done[4] if done else None}
                if done:
                    choice["router_weights"] = done[2]
                return {**head, "choices": [choice]}

            usage = (lambda u: {**head, "choices": [], "usage": u}) if (req.stream_options or {}).get(
                "include_usage") else None
            return StreamingResponse(_stream(jobs, chunk, usage), media_type="text/event-stream")
        results = await _collect(jobs, request)
        r = results[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": r[1]}, "logprobs": None,
                  "finish_reason": r[4], "router_weights": r[2]}
        return {**head, "choices": [choice], "usage": _usage(jobs, results)}

    return app


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_batch: int = 16, max_wait_ms: float = 5.0) -> None:
    """Load the run, then serve it until Ctrl-C (uvicorn finishes open requests, then stops the worker)."""
    import uvicorn

    from petmix.api import load

    model = load(run)
    model_id = model_name or model.run_dir.resolve().name
    app = create_app(model, model_id, max_batch, max_wait_ms)
    log.info("serving %s (%s, blocks: %s) as model %r on http://%s:%d/v1", run, model.method.name,
             ", ".join(model.block_names), model_id, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
