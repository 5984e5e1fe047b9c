"""calm.serve.engine: continuous batching gives each request what `generate` gives it alone.

The engine is driven step by step in-process (`Engine.step`, no thread, no HTTP), so when a
request joins or leaves is exact. Tiny random models (as tests/test_generation.py).
"""

from __future__ import annotations

import pytest
import torch

from calm.config import preset
from calm.generation import generate
from calm.models import build_model
from calm.models.autoencoder import ChunkAutoencoder
from calm.models.calm import CALM
from calm.serve.engine import Engine, Sampling, Sequence
from calm.serve.text import CompletionText

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33)), [40, 41, 42, 43]]  # lengths 5, 2, 13, 4 (K = 4)


class _Tok:
    """Token ids as text, one "<id>" per token (stop sequences can then name tokens)."""

    def decode(self, ids):
        return "".join(f"<{t}>" for t in ids)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    calm = CALM.from_autoencoder(preset("calm-tiny"), ChunkAutoencoder(preset("ae-tiny")))
    torch.nn.init.normal_(calm.head.final_layer.linears[-1].weight, std=0.5)
    torch.manual_seed(0)
    return {"calm": calm.eval(), "ar": build_model(preset("transformer-tiny")).eval()}


def _seq(prompt, max_tokens, seed, sampling=None, stops=(), events=None):
    sampling = Sampling() if sampling is None else sampling
    events = [] if events is None else events
    return Sequence(
        list(prompt), max_tokens, sampling, seed, CompletionText(_Tok(), list(stops)), events.append
    )


def _run(engine, plan, limit=500):
    """plan: {step number: [sequences to submit before that step]}; step until all are done."""
    seqs = [s for group in plan.values() for s in group]
    for i in range(limit):
        if i in plan:
            assert engine.submit(plan[i])
        if all(s.done for s in seqs):
            return i
        engine.step()
    raise AssertionError("sequences did not finish")


def _alone(model, seq, **kw):
    s = seq.sampling
    return generate(
        model, [seq.prompt], seed=seq.seed, max_new_tokens=seq.max_tokens, temperature=s.temperature,
        sampler=s.sampler, num_samples=s.num_samples, **kw,
    )[0]  # fmt: skip


SAMPLINGS = {
    "calm": [Sampling(1.0), Sampling(0.5, "exact", 32), Sampling(0.5, "approx", 24)],
    "ar": [Sampling(1.0), Sampling(0.7)],
}


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_requests_joining_and_leaving_a_running_batch_get_what_they_get_alone(models, kind):
    """Sequences join at different steps (a row at step 3 next to one at step 0), mix sampling
    settings in one batch, finish at different times (max_tokens, end of text), and each gets
    exactly the tokens of ``generate([prompt], seed=s)``."""
    model = models[kind]
    engine = Engine(model, max_rows=8, max_queue=8)
    samplings = SAMPLINGS[kind]
    seqs = [
        _seq(p, n, seed, samplings[i % len(samplings)])
        for i, (p, n, seed) in enumerate(zip(PROMPTS * 2, [9, 30, 3, 17, 26, 1, 12, 21], range(40, 48)))
    ]
    _run(engine, {0: seqs[:2], 3: seqs[2:5], 4: seqs[5:6], 9: seqs[6:]})
    for s in seqs:
        assert s.text.tokens == _alone(model, s), (kind, s.prompt, s.sampling)
    assert engine.status()["running"] == 0 and engine.rows == [] and engine.slots == 0
    assert engine.stats.requests == len(seqs) and engine.stats.row_steps > engine.stats.steps  # batched


def test_end_of_text_ends_a_row_like_generate(models):
    """A row stops after the end-of-text token (the token counts, its text is the token's);
    the other rows go on. The eos id is chosen as a token the model does produce."""
    model = models["ar"]
    probe = generate(model, [PROMPTS[0]], seed=1, max_new_tokens=20, eos_id=None)[0]
    eos = probe[6]
    engine = Engine(model, max_rows=4)
    engine.eos = eos
    a, b = _seq(PROMPTS[0], 20, 1), _seq(PROMPTS[1], 20, 2)
    _run(engine, {0: [a], 2: [b]})
    assert a.text.tokens == generate(model, [PROMPTS[0]], seed=1, max_new_tokens=20, eos_id=eos)[0]
    assert a.text.tokens[-1] == eos and len(a.text.tokens) == probe.index(eos) + 1 == a.tokens
    assert b.text.tokens == generate(model, [PROMPTS[1]], seed=2, max_new_tokens=20, eos_id=eos)[0]


def test_stop_sequences_end_a_row_and_are_not_sent(models):
    model = models["calm"]
    probe = generate(model, [PROMPTS[2]], seed=5, max_new_tokens=24)[0]
    stop = f"<{probe[9]}><{probe[10]}>"  # two tokens inside the third chunk
    first = next(i for i in range(len(probe)) if stop in _Tok().decode(probe[: i + 1]))
    events = []
    s = _seq(PROMPTS[2], 24, 5, stops=[stop, "<never>"], events=events)
    engine = Engine(model, max_rows=2)
    _run(engine, {0: [s]})
    text = "".join(e.text for e in events)
    full = _Tok().decode(probe)
    assert text == full[: full.index(stop)] and stop not in text
    assert events[-1].finish_reason == "stop" and s.tokens == first + 1 == events[-1].completion_tokens


def test_a_cancelled_row_leaves_at_the_next_step_and_the_batch_is_bounded(models):
    model = models["ar"]
    engine = Engine(model, max_rows=2, max_queue=1)
    a, b, c = (_seq(PROMPTS[i], 40, i) for i in range(3))
    assert engine.submit([a, b]) and engine.submit([c])  # 2 rows + 1 waiting
    assert not engine.submit([_seq(PROMPTS[3], 5, 9)])  # full
    engine.step()
    assert engine.rows == [a, b] and engine.status() == {
        "running": 2,
        "waiting": 1,
        "max_rows": 2,
        "max_queue": 1,
    }
    engine.cancel(a)
    engine.step()  # a leaves, c takes its row in the same step
    assert engine.rows == [b, c] and a.done and len(a.text.tokens) == 1
    while not (b.done and c.done):
        engine.step()
    assert c.text.tokens == _alone(model, c) and b.text.tokens == _alone(model, b)


def test_cache_slots_follow_the_longest_running_row(models):
    model = models["ar"]
    engine = Engine(model, max_rows=4)
    short, long = _seq([1, 2, 3], 10, 0), _seq(list(range(50, 90)), 100, 1)
    engine.submit([short])
    engine.step()
    assert engine.slots == 16  # 3 + 10 - 1 = 12 slots, rounded up to 16
    engine.submit([long])
    engine.step()
    assert engine.slots == 144  # 40 + 100 - 1 = 139
    while not long.done:
        engine.step()
    assert short.done and engine.slots == 0
    assert long.text.tokens == _alone(model, long) and short.text.tokens == _alone(model, short)


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_every_head_is_served_as_generate_samples_it(head):
    """The engine samples through the decode stack's ChunkSampler, so the flow and diffusion
    heads (many network evaluations per sample, all their noise drawn up front) give the
    tokens of ``generate([prompt], seed=s)`` too, joining at different steps."""
    from test_heads import tiny_calm

    model = tiny_calm(head)
    engine = Engine(model, max_rows=4)
    samplings = [Sampling(1.0), Sampling(0.5, "exact", 16), Sampling(0.5, "approx", 8)]
    seqs = [_seq(p, n, 60 + i, samplings[i % 3]) for i, (p, n) in enumerate(zip(PROMPTS, [10, 6, 9, 5]))]
    _run(engine, {0: seqs[:2], 1: seqs[2:3], 2: seqs[3:]})
    for s in seqs:
        assert s.text.tokens == _alone(model, s), (head, s.prompt, s.sampling)
    assert len(set(map(tuple, (s.text.tokens for s in seqs)))) == len(seqs)  # not a constant model
