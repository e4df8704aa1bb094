"""The chat template and its special tokens, defined once for tokenize, finetune, dpo and chat.

The template is ChatML, the one SmolLM and Qwen use, so users recognise it and `transformers`
renders it from a short Jinja string:

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n

Training puts loss on an assistant turn's content and its closing `<|im_end|>` only.
"""

END_OF_TEXT = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# Reserved in every tokenizer tinylm trains, in this order, at the end of the vocabulary.
DEFAULT_SPECIAL_TOKENS = (END_OF_TEXT, TURN_START, TURN_END)

ROLES = ("system", "user", "assistant")
