"""Instruction tuning data: reading, chat rendering with response masks, batching.

The losses over these batches are in `tinylm.losses`; evaluation in `tinylm.sft.evaluate`.

    data    the three instruction formats and preference pairs, validated line by line
    render  conversations to `input_ids` + `loss_mask`, segment by segment; truncation
    batch   padded (length-bucketed) and packed batches, the loop's batch source
    evaluate  validation loss on response tokens, exact match of greedy answers
"""

from tinylm.sft.batch import (
    Batch,
    SFTBatches,
    block_causal_mask,
    bucket_batches,
    collate_packed,
    collate_padded,
    pack_windows,
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
    "pack_windows",
    "read_conversations",
    "read_preference_pairs",
    "response_mask",
    "to_messages",
    "truncate",
]
