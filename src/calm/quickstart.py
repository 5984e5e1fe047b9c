"""`calm quickstart`: the whole CALM pipeline end to end on a small default, with a report.

prepare data -> train the chunk autoencoder -> train CALM on it -> train the token baseline
with the same backbone -> BrierLM for both on held-out text -> samples at T = 1 and T = 0.5
-> OUT/report/report.md with PNG plots (training curves, BrierLM against training FLOPs,
autoencoder accuracy against latent noise).

Default data: the files given with ``--data``; with none, an embedded corpus that needs no
network: the English reference text that ships inside CPython (`pydoc_data.topics`, the text
of `help("if")` and friends: 79 topics, ~0.46 MB), cut into sections of a few paragraphs;
every 10th section is held out for validation.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Sizes of the two settings, measured on an idle 2-core CPU from a fresh clone: "default" 531 s
# wall (1,014 CPU-s), "tiny" 17 s.


@dataclass(frozen=True)
class QuickstartSize:
    vocab_size: int
    ae_overrides: dict
    ae_steps: int
    backbone: dict
    lm_steps: int  # token baseline
    calm_steps: int  # CALM: a step costs under half the baseline's FLOPs, and it learns slower per step
    batch_size: int
    block_size: int
    eval_every: int
    eval_tokens: int
    sample_tokens: int


SIZES = {
    # K = 2 and a Xavier-initialised head: at this scale the best CALM recipe of the study in
    # docs/small_scale_study.md (BrierLM 0.55 vs 0.36 for K = 4, 0.00 with the paper's recipe)
    "default": QuickstartSize(
        vocab_size=2048,
        ae_overrides=dict(d_model=128, ffn_dim=320, latent_dim=32, chunk_size=2),
        ae_steps=1500,
        backbone=dict(d_model=128, num_layers=4, num_heads=4, ffn_dim=384, max_seq_len=128),
        lm_steps=400,
        calm_steps=1200,
        batch_size=16,
        block_size=128,
        eval_every=100,
        eval_tokens=8192,
        sample_tokens=48,
    ),
    "tiny": QuickstartSize(
        vocab_size=512,
        ae_overrides=dict(d_model=64, ffn_dim=160, latent_dim=32),
        ae_steps=200,
        backbone=dict(d_model=64, num_layers=2, num_heads=2, ffn_dim=160, max_seq_len=64),
        lm_steps=120,
        calm_steps=120,
        batch_size=8,
        block_size=64,
        eval_every=40,
        eval_tokens=1024,
        sample_tokens=24,
    ),
}

PROMPTS = ["The if statement", "A class definition"]


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def write_embedded_corpus(out_dir: Path, val_every: int = 10) -> tuple[Path, Path]:
    """The Python documentation topics as JSONL: (train file, validation file).

    Documents are the topics' sections (runs of paragraphs of up to ~1,500 characters), and
    every `val_every`-th section is held out, so the validation text is unseen but from the
    same distribution (whole held-out topics would mostly test topic shift on so small a
    corpus).
    """
    import pydoc_data.topics

    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = out_dir / "train.jsonl", out_dir / "val.jsonl"
    sections: list[str] = []
    for name in sorted(pydoc_data.topics.topics):
        current: list[str] = []
        for para in pydoc_data.topics.topics[name].strip().split("\n\n"):
            current.append(para)
            if sum(map(len, current)) >= 1500:
                sections.append("\n\n".join(current))
                current = []
        if current:
            sections.append("\n\n".join(current))
    with train.open("w", encoding="utf-8") as ft, val.open("w", encoding="utf-8") as fv:
        for i, text in enumerate(sections):
            (fv if i % val_every == val_every - 1 else ft).write(json.dumps({"text": text}) + "\n")
    return train, val


def _train_config(size: QuickstartSize, steps: int, seed: int, **changes):
    from calm.config import TrainConfig

    base = TrainConfig(
        steps=steps,
        batch_size=size.batch_size,
        block_size=size.block_size,
        lr=2e-3,
        warmup_steps=max(10, steps // 20),
        schedule="constant",
        eval_every=size.eval_every,
        eval_batches=4,
        save_every=steps,
        log_every=max(5, size.eval_every // 5),
        seed=seed,
    )
    return base.replace(**changes)


def run_pipeline(
    out: str | Path = "runs/quickstart",
    *,
    data: list[str] | None = None,
    val: list[str] | None = None,
    tiny: bool = False,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline into `out`; returns the summary that `report.md` is written from."""
    import shutil

    from calm.config import ARConfig, CALMConfig, preset
    from calm.data import prepare
    from calm.evaluate import brier_eval_fn, evaluate_model
    from calm.flops import flops_report
    from calm.generation import generate
    from calm.models.ar import TokenTransformer
    from calm.models.autoencoder import ChunkAutoencoder
    from calm.train import build_calm_from_autoencoder, train

    size = SIZES["tiny" if tiny else "default"]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{out} already exists and is not empty; pass --overwrite or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(seed)

    # 1. data -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if data:
        train_inputs, val_inputs, source = data, val, ", ".join(map(str, data))
    else:
        train_file, val_file = write_embedded_corpus(out / "corpus")
        train_inputs, val_inputs = [train_file], [val_file]
        source = "Python's bundled documentation topics (pydoc_data.topics)"
    _log(f"preparing data from {source}")
    data_dir = out / "data"
    prep = prepare(
        train_inputs,
        data_dir,
        vocab_size=size.vocab_size,
        val_inputs=val_inputs,
        val_fraction=0.05 if not val_inputs else 0.0,
        progress=progress,
        log=_log,
    )
    from calm.train_data import PreparedData

    prepared = PreparedData(data_dir)
    tok = prepared.tokenizer()
    val_tokens = torch.from_numpy(prepared.val.tokens[:].astype("int64"))
    timings["prepare"] = time.perf_counter() - t0
    quiet = not progress

    # 2. autoencoder ------------------------------------------------------------------------
    t0 = time.perf_counter()
    _log("training the chunk autoencoder (stage 1)")
    ae_cfg = preset("ae-cpu").replace(
        vocab_size=tok.vocab_size,
        pad_id=tok.pad_id,
        mask_id=tok.mask_id,
        eot_id=tok.eot_id,
        **size.ae_overrides,
    )
    torch.manual_seed(seed)
    ae = ChunkAutoencoder(ae_cfg)
    ae_run = out / "autoencoder"
    ae_summary = train(
        ae,
        _train_config(size, size.ae_steps, seed, lr=3e-3, schedule="cosine"),
        prepared,
        ae_run,
        tokenizer=tok,
        device=device,
        quiet=quiet,
    )
    ae.eval()
    recon = evaluate_model(
        ae, val_tokens, block_size=size.block_size, max_tokens=size.eval_tokens * 4, seed=seed
    )
    timings["autoencoder"] = time.perf_counter() - t0

    # 3. CALM and the token baseline, same backbone ------------------------------------------
    eval_windows_n = min(size.eval_tokens, val_tokens.numel()) // size.block_size
    if eval_windows_n < 1:
        raise ValueError(
            f"the held-out text has {val_tokens.numel()} tokens, fewer than one evaluation window of "
            f"{size.block_size}; give more validation text (--val)"
        )
    val_windows = val_tokens[: eval_windows_n * size.block_size].view(-1, size.block_size)
    eval_fn = brier_eval_fn(val_windows, seed=seed)
    calm_cfg = CALMConfig(
        **size.backbone,
        vocab_size=tok.vocab_size,
        chunk_size=ae_cfg.chunk_size,
        latent_dim=ae_cfg.latent_dim,
        autoencoder=ae_cfg.to_dict(),
        head_init="xavier",  # the small-scale recipe (docs/small_scale_study.md)
    )
    calm_cfg = calm_cfg.replace(max_seq_len=size.block_size // ae_cfg.chunk_size)
    ar_cfg = ARConfig(**size.backbone, vocab_size=tok.vocab_size).replace(max_seq_len=size.block_size)
    models = {}
    for name, build, cfg, steps in (
        ("calm", lambda c: build_calm_from_autoencoder(c, ae), calm_cfg, size.calm_steps),
        ("ar", TokenTransformer, ar_cfg, size.lm_steps),
    ):
        t0 = time.perf_counter()
        _log(f"training {'CALM (stage 2)' if name == 'calm' else 'the token-level baseline'}")
        torch.manual_seed(seed)
        model = build(cfg)
        train(
            model,
            _train_config(size, steps, seed),
            prepared,
            out / name,
            tokenizer=tok,
            device=device,
            quiet=quiet,
            eval_fn=eval_fn,
        )
        model.eval()
        models[name] = model
        timings[name] = time.perf_counter() - t0

    # 4. BrierLM for both on held-out text -------------------------------------------------------
    t0 = time.perf_counter()
    _log("scoring BrierLM on the held-out text")
    scores = {
        name: evaluate_model(
            m, val_tokens, block_size=size.block_size, max_tokens=size.eval_tokens * 2, seed=seed
        )
        for name, m in models.items()
    }
    timings["evaluate"] = time.perf_counter() - t0

    # 5. samples -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    prompts = [tok.encode(p) for p in PROMPTS]
    samples: dict[str, dict[str, list[str]]] = {}
    sample_stats: dict[str, dict[str, dict]] = {}
    for name, temps in (("calm", (1.0, 0.5)), ("ar", (1.0, 0.5))):
        samples[name], sample_stats[name] = {}, {}
        for t in temps:
            new, st = generate(
                models[name],
                prompts,
                max_new_tokens=size.sample_tokens,
                temperature=t,
                seed=seed,
                return_stats=True,
            )
            samples[name][f"T={t:g}"] = [tok.decode(p + n) for p, n in zip(prompts, new)]
            if name == "calm" and t < 1:
                sample_stats[name][f"T={t:g}"] = {
                    "row_steps": st.steps * st.batch_size,
                    "hit_limit": st.exact_hit_limit,
                    "draws_per_row_step": st.draws_per_row_step,
                    "max_draws": 200,
                }
    timings["samples"] = time.perf_counter() - t0

    # 6. report ----------------------------------------------------------------------------------
    flops = {
        "calm": flops_report(calm_cfg, context=calm_cfg.max_seq_len),
        "ar": flops_report(ar_cfg, context=ar_cfg.max_seq_len),
    }
    summary = {
        "out": str(out),
        "setting": "tiny" if tiny else "default",
        "data": {
            "source": source,
            "train_tokens": prep["splits"]["train"]["tokens"],
            "val_tokens": prep["splits"]["val"]["tokens"],
            "vocab_size": tok.vocab_size,
        },
        "autoencoder": {"config": ae_cfg.to_dict(), "train": jsonable(ae_summary), "reconstruction": recon},
        "configs": {"calm": calm_cfg.to_dict(), "ar": ar_cfg.to_dict()},
        "flops": {
            k: {
                "train_flops_per_token": v["train_flops_per_token"],
                "inference_flops_per_token": v["inference_flops_per_token"],
            }
            for k, v in flops.items()
        },
        "scores": scores,
        "samples": samples,
        "sample_stats": sample_stats,
        "timings_s": timings,
        "tokens_per_step": size.batch_size * size.block_size,
        "train_steps": {"calm": size.calm_steps, "ar": size.lm_steps, "autoencoder": size.ae_steps},
    }
    report_dir = out / "report"
    from calm.quickstart_report import write_report

    write_report(summary, report_dir, {n: out / n for n in ("autoencoder", "calm", "ar")}, flops)
    summary["timings_s"]["total"] = time.perf_counter() - t_start
    (report_dir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
    _log(f"done in {summary['timings_s']['total']:.0f}s; report: {report_dir / 'report.md'}")
    return summary


def jsonable(obj):
    """A JSON-ready copy of `obj` (values JSON cannot hold become strings)."""
    return json.loads(json.dumps(obj, default=lambda o: o if isinstance(o, (int, float, str)) else str(o)))
