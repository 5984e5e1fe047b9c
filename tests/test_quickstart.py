"""End to end: `calm quickstart --tiny` runs the whole pipeline and writes a complete report."""

import json
import subprocess
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
