"""LoRA through PEFT: frozen base, zero-init, merge, adapter runs saved and loaded, tinylm merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.errors import TinyLMError
from tinylm.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoraSettings,
    apply_lora,
    count_parameters,
    load_adapter,
    target_modules,
)
from tinylm.model import ModelConfig, Transformer
from tinylm.run import is_adapter_run, load_run, save_adapter_run, save_run
from tinylm.tokenizer import Tokenizer

runner = CliRunner()


def tiny_model(family: str = "llama", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(family=family, vocab_size=259, n_layers=2, n_heads=2, d_model=32,
                         max_seq_len=64)
    return Transformer(config).eval()


def make_base_run(path: Path, family: str = "llama") -> Path:
    path.mkdir(parents=True)
    save_run(path, tiny_model(family), Tokenizer.bytes_only(), {"stage": "pretrain"})
    return path


def train_a_little(model: torch.nn.Module, steps: int = 3) -> None:
    """A few optimizer steps so that B is no longer zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(1)
    x = torch.randint(0, 259, (2, 12))
    model.train()
    for _ in range(steps):
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_init_gives_base_logits_and_base_stays_frozen(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(ids())
    peft_model = apply_lora(model, LoraSettings(enabled=True, rank=4, dropout=0.0))
    assert torch.equal(peft_model(ids()), base_logits)  # B = 0: the adapter adds exactly 0
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    train_a_little(peft_model)
    assert not torch.allclose(peft_model(ids()), base_logits)
    base = peft_model.get_base_model()
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, before[original]), name  # bitwise unchanged


def test_trainable_count_matches_the_formula():
    model = apply_lora(tiny_model(), LoraSettings(enabled=True, rank=4, targets="q_proj,v_proj"))
    trainable, total = count_parameters(model)
    # per layer: q (32 -> 32) and v (32 -> 32), each A (4 x 32) + B (32 x 4)
    assert trainable == 2 * 2 * (4 * 32 + 32 * 4)
    base_total = sum(p.numel() for p in tiny_model().parameters())  # tied head counted once
    assert total == base_total + trainable


def test_targets():
    model = tiny_model()
    assert target_modules(model, "all-linear") == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]
    assert target_modules(tiny_model("gpt2"), "all-linear") == [
        "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"
    ]
    assert target_modules(model, " q_proj, o_proj ") == ["q_proj", "o_proj"]
    for bad in ("lm_head", "qproj", ""):
        with pytest.raises(TinyLMError, match="lora-targets"):
            target_modules(model, bad)
    peft_model = apply_lora(model, LoraSettings(enabled=True, targets="all-linear"))
    adapted = {n.rsplit(".", 2)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert not any("lm_head" in n for n in adapted)
    assert len(adapted) == 2 * 7


def test_merged_equals_unmerged():
    model = apply_lora(tiny_model(), LoraSettings(enabled=True, rank=4, targets="all-linear"))
    train_a_little(model)
    unmerged = model(ids())
    merged = model.merge_and_unload()
    assert isinstance(merged, Transformer)
    assert torch.allclose(merged(ids()), unmerged, atol=1e-5)


def make_adapter_run(tmp_path: Path, family: str = "llama") -> tuple[Path, torch.nn.Module]:
    base = make_base_run(tmp_path / "base", family)
    model = apply_lora(load_run(base).model, LoraSettings(enabled=True, rank=4, dropout=0.0))
    train_a_little(model)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter_run(adapter, model, base, {"stage": "finetune"})
    Tokenizer.bytes_only().save(adapter / "tokenizer.json")
    return adapter, model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_run_saves_and_loads(tmp_path, family):
    adapter, model = make_adapter_run(tmp_path, family)
    expected = model(ids())
    assert is_adapter_run(adapter) and not is_adapter_run(tmp_path / "base")
    assert not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "config.json").read_text())
    assert config["base_run"]["path"] == str((tmp_path / "base").resolve())
    assert config["model"]["family"] == family
    peft_config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4
    merged = load_run(adapter)
    assert isinstance(merged.model, Transformer)
    assert torch.allclose(merged.model(ids()), expected, atol=1e-5)
    unmerged = load_run(adapter, no_merge=True)
    assert not isinstance(unmerged.model, Transformer)
    assert torch.allclose(unmerged.model(ids()), expected, atol=1e-6)
    # The base run on disk is untouched by loading its adapter.
    assert torch.equal(load_run(tmp_path / "base").model(ids()), tiny_model(family)(ids()))


def test_adapter_on_an_adapter_run(tmp_path):
    """A LoRA run whose base is itself a LoRA run: both adapters apply, in order."""
    first, _ = make_adapter_run(tmp_path)
    model = apply_lora(load_run(first).model, LoraSettings(enabled=True, rank=2))
    train_a_little(model)
    second = tmp_path / "second"
    second.mkdir()
    save_adapter_run(second, model, first, {"stage": "finetune"})
    loaded = load_run(second)
    assert torch.allclose(loaded.model(ids()), model(ids()), atol=1e-5)
    assert not torch.allclose(loaded.model(ids()), load_run(first).model(ids()))


def test_peft_loads_our_adapter_files(tmp_path):
    """PEFT's own loader reads the adapter (its format, not just ours)."""
    from peft import PeftModel

    adapter, model = make_adapter_run(tmp_path)
    loaded = PeftModel.from_pretrained(load_run(tmp_path / "base").model, str(adapter))
    assert torch.allclose(loaded(ids()), model(ids()), atol=1e-6)


def test_adapter_run_survives_moving_both_runs(tmp_path):
    adapter, model = make_adapter_run(tmp_path / "a")
    expected = model(ids())
    (tmp_path / "a").rename(tmp_path / "b")
    moved = load_run(tmp_path / "b" / "adapter")
    assert torch.allclose(moved.model(ids()), expected, atol=1e-5)
    import shutil

    shutil.rmtree(tmp_path / "b" / "base")
    with pytest.raises(TinyLMError, match="base run"):
        load_run(tmp_path / "b" / "adapter")


def test_adapter_that_does_not_fit_is_an_error(tmp_path):
    adapter, _ = make_adapter_run(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / ADAPTER_WEIGHTS_FILE))
    weights["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, str(adapter / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(TinyLMError, match="does not fit"):
        load_adapter(tiny_model(), adapter)
    (adapter / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(TinyLMError, match="no adapter_model.safetensors"):
        load_adapter(tiny_model(), adapter)


def test_merge_command(tmp_path):
    adapter, model = make_adapter_run(tmp_path)
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", "-m", str(adapter), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["run"] == str(out)
    assert not is_adapter_run(out) and (out / "model.safetensors").is_file()
    merged = load_run(out)
    assert torch.allclose(merged.model(ids()), model(ids()), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["merged_from"]["adapter_run"]
    again = runner.invoke(app, ["merge", "-m", str(adapter), "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["merge", "-m", str(adapter), "-o", str(out), "--force"])
    assert forced.exit_code == 0
    base = str(tmp_path / "base")
    not_adapter = runner.invoke(app, ["merge", "-m", base, "-o", str(tmp_path / "x")])
    assert not_adapter.exit_code == 2 and "not a LoRA adapter run" in not_adapter.output


def test_adapter_loads_onto_the_exported_hf_model(tmp_path):
    """The interop promise: tinylm's adapter files load with PEFT onto `transformers`' model."""
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from tinylm.interop.export import export_hf

    adapter, model = make_adapter_run(tmp_path)
    export_hf(tmp_path / "base", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf_lora = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        hf_logits = hf_lora(input_ids=ids()).logits
    assert torch.allclose(hf_logits, model(ids()), atol=1e-4)
