"""The benchmarks still run: benchmarks/cpu.py --quick, and benchmarks/gpu.py, gpu_check.py and whole_job.py in their
CPU smoke modes, as programs.

No timing is checked, only that every row is printed with its figures, and (cpu.py) that ours and diffusers
computed the same thing, which the benchmark measures before it times anything.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"(\d+\.\d+)"


def run(*args) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture
def references():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


def test_cpu_benchmark_quick_prints_every_row_and_both_sides_agree(references):
    out = run("benchmarks/cpu.py", "--quick", "--repeats", "1", "--threads", "1")
    for name in ("UNet forward+backward", "training step, AdamW in backward", "training step, AdamW after backward",
                 "sampling (tiny model)"):
        assert re.search(rf"^{re.escape(name)} +{NUMBER} +{NUMBER} +{NUMBER}", out, re.M), f"no row {name!r}:\n{out}"
    eps_diff = float(re.search(r"max \|eps ours - eps diffusers\| = (\S+)", out).group(1))
    assert eps_diff <= 1e-4
    assert int(re.search(r"max pixel difference = (\d+) / 255", out).group(1)) <= 2


def test_gpu_benchmark_smoke_prints_every_row(references):
    out = run("benchmarks/gpu.py", "--cpu-smoke")
    assert "CPU smoke run" in out
    for trainer, checkpointing, text_encoder in (
            ("ours", "on", "frozen"), ("ours", "off", "frozen"), ("ours", "on", "trained"),
            ("diffusers", "on", "frozen"), ("diffusers", "off", "frozen"), ("diffusers", "on", "trained")):
        row = rf"^{trainer} +eager +{checkpointing} +{text_encoder} +{NUMBER} +-$"
        assert re.search(row, out, re.M), f"no training row {trainer} {checkpointing} {text_encoder}:\n{out}"
    assert len(re.findall(r"^ours +graph +.* skipped: CUDA graphs need CUDA$", out, re.M)) == 4 + 1  # 1: sampling
    for sampler in ("ours", "diffusers"):
        assert re.search(rf"^{sampler} +eager +{NUMBER}$", out, re.M), f"no sampling row {sampler}:\n{out}"


def test_gpu_benchmark_names_a_missing_reference(monkeypatch):
    from benchmarks import gpu

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if it were absent
    assert gpu.reference_missing().startswith("skipped: diffusers is not installed here")


def test_gpu_check_smoke_runs_every_check():
    """Every check's line, PASS where it ran (all eager on the CPU), "skipped" where only CUDA can tell."""
    out = run("benchmarks/gpu_check.py", "--cpu-smoke")
    assert "CPU smoke run" in out and out.rstrip().splitlines()[-1].startswith("0 failed")
    from benchmarks import gpu_check

    for model in ("toy", "full-size"):
        for config in gpu_check.CONFIGS:
            assert re.search(rf"^graph vs eager, {model}, {re.escape(config)} +mean .* PASS$", out, re.M), config
    for name in ("identity of weights and optimizer state", r"generate\(\) graph vs eager, eta 0.0",
                 r"generate\(\) graph vs eager, eta 0.5"):
        assert re.search(rf"^{name} .* PASS$", out, re.M), name
    assert len(re.findall(r"skipped: needs CUDA", out)) == 4


def test_whole_job_smoke_runs_the_three_programs():
    """make_prior.py, train.py (two saves) and sample.py as processes, each with its time; diffusers' rows where
    it is installed."""
    out = run("benchmarks/whole_job.py", "--cpu-smoke")
    diffusers = rf" +({NUMBER}|skipped: .*)$"
    for phase in ("prior", "sample"):
        assert re.search(rf"^{phase} .* {NUMBER}{diffusers}", out, re.M), f"no row {phase}:\n{out}"
    assert re.search(rf"^train .* {NUMBER} +skipped: .*$", out, re.M), out
    assert re.search(rf"^total .* {NUMBER}$", out, re.M), out
