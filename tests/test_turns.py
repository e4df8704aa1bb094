"""tinylm.turns: p(<|im_end|>) after the right answer, and the share of replies ending a turn."""

from __future__ import annotations

import torch

from tinylm.chat import TURN_END, encode_chat
from tinylm.model import ModelConfig, Transformer
from tinylm.tokenizer import Tokenizer
from tinylm.turns import ends_turn_share, p_turn_end

TOK = Tokenizer.bytes_only()
END = TOK.special_tokens[TURN_END]
CONVERSATIONS = [
    [{"role": "user", "content": "Where is Tupamark?"},
     {"role": "assistant", "content": "In the north."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=TOK.vocab_size, n_layers=1, n_heads=2, d_model=32,
                         max_seq_len=128, tie_embeddings=False)
    return Transformer(config).eval()


def test_p_turn_end_is_the_teacher_forced_probability_at_the_answers_end() -> None:
    model = tiny_model()
    by_hand = []
    for messages in CONVERSATIONS:
        ids = encode_chat(TOK, messages)
        last = max(i for i, t in enumerate(ids) if t == END)  # the answer's closing token
        with torch.no_grad():
            probs = model(torch.tensor([ids[:last]]))[0, -1].softmax(-1)
        by_hand.append(float(probs[END]))
    # Batched with right padding: the same numbers as one conversation at a time.
    assert abs(p_turn_end(model, TOK, CONVERSATIONS, batch_size=2) - sum(by_hand) / 3) < 1e-6
    assert abs(p_turn_end(model, TOK, CONVERSATIONS[1:2]) - by_hand[1]) < 1e-6


def test_a_model_that_learned_to_end_its_turn_scores_one() -> None:
    model = tiny_model()
    prompts = [c[:-1] for c in CONVERSATIONS]
    before = ends_turn_share(model, TOK, prompts, max_new_tokens=8, seed=0)
    assert before < 0.5 and p_turn_end(model, TOK, CONVERSATIONS) < 0.05
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ids = torch.tensor([encode_chat(TOK, CONVERSATIONS[0])])
    model.train()
    for _ in range(30):  # push p(<|im_end|>) up at every position
        loss = -model(ids).log_softmax(-1)[..., END].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert p_turn_end(model, TOK, CONVERSATIONS) > 0.9
    assert ends_turn_share(model, TOK, prompts, max_new_tokens=8, seed=0) == 1.0
