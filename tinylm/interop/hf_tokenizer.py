"""The tokenizer side of a Hugging Face model directory.

Export writes tinylm's tokenizer.json as it is (it is already in the `tokenizers` format) plus
the `transformers` files around it: tokenizer_config.json (special tokens, the ChatML template
as Jinja) and special_tokens_map.json. Import checks the BPE options that tinylm's tokenizer
loader does not (it refuses other models, normalizers and non-byte-level pre-tokenizers itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinylm.chat import END_OF_TEXT, TURN_END, TURN_START, chat_template_jinja
from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.textio import read_json

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer


def tokenizer_config(tokenizer: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """tokenizer_config.json: no BOS added, <|endoftext|> as eos and pad, the chat template."""
    specials = tokenizer.special_tokens
    eos = END_OF_TEXT if END_OF_TEXT in specials else None
    config: dict[str, Any] = {
        # The fast tokenizer reads tokenizer.json as it is; a model-specific class (Llama's,
        # GPT-2's) would rebuild its own pre-tokenizer and give other ids.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "additional_special_tokens": [t for t in specials if t != eos],
    }
    if TURN_START in specials and TURN_END in specials:
        config["chat_template"] = chat_template_jinja()
    return config


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, Any]:
    """special_tokens_map.json, consistent with `tokenizer_config`."""
    specials = tokenizer.special_tokens
    eos = END_OF_TEXT if END_OF_TEXT in specials else None
    named = {"eos_token": eos, "pad_token": eos} if eos else {}
    return {**named, "additional_special_tokens": [t for t in specials if t != eos]}


def generation_config(tokenizer: Tokenizer, eot_id: int | None) -> dict[str, Any]:
    """generation_config.json: stop at end of text, and at <|im_end|> (the end of a chat turn)."""
    stops = [eot_id] if eot_id is not None else []
    turn_end = tokenizer.special_tokens.get(TURN_END)
    if turn_end is not None:
        stops.append(turn_end)
    config: dict[str, Any] = {"bos_token_id": eot_id, "pad_token_id": eot_id}
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return config


def check_hf_tokenizer(file: Path, out: Output = SILENT) -> None:
    """Refuse what `Tokenizer.load` would read but encode differently from `tokenizers`.

    `Tokenizer.load` itself refuses non-BPE models, normalizers, Metaspace and other
    non-byte-level pre-tokenizers. This adds the BPE options it does not look at; a
    post-processor that adds tokens (a BOS) is reported, since the model itself is exact.
    """
    if not file.is_file():
        raise TinyLMError(
            f"{file.parent}: no tokenizer.json",
            "tinylm imports byte-level BPE tokenizers saved by the `tokenizers` library",
        )
    data = read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TinyLMError(
            f"{file}: tokenizer model {kind!r} is not supported (e.g. SentencePiece/Unigram); "
            "tinylm imports byte-level BPE tokenizers only"
        )
    if model.get("byte_fallback"):
        raise TinyLMError(f"{file}: BPE byte_fallback (SentencePiece style) is not supported")
    if model.get("ignore_merges"):
        raise TinyLMError(
            f"{file}: BPE ignore_merges=true is not supported; tinylm always applies the merges, "
            "which can split a word differently"
        )
    post = data.get("post_processor")
    if isinstance(post, dict) and post.get("type") not in (None, "ByteLevel"):
        out.warn(
            f"{file}: post-processor {post.get('type')} adds special tokens when transformers "
            "encodes; tinylm's encode does not add them (the model itself imports exactly)"
        )
