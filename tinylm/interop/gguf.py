"""`tinylm export --format gguf`: a run as one GGUF file that llama.cpp (and ollama) run.

The file is written with the `gguf` package (the writer llama.cpp's own converter uses):

    general.*, {arch}.*        the hyper-parameters llama.cpp's `llama` or `gpt2` loader reads
    tokenizer.ggml.*           byte-level BPE: model "gpt2", tokens, types, merges, a
                               pre-tokenizer name whose split regex is tinylm's, special ids
    tokenizer.chat_template    the ChatML template as Jinja (the one the HF export writes)
    tensors                    llama.cpp names; f32, f16 or q8_0 (1-D tensors stay f32)

Two layout differences with tinylm's weights are handled here. RoPE: tinylm rotates the pairs
(i, i + head_dim/2) of each head (Hugging Face's layout); llama.cpp's `llama` architecture
rotates neighbours (2i, 2i + 1). Reordering the rows of q_proj and k_proj inside each head so
that row i goes to 2i and row i + head_dim/2 to 2i + 1 gives the same rotated vectors up to
that order, which q.k does not see. gpt2: llama.cpp wants q|k|v fused as one `attn_qkv`.
Tied embeddings: no `output` tensor, llama.cpp then uses `token_embd`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm.chat import END_OF_TEXT, TURN_END, TURN_START, chat_template_jinja
from tinylm.console import SILENT, Output, Stopwatch
from tinylm.errors import TinyLMError
from tinylm.run import load_run
from tinylm.tokenizer.hf_format import token_string
from tinylm.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tinylm.model import ModelConfig
    from tinylm.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "q8_0")
_ALIASES = {"float32": "f32", "float16": "f16"}

# llama.cpp pre-tokenizer names whose split rules are tinylm's (llama.cpp src/llama-vocab.cpp).
# "dbrx": DBRX's tokenizer is GPT-4's cl100k; llama.cpp splits it with the Llama 3 regex, which
# differs from cl100k only in `\s++$`: a piece ending a text (or the text before a special token)
# in whitespace that holds a newline followed by spaces or tabs ("a\n  ") is one chunk for
# tinylm, two for llama.cpp. Unlike "llama-bpe", "dbrx" applies the merges to a word that is a
# token itself (no ignore_merges), as tinylm does. "gpt-2" is GPT-2's regex exactly.
_LLAMA3_REGEXES = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
    r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRE_TOKENIZERS = {
    GPT4_PATTERN: "dbrx",
    GPT2_PATTERN: "gpt-2",
    **dict.fromkeys(_LLAMA3_REGEXES, "dbrx"),
    _QWEN2_REGEX: "qwen2",
}


def pre_tokenizer_name(pattern: str) -> str:
    """The llama.cpp pre-tokenizer that splits text as `pattern` does; an error for a regex
    llama.cpp has none for (it would load the file but cut words differently)."""
    if pattern in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pattern]
    raise TinyLMError(
        f"tokenizer split pattern {pattern!r} has no llama.cpp pre-tokenizer, so llama.cpp "
        "would tokenize differently",
        "GGUF export needs a tokenizer trained with --pattern gpt4 (the default) or gpt2",
    )


def rope_rows_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from tinylm's RoPE pairing (i, i + d/2) to llama.cpp's (2i, 2i + 1),
    head by head; `weight` is (n_heads * head_dim, d_model)."""
    head_dim = weight.shape[0] // n_heads
    half = head_dim // 2
    # new row 2i is old row i, new row 2i + 1 is old row i + half
    order = [i + offset for i in range(half) for offset in (0, half)]
    return weight.view(n_heads, head_dim, -1)[:, order].reshape(weight.shape)


def _check_supported(config: ModelConfig) -> None:
    if config.norm_position != "pre":
        raise TinyLMError(
            f"model.norm_position {config.norm_position!r}: llama.cpp's {config.family} "
            "architecture is pre-norm only, so a post-norm model cannot be written as GGUF",
            "export it with --format hf instead",
        )


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """tinylm's state dict as llama.cpp tensors (names from the `gguf` package), float32."""
    import gguf
    import torch

    def name(kind: gguf.MODEL_TENSOR, suffix: str = "weight", layer: int | None = None) -> str:
        return gguf.TENSOR_NAMES[kind].format(bid=layer) + "." + suffix

    T = gguf.MODEL_TENSOR
    gpt2 = config.family == "gpt2"
    kinds = ("weight", "bias") if gpt2 else ("weight",)
    out = {name(T.TOKEN_EMBD): state["model.embed_tokens.weight"]}
    if gpt2:
        out[name(T.POS_EMBD)] = state["model.embed_positions.weight"]
    for kind in kinds:
        out[name(T.OUTPUT_NORM, kind)] = state[f"model.norm.{kind}"]
    if not config.tie_embeddings:
        out[name(T.OUTPUT)] = state["lm_head.weight"]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        for kind in kinds:
            out[name(T.ATTN_NORM, kind, i)] = state[f"{p}input_layernorm.{kind}"]
            out[name(T.FFN_NORM, kind, i)] = state[f"{p}post_attention_layernorm.{kind}"]
            out[name(T.ATTN_OUT, kind, i)] = state[f"{p}self_attn.o_proj.{kind}"]
            out[name(T.FFN_UP, kind, i)] = state[f"{p}mlp.up_proj.{kind}"]
            out[name(T.FFN_DOWN, kind, i)] = state[f"{p}mlp.down_proj.{kind}"]
            if gpt2:
                qkv = [state[f"{p}self_attn.{proj}_proj.{kind}"] for proj in "qkv"]
                out[name(T.ATTN_QKV, kind, i)] = torch.cat(qkv, dim=0)
        if not gpt2:
            q, k = state[f"{p}self_attn.q_proj.weight"], state[f"{p}self_attn.k_proj.weight"]
            out[name(T.ATTN_Q, layer=i)] = rope_rows_interleaved(q, config.n_heads)
            out[name(T.ATTN_K, layer=i)] = rope_rows_interleaved(k, config.n_kv_heads)
            out[name(T.ATTN_V, layer=i)] = state[f"{p}self_attn.v_proj.weight"]
            out[name(T.FFN_GATE, layer=i)] = state[f"{p}mlp.gate_proj.weight"]
    return {key: t.detach().to("cpu", torch.float32).contiguous() for key, t in out.items()}


def encode_tensor(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """The data and GGML type of one tensor: 1-D ones (norms, biases) stay f32, as llama.cpp's
    converter keeps them; a matrix whose rows do not fill q8_0's blocks of 32 is stored f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32
    if array.ndim > 1 and dtype != "f32":
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        qtype = Q.Q8_0 if dtype == "q8_0" and array.shape[-1] % block == 0 else Q.F16
    return gguf.quants.quantize(array, qtype), qtype


def _token_strings(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """The vocabulary as GGUF stores a byte-level BPE one: GPT-2's byte-to-character strings,
    special tokens as their text (type CONTROL), and the ids the model has beyond the
    tokenizer's (never produced) as unused placeholders."""
    import gguf

    special_ids = set(tokenizer.special_tokens.values())
    strings, types = [], []
    for i in range(tokenizer.vocab_size):
        data = tokenizer.token_bytes(i)
        if i in special_ids:
            strings.append(data.decode("utf-8"))
            types.append(gguf.TokenType.CONTROL)
        else:
            strings.append(token_string(data))
            types.append(gguf.TokenType.NORMAL)
    for i in range(tokenizer.vocab_size, vocab_size):
        strings.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    if len(set(strings)) != len(strings):
        raise TinyLMError("two tokens have the same string; llama.cpp's vocabulary needs "
                          "distinct ones", "choose special tokens that are not ordinary text")
    return strings, [int(t) for t in types]


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int, pre: str) -> None:
    strings, types = _token_strings(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(strings)
    writer.add_token_types(types)
    writer.add_token_merges([
        f"{token_string(tokenizer.token_bytes(a))} {token_string(tokenizer.token_bytes(b))}"
        for a, b in tokenizer.merges
    ])
    specials = tokenizer.special_tokens
    writer.add_add_bos_token(False)  # tinylm never prepends a token; the model saw none
    writer.add_add_eos_token(False)
    if END_OF_TEXT in specials:
        eot = specials[END_OF_TEXT]
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
        writer.add_pad_token_id(eot)
    if TURN_END in specials:
        writer.add_eot_token_id(specials[TURN_END])  # a chat reply ends here
    if TURN_START in specials and TURN_END in specials:
        writer.add_chat_template(chat_template_jinja())


def _add_hparams(writer: Any, config: ModelConfig, name: str, file_type: int) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)


def _check_output(path: Path, source: Path, force: bool) -> None:
    if path.is_dir():
        raise TinyLMError(f"{path}: is a directory", "give -o the name of the .gguf file to write")
    if path.exists() and path.resolve().is_relative_to(source.resolve()):
        raise TinyLMError(f"{path}: is inside the input run {source}", "choose another -o file")
    if path.exists() and not force:
        raise TinyLMError(f"{path}: already exists", "pass --force to overwrite")
    existing = next(p for p in path.parents if p.exists())  # the root always exists
    if not existing.is_dir():
        raise TinyLMError(f"{path}: cannot be created, {existing} is not a directory")


def export_gguf(
    run_dir: str | Path,
    out_file: str | Path,
    *,
    dtype: str = "f32",
    force: bool = False,
    out: Output = SILENT,
) -> dict[str, Any]:
    """Write the run at `run_dir` as the GGUF file `out_file`; a summary dict.

    `dtype`: f32, f16 or q8_0 for the matrices. A LoRA run is written merged. Raises
    `TinyLMError` for an unknown dtype, an existing file without `force`, a post-norm model,
    or a tokenizer split pattern llama.cpp cannot reproduce; nothing is written then.
    """
    try:
        import gguf
    except ImportError:
        raise TinyLMError("GGUF export needs the `gguf` package",
                          "pip install 'tinylm[gguf]' (or pip install gguf)") from None

    dtype = _ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise TinyLMError(f"--dtype {dtype!r}: GGUF export writes one of {', '.join(DTYPES)}")
    run_dir, out_file = Path(run_dir), Path(out_file)
    _check_output(out_file, run_dir, force)
    clock = Stopwatch()
    run = load_run(run_dir)
    config, tokenizer = run.model.config, run.tokenizer
    _check_supported(config)
    pre = pre_tokenizer_name(tokenizer.pattern)
    out.info(f"exporting {run_dir} ({config.family}, {dtype}) to {out_file}")
    tensors = gguf_tensors(run.model.state_dict(), config)

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, config.family)
        _add_hparams(writer, config, run_dir.resolve().name, file_types[dtype])
        _add_tokenizer(writer, tokenizer, config.vocab_size, pre)
        with out.progress("converting tensors", total=len(tensors)) as bar:
            for key, tensor in tensors.items():
                data, qtype = encode_tensor(tensor.numpy(), dtype)
                writer.add_tensor(key, data, raw_dtype=qtype)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
                bar.advance()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "path": str(out_file),
        "architecture": config.family,
        "dtype": dtype,
        "tensor_types": ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": out_file.stat().st_size,
        "vocab_size": config.vocab_size,
        "pre_tokenizer": pre,
        "tied_embeddings": config.tie_embeddings,
        "elapsed_s": clock.elapsed,
    }
