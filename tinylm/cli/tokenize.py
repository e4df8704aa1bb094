"""`tinylm tokenize`: train a byte-level BPE tokenizer."""
