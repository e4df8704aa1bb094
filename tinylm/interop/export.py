"""`tinylm export`: a run as a Hugging Face `transformers` model directory.

    DIR/config.json              LlamaConfig (llama family) or GPT2Config (gpt2 family)
    DIR/model.safetensors        the weights under Hugging Face names, in the chosen dtype
    DIR/generation_config.json   bos/eos/pad ids (eos: <|endoftext|> and <|im_end|>)
    DIR/tokenizer.json           the run's tokenizer, unchanged
    DIR/tokenizer_config.json    special tokens and the ChatML template as Jinja
    DIR/special_tokens_map.json
    DIR/adapter/                 for a LoRA run without --merge: the PEFT adapter (see adapter.py)

The directory is built under a temporary name beside DIR and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinylm.atomic import atomic_dir
from tinylm.chat import END_OF_TEXT
from tinylm.console import SILENT, Output, Stopwatch
from tinylm.errors import TinyLMError
from tinylm.interop import adapter as lora_export
from tinylm.interop import hf_tokenizer
from tinylm.interop.hf_config import to_hf_config
from tinylm.interop.hf_weights import to_hf_state
from tinylm.run import is_adapter_run, load_adapter_base, load_run
from tinylm.textio import check_distinct, check_output_dir

DTYPES = ("float32", "bfloat16", "float16")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    merge: bool = False,
    force: bool = False,
    out: Output = SILENT,
) -> dict[str, Any]:
    """Write the run at `run_dir` as a Hugging Face model directory `out_dir`; a summary dict.

    A LoRA adapter run exports its base model (merged down when the base is itself an adapter
    run) plus the adapter as `out_dir/adapter` for `peft.PeftModel.from_pretrained`, or with
    `merge` the merged weights as a plain model.

    Raises `TinyLMError` for a missing run, an existing `out_dir` without `force`, an unknown
    dtype, `merge` on a run that is no adapter run, a gpt2-family adapter whose options do not
    map exactly (see adapter.py) without `merge`, or a model Hugging Face Llama/GPT-2 cannot
    express (post-norm blocks).
    """
    import torch
    from safetensors.torch import save_file


    if dtype not in DTYPES:
        raise TinyLMError(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adapter_run = is_adapter_run(run_dir)
    if merge and not adapter_run:
        raise TinyLMError(f"--merge: {run_dir} is not a LoRA adapter run (no adapter_config.json)",
                          "leave out --merge to export a plain run")
    check_distinct(run_dir, out_dir)
    check_output_dir(out_dir, force)
    clock = Stopwatch()
    unmerged_adapter = adapter_run and not merge
    if unmerged_adapter:
        base_dir, run = load_adapter_base(run_dir)
        check_distinct(base_dir, out_dir)
        peft_adapter = lora_export.read_peft_adapter(run_dir, run.model.config, dtype)
    else:
        run = load_run(run_dir)
    config, tokenizer = run.model.config, run.tokenizer
    eot_id = tokenizer.special_tokens.get(END_OF_TEXT)
    hf_config = to_hf_config(config, eot_id=eot_id, dtype=dtype)
    what = "base model and adapter" if unmerged_adapter else "merged" if merge else config.family
    out.info(f"exporting {run_dir} ({what}) to {out_dir}")
    state = to_hf_state(run.model.state_dict(), config)
    state = {name: t.to(getattr(torch, dtype)).contiguous() for name, t in state.items()}

    extra: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        tokenizer.save(tmp / "tokenizer.json")
        files = {
            "generation_config.json": hf_tokenizer.generation_config(tokenizer, eot_id),
            "tokenizer_config.json": hf_tokenizer.tokenizer_config(tokenizer, config.max_seq_len),
            "special_tokens_map.json": hf_tokenizer.special_tokens_map(tokenizer),
        }
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        if unmerged_adapter:
            extra = lora_export.write_peft_adapter(
                tmp / lora_export.ADAPTER_SUBDIR, out_dir, *peft_adapter)
    summary = {
        "path": str(out_dir),
        "architecture": hf_config["architectures"][0],
        "parameters": sum(t.numel() for t in state.values()),
        "dtype": dtype,
        "vocab_size": config.vocab_size,
        "tied_embeddings": config.tie_embeddings,
        "merged": merge,
        **extra,
        "elapsed_s": clock.elapsed,
    }
    return summary
