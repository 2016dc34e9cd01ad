"""capture_qkv: identical model outputs, correct post-RoPE tensors, graphs, wrappers, errors."""

import pytest
import torch

from linearard_ray.models.capture import attention_modules, capture_qkv

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _load(path, impl):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)
    return m.eval()


def _batch(T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 7 :] = 0  # right padding in one row
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_logits_identical_and_shapes(tiny_model_dir, family, impl):
    model = _load(tiny_model_dir(family), impl)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with capture_qkv(model, [0, 1]) as cap:
            got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ref, got)
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for layer in (0, 1):
        assert cap.q[layer].shape == (2, c.num_attention_heads, 24, hd)
        assert cap.k[layer].shape == (2, c.num_key_value_heads, 24, hd)
        assert cap.v[layer].shape == (2, c.num_key_value_heads, 24, hd)
        assert cap.scaling[layer] == pytest.approx(hd**-0.5)
        assert not cap.q[layer].requires_grad
    # nothing is left patched or marked afterwards
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)
    assert not any(hasattr(m, "_linearard_capture") for m in attention_modules(model))


def _rope(x, pos, inv_freq):
    ang = pos[:, None].double() * inv_freq.double()[None]  # [T, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.parametrize("layer", [0, 1])
def test_captured_tensors_are_post_rope_qkv(tiny_model_dir, layer):
    model = _load(tiny_model_dir("llama"), "sdpa")
    ids, mask = _batch(T=20, seed=1)
    with torch.no_grad(), capture_qkv(model, [layer]) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    attn = model.model.layers[layer].self_attn
    x = model.model.layers[layer].input_layernorm(out.hidden_states[layer]).double()
    B, T, _ = x.shape
    D = model.config.head_dim

    def heads(lin):
        return (x @ lin.weight.double().T).view(B, T, -1, D).transpose(1, 2)

    inv = 1.0 / model.config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.arange(T)
    torch.testing.assert_close(cap.q[layer].double(), _rope(heads(attn.q_proj), pos, inv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap.k[layer].double(), _rope(heads(attn.k_proj), pos, inv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap.v[layer].double(), heads(attn.v_proj), rtol=1e-5, atol=1e-5)
    assert list(cap.q) == [layer]


def test_what_limits_recording_and_student_keeps_graph(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = _load(tiny_model_dir("qwen2"), "sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    ids, mask = _batch()
    with capture_qkv(peft_model, [1], what=("k",)) as cap:
        peft_model(input_ids=ids, attention_mask=mask)
    assert set(cap.k) == {1} and not cap.q and not cap.v
    assert cap.k[1].grad_fn is not None
    cap.k[1].pow(2).sum().backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # layer 1's k depends on its own k_proj and on everything in layer 0, nothing else of layer 1
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight" in grads
    assert all("layers.0." in n or "layers.1.self_attn.k_proj" in n for n in grads)


def test_gradient_checkpointing_keeps_captured_graph(tiny_model_dir):
    from linearard_ray.config import LoraConfig, ModelConfig, RopeConfig
    from linearard_ray.models.loading import load_student

    mc = ModelConfig(teacher="tiny:llama", cache_dir=str(tiny_model_dir("llama").parent.parent))
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)  # LoRA A is drawn at load time
        s = load_student(
            mc, RopeConfig(type="linear", factor=2.0), LoraConfig(r=4), device="cpu", gradient_checkpointing=gc
        )
        with torch.no_grad():
            for n, p in s.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        ids, mask = _batch()
        with capture_qkv(s, [0, 1]) as cap:
            s(input_ids=ids, attention_mask=mask)
        sum((cap.q[layer].pow(2).sum() + cap.v[layer].sum()) for layer in (0, 1)).backward()
        grads.append({n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_errors(tiny_model_dir):
    model = _load(tiny_model_dir("mistral"), "sdpa")
    with pytest.raises(ValueError, match="out of range"):
        with capture_qkv(model, [2]):
            pass
    with pytest.raises(RuntimeError, match="already being captured"):
        with capture_qkv(model, [0]), capture_qkv(model, [0, 1]):
            pass
    with capture_qkv(model, [0]) as cap:
        pass
    with pytest.raises(RuntimeError, match="recorded nothing"):
        cap.check_complete()
    with pytest.raises(ValueError, match="no attention modules"):
        with capture_qkv(torch.nn.Linear(2, 2), [0]):
            pass
    # two models captured at once, each records only its own layers
    other = _load(tiny_model_dir("llama"), "eager")
    ids, mask = _batch()
    with torch.no_grad(), capture_qkv(model, [1]) as a, capture_qkv(other, [0]) as b:
        model(input_ids=ids, attention_mask=mask)
        other(input_ids=ids, attention_mask=mask)
    assert list(a.q) == [1] and list(b.q) == [0]
    assert not torch.equal(a.q[1], b.q[0])
