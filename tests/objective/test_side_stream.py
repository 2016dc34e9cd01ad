"""objective.relation.overlap on a GPU: each layer's relations run on the second CUDA stream, and
the loss and every gradient are bit-identical to the relations computed on the main stream after
the forward (same kernels, same inputs; the stream rules of linearard_ray.objective.side_stream hold)."""

import pytest
import torch

import linearard_ray.objective.loss as loss_mod
from linearard_ray.config import LoraConfig, ModelConfig, ObjectiveConfig, RopeConfig
from linearard_ray.models.loading import load_student, load_teacher
from linearard_ray.objective.loss import Objective
from linearard_ray.objective.side_stream import SideStream


def test_side_stream_off_cuda_runs_the_work_in_place():
    side = SideStream(torch.device("cpu"))
    x = torch.randn(5, requires_grad=True)
    with side.run([x]):
        y = (x * x).sum()
    side.join([y])
    assert not side.enabled and side.stream is None
    y.backward()
    assert torch.equal(x.grad, 2 * x.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_overlap_runs_the_relations_on_the_side_stream_with_identical_results(cache_dir, monkeypatch, checkpointing):
    from linearard_ray.models.loading import enable_checkpointing

    dev = torch.device("cuda")
    mc = ModelConfig(teacher="tiny:llama", cache_dir=str(cache_dir))
    teacher = load_teacher(mc, device=dev)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 512, (2, 192), generator=g).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streams = []
    orig = loss_mod.ops.relation_kl_layer

    def spy(*args, **kw):
        streams.append(torch.cuda.current_stream().cuda_stream)
        return orig(*args, **kw)

    monkeypatch.setattr(loss_mod.ops, "relation_kl_layer", spy)
    results = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        student = load_student(mc, RopeConfig(type="linear", factor=4.0), LoraConfig(r=4), device=dev)
        with torch.no_grad():
            for n, p in student.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        if checkpointing:
            enable_checkpointing(student)
        student.train()
        cfg = ObjectiveConfig(name="linearard", relation={"overlap": overlap})
        obj = Objective(cfg, RopeConfig(type="linear", factor=4.0), num_layers=2, backend="triton")
        streams.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = obj(teacher, student, batch)
        out.loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results[overlap] = (out, grads, list(streams))
    (off, g_off, s_off), (on, g_on, s_on) = results[False], results[True]
    main = torch.cuda.current_stream().cuda_stream
    assert s_off == [main, main] and len(s_on) == 2 and main not in s_on
    assert off.loss > 0 and torch.equal(off.loss.detach(), on.loss.detach()) and off.metrics == on.metrics
    assert any(g.abs().max() > 0 for g in g_off.values())
    for n in g_off:
        assert torch.equal(g_off[n], g_on[n]), n
