"""Export as the field expects it: the merged student in its checkpoint's dtype, a model card that
huggingface_hub parses, naming the teacher by its public name (never a path on this machine), the
adapter's card likewise, and the record that lets later steps find the student's run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from linearard_ray.config import LoraConfig, ModelConfig, RopeConfig, build_config
from linearard_ray.models import card as cards
from linearard_ray.models.loading import (
    ModelError,
    checkpoint_dtype,
    export_dtype,
    export_student,
    load_student,
    load_tokenizer,
    public_model_name,
)
from linearard_ray.models.tiny import build_tiny_model


def _safetensor_dtypes(d: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out |= {str(fh.get_tensor(k).dtype) for k in fh.keys()}
    return out


def _weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


@pytest.fixture(scope="module")
def bf16_teacher(tmp_path_factory):
    """A tiny Llama published in bfloat16, as a local directory."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("bf16") / "tiny-bf16", dtype="bfloat16")


def _student(teacher: str, cache_dir, lora=True):
    mc = ModelConfig(teacher=teacher, cache_dir=str(cache_dir))
    rope = RopeConfig(type="linear", factor=4.0)
    s = load_student(mc, rope, LoraConfig(r=4, enabled=lora), device="cpu")
    with torch.no_grad():
        for p in s.parameters():
            if p.requires_grad:
                p.add_(0.05)
    return mc, rope, s.eval(), load_tokenizer(mc)


def test_export_dtype_follows_the_checkpoint(cache_dir, bf16_teacher):
    assert checkpoint_dtype("smollm2-135m") == torch.bfloat16  # known without fetching it
    assert checkpoint_dtype("tiny:llama") == torch.float32
    assert checkpoint_dtype(str(bf16_teacher)) == torch.bfloat16
    mc = ModelConfig(teacher=str(bf16_teacher))
    assert export_dtype("auto", mc) == torch.bfloat16
    assert export_dtype("fp32", mc) == torch.float32 and export_dtype("fp16", mc) == torch.float16
    assert export_dtype("auto", ModelConfig(teacher="tiny:llama", student=str(bf16_teacher))) == torch.bfloat16
    with pytest.raises(ModelError, match="export.dtype"):
        export_dtype("int8", mc)


def test_merged_student_is_written_once_in_the_teachers_dtype(cache_dir, bf16_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    mc, rope, s, tok = _student(str(bf16_teacher), cache_dir)
    assert next(s.parameters()).dtype == torch.float32  # trained in float32 on CPU
    paths = export_student(s, tok, tmp_path / "bf16", rope, dtype=export_dtype("auto", mc))
    merged = paths["merged"]
    assert _safetensor_dtypes(merged) == {"torch.bfloat16"}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    assert reloaded.dtype == torch.bfloat16  # the config's dtype is what from_pretrained uses
    full = export_student(s, tok, tmp_path / "fp32", rope, dtype=torch.float32)["merged"]
    assert _safetensor_dtypes(full) == {"torch.float32"}
    # the bf16 weights are the float32 merged weights rounded once, nothing else
    exact = AutoModelForCausalLM.from_pretrained(full).state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, exact[k].to(torch.bfloat16)), k
    assert _weights_bytes(merged) < 0.55 * _weights_bytes(full)
    assert next(s.parameters()).dtype == torch.float32  # the training model is left as it was
    # on a shared cluster others can read every exported file, the weights included
    for f in (*merged.iterdir(), *paths["adapter"].iterdir()):
        assert f.stat().st_mode & 0o044 == 0o044, f


def test_model_card_parses_and_names_the_public_base_model(cache_dir, tmp_path):
    from huggingface_hub import ModelCard

    mc, rope, s, tok = _student("tiny:llama", cache_dir)
    cfg = build_config({"model": {"teacher": "tiny:llama"}, "train": {"run_name": "card-test"}})
    manifest = {"sources": ["builtin:sotu/train"], "docs_used": 7, "tokens": 1234, "tokens_in_blocks": 1200}
    manifests = {"train": {**manifest, "ctx_len": 64}}
    card = cards.training_card(cfg, manifests=manifests, steps=3, tokens_seen=768, dtype="x")
    card.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what a built-in or hub teacher gives
    paths = export_student(s, tok, tmp_path / "out", rope, card=card)
    merged = ModelCard.load(paths["merged"] / "README.md")
    assert merged.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert merged.data.library_name == "transformers"
    assert merged.data.tags == ["linearard", "rope-scaling", "linear"]
    assert merged.data.eval_results is None  # until an evaluation has run
    text = merged.text
    assert "builtin:sotu/train" in text and "1,200" in text and "768" in text and "from_pretrained" in text
    assert "context window: 1024 tokens (native 256)" in text
    record = cards.read_student_record(paths["merged"])
    assert record.dtype == "float32" and record.rope["rope"]["factor"] == 4.0 and record.run_name == "card-test"

    adapter = ModelCard.load(paths["adapter"] / "README.md")
    assert adapter.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter.data.library_name == "peft"
    adapter_cfg = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for f in ("README.md", "adapter_config.json"):
        assert str(cache_dir) not in (paths["adapter"] / f).read_text()  # no path of this machine


def test_a_card_with_evaluation_results_has_a_model_index(tmp_path):
    from huggingface_hub import ModelCard

    card = cards.StudentCard(
        rope={"rope": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 32768},
        run_name="s1",
        evaluation=[
            cards.EvalFigure("main", "builtin:sotu/eval", "perplexity", 28.1, 2048),
            cards.EvalFigure("passkey", "passkey retrieval", "passkey_accuracy", 0.6),
        ],
        mlflow={"run_id": "abc", "registered_model": "s1", "version": "2", "source": "/local/dir"},
    )
    cards.write_model_card(tmp_path, card)
    parsed = ModelCard.load(tmp_path / "README.md")
    results = parsed.data.eval_results
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in results] == [
        ("perplexity", 28.1, "builtin:sotu/eval"),
        ("passkey_accuracy", 0.6, "passkey retrieval"),
    ]
    assert parsed.data.model_name == "s1" and "yarn" in parsed.data.tags
    assert parsed.data.to_dict()["linearard"]["mlflow"] == {"run_id": "abc", "registered_model": "s1", "version": "2"}
    assert "/local/dir" not in (tmp_path / "README.md").read_text()
    assert cards.read_student_record(tmp_path) == card


def test_public_model_names(tmp_path, bf16_teacher):
    assert public_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert public_model_name("gpt2") == "gpt2"
    assert public_model_name("tiny:llama") is None
    assert public_model_name(str(tmp_path / "model.gguf")) is None
    assert public_model_name(str(bf16_teacher)) is None  # a local directory that does not say
    snapshot = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert public_model_name(str(snapshot)) == "Org/Some-Model"
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "Org/Other"}))
    assert public_model_name(str(named)) == "Org/Other"
    (named / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert public_model_name(str(named)) is None
    assert public_model_name("./relative/dir") is None
