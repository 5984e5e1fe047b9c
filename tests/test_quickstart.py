"""End to end: `calm quickstart --tiny` runs the whole pipeline and writes a complete report."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    """The fenced code block right after ``<!-- readme-test: NAME -->`` in the README."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-test: {name} -->\n```\w*\n(.*?)\n```", text, re.S)
    assert match, f"README has no block marked readme-test: {name}"
    return match.group(1)


def readme_commands(name: str) -> list[list[str]]:
    """The `calm ...` command lines of a README shell block (continuations joined)."""
    joined = readme_block(name).replace("\\\n", " ")
    lines = [line.split("#")[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("calm ")]


def run_readme_after_quickstart(out: Path) -> None:
    """The README's commands and Python example for the quickstart's outputs, with
    ``runs/quickstart`` pointing at `out` (the --tiny run of the test)."""
    commands = readme_commands("after-quickstart")
    assert len(commands) >= 5
    for argv in commands:
        argv = [a.replace("runs/quickstart", str(out)) for a in argv]
        proc = subprocess.run(
            [sys.executable, "-m", "calm", *argv[1:]], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    code = readme_block("python-api").replace("runs/quickstart", str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert printed[0].startswith("The if statement")
    assert 0.0 <= float(printed[-1]) <= 100.0


@pytest.mark.slow
def test_tiny_quickstart_writes_a_complete_report(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "calm", "quickstart", "--tiny", "--out", str(out), "--quiet", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    report_dir = out / "report"
    report = (report_dir / "report.md").read_text(encoding="utf-8")

    # every stage ran and left its artefacts
    for stage in ("prepare", "autoencoder", "calm", "ar", "evaluate", "samples"):
        assert stage in summary["timings_s"]
    for run in ("autoencoder", "calm", "ar"):
        assert (out / run / "checkpoint" / "model.safetensors").exists()
        assert (out / run / "metrics.jsonl").stat().st_size > 0
    for png in ("training_curves.png", "brier_vs_flops.png", "ae_noise.png"):
        data = (report_dir / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
        assert f"({png})" in report

    # BrierLM for both models, with the context printed, in the report and the summary
    scores = summary["scores"]
    for name in ("calm", "ar"):
        assert 0.0 <= scores[name]["brier_lm"] <= 100.0
        assert scores[name]["block_size"] == scores["calm"]["block_size"]
    assert f"Evaluation context: {scores['calm']['block_size']} tokens" in report
    assert "| CALM (K=4) |" in report and "| Transformer |" in report
    # autoencoder table, samples at both temperatures, FLOPs
    assert "z = μ + N(0, 0.5²)" in report
    for label in ("**CALM, T=1**", "**CALM, T=0.5**", "**Transformer, T=1**", "**Transformer, T=0.5**"):
        assert label in report
    assert summary["samples"]["calm"]["T=0.5"][0].startswith("The if statement")
    assert summary["flops"]["calm"]["train_flops_per_token"] < summary["flops"]["ar"]["train_flops_per_token"]
    # BrierLM was logged during training, so the compute plot has points for both models
    for run in ("calm", "ar"):
        records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert any("brier_lm" in r for r in records if r.get("split") == "val")

    # the README's tour block and Python example run verbatim on these outputs
    run_readme_after_quickstart(out)


def test_readme_blocks_are_found():
    """The markers the slow test reads exist and hold what it expects (fast check)."""
    commands = readme_commands("after-quickstart")
    assert all(argv[1] in ("eval", "generate", "flops") for argv in commands)
    assert all(any("runs/quickstart" in a for a in argv) for argv in commands)
    assert "runs/quickstart/calm/checkpoint" in readme_block("python-api")


def test_quickstart_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = subprocess.run(
        [sys.executable, "-m", "calm", "quickstart", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "already exists" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def _summary(calm_b=(0.05, 0.01, 0.001, -0.0004), ar_b=(0.15, 0.05, 0.01, 0.003)):
    def score(b, lm):
        return {"brier_lm": lm, **{f"brier_{n + 1}": v for n, v in enumerate(b)}}

    return {
        "scores": {"calm": score(calm_b, 0.0), "ar": score(ar_b, 1.81)},
        "configs": {"calm": {"chunk_size": 2}, "ar": {}},
        "flops": {
            "calm": {"train_flops_per_token": 4e6, "inference_flops_per_token": 1e6},
            "ar": {"train_flops_per_token": 9e6, "inference_flops_per_token": 3e6},
        },
        "train_steps": {"calm": 1200, "ar": 400},
        "tokens_per_step": 2048,
        "autoencoder": {"train": {"loss": 3.2, "val_loss": 0.49}},
        "sample_stats": {
            "calm": {"T=0.5": {"row_steps": 48, "hit_limit": 46, "draws_per_row_step": 195, "max_draws": 200}}
        },
    }


def test_report_conclusions_come_from_the_numbers(tmp_path):
    from calm.quickstart_report import conclusions

    runs = {}
    for name, vals in (("calm", [12.6, 12.41, 12.5, 12.68]), ("ar", [6.0, 5.5, 5.2, 5.1])):
        d = tmp_path / name
        d.mkdir()
        lines = [
            json.dumps({"split": "val", "step": 100 * (i + 1), "val_loss": v}) for i, v in enumerate(vals)
        ]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        runs[name] = d
    text = "\n".join(conclusions(_summary(), runs))
    assert "CALM 0.00, Transformer 1.81" in text and "the Transformer is better" in text
    # 1200 x 2048 x 4e6 vs 400 x 2048 x 9e6 training FLOPs
    assert "1.3× the Transformer's training FLOPs" in text
    assert "Brier-4 is at or below 0" in text and "compare Brier-1" in text
    assert "33% of it" in text  # 0.05 / 0.15
    assert "lowest at step 200 (12.41) and rose to 12.68 by step 400" in text  # CALM overfits
    assert text.count("overfits") == 1  # the Transformer's loss kept falling
    assert "masks 15% of the input tokens" in text  # val below train loss, explained
    assert "46 of 48 row-steps" in text
    assert "-0.000" not in text
