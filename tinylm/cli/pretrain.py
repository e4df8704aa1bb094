"""`tinylm pretrain` and `tinylm eval`: train a model from scratch; score it on any data."""

from __future__ import annotations

from typing import Annotated

import typer

from tinylm.cli.app import (
    Force,
    Json,
    Log,
    Overrides,
    Quiet,
    app,
    exit_if_interrupted,
    output,
)

Files = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", help="Text, JSONL or parquet files (.gz / .zst of text or "
                 "JSONL too), directories or quoted globs; repeat for several. PATH:WEIGHT on "
                 "every value makes a mixture (web.parquet:0.8)."),
]
TextField = Annotated[
    str | None,
    typer.Option("--text-field", help="The JSONL key or parquet column holding the text "
                 "(default: text)."),
]


@app.command()
def pretrain(
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run directory to write.")],
    data: Files = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="A preset name (tiny, small, "
                                 "shakespeare, ...) or a YAML file.")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", "-t", help="tokenizer.json, its directory, or "
                                 "'bytes'; default: train one (config tokenizer.vocab_size).")
    ] = None,
    val_data: Annotated[
        list[str] | None, typer.Option("--val-data", help="Validation text (else a split).")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Last fraction of the tokens kept for validation.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    max_time: Annotated[
        float | None, typer.Option(help="Stop cleanly (eval, save) after this many seconds.")
    ] = None,
    save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between evaluations.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (init and data order).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    fsdp: Annotated[
        bool, typer.Option("--fsdp", help="Shard the model with FSDP2 (under torchrun).")
    ] = False,
    allow_special: Annotated[
        bool, typer.Option("--allow-special", help="Read special-token spellings in the text "
                           "(<|endoftext|> between documents) as control tokens; by default "
                           "they are plain text.")
    ] = False,
    text_field: TextField = None,
    log: Log = None,
    set_: Overrides = None,
    force: Force = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Pretrain a decoder-only transformer from scratch on your text.

    Writes RUN/config.json, model.safetensors, tokenizer.json, metrics.jsonl, checkpoints/,
    loss_curve.png and report.md. Ctrl-C (or SIGTERM) saves a checkpoint and stops; --resume
    continues exactly. The same command runs on several processes under torchrun (DDP, or FSDP2 with
    --fsdp).

    Examples:

        tinylm pretrain -c shakespeare -d shakespeare.txt -o runs/shakes

        tinylm pretrain -c tiny -d corpus/ -t bytes -o runs/tiny --max-steps 500 --set train.lr=3e-3

        tinylm pretrain -o runs/shakes --resume

        tinylm pretrain -c tiny -d docs.txt -t tok/ -o runs/docs --allow-special

        tinylm pretrain -c small -d "web/*.parquet:0.8" -d code.jsonl.zst:0.2 -t tok/ -o runs/mix

        torchrun --nproc_per_node=4 -m tinylm pretrain -c small -d corpus/ -t tok/ -o runs/small
    """
    from tinylm.pretrain import pretrain as run_pretrain

    flags = {
        "data.val_fraction": val_fraction, "train.max_steps": max_steps,
        "train.max_time": max_time, "train.save_every": save_every,
        "train.eval_every": eval_every, "train.seed": seed, "train.device": device,
        "train.compile": True if compile else None, "train.fsdp": True if fsdp else None,
        "data.allow_special": True if allow_special else None, "data.text_field": text_field,
    }
    out = output(quiet, json)
    result = run_pretrain(
        data, out_dir, config=config, tokenizer=tokenizer, val_data=val_data,
        overrides=set_, values={**flags, "train.log": log}, resume=resume, force=force, out=out,
    )
    exit_if_interrupted(out, result, "pretrain", out_dir)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="A run directory.")],
    data: Annotated[list[str], typer.Option(
        "--data", "-d", help="Text (files, directories, globs; JSONL or parquet with a text "
        "field; .gz / .zst), instruction or preference JSONL / parquet (one kind at a time).")],
    batch_size: Annotated[int, typer.Option(help="Windows or examples per forward pass.")] = 16,
    seq_len: Annotated[
        int | None, typer.Option(help="Window length on text (default: the run's training "
                                 "length).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Score at most this many text tokens (0: all).")
    ] = 0,
    max_new_tokens: Annotated[
        int, typer.Option(help="Greedy answer length for exact match (0: reference + 8).")
    ] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    text_field: TextField = None,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Score a model on data; the metrics follow the kind of data.

    Text (files, directories, JSONL with "text"): loss in nats per token and bits per byte
    (val_bpb, the number `tinylm pretrain` logs; it divides by UTF-8 bytes, so models with
    different tokenizers compare). Instruction JSONL (messages, prompt/completion, Alpaca):
    loss per response token and greedy exact match. Preference JSONL (prompt, chosen,
    rejected): pref_accuracy_logp, the share of pairs whose chosen answer has the higher
    log-prob, and, for a run with a base (finetune, dpo, LoRA), pref_accuracy, the share whose
    chosen answer gained more log-prob over the base than the rejected one.

    Examples:

        tinylm eval -m runs/shakes -d valid.txt

        tinylm eval -m runs/shakes -d corpus/ --max-tokens 100000 --json

        tinylm eval -m runs/sft -d val.jsonl

        tinylm eval -m runs/dpo -d pairs.jsonl --json

        tinylm eval -m runs/shakes -d "val/*.parquet" --text-field content
    """
    from tinylm.evaluate import evaluate_data

    out = output(quiet, json)
    result = evaluate_data(model, data, batch_size=batch_size, seq_len=seq_len,
                           max_tokens=max_tokens, max_new_tokens=max_new_tokens,
                           device=device, text_field=text_field or "text", out=out)
    out.table(f"eval: {model}", result)
