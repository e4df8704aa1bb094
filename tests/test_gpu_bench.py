"""bench/gpu.py: the GPU table and MFU, and its reduced CPU form end to end (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    """bench/gpu.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_flops_by_name(gpu_bench):
    assert gpu_bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert gpu_bench.peak_flops("NVIDIA H200", None) == 989e12
    assert gpu_bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert gpu_bench.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert gpu_bench.peak_flops("NVIDIA L4", None) == 121e12
    assert gpu_bench.peak_flops("NVIDIA L40S", None) is None  # not L4
    assert gpu_bench.peak_flops("NVIDIA H100 NVL", None) is None
    assert gpu_bench.peak_flops("Some GPU", 100.0) == 100e12


def test_render_computes_mfu_from_tokens_per_second(gpu_bench):
    row = {"preset": "gpt2-124m", "precision": "bf16", "compile": True, "vocab_size": 50257,
           "seq_len": 1024, "tokens_per_step": 16384, "tokens_per_s": 400_000.0,
           "step_s": 0.041, "flops_per_token": 1_000_000_000, "peak_mem_gib": 20.0,
           "first_step_s": 60.0, "steps_timed": 22}
    eager = {**row, "compile": False, "tokens_per_s": 200_000.0}
    result = {"command": "x", "steps": 30, "warmup": 8, "peak_flops": 1000e12,
              "machine": {"date": "d", "gpu": "G", "gpu_memory_gib": 80, "cuda": "12",
                          "torch": "t", "python": "p", "load_average": [0.0]},
              "rows": [eager, row], "quickstart": None}
    text = gpu_bench.render(result)
    assert row["mfu"] == pytest.approx(0.4) and eager["mfu"] == pytest.approx(0.2)
    assert "| 40.0% |" in text and "| 20.0% |" in text
    assert "torch.compile / eager tokens/s **2.00x**" in text


@pytest.mark.slow
def test_the_cpu_form_runs_and_writes_json(tmp_path: Path):
    from tinylm.model import ModelConfig, flops_per_token
    from tinylm.pretrain import load_config

    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--minimal", "--out", str(out)],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU here" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["preset"], row["precision"], row["compile"]) == ("tiny", "fp32", False)
    assert row["tokens_per_s"] > 0 and row["steps_timed"] == 2
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"])
    model = {**vars(load_config("tiny", []).model), "vocab_size": 2048}
    assert row["flops_per_token"] == flops_per_token(ModelConfig(**model), 128)
    assert result["peak_flops"] is None and row["mfu"] is None
    assert result["quickstart"] is None
