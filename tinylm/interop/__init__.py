"""Interoperability with Hugging Face `transformers`: export a run, import a model directory.

`export_hf(run, dir)` writes a directory `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with tinylm's exact logits and ids; `import_hf(dir, run)`
reads a Llama-architecture or GPT-2 model with a byte-level BPE tokenizer into a tinylm run.
Neither needs `transformers` installed: they read and write JSON and safetensors only.
"""

from tinylm.interop.export import export_hf
from tinylm.interop.importer import import_hf, load_hf_model

__all__ = ["export_hf", "import_hf", "load_hf_model"]
