"""`tinylm import`: a local Hugging Face model directory as a tinylm run.

Reads config.json, the safetensors weights and a byte-level BPE tokenizer.json (JSON and
safetensors only), checks that tinylm computes exactly what `transformers` does for this model,
and writes a run directory through `tinylm.run.save_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinylm.atomic import atomic_dir
from tinylm.console import SILENT, Output, Stopwatch
from tinylm.errors import TinyLMError
from tinylm.interop.hf_config import from_hf_config
from tinylm.interop.hf_tokenizer import check_hf_tokenizer
from tinylm.interop.hf_weights import from_hf_state, read_hf_weights
from tinylm.model import Transformer
from tinylm.run import load_checked, save_run
from tinylm.textio import check_distinct, check_output_dir, read_json
from tinylm.tokenizer import Tokenizer


def read_hf_config(directory: Path) -> dict[str, Any]:
    """A Hugging Face model directory's config.json."""
    if not directory.is_dir():
        raise TinyLMError(f"{directory}: no such directory", "give a local Hugging Face model dir")
    file = directory / "config.json"
    if not file.is_file():
        raise TinyLMError(f"{directory}: no config.json; not a Hugging Face model directory")
    config = read_json(file)
    if not isinstance(config, dict):
        raise TinyLMError(f"{file}: expected a JSON object")
    return config


def load_hf_model(directory: str | Path, out: Output = SILENT) -> tuple[Any, Any, str]:
    """(tinylm `Transformer` in eval mode, `Tokenizer`, architecture) for a Hugging Face dir."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config, arch = from_hf_config(hf, str(directory / "config.json"))
    tokenizer_file = directory / "tokenizer.json"
    check_hf_tokenizer(tokenizer_file, out)
    tokenizer = Tokenizer.load(tokenizer_file)
    if tokenizer.vocab_size > config.vocab_size:
        raise TinyLMError(
            f"{tokenizer_file}: {tokenizer.vocab_size} tokens, but the model has only "
            f"{config.vocab_size} embeddings"
        )
    state = from_hf_state(read_hf_weights(directory), config, str(directory))
    model = Transformer(config)
    load_checked(model, state, str(directory), f" for {arch} as configured")
    return model.eval(), tokenizer, arch


def import_hf(
    source: str | Path, out_dir: str | Path, *, force: bool = False, out: Output = SILENT
) -> dict[str, Any]:
    """Write the Hugging Face model at `source` as a tinylm run in `out_dir`; a summary dict."""
    source, out_dir = Path(source), Path(out_dir)
    check_distinct(source, out_dir)
    check_output_dir(out_dir, force)
    clock = Stopwatch()
    model, tokenizer, arch = load_hf_model(source, out)  # checked before anything is said
    out.info(f"importing {source} ({arch}) to {out_dir}")
    with atomic_dir(out_dir) as tmp:
        save_run(tmp, model, tokenizer, {"stage": "import", "source": str(source)})
    config = model.config
    return {
        "path": str(out_dir),
        "architecture": arch,
        "family": config.family,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "elapsed_s": clock.elapsed,
    }
