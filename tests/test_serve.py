"""`petmix serve`: the official openai client against a tiny run, batching, bad requests, Ctrl-C.

Loopback only: the server listens on 127.0.0.1 on a free port, in a thread (a subprocess for Ctrl-C).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="petmix serve needs fastapi and uvicorn (pip install petmix)")
openai = pytest.importorskip("openai", reason="the tests call the server with the openai client (pip install -e .[dev])")

from petmix.api import load  # noqa: E402
from petmix.data.task import Example, Task  # noqa: E402
from petmix.train import TrainConfig, Trainer  # noqa: E402

WORDS = ["yes", "no", "cat"]
# Inputs of different token lengths (a batch of them needs padding) whose answers differ (a mix-up shows).
_VOCAB = ("the cat sat on mat positive negative yes no true false summary of dialogue What is two plus four "
          "Answer question entailment neutral").split()
_RNG = random.Random(0)
INPUTS = [" ".join(_RNG.choice(_VOCAB) for _ in range(_RNG.randint(1, 12))) for _ in range(16)]


def _tasks() -> list[Task]:
    tasks = []
    for t, w in enumerate(WORDS):
        ex = [Example(f"say {w} number {i} " + "x" * (i % 3), [w]) for i in range(14)]
        tasks.append(Task(f"task{t}", f"Answer {w}.", "exact_match", ex[:12], ex[12:], "plain"))
    return tasks


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_path) -> Path:
    out = tmp_path_factory.mktemp("serve") / "tiny-sapt"
    cfg = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), epochs=1, batch_size=4, lr=5e-3,
                      max_new_tokens=6, replay_source="real", eval_batch_size=16)
    Trainer(cfg, _tasks(), out).run()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    import uvicorn

    from petmix.serve import create_app

    model = load(tiny_run)
    app = create_app(model, "tiny", max_batch=16, max_wait_ms=20)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield {"port": port, "url": f"http://127.0.0.1:{port}/v1", "state": app.state.petmix}
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def reference(tiny_run):
    return load(tiny_run)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"], api_key="unused", max_retries=0, timeout=60)


def test_models_completion_chat_and_stream(server, reference):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = INPUTS[3]
    want = reference.generate([prompt])[0]

    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6)
    choice = out.choices[0]
    assert choice.text == want.text
    assert choice.router_weights == pytest.approx(want.router_weights)  # extra field: weights by task
    assert set(choice.router_weights) == {"task0", "task1", "task2"}
    assert out.usage.prompt_tokens > 0 and choice.finish_reason in ("stop", "length")

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say yes number 3"}],
                                          max_tokens=6)
    chat_prompt = "Input: say yes number 3\nOutput: "  # the run's template (plain) with no definition
    assert chat.choices[0].message.content == reference.generate([chat_prompt])[0].text
    assert chat.choices[0].router_weights

    pieces, weights, reasons = [], None, []
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=6, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
        weights = getattr(chunk.choices[0], "router_weights", None) or weights
    assert "".join(pieces) == want.text
    assert reasons[-1] == choice.finish_reason and weights == pytest.approx(want.router_weights)

    texts = {0: "", 1: ""}  # several prompts in one streamed request: chunks tagged by choice index
    for chunk in client.completions.create(model="tiny", prompt=INPUTS[4:6], max_tokens=6, stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[0], texts[1]] == [a.text for a in reference.generate(INPUTS[4:6], max_new_tokens=6)]

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say yes number 3"}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens


def test_concurrent_requests_batch_and_match_generate(server, reference):
    client = _client(server)
    before = server["state"].worker.batches
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=6), INPUTS))
    got = [o.choices[0].text for o in outs]
    batched = reference.generate(INPUTS, max_new_tokens=6)
    assert got == [a.text for a in batched]
    assert len(set(got)) > 4  # the answers differ, so a mix-up between requests would show
    # left padding must not change answers: one at a time gives the same
    assert got == [reference.generate([p], max_new_tokens=6)[0].text for p in INPUTS]
    for o, a in zip(outs, batched):
        assert o.choices[0].router_weights == pytest.approx(a.router_weights, abs=1e-5)
    assert server["state"].worker.batches - before < len(INPUTS)  # requests were answered together


def _raw(server, body: bytes | str, path: str = "/v1/completions", method: str = "POST") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.request(method, path, body=body if isinstance(body, bytes) else body.encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, payload = resp.status, json.loads(resp.read())
    conn.close()
    return status, payload


BAD = [
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10_000_000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "task": "unknown"}, 400, "task"),
    ({"prompt": "hi"}, 400, "model"),
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
]
BAD_CHAT = [
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path,cases", [("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)])
def test_bad_requests_get_4xx_in_openai_shape(server, path, cases):
    for body, status, param in cases:
        got, payload = _raw(server, body if isinstance(body, (str, bytes)) else json.dumps(body), path)
        assert got == status, (body, payload)
        err = payload["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], payload
        assert err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param, (body, err)
        ok, good = _raw(server, json.dumps({"model": "tiny", "prompt": "say no number 1", "max_tokens": 3}))
        assert ok == 200 and good["choices"][0]["text"] is not None  # the server keeps answering
    assert _raw(server, "", "/v1/nowhere", "GET")[0] == 404
    assert _raw(server, "{}", "/v1/models", "POST")[0] == 405


def test_a_failing_request_fails_alone(server, reference, monkeypatch):
    """A batch with one request that breaks generation: the others still get their answers."""
    model = server["state"].worker.model
    real = model.generate

    def flaky(prompts, *args, **kwargs):
        if "boom" in " ".join(prompts):
            raise RuntimeError("boom")
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(model, "generate", flaky)
    client = _client(server)
    prompts = INPUTS[:5] + ["boom"] + INPUTS[5:8]

    def ask(p):
        try:
            return client.completions.create(model="tiny", prompt=p, max_tokens=6).choices[0].text
        except openai.APIStatusError as err:
            return err

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    failed = got[5]
    assert isinstance(failed, openai.InternalServerError) and "boom" in str(failed)
    want = [a.text for a in reference.generate(INPUTS[:8], max_new_tokens=6)]
    assert got[:5] + got[6:] == want


def test_stop_sequences(server, reference):
    client = _client(server)
    full = reference.generate([INPUTS[0]], max_new_tokens=6)[0].text
    if len(full) < 3:
        pytest.skip(f"the tiny model's answer {full!r} is too short to cut")
    stop = full[2:4]
    want = full[: full.find(stop)]
    out = client.completions.create(model="tiny", prompt=INPUTS[0], max_tokens=6, stop=[stop])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=INPUTS[0], max_tokens=6, stop=stop, stream=True))
    assert streamed == want


def test_cli_serve_stops_cleanly_on_ctrl_c(tiny_run):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "petmix.cli", "serve", str(tiny_run), "--port", str(port),
                             "--model-name", "tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny"
                break
            except OSError:
                assert time.time() < deadline, "petmix serve did not come up"
                time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        output = proc.stdout.read()
        assert code == 0, output
        assert "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
