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


RESTORE_LONG = str(ROOT / "configs" / "smollm2-135m-x4-restore-long.yaml")


def test_objective_config_times_the_recipes_step():
    """--objective-config takes a recipe's objective: its relation weights (Q/Q, K/K at 0.1, V/V, the
    attention map), logit KL and next-token terms all run in the timed step."""
    import math

    b = _bench()
    a = b.parse(["--tiny", "--objective-config", RESTORE_LONG])
    o = b.objective_config(a)
    assert o.relation.weights == {"q": 0.1, "k": 0.1, "v": 1.0, "qk": 1.0}
    assert (o.logits.weight, o.next_token.weight) == (1.0, 2.2)
    res, cross = _run_counting_relation_kl(b, a)
    assert cross.count(True) == a.layers  # the attention map: one cross-relation call per layer
    assert res["objective"]["next_token"] == 2.2 and res["objective"]["logits"] == 1.0
    # the next-token CE of a random model is about ln(V), weighted 2.2: it is in the loss
    assert res["loss"] > 2.2 * 0.5 * math.log(a.vocab)
    for bad in (["--relation-weights", "v=1"], ["--relation-qk", "1"]):
        with pytest.raises(SystemExit):
            b.parse(["--tiny", "--objective-config", RESTORE_LONG, *bad])
    with pytest.raises(SystemExit):
        b.parse(["--tiny", "--objective-config", str(ROOT / "configs" / "no-such.yaml")])


def _ddp_and_fsdp(*flags: str) -> list[dict]:
    b = _bench()
    a = b.parse(["--tiny", "--parallelism", "ddp,fsdp", *flags])
    a.seq, a.native, a.steps, a.warmup = 32, 32, 1, 0
    return b.run(a)["variants"]


def test_fsdp_on_one_process_computes_the_ddp_step():
    """--parallelism ddp,fsdp: the FSDP2 arm (training.fsdp.shard_models on a one-process gloo
    group) gives the same loss as the plain step on the same weights and batches."""
    res = _ddp_and_fsdp("--objective-config", RESTORE_LONG)
    assert [(r["parallelism"], r["workers"]) for r in res] == [("ddp", 1), ("fsdp", 1)]
    assert res[0]["loss"] > 0 and res[1]["loss"] == pytest.approx(res[0]["loss"], rel=1e-5)
    assert all(r["predicted_peak_gb"] > 0 and r["tokens_per_s"] > 0 for r in res)
    b = _bench()
    for bad in (["--parallelism", "zero3"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            b.parse(["--tiny", *bad])


def test_fsdp_step_with_relation_terms_only():
    """The relations-only objective (objective.name linearard) under FSDP2: no gradient would reach
    the last decoder layer's output, only its captured q/k/v, so FSDP2's pre-backward unshard
    (hooked on layer outputs) would not run before that layer's backward ("mixed torch.Tensor and
    DTensor" in the checkpoint recompute; a storage of size 0 without checkpointing). The sharded
    objective anchors the decoder's output with a zero, and the step matches the plain one."""
    res = _ddp_and_fsdp()
    assert res[1]["loss"] == pytest.approx(res[0]["loss"], rel=1e-5)


def test_memory_prediction_is_the_memory_models_for_the_7b_step():
    """The bench hands the memory model its own shape and objective: on a GPU the 7B step's
    prediction is the calibrated one (benchmarks/README.md: 49.1 / 55.1 / 43.0 GiB measured)."""
    b = _bench()
    a = b.parse([])
    cuda = torch.device("cuda", 0)  # only the device type is read; nothing runs on it
    got = {
        v: b.predicted_peak_gib(a, v, "ddp", 1, cuda)
        for v in (("op", "auto", "on"), ("op", "rowfwd", "on"), ("null", "auto", "on"))
    }
    assert abs(got[("op", "auto", "on")] - 49.1) < 0.3 and abs(got[("op", "rowfwd", "on")] - 55.1) < 0.3
    assert abs(got[("null", "auto", "on")] - 43.0) < 0.3
    assert b.predicted_peak_gib(a, ("attn-cudnn", "auto", "on"), "ddp", 1, cuda) is None
    fsdp = b.predicted_peak_gib(a, ("op", "auto", "on"), "fsdp", 4, cuda)
    assert fsdp < got[("op", "auto", "on")] - 15  # weights and state divided by 4


@pytest.mark.slow
def test_two_spawned_workers_under_ddp_and_fsdp(tmp_path):
    """--workers 2 spawns two gloo processes per parallelism; DDP and FSDP2 give the same loss."""
    import json
    import subprocess
    import sys

    out = tmp_path / "res.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_distill_step.py"), "--tiny", "--workers", "2"]
    cmd += ["--parallelism", "ddp,fsdp", "--objective-config", RESTORE_LONG, "--steps", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp, fsdp = json.loads(out.read_text())["variants"]
    assert (ddp["parallelism"], fsdp["parallelism"], ddp["workers"], fsdp["workers"]) == ("ddp", "fsdp", 2, 2)
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-5) and ddp["loss"] > 0
