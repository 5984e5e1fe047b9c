"""The exact vocabulary argmax and the draw decoder's call sizes: the numbers behind two rules of
`calm.decoding`.

1. ``screen``: `tied_argmax` with the bf16 screen against the direct float32 matmul, for a grid
   of (rows, V, d) (random weights; hidden states near a token's embedding, as a trained
   decoder's are). `screen_pays` uses the screen from rows x V x d >= 2^25 where bf16 matrix
   units exist.
2. ``rest`` (with ``--calm CKPT --data DATA``, a trained CALM): 200 head samples per row for real
   hidden states (validation text), their first tokens decoded; for the draws whose first token
   another draw of the row shares, one call that decodes the rest of their chunks against one
   call for the next position only (`DrawClasses` decodes the rest at once up to
   ``_REST_AT_ONCE`` positions).

Medians of ``--reps`` interleaved timings, ms per call, one thread by default.

Usage::

    python benchmarks/bench_tied_argmax.py [--calm RUN/checkpoint --data DATA] [--reps 9]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from calm.decoding import ChunkDecoder, DrawClasses, _fast_bf16, tied_argmax

GRID = [(4096, 128), (8192, 256), (32000, 512)]
ROWS = [1, 4, 16, 64, 200, 800, 3200]


def _median_ms(fns: dict, reps: int, calls: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up (the screen's bf16 copy is built once)
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append(1e3 * (time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def screen_table(reps: int) -> list[str]:
    lines = ["| V x d | rows | screen ms | direct ms | screen / direct |", "|---|---:|---:|---:|---:|"]
    gen = torch.Generator().manual_seed(0)
    for V, d in GRID:
        W = torch.randn(V, d, generator=gen) / d**0.5
        for R in ROWS:
            tok = torch.randint(V, (R,), generator=gen)
            h = W[tok] * 3 + torch.randn(R, d, generator=gen) * 0.3 / d**0.5
            assert torch.equal(tied_argmax(h, W, screen=True), tied_argmax(h, W, screen=False))
            calls = max(1, 400 // R)
            t = _median_ms(
                {
                    "screen": lambda h=h, W=W: tied_argmax(h, W, screen=True),
                    "direct": lambda h=h, W=W: tied_argmax(h, W, screen=False),
                },
                reps,
                calls,
            )
            ratio = t["screen"] / t["direct"]
            lines.append(f"| {V} x {d} | {R} | {t['screen']:.3f} | {t['direct']:.3f} | {ratio:.2f} |")
    return lines


def rest_table(path: str, data: str, reps: int) -> list[str]:
    from calm.checkpoint import load_model
    from calm.train_data import PreparedData

    model = load_model(path).eval()
    if model.config.kind != "calm":
        raise SystemExit(f"--calm {path} holds a {model.config.kind} model, not a CALM")
    dec = ChunkDecoder.for_model(model)
    K = dec.K
    windows = PreparedData(data).val_windows(64 * K, 8)
    with torch.no_grad():
        hidden = model.hidden(windows).reshape(-1, model.config.d_model)
    lines = ["| rows | draws sharing a first token | rest at once ms | next position ms |", "|---:|---:|---:|---:|"]
    gen = torch.Generator().manual_seed(0)
    for b in (1, 16):
        h = hidden[: b * 7 : 7].contiguous()
        noise = model.head.noise_from_uniform(torch.rand(b, 200, model.head.noise_dim, generator=gen))
        with torch.no_grad():
            classes = DrawClasses(dec, h)
            classes.draw(noise)
            first = classes.tokens[:, 0]
            key = classes.row * dec.V + first
            _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
            shared = classes.states[counts[inverse] > 1]
            t = _median_ms(
                {
                    "rest": lambda s=shared: dec.tokens_from(s, 1),
                    "next": lambda s=shared: dec.tokens_from(s, 1, 2),
                },
                reps,
                5,
            )
        lines.append(f"| {b} x 200 | {shared.shape[0]} | {t['rest']:.2f} | {t['next']:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm", help="trained CALM checkpoint (with --data) for the rest-of-chunk table")
    parser.add_argument("--data", help="its prepared data (validation windows give the hidden states)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if bool(args.calm) != bool(args.data):
        parser.error("--calm and --data go together")
    torch.set_num_threads(args.threads)
    print(
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"bf16 matrix units: {_fast_bf16(torch.device('cpu'))}\n"
    )
    print("\n".join(screen_table(args.reps)))
    if args.calm:
        from calm.checkpoint import CheckpointError

        print()
        try:
            print("\n".join(rest_table(args.calm, args.data, args.reps)))
        except (CheckpointError, FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
