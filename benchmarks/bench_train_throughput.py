"""Training throughput of CALM vs the token baseline on the same backbone, in text tokens/s.

For each setting both models get the same Llama-style backbone, the same batch of token
windows and the same optimiser (the trainer's AdamW parameter groups); one training step is
forward + backward + AdamW step. The two models are timed alternately (CALM, AR, CALM, ...)
after warm-up so that machine noise hits both alike, and the median step is reported. Next to
each measured speed ratio (CALM tokens/s ÷ AR tokens/s) the ratio predicted by the FLOP
accounting in `calm.flops` is printed (AR train FLOPs/token ÷ CALM train FLOPs/token, both at
the benchmark's context); the target is measured ≥ 0.85 × predicted.

Two clocks are recorded: wall time (tokens/s, what a user sees) and the process CPU time
(tokens per CPU-second). On a shared machine the CPU time is the steadier measure of the work
a step needs; with one thread (``--threads 1``) it is the work itself. Use ``--threads 1`` when
the machine is oversubscribed (the load average is recorded and a warning printed): with more
intra-op threads than free cores every parallel region waits a scheduler time slice (~10 ms)
for its second thread, whatever its size, which measures the op count rather than the work
and penalises the model with more, smaller ops (CALM runs its backbone over 4× fewer rows).

Settings (``--settings``, comma-separated):
  cpu        d 256, 4 layers, 4 heads, SwiGLU 688, vocab 8192, head blocks 1 (= layers/4), K 4
  reference  the authors' small reference setting, for orientation: as ``cpu`` but vocab 4096
             and 2 head blocks
  4x         a backbone four times larger: 16 layers, head blocks 4 (= layers/4)
All: batch 8 windows of 512 tokens, fp32 (``--dtype bf16`` uses autocast), N = 8 head samples,
M = 100 target samples, α = 1; the CALM's frozen autoencoder has the ``ae-cpu`` sizes.

``--profile`` also times the parts of a CALM step (input compression + backbone, target
encoding, target noise, energy head, energy loss, optimiser) and writes a torch.profiler
table of one step.

Usage::

    python benchmarks/bench_train_throughput.py [--settings cpu,reference,4x] [--steps 6]
        [--threads N] [--device cpu|cuda] [--dtype fp32|bf16] [--profile] [--out bench_out/]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from calm.config import ARConfig, CALMConfig, TrainConfig, preset
from calm.flops import flops_report
from calm.models.ar import TokenTransformer
from calm.models.calm import CALM
from calm.models.energy import energy_loss
from calm.train import build_optimizer

REPO = Path(__file__).resolve().parents[1]

BACKBONE = dict(d_model=256, num_layers=4, num_heads=4, ffn_dim=688)
SETTINGS = {
    "cpu": dict(vocab_size=8192, head_layers=1),
    "reference": dict(vocab_size=4096, head_layers=2),
    "4x": dict(vocab_size=8192, num_layers=16, head_layers=4),
}


def build_configs(name: str, block_size: int) -> tuple[CALMConfig, ARConfig]:
    over = dict(SETTINGS[name])
    vocab, head_layers = over.pop("vocab_size"), over.pop("head_layers")
    backbone = {**BACKBONE, **over}
    K = 4
    ae = preset("ae-cpu").replace(vocab_size=vocab, chunk_size=K)
    calm_cfg = CALMConfig(
        **backbone,
        max_seq_len=block_size // K,
        vocab_size=vocab,
        chunk_size=K,
        latent_dim=ae.latent_dim,
        head_layers=head_layers,
        num_model_samples=8,
        num_target_samples=100,
        energy_alpha=1.0,
        autoencoder=ae.to_dict(),
    )
    ar_cfg = ARConfig(**backbone, max_seq_len=block_size, vocab_size=vocab)
    return calm_cfg, ar_cfg


def predicted_ratio(calm_cfg: CALMConfig, ar_cfg: ARConfig, block_size: int) -> tuple[float, dict]:
    """AR ÷ CALM training FLOPs per token at a context of `block_size` tokens (calm.flops)."""
    calm = flops_report(calm_cfg, context=block_size // calm_cfg.chunk_size)
    ar = flops_report(ar_cfg, context=block_size)
    return ar["train_flops_per_token"] / calm["train_flops_per_token"], {
        "calm_train_flops_per_token": calm["train_flops_per_token"],
        "ar_train_flops_per_token": ar["train_flops_per_token"],
        "calm_breakdown": calm["flops_per_token"]["train"],
        "ar_breakdown": ar["flops_per_token"]["train"],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model + optimiser; `step()` times a full training step (wall and CPU seconds)."""

    def __init__(self, model, tokens, device, amp):
        self.model, self.tokens, self.device, self.amp = model.to(device), tokens.to(device), device, amp
        self.model.train()
        self.opt = build_optimizer(self.model, TrainConfig(), device)

    def step(self) -> tuple[float, float]:
        _sync(self.device)
        w0, c0 = time.perf_counter(), time.process_time()
        with self.amp():
            loss, _ = self.model(self.tokens)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - w0, time.process_time() - c0


def measure(name, args, device, amp) -> dict:
    calm_cfg, ar_cfg = build_configs(name, args.block_size)
    torch.manual_seed(0)
    tokens = torch.randint(3, calm_cfg.vocab_size, (args.batch_size, args.block_size))
    calm = Runner(CALM(calm_cfg), tokens, device, amp)
    ar = Runner(TokenTransformer(ar_cfg), tokens, device, amp)
    for _ in range(args.warmup):
        calm.step()
        ar.step()
    times = {"calm": [], "ar": []}
    for _ in range(args.steps):
        for key, runner in (("calm", calm), ("ar", ar)):
            times[key].append(runner.step())
    n_tok = args.batch_size * args.block_size
    out = {"setting": name, "tokens_per_step": n_tok}
    for key in ("calm", "ar"):
        wall = statistics.median(t[0] for t in times[key])
        cpu = statistics.median(t[1] for t in times[key])
        out[key] = {
            "step_wall_s": wall,
            "step_cpu_s": cpu,
            "tokens_per_s": n_tok / wall,
            "tokens_per_cpu_s": n_tok / cpu,
            "steps_wall_s": [t[0] for t in times[key]],
            "trainable_params": sum(p.numel() for p in runner_params(calm if key == "calm" else ar)),
        }
    pred, flops = predicted_ratio(calm_cfg, ar_cfg, args.block_size)
    out["predicted_ratio"] = pred
    out["measured_ratio_wall"] = out["calm"]["tokens_per_s"] / out["ar"]["tokens_per_s"]
    out["measured_ratio_cpu"] = out["calm"]["tokens_per_cpu_s"] / out["ar"]["tokens_per_cpu_s"]
    out["flops"] = flops
    out["configs"] = {"calm": calm_cfg.to_dict(), "ar": ar_cfg.to_dict()}
    if args.profile:
        out["calm_parts_ms"] = profile_parts(calm, args)
        out["profiler_table"] = profiler_table(calm)
    return out


def runner_params(runner: Runner):
    return [p for p in runner.model.parameters() if p.requires_grad]


def profile_parts(runner: Runner, args, reps: int = 3) -> dict[str, float]:
    """Median wall ms of the parts of one CALM training step (same order as `CALM.loss`)."""
    model, device, amp = runner.model, runner.device, runner.amp
    c = model.config
    chunks = model.to_chunks(runner.tokens)
    B, C, _ = chunks.shape
    with amp():
        h = model.hidden(chunks[:, :-1]).detach()
        mu, log_std = model.autoencoder.encode(chunks[:, 1:])
        samples = model.head.sample(h, c.num_model_samples).detach()
    mu, std = mu.float(), log_std.float().exp()
    targets = torch.randn((B, C - 1, c.num_target_samples, c.latent_dim), device=device) * std.unsqueeze(-2)
    rel = (samples.float() - mu.unsqueeze(-2)).contiguous()

    def backbone():
        with amp():
            out = model.hidden(chunks[:, :-1])
        out.float().sum().backward()

    def encode():
        with torch.no_grad(), amp():
            model.autoencoder.encode(chunks[:, 1:])

    def noise():
        torch.randn((B, C - 1, c.num_target_samples, c.latent_dim), device=device).mul_(std.unsqueeze(-2))

    def head():
        with amp():
            out = model.head.sample(h, c.num_model_samples)
        out.float().sum().backward()

    def loss():
        x = rel.clone().requires_grad_(True)
        energy_loss(x, targets, c.energy_alpha, center=False).mean().backward()

    def optimiser():
        with amp():
            out, _ = model(runner.tokens)
        out.backward()
        _sync(device)
        t0 = time.perf_counter()
        runner.opt.step()
        _sync(device)
        return time.perf_counter() - t0

    def full():
        runner.step()

    parts = {
        "embed+compress+backbone (fwd+bwd)": backbone,
        "AE encoder (targets, fwd)": encode,
        "target noise (randn, M×l)": noise,
        "energy head (N samples, fwd+bwd)": head,
        "energy loss (fwd+bwd)": loss,
        "AdamW step": optimiser,
        "full step": full,
    }
    result = {}
    for name, fn in parts.items():
        fn()
        ts = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            inner = fn()  # a part that needs set-up returns its own time
            _sync(device)
            ts.append(time.perf_counter() - t0 if inner is None else inner)
        result[name] = 1e3 * statistics.median(ts)
        model.zero_grad(set_to_none=True)
    return result


def profiler_table(runner: Runner, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        runner.step()
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Training throughput: CALM (K = 4) vs token baseline, same backbone",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}, {meta['dtype']}, "
        f"batch {meta['batch_size']} × {meta['block_size']} tokens, median of {meta['steps']} alternating steps "
        f"after {meta['warmup']} warm-up; load average {meta['load_avg_1min_start']:.1f} at the start, "
        f"{meta['load_avg_1min_end']:.1f} at the end. Ratio = CALM ÷ AR text tokens per second; predicted = AR ÷ CALM "
        "training FLOPs per token (`calm.flops`).",
        "",
        "| setting | layers | head blocks | vocab | CALM tok/s | AR tok/s | ratio (wall) | ratio (CPU time) "
        "| predicted | wall ÷ predicted | CPU ÷ predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["configs"]["calm"]
        lines.append(
            f"| {r['setting']} | {c['num_layers']} | {c['head_layers']} | {c['vocab_size']} "
            f"| {r['calm']['tokens_per_s']:,.0f} | {r['ar']['tokens_per_s']:,.0f} "
            f"| {r['measured_ratio_wall']:.2f} | {r['measured_ratio_cpu']:.2f} | {r['predicted_ratio']:.2f} "
            f"| {r['measured_ratio_wall'] / r['predicted_ratio']:.2f} "
            f"| {r['measured_ratio_cpu'] / r['predicted_ratio']:.2f} |"
        )
    for r in results:
        if "calm_parts_ms" in r:
            lines += ["", f"## CALM step parts, setting `{r['setting']}` (median wall ms)", ""]
            lines += ["| part | ms |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in r["calm_parts_ms"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="cpu,reference,4x", help=f"comma-separated of {list(SETTINGS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512, help="tokens per window")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (alternating)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--profile", action="store_true", help="also time the parts of a CALM step")
    parser.add_argument("--out", default="bench_out", help="output folder for JSON and markdown")
    args = parser.parse_args(argv)

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dtype == "bf16":

        def amp():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        amp = contextlib.nullcontext

    command = shlex.join([sys.executable, "benchmarks/bench_train_throughput.py", *sys.argv[1:]])
    meta = {
        "command": command,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    load = os.getloadavg()[0]
    meta["load_avg_1min_start"] = load
    busy = load + meta["threads"] > (os.cpu_count() or 1) + 0.5
    if device.type == "cpu" and busy:
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores: {meta['threads']} more thread(s) "
            "oversubscribe the machine, so wall times will be noisy"
            + (
                " (consider --threads 1)"
                if meta["threads"] > 1
                else "; the CPU-time ratio is the steadier one"
            ),
            file=sys.stderr,
        )
    results = []
    for name in names:
        r = measure(name, args, device, amp)
        results.append(r)
        print(
            f"{name:10s} CALM {r['calm']['tokens_per_s']:9,.0f} tok/s  AR {r['ar']['tokens_per_s']:9,.0f} tok/s  "
            f"ratio wall {r['measured_ratio_wall']:.2f}  cpu {r['measured_ratio_cpu']:.2f}  "
            f"predicted {r['predicted_ratio']:.2f}  (wall/pred {r['measured_ratio_wall'] / r['predicted_ratio']:.2f})",
            flush=True,
        )
    meta["load_avg_1min_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = markdown(results, meta)
    (out / "train_throughput.md").write_text(md)
    print()
    print(md)
    for r in results:
        if "profiler_table" in r:
            print(f"torch.profiler, one CALM step, setting {r['setting']}:\n{r['profiler_table']}")
    print(f"wrote {out / 'train_throughput.json'} and {out / 'train_throughput.md'}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
