"""torch.compile(fullgraph=True): the three losses and one decode step of CALM and the baseline
compile to a single graph and compute what eager mode computes; activation checkpointing and
per-block compile (the FSDP2 path) change nothing but memory and speed.

Most tests use the "aot_eager" backend: Dynamo captures the graph (a graph break is an error
under fullgraph=True) and AOTAutograd traces the backward, which is what a graph break would
stop, while skipping Inductor's code generation (minutes on a small CPU). Random draws then
come from the eager RNG, so compiled and eager results agree exactly. One slow test trains with
the default backend (Inductor) through `calm.train`.
"""

import pytest
import torch

from calm.config import TrainConfig, preset
from calm.models import build_model
from calm.parallelize import apply_activation_checkpointing, compile_blocks
from calm.train import train

PRESETS = {"autoencoder": "ae-tiny", "calm": "calm-tiny", "ar": "transformer-tiny"}


def model_of(kind, seed=0):
    torch.manual_seed(seed)
    return build_model(preset(PRESETS[kind])).train()


def loss_and_grads(model, loss_fn, tokens, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same noise / masks for both runs
    loss, metrics = loss_fn(tokens)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: torch.as_tensor(v).detach() for k, v in metrics.items()}, grads


def assert_same(a, b):
    (loss_a, met_a, grads_a), (loss_b, met_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert met_a.keys() == met_b.keys()
    for k in met_a:
        torch.testing.assert_close(met_a[k].float(), met_b[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_loss_compiles_to_one_graph_and_matches_eager(kind):
    model = model_of(kind)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model.loss)(tokens)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    assert_same(loss_and_grads(model, compiled, tokens), loss_and_grads(model, model.loss, tokens))


def test_decode_steps_with_a_static_cache_compile_to_one_graph():
    B, L = 2, 12
    prompt = torch.randint(0, 500, (B, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # token baseline: one token per row and step
        ar = model_of("ar").eval()
        step = torch.compile(
            lambda tok, pos, cache: ar.logits(tok, positions=pos, cache=cache)[:, -1],
            fullgraph=True, dynamic=False, backend="aot_eager",
        )  # fmt: skip
        caches = [ar.new_cache(B, L, static=True) for _ in range(2)]
        for cache in caches:
            ar.logits(prompt, positions=torch.arange(8).expand(B, 8), cache=cache)
        tok = prompt[:, -1:]
        for _ in range(3):
            a = step(tok, caches[0].pos[:, None].clone(), caches[0])
            b = ar.logits(tok, positions=caches[1].pos[:, None].clone(), cache=caches[1])[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            tok = a.argmax(-1, keepdim=True)
        assert torch.equal(caches[0].pos, caches[1].pos) and int(caches[0].pos[0]) == 11

        # CALM: one chunk per row and step: backbone, one head sample, decoder argmax
        cm = model_of("calm").eval()

        def calm_step(chunks, pos, cache):
            h = cm.hidden(chunks, positions=pos, cache=cache)[:, -1]
            return cm.autoencoder.decode_logits(cm.head.sample(h, 1)).argmax(-1)  # [B, 1, K]

        compiled = torch.compile(calm_step, fullgraph=True, dynamic=False, backend="aot_eager")
        caches = [cm.new_cache(B, L, static=True) for _ in range(2)]
        chunks = prompt.view(B, 2, 4)
        for cache in caches:
            cm.hidden(chunks, positions=torch.arange(2).expand(B, 2), cache=cache)
        chunk = chunks[:, -1:]
        for i in range(3):
            torch.manual_seed(10 + i)
            a = compiled(chunk, caches[0].pos[:, None].clone(), caches[0])
            torch.manual_seed(10 + i)
            b = calm_step(chunk, caches[1].pos[:, None].clone(), caches[1])
            assert a.shape == (B, 1, 4) and torch.equal(a, b)
            chunk = a


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_activation_checkpointing_changes_memory_not_results(kind):
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    plain, checkpointed = model_of(kind), model_of(kind)
    assert apply_activation_checkpointing(checkpointed) == plain.config.num_layers
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()  # names unchanged

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = loss_and_grads(model, model.loss, tokens)
        return total[0], result

    plain_bytes, a = saved_bytes(plain)
    ckpt_bytes, b = saved_bytes(checkpointed)
    assert_same(a, b)
    assert ckpt_bytes < 0.8 * plain_bytes, (ckpt_bytes, plain_bytes)
    # and it composes with a whole-loss compile (one graph)
    compiled = torch.compile(checkpointed.loss, fullgraph=True, backend="aot_eager")
    assert_same(loss_and_grads(checkpointed, compiled, tokens), a)
    # without gradients (evaluation, decoding with a KV cache) the blocks run as they were
    with torch.no_grad():
        caches = [m.new_cache(2, 16) for m in (plain, checkpointed)]
        inputs = tokens[:, :16] if kind == "ar" else tokens[:, :16].view(2, 4, 4)
        run = (lambda m, c: m.logits(inputs, cache=c)) if kind == "ar" else (lambda m, c: m.hidden(inputs, cache=c))
        torch.testing.assert_close(run(plain, caches[0]), run(checkpointed, caches[1]))


def test_per_block_compile_matches_eager():
    """The FSDP2 path compiles each Transformer block on its own (module hooks stay outside)."""
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    plain, blocks = model_of("calm"), model_of("calm")
    apply_activation_checkpointing(blocks)
    assert compile_blocks(blocks, backend="aot_eager") == plain.config.num_layers
    assert_same(loss_and_grads(blocks, blocks.loss, tokens), loss_and_grads(plain, plain.loss, tokens))


@pytest.mark.slow
def test_training_with_compile_matches_eager(tmp_path):
    """`--compile` through the training loop with Inductor: the same weights as eager training."""

    class Windows:
        def train_batch(self, step, batch_size, block_size, seed, rank, world_size):
            g = torch.Generator().manual_seed(step)
            return torch.randint(0, 500, (batch_size, block_size), generator=g)

        def val_windows(self, block_size, count):
            return torch.zeros(0, block_size, dtype=torch.long)

    runs = {}
    for compiled in (False, True):
        model = model_of("ar")
        cfg = TrainConfig(steps=3, batch_size=2, block_size=32, log_every=1, eval_every=0, save_every=0,
                          warmup_steps=1, compile=compiled)  # fmt: skip
        train(model, cfg, Windows(), tmp_path / str(compiled), quiet=True, device="cpu")
        runs[compiled] = model.state_dict()
    for name, value in runs[False].items():
        torch.testing.assert_close(runs[True][name], value, rtol=1e-4, atol=1e-5, msg=name)
