"""tinylm: a small language model through its whole life, on a CPU or a GPU."""

__version__ = "0.1.0"

# Bumped when the run-directory or tokenizer layout changes in a way older readers cannot follow.
FORMAT_VERSION = 1
