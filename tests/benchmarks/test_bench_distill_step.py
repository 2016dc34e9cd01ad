"""benchmarks/bench_distill_step.py on a tiny CPU shape: it runs, and its timing instrumentation
around the relation ops leaves the loss and the gradients exactly as they are."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import ROOT, load_script


def _bench():
    return load_script("benchmarks/bench_distill_step.py")


def test_instrumentation_does_not_change_loss_or_gradients():
    from linearard_ray.config import ObjectiveConfig
    from linearard_ray.objective.loss import Objective

    b = _bench()
    a = b.parse(["--tiny"])
    a.seq, a.native = 48, 48
    teacher, student, rope = b.build_models(a, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # LoRA B starts at 0; give the adapters a real effect
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    obj = Objective(ObjectiveConfig(name="linearard"), rope, a.layers, "torch")
    ids = torch.randint(0, a.vocab, (2, a.seq), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = [p for p in student.parameters() if p.requires_grad]

    def loss_and_grads():
        for p in params:
            p.grad = None
        out = obj(teacher, student, batch)
        out.loss.backward()
        return out.loss.detach().clone(), [p.grad.clone() for p in params]

    plain_loss, plain_grads = loss_and_grads()
    clock = b._Clock(torch.device("cpu"))
    restore = b.instrument_relation_ops(clock)
    try:
        timed_loss, timed_grads = loss_and_grads()
    finally:
        restore()
    assert plain_loss > 0 and torch.equal(plain_loss, timed_loss)
    assert any(g.abs().max() > 0 for g in plain_grads)
    for g0, g1 in zip(plain_grads, timed_grads, strict=False):
        assert torch.equal(g0, g1)
    kinds = [k for k, _, _ in clock.spans]
    assert kinds.count("fwd") == a.layers and kinds.count("bwd") == a.layers  # one fused call per layer
    assert 0 < clock.total_ms("fwd") <= clock.total_ms()


def test_tiny_run_reports_the_figures():
    b = _bench()
    a = b.parse(["--tiny"])
    a.seq, a.native, a.steps, a.warmup = 32, 32, 1, 0
    res = b.run(a)
    assert res["steps_timed"] == 1 and res["device"] == "cpu"
    assert res["tokens_per_s"] > 0 and 0 < res["relation_loss_ms"] < res["step_ms"]
    assert 0 < res["relation_loss_share"] < 1
    assert res["shape"]["layers"] == 2 and res["shape"]["seq"] == 32


def _run_counting_relation_kl(b, a) -> tuple[dict, list[bool]]:
    """One tiny timed step of `a`, and for each `ops.relation_kl` call whether it was a cross-relation."""
    a.seq, a.native, a.steps, a.warmup = 32, 32, 1, 0
    cross = []
    orig = b.ops.relation_kl

    def spy(*args, **kw):
        cross.append(args[1] is not None)
        return orig(*args, **kw)

    b.ops.relation_kl = spy
    try:
        return b.run(a), cross
    finally:
        b.ops.relation_kl = orig


def test_attention_map_term_is_timed_with_the_relations():
    """--relation-qk adds the attention-map call per layer; the clock counts it in the relation loss."""
    b = _bench()
    a = b.parse(["--tiny", "--relation-qk", "1.0"])
    assert b.objective_config(a).relation.weights == {"q": 1.0, "k": 1.0, "v": 1.0, "qk": 1.0}
    assert "qk" not in b.objective_config(b.parse(["--tiny"])).relation.weights
    res, cross = _run_counting_relation_kl(b, a)
    assert cross == [True] * (a.layers * (a.steps + a.warmup))  # the student's keys are given
    assert res["relation_qk"] == 1.0 and 0 < res["relation_loss_share"] < 1


def test_relation_weights_switch_relations_off_and_bad_ones_fail_at_parse():
    """--relation-weights q=0,k=0 times the step with V/V alone: one op call per layer and step."""
    b = _bench()
    a = b.parse(["--tiny", "--relation-weights", "q=0,k=0"])
    assert b.objective_config(a).relation.weights == {"q": 0.0, "k": 0.0, "v": 1.0}
    res, cross = _run_counting_relation_kl(b, a)
    assert cross == [False] * (a.layers * (a.steps + a.warmup))  # self-relations, no separate keys
    assert res["relation_weights"] == {"q": 0.0, "k": 0.0} and res["loss"] > 0
    for bad in ("x=1", "q", "v=high", "k=-1"):
        with pytest.raises(SystemExit):
            b.parse(["--tiny", "--relation-weights", bad])


def test_variants_are_timed_in_turn_and_the_op_is_charged_against_the_null_relation():
    b = _bench()
    a = b.parse(["--tiny", "--relation-impl", "op,null", "--overlap", "off,on"])
    a.seq, a.native, a.steps, a.warmup = 32, 32, 1, 0
    res = b.run(a)["variants"]
    assert [(r["relation_impl"], r["overlap"]) for r in res] == [
        ("op", False),
        ("op", True),
        ("null", False),
        ("null", True),
    ]
    nulls = {r["overlap"]: r for r in res if r["relation_impl"] == "null"}
    for r in res:
        if r["relation_impl"] == "op":
            assert r["loss"] > 0 and r["relation_loss_ms"] > 0
            assert r["added_ms"] == r["step_ms"] - nulls[r["overlap"]]["step_ms"]
        else:
            assert r["loss"] == 0 and r["relation_loss_ms"] == 0 and "added_ms" not in r
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    undo = b.install_null_relation()
    try:
        kl = b.ops.relation_kl(x, None, x.detach(), None)
    finally:
        undo()
    kl.backward()
    # zero loss, but real (fixed, random) gradients: zeros would let the GEMMs behind them run cooler
    assert kl.item() == 0 and x.grad.shape == x.shape and torch.count_nonzero(x.grad) == x.numel()
    assert 0 < x.grad.abs().max() < 0.1
    with pytest.raises(SystemExit):
        b.parse(["--tiny", "--relation-impl", "op,nope"])


def test_attention_proxy_gives_attentions_own_gradient():
    """attn-cudnn / attn-flash put causal SDPA fwd+bwd of each student tensor in the op's place; on
    CPU (math backend) the gradient it returns is attention's dX for its fixed output grads."""
    b = _bench()
    undo = b.install_attention_proxy("cudnn")
    try:
        xs = [
            torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(i)).requires_grad_(True) for i in range(3)
        ]
        kls = b.ops.relation_kl_layer(*xs, *(x.detach() for x in xs))
        assert len(kls) == 3 and all(float(k) == 0.0 for k in kls)
        sum(kls).backward()
    finally:
        undo()
    assert b.ops.relation_kl_layer.__name__ != "layer"  # routed back
    for x in xs:
        ref = x.detach().clone().requires_grad_(True)
        out = torch.nn.functional.scaled_dot_product_attention(ref, ref, ref, is_causal=True)
        (dx,) = torch.autograd.grad(out, ref, b._null_grad(out.shape, out.dtype, out.device))
        assert dx.abs().max() > 0
        torch.testing.assert_close(x.grad, dx)


def test_tiny_run_with_the_attention_proxy():
    b = _bench()
    a = b.parse(["--tiny", "--relation-impl", "attn-flash,null", "--overlap", "off"])
    a.seq, a.native, a.steps, a.warmup = 32, 32, 1, 0
    out = b.run(a)
    proxy = next(r for r in out["variants"] if r["relation_impl"] == "attn-flash")
    assert proxy["step_ms"] > 0 and "added_ms" in proxy and proxy["loss"] == 0.0


def test_product_benchmarks_do_not_reach_into_research():
    """The experimental Gluon kernels keep their own --bench in research/experimental/; the product
    benchmarks neither offer them nor load anything from research/."""
    b = load_script("benchmarks/bench_distill_step.py")
    with pytest.raises(SystemExit):
        b.parse(["--tiny", "--relation-impl", "gluon-experimental"])
    assert not any(i.startswith("gluon") for i in b.IMPLS)
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        assert "experimental" not in path.read_text().replace("triton.experimental", ""), path.name
