"""`tinylm export` and `tinylm import`: to and from a Hugging Face `transformers` directory;
export also writes a GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinylm.cli.app import Force, Json, OutputAlias, Quiet, app, out_path, output
from tinylm.errors import TinyLMError


@app.command("export")
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="The run directory to export.")],
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="The Hugging Face model directory to write "
                                 "(--format hf), or the .gguf file (--format gguf).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="hf: a transformers directory; gguf: one file for "
                          "llama.cpp and ollama.")
    ] = "hf",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weight dtype. hf: float32, bfloat16 or float16; "
                          "gguf: f32, f16 or q8_0 (float32 means f32).")
    ] = "float32",
    merge: Annotated[
        bool,
        typer.Option("--merge", help="For a LoRA run: export the merged weights as a plain model "
                     "instead of the base model plus a PEFT adapter."),
    ] = False,
    output_alias: OutputAlias = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Write a run as a Hugging Face model directory (config.json, model.safetensors,
    tokenizer files with the chat template) that `transformers` loads with the same logits.

    A LoRA run (tinylm finetune --lora) exports its base model as DIR and the adapter as
    DIR/adapter for PEFT, or with --merge the merged weights.

    Examples:

        tinylm export --model runs/sft -o hf/sft

        tinylm export --model runs/base -o hf/base --dtype bfloat16 --force

        tinylm export --model runs/lora -o hf/lora

        tinylm export --model runs/lora -o hf/lora-merged --merge

    Then in Python: AutoModelForCausalLM.from_pretrained("hf/sft"), and for a LoRA export
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("hf/lora"), "hf/lora/adapter").

    With --format gguf the run (a LoRA run merged) becomes one GGUF file with its tokenizer and
    chat template, for llama.cpp and ollama (needs the `gguf` package: pip install 'tinylm[gguf]'):

        tinylm export --model runs/sft --format gguf -o sft.gguf --dtype q8_0

        llama-cli -m sft.gguf            (a chat with the file's template)
    """
    out = output(quiet, json)
    output_dir = Path(out_path(out_dir, output_alias))
    if fmt == "gguf":
        from tinylm.interop.gguf import export_gguf

        summary = export_gguf(model, output_dir, dtype=dtype, force=force, out=out)
    elif fmt == "hf":
        from tinylm.interop import export_hf

        summary = export_hf(model, output_dir, dtype=dtype, merge=merge, force=force, out=out)
    else:
        raise TinyLMError(f"--format {fmt!r}: must be hf or gguf")
    out.table("export", summary)


@app.command("import")
def import_(
    source: Annotated[
        Path, typer.Argument(help="A local Hugging Face model directory (Llama-style or GPT-2).")
    ],
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="The run directory to write.")
    ] = None,
    output_alias: OutputAlias = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Turn a local Hugging Face model directory into a tinylm run.

    Supported: LlamaForCausalLM (Llama, SmolLM), MistralForCausalLM without sliding windows,
    Qwen2ForCausalLM when its attention biases are zero, and GPT2LMHeadModel, with a byte-level
    BPE tokenizer.json and safetensors weights. Anything tinylm cannot reproduce exactly
    (rope scaling, sliding windows, biases, SentencePiece tokenizers) is refused by name.

    Examples:

        tinylm import ~/models/SmolLM2-135M -o runs/smol

        tinylm import ./gpt2 -o runs/gpt2 --force
    """
    from tinylm.interop import import_hf

    out = output(quiet, json)
    summary = import_hf(source, Path(out_path(out_dir, output_alias)), force=force, out=out)
    out.table("import", summary)
