"""`calm serve` under load: CALM vs the baseline on the same backbone, side by side in one run.

    nice -n 19 python benchmarks/bench_serve.py --calm CALM_CKPT --ar AR_CKPT      # trained models
    nice -n 19 python benchmarks/bench_serve.py                                    # random CPU presets
    python benchmarks/bench_serve.py --calm C --ar A --device cuda                 # GPU: 1, 32, 128 clients

Starts one server per model on 127.0.0.1 (a free port each; localhost only), then for each
client count (default 1, 8, 32; 1, 32, 128 with ``--device cuda``) runs that many concurrent
streaming clients against CALM, then against the baseline (so the two never compete for the
cores), each client sending requests one after another: ``--new-tokens`` (64) new tokens per
request, ``ignore_eos`` so every request has that length, T = 1. Reported per model and
client count: generated tokens/s (all clients, wall clock of the phase), p50 / p99 latency to
the first token and to the last, the server's mean batch rows, and tokens per CPU second
of the server process (user + system time from /proc: on a loaded machine the share of a
core a server gets varies, its CPU time per token much less). Then ``--memory-requests``
(1,000) short requests per server, with the server's RSS before and after.

Bounded in count (``--requests``: total per phase, at least one per client) and in time
(``--phase-timeout``). Without checkpoints: random-weight ``calm-cpu`` / ``transformer-cpu``
presets (d256, 4 layers, the same backbone) with a BPE tokenizer trained on Python's bundled
documentation text. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import ServerProcess  # noqa: E402

PROMPTS = [
    "The history of the city begins",
    "In the early years of the war",
    "The album was released in",
    "She was born in a small town",
    "The species is found in",
    "After the end of the season",
    "The first recorded use of",
    "During the construction of the bridge",
]


def _random_checkpoints(root: Path) -> dict[str, Path]:
    import pydoc_data.topics

    import torch

    from calm.checkpoint import save_checkpoint
    from calm.config import preset
    from calm.models import build_model
    from calm.models.autoencoder import ChunkAutoencoder
    from calm.models.calm import CALM
    from calm.tokenizer import Tokenizer

    docs = [t for t in pydoc_data.topics.topics.values() if t.strip()]
    tok = Tokenizer.train_bpe(docs, vocab_size=preset("ae-cpu").vocab_size)
    torch.manual_seed(0)
    calm = CALM.from_autoencoder(preset("calm-cpu"), ChunkAutoencoder(preset("ae-cpu")))
    torch.nn.init.normal_(calm.head.final_layer.linears[-1].weight, std=0.5)  # varied samples
    ar = build_model(preset("transformer-cpu").replace(vocab_size=calm.config.vocab_size))
    return {
        "calm": save_checkpoint(root / "calm", calm, tokenizer=tok),
        "ar": save_checkpoint(root / "ar", ar, tokenizer=tok),
    }


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                first = now if first is None else first
                last = now
    return {"ttft": first - t0, "latency": last - t0, "tokens": tokens}


async def _phase(url: str, clients: int, requests: int, body: dict, timeout: float) -> dict:
    """`clients` concurrent clients, `requests` in all (each client sends its share in turn)."""
    share = [requests // clients + (i < requests % clients) for i in range(clients)]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker(i: int, n: int) -> None:
            for j in range(n):
                prompt = PROMPTS[(i + j) % len(PROMPTS)]
                results.append(await _one(client, url, {**body, "prompt": prompt, "seed": 1000 * i + j}))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(i, n) for i, n in enumerate(share))), timeout)
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    lat = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "last_p50_s": _pct(lat, 50),
        "last_p99_s": _pct(lat, 99),
    }


def _stats(url: str) -> dict:
    return httpx.get(url + "/health", timeout=60).json()["stats"]


def _mean_rows(before: dict, after: dict) -> float:
    steps = after["steps"] - before["steps"]
    return (after["row_steps"] - before["row_steps"]) / steps if steps else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calm", type=Path, help="CALM checkpoint (default: random calm-cpu)")
    p.add_argument(
        "--ar", type=Path, help="baseline checkpoint on the same backbone (default: random transformer-cpu)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU variant: 1, 32, 128 clients)")
    p.add_argument(
        "--clients", type=int, nargs="+", default=None, help="client counts (default 1 8 32; GPU 1 32 128)"
    )
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--requests", type=int, default=None, help="requests per phase (default: 2 x clients, >= 8)"
    )
    p.add_argument(
        "--memory-requests", type=int, default=1000, help="short requests for the RSS check (0: skip)"
    )
    p.add_argument("--phase-timeout", type=float, default=1800.0, help="seconds one phase may take")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    counts = args.clients or ([1, 32, 128] if gpu else [1, 8, 32])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.calm is None or args.ar is None:
            made = _random_checkpoints(root)
        ckpts = {"calm": args.calm or made["calm"], "ar": args.ar or made["ar"]}
        rows = str(max(counts))
        servers = {
            kind: ServerProcess(
                path, root / f"{kind}.log", "--device", args.device, "--max-rows", rows, "--max-queue", "1024",
                threads=args.threads,
            )
            for kind, path in ckpts.items()
        }  # fmt: skip
        try:
            for s in servers.values():
                s.wait_ready()
            result = _run(servers, ckpts, counts, args, gpu)
        finally:
            for s in servers.values():
                s.stop()
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)


def _run(servers, ckpts, counts, args, gpu) -> dict:
    body = {"max_tokens": args.new_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    info = {kind: httpx.get(s.url + "/v1/models").json()["data"][0] for kind, s in servers.items()}
    for s in servers.values():  # warm-up
        asyncio.run(_phase(s.url, 2, 4, body, args.phase_timeout))
    phases = []
    for n in counts:
        requests = args.requests or max(8, 2 * n)
        for kind, s in servers.items():
            before, cpu0 = _stats(s.url), s.cpu_seconds()
            r = asyncio.run(_phase(s.url, n, max(requests, n), body, args.phase_timeout))
            cpu = s.cpu_seconds() - cpu0
            r.update(kind=kind, mean_batch_rows=_mean_rows(before, _stats(s.url)), server_cpu_s=cpu)
            r["tokens_per_cpu_s"] = r["tokens"] / cpu if cpu > 0 else float("nan")
            phases.append(r)
            print(f"[{kind}, {n} clients] {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    memory = []
    if args.memory_requests:
        short = {**body, "max_tokens": 8}
        for kind, s in servers.items():
            rss0 = s.rss_bytes()
            t0 = time.perf_counter()
            asyncio.run(_phase(s.url, 8, args.memory_requests, short, args.phase_timeout))
            memory.append(
                {"kind": kind, "requests": args.memory_requests, "rss_before_mib": rss0 / 2**20,
                 "rss_after_mib": s.rss_bytes() / 2**20, "time_s": time.perf_counter() - t0}
            )  # fmt: skip
    device = args.device
    if gpu:
        import torch

        device = f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})"
    return {
        "device": device,
        "threads": args.threads,
        "cpu": _cpu_name(),
        "checkpoints": {k: str(v) for k, v in ckpts.items()}
        if args.calm
        else "random calm-cpu / transformer-cpu",
        "models": info,
        "new_tokens": args.new_tokens,
        "phases": phases,
        "memory": memory,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown"


def _print(r: dict) -> None:
    print(f"device {r['device']}, {r['cpu']}, {r['threads']} torch thread(s) per server")
    print(
        f"models: {r['checkpoints']}; {r['new_tokens']} new tokens per request (ignore_eos), T = 1, streaming\n"
    )
    print(
        "| model | clients | requests | tokens/s | tokens per server CPU-s | first token p50 / p99 (s) "
        "| last token p50 / p99 (s) | mean batch rows |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by = {(p["kind"], p["clients"]): p for p in r["phases"]}
    for n in sorted({p["clients"] for p in r["phases"]}):
        for kind in ("calm", "ar"):
            p = by[(kind, n)]
            print(
                f"| {kind} | {n} | {p['requests']} | {p['tokens_per_s']:.1f} | {p['tokens_per_cpu_s']:.1f} "
                f"| {p['ttft_p50_s']:.3f} / {p['ttft_p99_s']:.3f} | {p['last_p50_s']:.3f} / {p['last_p99_s']:.3f} "
                f"| {p['mean_batch_rows']:.1f} |"
            )
        c, a = by[("calm", n)], by[("ar", n)]
        ratio, cpu_ratio = (
            c["tokens_per_s"] / a["tokens_per_s"],
            c["tokens_per_cpu_s"] / a["tokens_per_cpu_s"],
        )
        print(f"| CALM / baseline | {n} | | **{ratio:.2f}x** | **{cpu_ratio:.2f}x** | | | |")
    for m in r["memory"]:
        print(
            f"\n{m['kind']}: RSS {m['rss_before_mib']:.1f} MiB before, {m['rss_after_mib']:.1f} MiB after "
            f"{m['requests']} requests ({m['time_s']:.0f} s)",
            end="",
        )
    print()


if __name__ == "__main__":
    main()
