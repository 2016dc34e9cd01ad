"""train.parallelism=fsdp end to end on a local Ray cluster: 2 gloo workers shard a tiny Llama
teacher and student with FSDP2 through run_distill (the pipeline's code path).

The sharded run must train like a DDP run on the same data and seed (its last step's numbers
and the exported student); an injected worker failure must resume to the same weights; and a run
stopped after its step-2 checkpoint must resume on 1 worker with twice the gradient accumulation
(and a 1-worker run on 2 workers) to the weights of the uninterrupted 2-worker run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import small_corpus
from tests.training.test_e2e import _cfg as e2e_cfg

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs=4, chars=2000)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


def _cfg(workdir: Path, corpus: Path, run_name: str, **over):
    """The end-to-end tests' tiny job, sharded: one block per worker and step, the torch op."""
    fsdp = {
        "train.parallelism": "fsdp",
        "objective.logits.weight": 0.5,  # the logit KL on sharded modules too
        "train.max_steps": STEPS,
        "train.micro_batch_size": 1,
        "train.grad_accum": 1,
        "train.op_backend": "torch",
        # 3 held-out windows over 2 workers: the sharded forwards of an uneven split must not hang
        "train.eval_every": 2,
        "train.eval_texts": 3,
        "train.eval_long_len": None,
        "tracking.enabled": False,
    }
    return e2e_cfg(workdir, corpus, run_name, **{**fsdp, **over})


def _exported(res) -> dict[str, torch.Tensor]:
    """The exported student: the merged weights and the adapter's."""
    from safetensors.torch import load_file

    merged = Path(res.student_dir)
    out = {f"merged.{k}": v for k, v in load_file(merged / "model.safetensors").items()}
    adapter = load_file(merged.parent / "adapter" / "adapter_model.safetensors")
    out.update({f"adapter.{k}": v for k, v in adapter.items()})
    return out


def _assert_same_student(a, b, exact: bool = False) -> None:
    wa, wb = _exported(a), _exported(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def sharded(ray_cluster, tiny_model_dir, workdir, corpus):
    from linearard_ray.training.driver import run_distill

    tiny_model_dir("llama")
    return run_distill(_cfg(workdir, corpus, "fsdp"))


def test_sharded_run_trains_like_ddp_and_exports_the_same_student(sharded, workdir, corpus):
    from linearard_ray.training.checkpointing import DCP_METADATA, MANIFEST_FILE, load_checkpoint
    from linearard_ray.training.driver import run_distill

    ddp = run_distill(_cfg(workdir, corpus, "ddp", **{"train.parallelism": "ddp"}))
    assert sharded.final_step == ddp.final_step == STEPS and sharded.tokens_seen == ddp.tokens_seen
    for k in ("loss", "relation_q", "relation_k", "relation_v", "logit_kl", "grad_norm", "student_nll", "nll_gap"):
        assert sharded.metrics[k] == pytest.approx(ddp.metrics[k], rel=1e-4, abs=1e-6), k
    _assert_same_student(sharded, ddp)
    # both workers' DCP shards in the checkpoint, listed in its manifest with rank 0's files
    ckpt = Path(sharded.checkpoint_path)
    listed = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert {DCP_METADATA, "__0_0.distcp", "__1_0.distcp", "state.json", "rng.pt"} <= set(listed)
    loaded = load_checkpoint(ckpt)
    assert loaded.state.step == STEPS and len(loaded.rng_states) == 2 and loaded.dcp_dir is not None


def test_injected_worker_failure_resumes_to_the_same_weights(sharded, workdir, corpus):
    from linearard_ray.training.driver import run_distill

    res = run_distill(_cfg(workdir, corpus, "fsdp-fail", **{"train.fail_at_step": 3}))
    assert (Path(res.storage_dir) / "linearard_fail_at_step.fired").exists()
    assert res.final_step == STEPS and res.tokens_seen == sharded.tokens_seen
    assert _checkpoints(res) == {"checkpoint_step0000002": 2, "checkpoint_step0000004": 2}  # resumed, not redone
    _assert_same_student(sharded, res, exact=True)


@pytest.mark.parametrize(("first", "then"), [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["2to1", "1to2"])
def test_resume_on_another_worker_count_with_the_same_global_batch(sharded, workdir, corpus, first, then):
    """Stopped after step 3 (the step-2 checkpoint stands), started again with the same run name
    on the other worker count, grad_accum keeping 2 blocks per step."""
    from linearard_ray.training.driver import run_distill

    name = f"reshard-{first[0]}to{then[0]}"
    stop = {"train.fail_at_step": 3, "train.max_failures": 0}
    with pytest.raises(Exception, match="fail_at_step"):
        run_distill(_cfg(workdir, corpus, name, **stop, **_shape(*first)))
    res = run_distill(_cfg(workdir, corpus, name, **stop, **_shape(*then)))
    assert res.final_step == STEPS and res.tokens_seen == sharded.tokens_seen
    # resumed from the first run's step 2 (a fresh start would have written step 2 again, beside it)
    assert _checkpoints(res) == {"checkpoint_step0000002": first[0], "checkpoint_step0000004": then[0]}
    _assert_same_student(sharded, res)


def _checkpoints(res) -> dict[str, int]:
    """The run's checkpoint directories and how many workers wrote each."""
    from linearard_ray.training.checkpointing import read_state

    return {p.name: read_state(p).world_size for p in Path(res.storage_dir).glob("checkpoint_step*")}


def _shape(workers: int, accum: int) -> dict:
    return {"train.num_workers": workers, "train.grad_accum": accum}
