"""The built-in synthetic world: a seeded generator of checkable facts and the data about them.

`synthesize(out_dir, seed, size)` writes `corpus.txt` (pretraining text stating every fact in
many phrasings), `sft.jsonl` / `sft_eval.jsonl` (questions about training / held-out facts),
`prefs.jsonl` / `prefs_eval.jsonl` (preference pairs), `facts.jsonl` and a README. The pure
functions `exact_match` and `shows_preference` score generations against it.
"""

from tinylm.synth.build import build_dataset, synthesize
from tinylm.synth.scoring import CLOSING, exact_match, first_sentence, normalize, shows_preference
from tinylm.synth.world import SIZES, SizeSpec

__all__ = [
    "CLOSING",
    "SIZES",
    "SizeSpec",
    "build_dataset",
    "exact_match",
    "first_sentence",
    "normalize",
    "shows_preference",
    "synthesize",
]
