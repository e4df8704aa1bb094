"""Instruction tuning data: reading, chat rendering with response masks, batching, losses.

    data    the three instruction formats and preference pairs, validated line by line
    render  conversations to `input_ids` + `loss_mask`, segment by segment; truncation
    batch   padded (length-bucketed) and packed batches, the loop's batch source, the losses
    evaluate  validation loss on response tokens, exact match of greedy answers
"""

from tinylm.sft.batch import (
    Batch,
    SFTBatches,
    block_causal_mask,
    bucket_batches,
    collate_packed,
    collate_padded,
    masked_lm_loss,
    pack_windows,
    sequence_logps,
    sft_loss,
)
from tinylm.sft.data import (
    Conversation,
    Message,
    PreferencePair,
    detect_format,
    read_conversations,
    read_preference_pairs,
    to_messages,
)
from tinylm.sft.render import (
    EncodeStats,
    TokenizedExample,
    encode_conversations,
    encode_example,
    encode_pairs,
    encode_segments,
    response_mask,
    truncate,
)

__all__ = [
    "Batch",
    "Conversation",
    "EncodeStats",
    "Message",
    "PreferencePair",
    "SFTBatches",
    "TokenizedExample",
    "block_causal_mask",
    "bucket_batches",
    "collate_packed",
    "collate_padded",
    "detect_format",
    "encode_conversations",
    "encode_example",
    "encode_pairs",
    "encode_segments",
    "masked_lm_loss",
    "pack_windows",
    "read_conversations",
    "read_preference_pairs",
    "response_mask",
    "sequence_logps",
    "sft_loss",
    "to_messages",
    "truncate",
]
