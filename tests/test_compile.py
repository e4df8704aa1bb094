"""torch.compile on the CPU (Inductor, which builds C++): the training step gives the eager
losses within float tolerance, and compiled greedy decoding gives the eager tokens.

Skipped with the reason when Inductor cannot build here (no C++ compiler, or a failed build).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.generate import SamplingConfig, generate
from tinylm.model import ModelConfig, Transformer
from tinylm.tokenizer import Tokenizer
from tinylm.train.report import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cache")]
runner = CliRunner()


@pytest.fixture(scope="module")
def inductor() -> None:
    """Inductor on one compile thread (no worker pool on a small shared machine), after one
    trial build; the reason to skip when it fails."""
    import shutil

    from torch._inductor import config

    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler (g++, c++, clang++): Inductor cannot build CPU kernels")
    previous = config.compile_threads
    config.compile_threads = 1
    torch._dynamo.reset()
    try:
        torch.compile(lambda x: (x * 2).sum())(torch.ones(3))
    except Exception as exc:  # any build failure means: cannot test compile here
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}: {exc}")
    yield
    config.compile_threads = previous
    torch._dynamo.reset()


CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 4, batch_tokens: 128, micro_batch: 4, warmup_steps: 1, lr: 3.0e-3,
        eval_every: 0, save_every: 0, log_every: 1, device: cpu}
data: {seq_len: 32, val_fraction: 0.1}
"""


def test_compiled_training_step_gives_the_eager_losses(inductor, tmp_path: Path,
                                                       shakespeare_text: str) -> None:
    from torch._dynamo.utils import counters

    data = tmp_path / "shakes.txt"
    data.write_text(shakespeare_text[:20_000], encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        counters.clear()
        result = runner.invoke(app, ["pretrain", "-c", str(config), "-d", str(data), "-t",
                                     "bytes", "-o", str(tmp_path / name), "-q", *extra])
        assert result.exit_code == 0, result.output
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (name == "compiled"), (name, dict(counters["stats"]))
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                        if "loss" in r]
    assert len(losses["compiled"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert saved["pretrain"]["train"]["compile"] is True
    # the run's weights carry no torch.compile prefix, so the run loads as any other
    assert b"_orig_mod" not in (tmp_path / "compiled" / "model.safetensors").read_bytes()[:4096]


def test_compiled_decoding_gives_the_eager_tokens(inductor) -> None:
    from torch._dynamo.utils import counters

    tok = Tokenizer.bytes_only()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=2,
                                    d_model=32, max_seq_len=64)).eval()
    prompts = [tok.encode("To be, or not"), tok.encode("Whether")]  # two lengths: left padding
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, seed=0)
    eager = generate(model, tok, prompts, greedy, batch_size=2)
    counters.clear()
    compiled = generate(model, tok, prompts, greedy, batch_size=2, compile=True)
    assert counters["stats"]["unique_graphs"] > 0
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    assert all(len(g.token_ids) == 12 or g.finish_reason != "length" for g in eager)
