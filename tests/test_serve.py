"""`calm serve` end to end: real server processes on 127.0.0.1, the official `openai` client
and plain HTTP (httpx).

Three servers start together (module fixture): CALM and the baseline with a small batch
(4 rows, 2 waiting) so the limits are reachable, and one baseline server for the SIGTERM test.
Results are compared with `generate` on the same checkpoint in this process.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import openai  # a test dependency (.[dev]): the official client
import pytest
import torch
from serve_helpers import ServerProcess

import calm
from calm.checkpoint import save_checkpoint
from calm.config import preset
from calm.generation import generate
from calm.models import build_model
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM
from calm.tokenizer import Tokenizer

WORDS = "the a cat dog sat on mat and ran far away home tree bird sang loud soft".split()
ROWS, QUEUE = 4, 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rnd = random.Random(0)
    tok = Tokenizer.train_bpe([" ".join(rnd.choice(WORDS) for _ in range(12)) + "." for _ in range(300)], 400)
    torch.manual_seed(0)
    model = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    torch.nn.init.normal_(model.head.final_layer.linears[-1].weight, std=0.5)
    return {
        "root": root,
        "ae": save_checkpoint(root / "ae", ChunkAutoencoder(preset("ae-tiny")), tokenizer=tok),
        "calm": save_checkpoint(root / "calm", model, tokenizer=tok),
        "ar": save_checkpoint(root / "ar", build_model(preset("transformer-tiny")), tokenizer=tok),
    }


@pytest.fixture(scope="module")
def servers(ckpts):
    limits = ["--max-rows", str(ROWS), "--max-queue", str(QUEUE)]
    procs = {
        "calm": ServerProcess(
            ckpts["calm"], ckpts["root"] / "calm.log", *limits, "--served-model-name", "calm"
        ),
        "ar": ServerProcess(ckpts["ar"], ckpts["root"] / "ar.log", *limits, "--served-model-name", "ar"),
        "term": ServerProcess(
            ckpts["ar"], ckpts["root"] / "term.log", "--served-model-name", "ar", "--grace", "60"
        ),
    }
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def models(ckpts):
    return {kind: calm.load(ckpts[kind]) for kind in ("calm", "ar")}


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)


def _reference(model, prompts, *, seed, max_tokens, temperature=1.0, sampler="exact", num_samples=200):
    ids = [model.tokenizer.encode(p) for p in prompts]
    kw = dict(
        seed=seed,
        max_new_tokens=max_tokens,
        temperature=temperature,
        sampler=sampler,
        num_samples=num_samples,
    )
    out = generate(model, ids, **kw)
    return [model.tokenizer.decode(r) for r in out], [len(r) for r in out]


CASES = {
    "calm": [dict(temperature=1.0), dict(temperature=0.5, num_samples=32), dict(temperature=0.5, sampler="approx", num_samples=24)],
    "ar": [dict(temperature=1.0), dict(temperature=0.7)],
}  # fmt: skip


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_models_health_and_completions_equal_generate(servers, models, kind):
    server, model = servers[kind], models[kind]
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [kind]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_rows"] == ROWS and health["max_queue"] == QUEUE
    prompts = ["the cat sat", "a dog ran far away home", "tree"]
    for i, case in enumerate(CASES[kind]):
        extra = {k: case[k] for k in ("sampler", "num_samples") if k in case}
        kw = dict(model=kind, max_tokens=13, temperature=case["temperature"], seed=10 * i)
        got = client.completions.create(prompt=prompts, extra_body=extra, **kw)
        texts, counts = _reference(model, prompts, seed=10 * i, max_tokens=13, **case)
        assert [c.text for c in got.choices] == texts, case
        assert [c.index for c in got.choices] == [0, 1, 2] and got.object == "text_completion"
        assert [c.finish_reason for c in got.choices] == ["length" if n == 13 else "stop" for n in counts]
        assert got.usage.completion_tokens == sum(counts)
        assert got.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in prompts)
        # one prompt alone with seed s + 1 is row 1 of the list (generate's rule)
        one = client.completions.create(prompt=prompts[1], extra_body=extra, **{**kw, "seed": 10 * i + 1})
        assert one.choices[0].text == texts[1]


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_streamed_text_equals_non_streamed_text(servers, models, kind):
    server, model = servers[kind], models[kind]
    client = _client(server)
    kw = dict(model=kind, prompt="the dog", max_tokens=22, seed=3, temperature=1.0)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens <= 22
    pieces = [c.choices[0] for c in chunks[:-1]]
    assert "".join(p.text for p in pieces) == whole.text
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == whole.finish_reason
    K = model.config.chunk_size if kind == "calm" else 1
    assert len(pieces) <= -(-22 // K) + 1  # one chunk per decoding step (K tokens for CALM)
    # the wire format: server-sent events, data: [DONE] last
    with httpx.stream("POST", server.url + "/v1/completions", json={**kw, "stream": True}, timeout=600) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == whole.text


def test_stop_sequences(servers, models):
    server = servers["calm"]
    client = _client(server)
    kw = dict(model="calm", prompt="the cat", max_tokens=40, seed=5)
    full = client.completions.create(**kw).choices[0].text
    stop = full[12:15]
    want = full[: full.index(stop)]
    got = client.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert got.text == want and got.finish_reason == "stop"
    streamed = client.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == want


def _post(server, body, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/completions", content=content, timeout=60, **kw)


ERRORS = [
    (b'{"prompt": "the", "max_tokens": ', None, "malformed JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b"", None, "malformed JSON"),
    (b'{"prompt": "\xff the"}', None, "malformed JSON"),  # not UTF-8
    ({"max_tokens": 4}, "prompt", "missing"),
    ({"prompt": "the", "max_token": 4}, "max_token", "unknown field"),
    ({"prompt": "the", "max_tokens": "4"}, "max_tokens", "integer"),
    ({"prompt": "the", "max_tokens": 4.0}, "max_tokens", "integer"),
    ({"prompt": "the", "temperature": True}, "temperature", "number"),
    ({"prompt": "the", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": 7}, "prompt", "prompt must be"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [[1, 2], [600]]}, "prompt", "outside the vocabulary"),
    ({"prompt": "the", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "the", "max_tokens": -3}, "max_tokens", ">= 1"),
    ({"prompt": "the", "max_tokens": 300}, "max_tokens", "context"),
    ({"prompt": [list(range(1, 300))], "max_tokens": 1}, "prompt", "longer than the model's context"),
    ({"prompt": "the", "temperature": 1.5}, "temperature", "impossible for CALM"),
    ({"prompt": "the", "temperature": 0}, "temperature", "> 0"),
    ({"prompt": "the", "temperature": -1}, "temperature", "> 0"),
    ({"prompt": "the", "sampler": "greedy"}, "sampler", "exact"),
    ({"prompt": "the", "num_samples": 0}, "num_samples", "num_samples"),
    ({"prompt": "the", "n": 2}, "n", "not supported"),
    ({"prompt": "the", "logprobs": 1}, "logprobs", "logits"),
    ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "the", "stream_options": {"include_usage": 1}}, "stream_options", "true or false"),
]


@pytest.mark.parametrize("body,param,words", ERRORS)
def test_bad_requests_get_400_naming_the_field(servers, body, param, words):
    r = _post(servers["calm"], body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


def test_other_errors_are_openai_error_objects(servers):
    r = _post(servers["calm"], {"prompt": "the", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.get(servers["calm"].url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # the baseline takes any T > 0 (it has logits), and CALM's knobs are checked, then ignored
    r = _post(servers["ar"], {"prompt": "the", "temperature": 2.0, "sampler": "approx", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    r = _post(servers["ar"], {"prompt": "the", "temperature": 0})  # generate's rule: T > 0
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as exc:  # the openai client sees them as such
        _client(servers["calm"]).completions.create(model="calm", prompt="the", temperature=2.0)
    assert "temperature" in str(exc.value)


def _wait_health(server, pred, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health", timeout=30).json()
        if pred(h):
            return h
        time.sleep(0.1)
    raise AssertionError(f"health never satisfied the condition: {h}")


def test_a_request_that_joins_mid_batch_gets_the_tokens_it_gets_alone(servers, models):
    server, model = servers["ar"], models["ar"]
    client = _client(server)
    long_kw = dict(model="ar", prompt="the cat sat on", max_tokens=240, seed=1)
    short_kw = dict(model="ar", prompt="a bird sang", max_tokens=6, seed=2)
    stream = client.completions.create(stream=True, **long_kw)
    pieces = [next(stream).choices[0].text]  # the long one is decoding
    short = client.completions.create(**short_kw).choices[0].text  # joins its batch, leaves first
    still_running = httpx.get(server.url + "/health").json()["running"]
    pieces += [c.choices[0].text for c in stream]
    assert still_running == 1, "the long request had finished: the short one did not join it"
    assert short == _reference(model, [short_kw["prompt"]], seed=2, max_tokens=6)[0][0]
    assert "".join(pieces) == _reference(model, [long_kw["prompt"]], seed=1, max_tokens=240)[0][0]


def test_full_server_says_429_and_disconnected_clients_free_their_slots(servers, models):
    server = servers["calm"]
    # slow requests (an exact sampler with many draws per step) that fill the rows and the queue
    slow = {"prompt": "the cat", "max_tokens": 240, "temperature": 0.25, "num_samples": 4096, "stream": True}
    clients = [httpx.Client(timeout=600) for _ in range(ROWS + QUEUE)]
    streams = []
    try:
        for c in clients:
            s = c.stream("POST", server.url + "/v1/completions", json=slow)
            s.__enter__()
            streams.append(s)
        _wait_health(server, lambda h: h["running"] + h["waiting"] == ROWS + QUEUE)
        r = _post(server, {"prompt": "the", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for s, c in zip(streams, clients):
            s.__exit__(None, None, None)
            c.close()  # the connection goes: its sequence leaves the batch at the next step
    _wait_health(server, lambda h: h["running"] == 0 and h["waiting"] == 0)
    # a plain (non-streamed) request whose client gives up frees its row too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={**slow, "stream": False}, timeout=1.0)
    _wait_health(server, lambda h: h["running"] == 0)
    got = _client(server).completions.create(model="calm", prompt="the cat", max_tokens=8, seed=4)
    assert got.choices[0].text == _reference(models["calm"], ["the cat"], seed=4, max_tokens=8)[0][0]


def test_sigterm_finishes_in_flight_requests_then_exits_0(servers, models):
    server = servers["term"]
    kw = dict(model="ar", prompt="the dog ran", max_tokens=250, seed=8)
    stream = _client(server).completions.create(stream=True, **kw)
    pieces = [next(stream).choices[0].text]
    rest = []
    reader = threading.Thread(target=lambda: rest.extend(c.choices[0].text for c in stream))
    reader.start()
    server.proc.send_signal(signal.SIGTERM)
    refused_while_draining = False
    while reader.is_alive() and not refused_while_draining:
        try:
            httpx.get(server.url + "/health", timeout=10)
        except httpx.ConnectError:  # no longer accepting connections
            refused_while_draining = reader.is_alive()
        time.sleep(0.02)
    reader.join(600)
    assert "".join(pieces + rest) == _reference(models["ar"], [kw["prompt"]], seed=8, max_tokens=250)[0][0]
    assert refused_while_draining
    assert server.proc.wait(300) == 0


def test_the_command_refuses_what_it_cannot_serve(ckpts, capsys):
    from calm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", str(ckpts["ae"]), "--port", "0"])
    assert exc.value.code == 2 and "autoencoder model; calm serve needs a CALM" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(ckpts["ar"]), "--max-rows", "0"])
    assert exc.value.code == 2 and "--max-rows must be >= 1" in capsys.readouterr().err
