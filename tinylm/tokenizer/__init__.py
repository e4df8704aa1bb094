"""Byte-level BPE tokenizer: training, encoding, decoding, Hugging Face and tiktoken formats.

from tinylm.tokenizer import Tokenizer
tok = Tokenizer.train_files(["corpus/"], vocab_size=8192)
ids = tok.encode("Hello world")          # special-token strings stay plain text
tok.decode(ids) == "Hello world"
tok.save("out/")                         # out/tokenizer.json, loadable by HF tokenizers
"""

from tinylm.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from tinylm.tokenizer.tokenizer import Tokenizer

__all__ = ["GPT2_PATTERN", "GPT4_PATTERN", "PATTERNS", "Tokenizer"]
