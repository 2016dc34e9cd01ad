"""Objective: each term against a direct float64 computation, normalisation, YaRN correction,
gradients only on trainable q/k/v parameters, weight 0 skips work."""

import pytest
import torch
import torch.nn.functional as F

import linearard_ray.objective.loss as loss_mod
from linearard_ray.config import LoraConfig, ModelConfig, ObjectiveConfig, RopeConfig
from linearard_ray.models.capture import capture_qkv
from linearard_ray.models.loading import load_student, load_teacher
from linearard_ray.objective.loss import Objective


def _mc(cache_dir, family):
    return ModelConfig(teacher=f"tiny:{family}", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def teachers(cache_dir):
    return {f: load_teacher(_mc(cache_dir, f), device="cpu") for f in ("llama", "qwen3")}


def _student(cache_dir, family="llama", rope=None, lora=None, seed=0, perturb=0.0):
    torch.manual_seed(seed)
    s = load_student(
        _mc(cache_dir, family), rope or RopeConfig(type="linear", factor=4.0), lora or LoraConfig(r=4), device="cpu"
    )
    if perturb:
        with torch.no_grad():
            for n, p in s.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, perturb)
    return s


def _batch(T=40, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 9 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _obj(
    rel=1.0,
    logits=0.0,
    nt=0.0,
    weights=None,
    layers="all",
    fused=True,
    tau=1.0,
    top_k=None,
    corr="divide",
    rope=None,
    overlap=True,
    backward="auto",
    backend="torch",
):
    cfg = ObjectiveConfig(
        name="custom",
        relation={
            "weight": rel,
            "weights": weights or {"q": 1.0, "k": 1.0, "v": 1.0},
            "layers": layers,
            "fused": fused,
            "overlap": overlap,
            "backward": backward,
        },
        logits={"weight": logits, "temperature": tau, "top_k_positions": top_k, "chunk_size": 16},
        next_token={"weight": nt},
    )
    rope = (rope or RopeConfig(type="linear", factor=4.0)).model_copy(update={"yarn_logit_correction": corr})
    return Objective(cfg, rope, num_layers=2, backend=backend)


def _ref_self_kl(s, t, mask, a_s, a_t):
    """Σ over valid rows of KL(teacher row ‖ student row), causal self-relations, float64."""
    s, t = s.double(), t.double()
    S = (s @ s.transpose(-1, -2)) * a_s
    Tt = (t @ t.transpose(-1, -2)) * a_t
    T = s.shape[2]
    m = mask.bool()
    valid = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & m[:, None, None, :]
    ls = torch.log_softmax(S.masked_fill(~valid, float("-inf")), -1)
    lt = torch.log_softmax(Tt.masked_fill(~valid, float("-inf")), -1)
    kl = (lt.exp() * (lt - ls)).masked_fill(~valid, 0).sum(-1)  # [B, H, T]
    return (kl * m[:, None, :]).sum()


def _captures(model, batch):
    with torch.no_grad(), capture_qkv(model, [0, 1]) as cap:
        model(**batch)
    return cap


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_relation_term_matches_direct_computation(cache_dir, teachers, family):
    teacher = teachers[family]
    student = _student(cache_dir, family, perturb=0.05)
    batch = _batch(seed=1)
    w = {"q": 1.0, "k": 0.5, "v": 2.0}
    out = _obj(weights=w)(teacher, student, batch)
    sc, tc = _captures(student, batch), _captures(teacher, batch)
    mask = batch["attention_mask"]
    n_tok = mask.sum().item()
    alpha = teacher.config.head_dim**-0.5
    per_rel = {}
    for r in "qkv":
        vals = []
        for layer in (0, 1):
            s, t = getattr(sc, r)[layer], getattr(tc, r)[layer]
            ref = _ref_self_kl(s, t, mask, alpha, alpha).item() / (s.shape[1] * n_tok)
            assert out.metrics[f"relation_layer{layer}_{r}"] == pytest.approx(ref, rel=1e-4, abs=1e-7)
            vals.append(ref)
        per_rel[r] = sum(vals) / 2
        assert out.metrics[f"relation_{r}"] == pytest.approx(per_rel[r], rel=1e-4)
    # q relations normalise by 4 query heads, k/v by 2 kv heads
    assert sc.q[0].shape[1] == 4 and sc.k[0].shape[1] == 2
    total = sum(w[r] * per_rel[r] for r in "qkv")
    assert out.metrics["relation"] == pytest.approx(total, rel=1e-4)
    assert out.metrics["loss"] == pytest.approx(total, rel=1e-4)
    assert out.metrics["relation"] > 0.05  # PI×4 student is far from the teacher
    assert float(out.loss.detach()) == pytest.approx(out.metrics["loss"])
    # the unfused path (one op call per relation) gives the same numbers
    unfused = _obj(weights=w, fused=False)(teacher, student, batch)
    for k, v in out.metrics.items():
        assert unfused.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-8)


def _ref_attention_kl(sq, sk, tq, tk, mask, a_s, a_t):
    """Σ over valid rows of KL(teacher ‖ student) between the causal softmax rows of Q·Kᵀ (key heads
    repeated for their query heads), float64."""
    rep = sq.shape[1] // sk.shape[1]
    S = (sq.double() @ sk.double().repeat_interleave(rep, 1).transpose(-1, -2)) * a_s
    Tt = (tq.double() @ tk.double().repeat_interleave(rep, 1).transpose(-1, -2)) * a_t
    T = sq.shape[2]
    m = mask.bool()
    valid = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & m[:, None, None, :]
    ls = torch.log_softmax(S.masked_fill(~valid, float("-inf")), -1)
    lt = torch.log_softmax(Tt.masked_fill(~valid, float("-inf")), -1)
    kl = (lt.exp() * (lt - ls)).masked_fill(~valid, 0).sum(-1)
    return (kl * m[:, None, :]).sum()


@pytest.mark.parametrize(
    "rope", [RopeConfig(type="linear", factor=4.0), RopeConfig(type="yarn", factor=4.0)], ids=["pi", "yarn"]
)
def test_attention_map_term_matches_direct_computation(cache_dir, teachers, rope):
    """weights.qk: the attention map (causal softmax of Q·Kᵀ, GQA 4 query / 2 key heads) against
    float64, normalised by the query heads, added with its weight beside the self-relations; never
    corrected for YaRN's m² (it is the sharpening the student attends with), while Q/Q still is.
    Alone, it trains q_proj and k_proj."""
    teacher = teachers["llama"]
    student = _student(cache_dir, rope=rope, perturb=0.05)
    batch = _batch(seed=11)
    w = {"q": 0.3, "k": 0.0, "v": 1.0, "qk": 2.0}
    out = _obj(weights=w, rope=rope)(teacher, student, batch)
    sc, tc = _captures(student, batch), _captures(teacher, batch)
    mask = batch["attention_mask"]
    n_tok = mask.sum().item()
    a = teacher.config.head_dim**-0.5
    m2 = loss_mod.rope_attention_factor(student.config) ** 2
    assert (m2 > 1.0) == (rope.type == "yarn")
    per = {}
    for r in ("qk", "q"):
        vals = []
        for layer in (0, 1):
            if r == "qk":
                ref = _ref_attention_kl(sc.q[layer], sc.k[layer], tc.q[layer], tc.k[layer], mask, a, a).item() / (
                    4 * n_tok
                )
            else:
                ref = _ref_self_kl(sc.q[layer], tc.q[layer], mask, a / m2, a).item() / (4 * n_tok)
            assert out.metrics[f"relation_layer{layer}_{r}"] == pytest.approx(ref, rel=1e-4, abs=1e-7)
            vals.append(ref)
        per[r] = sum(vals) / 2
    assert per["qk"] > 1e-3 and "relation_k" not in out.metrics
    total = w["q"] * per["q"] + w["v"] * out.metrics["relation_v"] + w["qk"] * per["qk"]
    assert out.metrics["relation"] == pytest.approx(total, rel=1e-4)
    # unfused self-relations give the same numbers
    unfused = _obj(weights=w, fused=False, rope=rope)(teacher, student, batch)
    for k, v in out.metrics.items():
        assert unfused.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-8)
    # the attention map alone trains the query and key projections; the last layer's values reach
    # no attention map (earlier layers' values do, through the next layer's input)
    only = _obj(weights={"q": 0.0, "k": 0.0, "v": 0.0, "qk": 1.0}, rope=rope)(teacher, student, batch)
    assert {k for k in only.metrics if k.startswith("relation_")} == {
        "relation_layer0_qk",
        "relation_layer1_qk",
        "relation_qk",
    }
    student.zero_grad(set_to_none=True)
    only.loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    for n, g in grads.items():
        if "layers.1.self_attn.v_proj" in n:
            assert g is None or g.abs().sum() == 0, n
        elif "lora_A" in n and ("q_proj" in n or "k_proj" in n):
            assert g is not None and g.abs().sum() > 0, n


def test_dense_batch_skips_the_mask_with_the_same_loss(cache_dir, teachers, monkeypatch):
    """A batch without padding reaches the relation op with no mask (the kernels' cheaper path)
    and gives the same loss as the masked path would, with or without an explicit all-ones mask."""
    teacher, student = teachers["llama"], _student(cache_dir, perturb=0.05)
    batch = _batch(seed=3)
    dense = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
    seen = []
    real = loss_mod.ops.relation_kl_layer

    def spy(*a, **kw):
        seen.append(kw["attention_mask"])
        return real(*a, **kw)

    monkeypatch.setattr(loss_mod.ops, "relation_kl_layer", spy)
    out = _obj()(teacher, student, dense)
    no_mask = _obj()(teacher, student, {"input_ids": dense["input_ids"]})
    assert seen and all(m is None for m in seen)
    seen.clear()
    padded = _obj()(teacher, student, batch)
    assert seen and all(m is not None for m in seen)
    sc, tc = _captures(student, dense), _captures(teacher, dense)
    alpha = teacher.config.head_dim**-0.5
    n_tok = dense["input_ids"].numel()
    ref_q0 = _ref_self_kl(sc.q[0], tc.q[0], dense["attention_mask"], alpha, alpha).item() / (4 * n_tok)
    assert out.metrics["relation_layer0_q"] == pytest.approx(ref_q0, rel=1e-4)
    assert no_mask.metrics["loss"] == pytest.approx(out.metrics["loss"], rel=1e-6)
    assert padded.metrics["loss"] != pytest.approx(out.metrics["loss"], rel=1e-3)


def test_mixed_precision_captures_reach_the_op_in_one_dtype(cache_dir, teachers):
    """fp32 weights under bf16 autocast give fp32 q/k (RoPE's fp32 cos/sin) but bf16 v: the loss
    runs (every op input in bf16) and matches the same loss computed from fp32 captures."""
    teacher, student = teachers["llama"], _student(cache_dir, perturb=0.05)
    batch = _batch(seed=4)
    ref = _obj()(teacher, student, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _obj()(teacher, student, batch)
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.metrics["relation"] == pytest.approx(ref.metrics["relation"], rel=0.1)
    caster = loss_mod.relation_caster(
        torch.device("cpu"), [torch.zeros(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.float32)]
    )
    assert caster(torch.randn(2, dtype=torch.bfloat16)).dtype == torch.float32


def test_layer_selection(cache_dir, teachers):
    student = _student(cache_dir)
    out = _obj(layers="last:1")(teachers["llama"], student, _batch())
    assert {k for k in out.metrics if k.startswith("relation_layer")} == {
        "relation_layer1_q",
        "relation_layer1_k",
        "relation_layer1_v",
    }
    assert out.metrics["relation_q"] == pytest.approx(out.metrics["relation_layer1_q"])


def test_zero_when_student_is_teacher(cache_dir, teachers):
    teacher = teachers["llama"]
    batch = _batch(seed=2)
    out = _obj(rel=1.0, logits=1.0)(teacher, teacher, batch)
    assert abs(out.metrics["relation"]) < 1e-6 and abs(out.metrics["logit_kl"]) < 1e-6
    # a dynamic-NTK ×4 student equals the teacher inside the native window
    dyn = _student(cache_dir, rope=RopeConfig(type="dynamic", factor=4.0))
    out = _obj(rel=1.0, logits=1.0, rope=RopeConfig(type="dynamic", factor=4.0))(teacher, dyn, batch)
    assert abs(out.metrics["relation"]) < 1e-6 and abs(out.metrics["logit_kl"]) < 1e-6
    # while PI×4 on the same batch is clearly positive, on every relation except layer-0 V/V
    pi = _obj(rel=1.0, logits=1.0)(teacher, _student(cache_dir), batch).metrics
    assert pi["relation"] > 0.05 and pi["logit_kl"] > 1e-4
    assert (
        all(pi[f"relation_layer{layer}_{r}"] > 1e-3 for layer in (0, 1) for r in "qk")
        and pi["relation_layer1_v"] > 1e-3
    )
    assert abs(pi["relation_layer0_v"]) < 1e-6  # V is not rotated and layer 0 sees the same embeddings


@pytest.mark.parametrize("tau,top_k", [(1.0, None), (2.0, None), (1.0, 6)])
def test_logit_term_matches_direct_computation(cache_dir, teachers, tau, top_k):
    teacher = teachers["llama"]
    student = _student(cache_dir, perturb=0.05)
    batch = _batch(seed=3)
    out = _obj(rel=0.0, logits=0.7, tau=tau, top_k=top_k)(teacher, student, batch)
    with torch.no_grad():
        s = student(**batch).logits.double() / tau
        t = teacher(**batch).logits.double() / tau
    per = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1) * tau * tau
    mask = batch["attention_mask"].bool()
    if top_k is None:
        ref = per[mask].mean().item()
    else:
        ref = per.masked_fill(~mask, float("-inf")).topk(top_k, -1).values.mean().item()
    assert out.metrics["logit_kl"] == pytest.approx(ref, rel=1e-4)
    assert out.metrics["loss"] == pytest.approx(0.7 * ref, rel=1e-4)
    assert "relation" not in out.metrics


def _ref_nt(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits.double()
    ids, m = batch["input_ids"], batch["attention_mask"].bool()
    valid = m[:, :-1] & m[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (nll.view(valid.shape) * valid).sum().item() / valid.sum().item()


def test_next_token_term_on_batch_and_on_its_own_stream(cache_dir, teachers):
    teacher = teachers["llama"]
    student = _student(cache_dir, perturb=0.05)
    batch, lm = _batch(seed=4), _batch(T=56, seed=5, B=3)
    out = _obj(rel=1.0, nt=0.3)(teacher, student, batch)
    ref = _ref_nt(student, batch)
    assert out.metrics["next_token"] == pytest.approx(ref, rel=1e-5)
    assert out.metrics["loss"] == pytest.approx(out.metrics["relation"] + 0.3 * ref, rel=1e-5)
    out2 = _obj(rel=1.0, nt=0.3)(teacher, student, batch, lm_batch=lm)
    assert out2.metrics["next_token"] == pytest.approx(_ref_nt(student, lm), rel=1e-5)
    assert out2.metrics["relation"] == pytest.approx(out.metrics["relation"], rel=1e-6)
    # own stream, a step between data.lm_every draws: the term is left out, not moved onto `batch`
    own = _obj(rel=1.0, nt=0.3)
    own.own_lm_stream = True
    off = own(teacher, student, batch)
    assert "next_token" not in off.metrics
    assert off.metrics["loss"] == pytest.approx(out.metrics["relation"], rel=1e-6)
    on = own(teacher, student, batch, lm_batch=lm)
    assert on.metrics["next_token"] == pytest.approx(out2.metrics["next_token"], rel=1e-6)


@pytest.mark.parametrize("lora", [True, False])
def test_gradients_only_on_trainable_qkv(cache_dir, teachers, lora):
    student = _student(cache_dir, lora=LoraConfig(r=4, enabled=lora), perturb=0.05 if lora else 0.0)
    out = _obj(rel=1.0, logits=1.0, nt=1.0)(teachers["llama"], student, _batch(seed=6))
    out.loss.backward()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    if lora:
        assert len(trainable) == 2 * 3 * 2 and all(".lora_" in n for n in trainable)
        assert all(student.get_parameter(n).grad.abs().sum() > 0 for n in trainable if "lora_B" in n)
    else:
        assert sorted(trainable) == sorted(
            f"model.layers.{layer}.self_attn.{p}_proj.weight" for layer in (0, 1) for p in "qkv"
        )
        assert all(student.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    assert all(p.grad is None for p in teachers["llama"].parameters())


def test_yarn_attention_factor_is_divided_out(cache_dir, teachers):
    # Two YaRN students that differ only in the cos/sin multiplier m: their layer-0 Q/Q and K/K
    # relations differ only by m² in the logits. 'divide' removes it, 'keep' does not.
    teacher = teachers["llama"]
    batch = _batch(seed=7)
    res = {}
    for m in (1.0, 1.7):
        rope = RopeConfig(type="yarn", factor=4.0, attention_factor=m)
        student = _student(cache_dir, rope=rope)
        for corr in ("divide", "keep"):
            res[m, corr] = _obj(layers="first:1", corr=corr, rope=rope)(teacher, student, batch).metrics
        if m == 1.7:  # 'divide' equals the direct computation with the student scale α/m²
            sc, tc = _captures(student, batch), _captures(teacher, batch)
            a = teacher.config.head_dim**-0.5
            n = batch["attention_mask"].sum().item()
            ref = _ref_self_kl(sc.q[0], tc.q[0], batch["attention_mask"], a / m**2, a).item() / (4 * n)
            assert res[m, "divide"]["relation_layer0_q"] == pytest.approx(ref, rel=1e-4)
    for r in "qk":
        assert res[1.0, "divide"][f"relation_{r}"] == pytest.approx(res[1.7, "divide"][f"relation_{r}"], rel=1e-4)
        assert res[1.7, "keep"][f"relation_{r}"] > 1.5 * res[1.7, "divide"][f"relation_{r}"]
        assert res[1.0, "keep"][f"relation_{r}"] == pytest.approx(res[1.0, "divide"][f"relation_{r}"], rel=1e-6)
    assert res[1.7, "keep"]["relation_v"] == pytest.approx(res[1.7, "divide"]["relation_v"], rel=1e-6)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.args = fn, 0, []

    def __call__(self, *a, **kw):
        self.calls += 1
        self.args.append((a, kw))
        return self.fn(*a, **kw)


def _count_forwards(model):
    n = {"calls": 0}
    h = model.model.register_forward_pre_hook(lambda *_: n.__setitem__("calls", n["calls"] + 1))
    return n, h


def test_weight_zero_skips_work(cache_dir, teachers, monkeypatch):
    teacher = teachers["llama"]
    student = _student(cache_dir)
    batch = _batch(seed=8)
    cap = _Counter(loss_mod.capture_qkv)
    lkl = _Counter(loss_mod.chunked_logit_kl)
    ce = _Counter(loss_mod.chunked_cross_entropy)
    layer_op = _Counter(loss_mod.ops.relation_kl_layer)
    rel_op = _Counter(loss_mod.ops.relation_kl)
    monkeypatch.setattr(loss_mod, "capture_qkv", cap)
    monkeypatch.setattr(loss_mod, "chunked_logit_kl", lkl)
    monkeypatch.setattr(loss_mod, "chunked_cross_entropy", ce)
    monkeypatch.setattr(loss_mod.ops, "relation_kl_layer", layer_op)
    monkeypatch.setattr(loss_mod.ops, "relation_kl", rel_op)
    tf, h = _count_forwards(teacher)
    try:

        def reset():
            for c in (cap, lkl, ce, layer_op, rel_op):
                c.calls, c.args = 0, []
            tf["calls"] = 0

        # CPT: no teacher at all (None is accepted), no capture, no KL
        reset()
        out = _obj(rel=0.0, nt=1.0)(None, student, batch)
        assert set(out.metrics) == {"loss", "next_token"}
        assert (cap.calls, lkl.calls, layer_op.calls, rel_op.calls, ce.calls) == (0, 0, 0, 0, 1)
        out = _obj(rel=0.0, nt=1.0)(teacher, student, batch)
        assert tf["calls"] == 0
        # relation only: one teacher forward, no logit KL, no CE
        reset()
        out = _obj()(teacher, student, batch)
        assert tf["calls"] == 1 and cap.calls == 2 and lkl.calls == 0 and ce.calls == 0 and layer_op.calls == 2
        assert "logit_kl" not in out.metrics and "next_token" not in out.metrics
        # logit only: teacher runs without capture
        reset()
        _obj(rel=0.0, logits=1.0)(teacher, student, batch)
        assert tf["calls"] == 1 and cap.calls == 0 and lkl.calls == 1 and layer_op.calls == 0
        # only Q/Q weighted: only q captured and computed
        reset()
        out = _obj(weights={"q": 1.0, "k": 0.0, "v": 0.0})(teacher, student, batch)
        assert [a[1].get("what", a[0][2] if len(a[0]) > 2 else None) for a in cap.args] == [("q",), ("q",)]
        assert layer_op.calls == 0 and rel_op.calls == 2
        assert "relation_k" not in out.metrics and "relation_q" in out.metrics
    finally:
        h.remove()


def test_errors(cache_dir, teachers):
    with pytest.raises(ValueError, match="per-relation weight"):
        _obj(weights={"q": 0.0, "k": 0.0, "v": 0.0})
    with pytest.raises(ValueError, match="needs a teacher"):
        _obj()(None, teachers["llama"], _batch())
    with pytest.raises(ValueError, match="must both be"):
        _obj()(teachers["llama"], teachers["llama"], {"input_ids": torch.zeros(3, dtype=torch.long)})


def test_a_few_steps_reduce_the_relation_loss(cache_dir, teachers):
    # The gradients the objective produces are descent directions: LoRA on q/k/v pulls a PI×4
    # student's relations and logits toward the teacher's on the batch it trains on.
    teacher = teachers["llama"]
    student = _student(cache_dir, lora=LoraConfig(r=8, alpha=16))
    obj = _obj(rel=1.0, logits=0.5)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(T=48, seed=100)
    hist = []
    for _ in range(15):
        out = obj(teacher, student, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        hist.append(out.metrics)
    assert hist[-1]["relation"] < 0.6 * hist[0]["relation"]
    assert hist[-1]["logit_kl"] < hist[0]["logit_kl"]
    assert all(b["loss"] < a["loss"] for a, b in zip(hist, hist[1:], strict=False))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_overlap_starts_each_layer_during_the_forward_with_the_same_loss_and_gradients(
    cache_dir, teachers, monkeypatch, checkpointing
):
    """relation.overlap queues a layer's relations as soon as its q/k/v exist (on GPU on a second
    stream); the loss, every metric and every gradient are exactly those of the loss computed after
    the forward, also inside non-reentrant checkpointed layers, whose saved-tensor hooks must not
    take over the relation op's saved tensors."""
    from linearard_ray.models.loading import enable_checkpointing

    batch = _batch(seed=11)
    events: list[str] = []
    orig = loss_mod.ops.relation_kl_layer

    def spy(*args, **kw):
        events.append("relation")
        return orig(*args, **kw)

    monkeypatch.setattr(loss_mod.ops, "relation_kl_layer", spy)
    results = {}
    for overlap in (False, True):
        student = _student(cache_dir, perturb=0.05, seed=4)
        if checkpointing:
            enable_checkpointing(student)
        student.train()
        last = student.get_base_model().model.layers[-1]
        hook = last.register_forward_hook(lambda *_: events.append("last layer done"))
        obj = _obj(overlap=overlap)
        events.clear()
        out = obj(teachers["llama"], student, batch)
        out.loss.backward()
        hook.remove()
        order = list(events)
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results[overlap] = (out, grads, order)
    (off, g_off, order_off), (on, g_on, order_on) = results[False], results[True]
    assert order_off == ["last layer done", "relation", "relation"]
    assert order_on == ["relation", "relation", "last layer done"]
    assert off.loss > 0 and torch.equal(off.loss.detach(), on.loss.detach())
    assert off.metrics == on.metrics
    assert g_off.keys() == g_on.keys() and any(g.abs().max() > 0 for g in g_off.values())
    for n in g_off:
        assert torch.equal(g_off[n], g_on[n]), n


def test_relation_backward_setting_reaches_the_triton_op_and_keeps_loss_and_gradients(cache_dir, teachers, monkeypatch):
    """objective.relation.backward: the op runs its forwards in that mode (read at forward time) and
    the process-wide mode is back afterwards; 'auto' leaves the process-wide mode in charge. The
    rowfwd and sweep backwards agree (Triton; in CI under the interpreter)."""
    rk = pytest.importorskip("linearard_ray.ops.relation_kl_triton")
    seen: list = []
    orig = loss_mod.ops.relation_kl_layer

    def spy(*args, **kw):
        seen.append(rk.current_backward_mode())
        return orig(*args, **kw)

    monkeypatch.setattr(loss_mod.ops, "relation_kl_layer", spy)
    batch = _batch(T=24, seed=13)
    out = {}
    for mode in ("sweep", "rowfwd"):
        student = _student(cache_dir, perturb=0.05, seed=2)
        obj = _obj(backward=mode, backend="triton")
        seen.clear()
        res = obj(teachers["llama"], student, batch)
        res.loss.backward()
        assert seen == [mode, mode] and rk.current_backward_mode() is None
        out[mode] = (res.loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.requires_grad})
    (l_sw, g_sw), (l_rf, g_rf) = out["sweep"], out["rowfwd"]
    assert l_sw > 0 and torch.allclose(l_sw, l_rf, rtol=1e-5)
    for n in g_sw:
        assert torch.allclose(g_sw[n], g_rf[n], rtol=1e-4, atol=1e-5 * float(g_sw[n].abs().max())), n
    rk.set_backward_mode("rowfwd")
    try:
        seen.clear()
        _obj()(teachers["llama"], _student(cache_dir), batch)
        assert seen == ["rowfwd", "rowfwd"]  # auto: the process-wide mode
    finally:
        rk.set_backward_mode(None)
