"""`calm generate`: prompts in, text out, streamed to the terminal as chunks are produced.

    calm generate CKPT --prompt "Once upon a time" --temperature 0.5
    calm generate CKPT --prompt-file prompts.txt --max-new-tokens 64 --json

CKPT is any checkpoint `calm.checkpoint.load_model` reads (a CALM or a token-level model,
ours or the authors' released layout) with its tokenizer. The algorithms live in
`calm.generation`; this module only reads prompts, prints and times.

Output
    One prompt: the prompt is printed, then the continuation is streamed as it is produced
    (after every CALM step, i.e. every K tokens; the text of the growing token list is
    decoded and only the new suffix printed, holding back an incomplete UTF-8 character).
    Several prompts (all generated together, as one left-padded batch): each completion is
    printed as soon as its row finishes (end of text), the others when generation ends, each
    under a ``=== [i] ===`` header, so outputs never interleave mid-line. A summary (tokens,
    time, tokens/s) goes to stderr. ``--json`` prints only one JSON object on stdout.

Naming: ``--num-samples`` (DESIGN §3) is the number N of head samples (candidates) the
approximate sampler draws per step; ``--num-candidates`` is an alias.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from calm.cli import (
    add_head_sampling_arguments,
    add_no_verify_argument,
    add_official_ae_argument,
    add_threads_argument,
    apply_head_sampling,
)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint directory (CALM or token-level model), or a Hugging Face repo id in the local cache",
    )
    src = parser.add_argument_group("prompts (at least one)")
    src.add_argument(
        "--prompt", "-p", action="append", default=[], metavar="TEXT", help="a prompt (repeat for a batch)"
    )
    src.add_argument(
        "--prompt-file", metavar="FILE", help="a text file with one prompt per line (blank lines skipped)"
    )
    parser.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate per prompt")
    parser.add_argument(
        "--temperature",
        "-t",
        type=float,
        default=1.0,
        help="sampling temperature; CALM: 0 < T <= 1 (no logits: only sharpening is possible), AR: T > 0",
    )
    parser.add_argument(
        "--sampler",
        choices=["exact", "approx"],
        default="exact",
        help="CALM temperature sampler at T < 1 (default exact): 'exact' is rejection sampling that stops "
        "as soon as it accepts (a few draws when the model is confident) and falls back to the "
        "approximation after --max-draws draws; 'approx' always decodes N head samples per step and "
        "reweights them",
    )
    parser.add_argument(
        "--num-samples",
        "--num-candidates",
        dest="num_samples",
        type=int,
        default=200,
        help="CALM at T < 1: head samples N decoded per step (approx), the exact sampler's default bound",
    )
    parser.add_argument(
        "--max-draws",
        type=int,
        default=None,
        help="CALM exact sampler: bound on the draws per row and step (default: --num-samples)",
    )
    parser.add_argument(
        "--dtype",
        choices=["model", "bfloat16"],
        default="model",
        help="run the whole model in this dtype: model = as stored (float32); bfloat16 is faster on GPUs "
        "(and on CPUs with AMX at large batch) and decodes the bf16 model's own argmax",
    )
    add_head_sampling_arguments(parser)
    add_official_ae_argument(parser)
    add_no_verify_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=None, help="random seed (prompt i uses seed + i)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (no streaming)")


def read_prompts(args) -> list[str]:
    """The prompts from --prompt and --prompt-file, in that order."""
    from calm.generation_inputs import GenerationError

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if path.is_dir():
            raise GenerationError(
                f"--prompt-file {path} is a directory; give a text file with one prompt per line"
            )
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise GenerationError(f"{path} is not UTF-8 text: {err}") from err
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise GenerationError(f"{path} has no prompts (one prompt per line; blank lines are skipped)")
        prompts.extend(from_file)
    if not prompts:
        raise GenerationError("no prompt given: use --prompt TEXT (repeatable) or --prompt-file FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise GenerationError(f"prompt {i} is empty")
    return prompts


class TextStream:
    """Turns a growing list of token ids into printable text increments.

    Decodes the whole list each time and returns the part not printed yet; holds output back
    while the text ends in U+FFFD (a multi-byte character split across tokens).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = ""

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.printed):  # a decoder that rewrote earlier text: print nothing more
            return ""
        new = text[len(self.printed) :]
        self.printed = text
        return new



def run_generate(args) -> int:
    import torch

    from calm.checkpoint import load_model
    from calm.distributed import resolve_device
    from calm.generation import GenerationError, generate

    prompts = read_prompts(args)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, ae_path=args.ae, verify=not args.no_verify)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kind = getattr(model.config, "kind", None)
    if kind not in ("calm", "ar"):
        raise GenerationError(
            f"{args.model} holds a {kind} model; calm generate needs a CALM or token-level model"
        )
    apply_head_sampling(model, args)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise GenerationError(f"{args.model} has no tokenizer (tokenizer.json); cannot encode the prompts")
    ids = [tok.encode(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise GenerationError(f"prompt {i} encodes to no tokens")
    from calm.generation_inputs import check_temperature

    check_temperature(args.temperature, kind)

    out = sys.stdout
    stream = None
    finished: set[int] = set()
    streams = [TextStream(tok) for _ in prompts]
    if not args.json:
        if len(prompts) == 1:
            # The prompt is echoed with the first new tokens, i.e. only once `generate` has
            # accepted every argument: a rejected call prints nothing but its error.
            echoed = [False]

            def stream(row: int, piece: list[int]) -> None:
                text = streams[row].push(piece)
                if not echoed[0]:
                    text, echoed[0] = prompts[0] + text, True
                out.write(text)
                out.flush()
        else:

            def stream(row: int, piece: list[int]) -> None:
                streams[row].tokens.extend(piece)
                if piece and piece[-1] == tok.eot_id and not args.ignore_eos:
                    _print_block(out, row, prompts[row], streams[row].flush())
                    finished.add(row)

    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stream=stream,
        return_stats=True,
    )
    if args.ignore_eos:
        kwargs["eos_id"] = None
    if kind == "calm":
        kwargs.update(
            sampler=args.sampler,
            num_samples=args.num_samples,
            max_draws=args.max_draws,
        )
    t0 = time.perf_counter()
    new, stats = generate(model, ids, **kwargs)
    elapsed = time.perf_counter() - t0
    completions = [tok.decode(r) for r in new]
    n_new = sum(len(r) for r in new)
    if args.json:
        result = {
            "model": str(args.model),
            "kind": kind,
            "device": str(device),
            "temperature": args.temperature,
            "sampler": args.sampler if kind == "calm" else None,
            "num_samples": args.num_samples if kind == "calm" and args.temperature < 1 else None,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "prompts": prompts,
            "completions": completions,
            "prompt_tokens": [len(p) for p in ids],
            "new_tokens": [len(r) for r in new],
            "finished_by_eos": stats.finished_by_eos,
            "time_s": elapsed,
            "tokens_per_s": n_new / elapsed if elapsed > 0 else None,
        }
        if kind == "calm":
            result["head"] = model.head.describe()
        if kind == "calm" and args.temperature < 1:
            result["draws_per_step"] = stats.draws_per_row_step
            result["exact_hit_limit"] = stats.exact_hit_limit
        out.write(json.dumps(result) + "\n")
        return 0
    if len(prompts) == 1:
        out.write(("" if echoed[0] else prompts[0]) + streams[0].flush() + "\n")
    else:
        for row in range(len(prompts)):
            if row not in finished:
                _print_block(out, row, prompts[row], streams[row].flush())
    out.flush()
    rate = n_new / elapsed if elapsed > 0 else float("nan")
    extra = ""
    if kind == "calm" and args.temperature < 1:
        extra = f", {stats.draws_per_row_step:.1f} head samples per row and step"
        if args.sampler == "exact" and stats.exact_hit_limit:
            extra += f", {stats.exact_hit_limit} row-steps fell back to the approximation"
    print(
        f"[{kind}, T={args.temperature:g}: {n_new} new tokens in {elapsed:.2f} s, {rate:.1f} tokens/s{extra}]",
        file=sys.stderr,
    )
    return 0


def _print_block(out, row: int, prompt: str, completion: str) -> None:
    out.write(f"=== [{row}] ===\n{prompt}{completion}\n")
    out.flush()
