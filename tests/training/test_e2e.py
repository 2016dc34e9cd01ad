"""End to end on a local Ray cluster: 2 gloo workers distil a tiny Llama.

One uninterrupted run is the reference; a run with an injected worker failure and a job that
dies and is started again under the same run name must end with the same trainable weights, the
same step and the same token count, in one MLflow run each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.conftest import small_corpus

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few SOTU openings as a small jsonl corpus (a few hundred tiny-tokenizer blocks)."""
    return small_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs=6, chars=3000)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _cfg(workdir: Path, corpus: Path, run_name: str, **over):
    from linearard_ray.config import build_config

    base = {
        "model": {"teacher": "tiny:llama"},
        "rope": {"type": "linear", "factor": 4.0},
        "lora": {"r": 4, "alpha": 8.0},
        "data": {"sources": [str(corpus)], "ctx_len": 64, "output_dir": str(workdir / "data")},
        "train": {
            "run_name": run_name,
            "storage_path": str(workdir / "ray"),
            "output_dir": str(workdir / "students"),
            "num_workers": 2,
            "cpus_per_worker": 1,
            "max_steps": STEPS,
            "checkpoint_every": 2,
            "keep_checkpoints": 2,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "warmup_steps": 1,
            "eval_every": 3,
            "eval_texts": 2,
            "eval_long_len": 256,
            "max_failures": 1,
            "seed": 0,
        },
        "tracking": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "e2e"},
    }
    return build_config(base, over)


def _final_trainable(res) -> dict[str, torch.Tensor]:
    """The trainable tensors of the run's last checkpoint."""
    from linearard_ray.training.checkpointing import load_checkpoint

    return load_checkpoint(res.checkpoint_path).trainable


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_model_dir, workdir, corpus):
    from linearard_ray.training.driver import run_distill

    tiny_model_dir("llama")
    # a second held-out domain, never trained on, measured at the same evaluations
    cfg = _cfg(
        workdir,
        corpus,
        "ref",
        **{"train.eval_sources": {"pydocs": ["builtin:pydocs/tutorial"]}, "tracking.system_metrics_interval_s": 1.0},
    )
    return cfg, run_distill(cfg)


def _runs_named(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`linearard.run_name` = '{name}'")


def test_two_workers_end_to_end_with_mlflow(reference, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg, res = reference
    assert res.final_step == STEPS
    assert res.tokens_seen > 0 and res.tokens_seen <= STEPS * 2 * 2 * 2 * 64
    for k in ("nll_gap", "student_nll", "teacher_nll", "long_nll", "loss", "relation_q"):
        assert k in res.metrics
    assert res.metrics["nll_gap"] == pytest.approx(res.metrics["student_nll"] - res.metrics["teacher_nll"])

    client, runs = _runs_named(cfg.tracking.resolved_uri(), "ref")
    assert len(runs) == 1 and runs[0].info.run_id == res.mlflow_run_id
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.lr"] == "0.01" and p["model.teacher"] == "tiny:llama" and p["rope.factor"] == "4.0"
    assert p["lora.r"] == "4" and p["job.total_steps"] == str(STEPS) and p["job.world_size"] == "2"
    for name in ("loss", "relation_q", "relation_k", "relation_v", "lr", "grad_norm", "tokens_per_s", "tokens_seen"):
        hist = client.get_metric_history(res.mlflow_run_id, name)
        assert sorted(h.step for h in hist) == list(range(1, STEPS + 1)), name
    lr = {h.step: h.value for h in client.get_metric_history(res.mlflow_run_id, "lr")}
    assert lr[1] == pytest.approx(0.01) and lr[STEPS] == pytest.approx(0.001)  # warmup 1, cosine to 0.1×
    tokens = sorted(client.get_metric_history(res.mlflow_run_id, "tokens_seen"), key=lambda h: h.step)
    assert tokens[-1].value == res.tokens_seen
    for name in ("nll_gap", "student_nll", "teacher_nll", "long_nll"):
        assert sorted(h.step for h in client.get_metric_history(res.mlflow_run_id, name)) == [3, 6]
    # train.eval_sources: the same metrics per domain, logged and reported under eval_<name>_
    hist = {
        m: {h.step: h.value for h in client.get_metric_history(res.mlflow_run_id, f"eval_pydocs_{m}")}
        for m in ("student_nll", "teacher_nll", "nll_gap", "recovery_pct", "long_nll")
    }
    for m, h in hist.items():
        assert sorted(h) == [3, 6] and all(math.isfinite(v) for v in h.values()), m
        assert res.metrics[f"eval_pydocs_{m}"] == pytest.approx(h[6]), m
    assert hist["teacher_nll"][3] == hist["teacher_nll"][6]  # measured once
    for step in (3, 6):
        assert hist["nll_gap"][step] == pytest.approx(hist["student_nll"][step] - hist["teacher_nll"][step])
        assert hist["recovery_pct"][step] == pytest.approx(100 * math.exp(-hist["nll_gap"][step]))
    assert hist["student_nll"][6] != pytest.approx(res.metrics["student_nll"])  # another text than SOTU

    # checkpoints at steps 2, 4, 6; CheckpointConfig(num_to_keep=2) keeps the last two
    kept = sorted(p.name for p in Path(res.storage_dir).glob("checkpoint_step*"))
    assert kept == ["checkpoint_step0000004", "checkpoint_step0000006"]

    root = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"config.yaml", "data", "student"} <= root and "adapter" not in root  # the adapter is exported once
    # the weights exist once, in the exported directory the registered version points at; the
    # run holds the small things: config, card, record
    student_files = {Path(a.path).name for a in client.list_artifacts(res.mlflow_run_id, "student")}
    assert student_files == {"config.json", "README.md", "linearard_student.json"}
    _check_registered_student(cfg, res)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "manifest.json" in {Path(a.path).name for a in client.list_artifacts(res.mlflow_run_id, "data/train")}
    assert (Path(res.student_dir).parent / "adapter" / "adapter_model.safetensors").exists()

    # the exported student loads with plain transformers and carries the student's RoPE
    model = AutoModelForCausalLM.from_pretrained(res.student_dir)
    rp = model.config.rope_parameters
    assert rp["rope_type"] == "linear" and rp["factor"] == 4.0
    # and holds the trained adapters merged in: its q_proj differs from the teacher's
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(model.state_dict()[key], teacher.state_dict()[key])
    assert torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"],
        teacher.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


def _check_registered_student(cfg, res) -> None:
    """The student is a version of the registered model named after the run, sourced from the
    exported directory, tagged with what tells students apart; its card says so."""
    from huggingface_hub import ModelCard
    from mlflow.tracking import MlflowClient

    from linearard_ray.models.card import read_student_record

    uri = cfg.tracking.resolved_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'ref'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.source == str(Path(res.student_dir).resolve()) and mv.run_id == res.mlflow_run_id
    assert mv.tags["rope_type"] == "linear" and mv.tags["rope_factor"] == "4.0"
    assert mv.tags["tokens_seen"] == str(res.tokens_seen) and mv.tags["recipe"] == "linearard"
    assert mv.tags["teacher"] == "tiny:llama" and mv.tags["dtype"] == "float32"  # the tiny teacher's dtype
    card = ModelCard.load(Path(res.student_dir) / "README.md")
    assert card.data.library_name == "transformers" and "linear" in card.data.tags
    mlflow = card.data.to_dict()["linearard"]["mlflow"]
    assert mlflow["run_id"] == res.mlflow_run_id and mlflow["version"] == str(mv.version)
    record = read_student_record(res.student_dir)
    assert record.tokens_seen == res.tokens_seen and record.data[0]["stream"] == "train"
    assert record.data[0]["tokens_in_blocks"] > 0


def test_worker_failure_resumes_to_the_same_weights(reference, workdir, corpus):
    from linearard_ray.training.driver import run_distill

    ref_cfg, ref = reference
    cfg = _cfg(workdir, corpus, "fail-once", **{"train.fail_at_step": 5, "train.eval_every": None})
    res = run_distill(cfg)
    assert res.final_step == STEPS and res.tokens_seen == ref.tokens_seen
    assert (Path(res.storage_dir) / "linearard_fail_at_step.fired").exists()
    a, b = _final_trainable(ref), _final_trainable(res)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    client, runs = _runs_named(cfg.tracking.resolved_uri(), "fail-once")
    assert len(runs) == 1
    assert runs[0].data.tags.get("resumed_from_step") == "4"
    steps = {h.step for h in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == set(range(1, STEPS + 1))


def test_job_started_again_with_the_same_name_resumes_exactly(reference, workdir, corpus):
    from linearard_ray.training.driver import run_distill

    _, ref = reference
    cfg = _cfg(
        workdir, corpus, "restart", **{"train.fail_at_step": 3, "train.max_failures": 0, "train.eval_every": None}
    )
    with pytest.raises(Exception, match="fail_at_step"):
        run_distill(cfg)
    client, runs = _runs_named(cfg.tracking.resolved_uri(), "restart")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    first_run_id = runs[0].info.run_id

    res = run_distill(cfg)  # the same job again: resumes from the step-2 checkpoint
    assert res.final_step == STEPS and res.tokens_seen == ref.tokens_seen
    assert res.mlflow_run_id == first_run_id
    _, runs = _runs_named(cfg.tracking.resolved_uri(), "restart")
    assert len(runs) == 1 and runs[0].data.tags.get("resumed_from_step") == "2"
    assert runs[0].info.status == "FINISHED"
    a, b = _final_trainable(ref), _final_trainable(res)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _params(uri, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).data.params


def test_cpt_recipe_trains_without_a_teacher_on_its_own_stream(ray_cluster, tiny_model_dir, workdir, corpus):
    """objective=cpt with data.lm_ctx_len: the next-token stream is the only one; no teacher."""
    from mlflow.tracking import MlflowClient

    from linearard_ray.training.driver import run_distill

    cfg = _cfg(
        workdir,
        corpus,
        "cpt",
        **{
            "objective.name": "cpt",
            "data.lm_ctx_len": 96,
            "train.num_workers": 1,
            "train.max_steps": 3,
            "train.eval_every": None,
            "train.grad_accum": 1,
            "train.lr": 3e-2,
        },
    )
    res = run_distill(cfg)
    assert res.final_step == 3
    p = _params(cfg.tracking.resolved_uri(), res.mlflow_run_id)
    assert p["job.teacher_loaded"] == "False" and p["job.primary_stream"] == "lm" and p["job.lm.ctx_len"] == "96"
    assert "job.train.blocks" not in p
    client = MlflowClient(cfg.tracking.resolved_uri())
    hist = client.get_metric_history(res.mlflow_run_id, "next_token")
    assert sorted(h.step for h in hist) == [1, 2, 3] and all(h.value > 0 for h in hist)
    assert client.get_metric_history(res.mlflow_run_id, "relation_q") == []
    assert res.tokens_seen <= 3 * 2 * 96 and res.tokens_seen > 2 * 2 * 96  # 3 steps × 2 blocks of 96


def test_relation_plus_next_token_reads_two_streams_side_by_side(ray_cluster, tiny_model_dir, workdir, corpus):
    from mlflow.tracking import MlflowClient

    from linearard_ray.training.driver import run_distill

    cfg = _cfg(
        workdir,
        corpus,
        "mixed",
        **{
            "objective.name": "custom",
            "objective.next_token.weight": 0.5,
            "data.lm_ctx_len": 128,
            "train.num_workers": 2,
            "train.max_steps": 2,
            "train.eval_every": None,
            "train.grad_accum": 1,
        },
    )
    res = run_distill(cfg)
    p = _params(cfg.tracking.resolved_uri(), res.mlflow_run_id)
    assert p["job.teacher_loaded"] == "True" and p["job.primary_stream"] == "train"
    assert p["job.train.ctx_len"] == "64" and p["job.lm.ctx_len"] == "128"
    assert p["job.tokens_per_step"] == str(2 * 2 * (64 + 128))
    client = MlflowClient(cfg.tracking.resolved_uri())
    for name in ("relation_q", "next_token", "loss"):
        assert len(client.get_metric_history(res.mlflow_run_id, name)) == 2, name
    from linearard_ray.training.checkpointing import read_state

    st = read_state(res.checkpoint_path)
    # each worker consumed 2 steps × 2 blocks of each stream
    assert st.data.rows == 4 and st.lm_data is not None and st.lm_data.rows == 4


def test_lm_every_draws_the_long_stream_on_every_nth_step_only(ray_cluster, tiny_model_dir, workdir, corpus):
    """data.lm_every=2: the next-token term and its stream appear on steps 1 and 3 of 3, the KL terms on all."""
    from mlflow.tracking import MlflowClient

    from linearard_ray.training.checkpointing import read_state
    from linearard_ray.training.driver import run_distill

    cfg = _cfg(
        workdir,
        corpus,
        "lm-every",
        **{
            "objective.name": "custom",
            "objective.next_token.weight": 0.5,
            "data.lm_ctx_len": 128,
            "data.lm_every": 2,
            "train.num_workers": 1,
            "train.max_steps": 3,
            "train.eval_every": None,
            "train.grad_accum": 1,
        },
    )
    res = run_distill(cfg)
    p = _params(cfg.tracking.resolved_uri(), res.mlflow_run_id)
    assert p["job.tokens_per_step"] == str(2 * (64 + 128 // 2))
    client = MlflowClient(cfg.tracking.resolved_uri())
    assert [m.step for m in client.get_metric_history(res.mlflow_run_id, "next_token")] == [1, 3]
    assert len(client.get_metric_history(res.mlflow_run_id, "relation_q")) == 3
    st = read_state(res.checkpoint_path)
    assert st.data.rows == 3 * 2 and st.lm_data.rows == 2 * 2
    assert st.tokens_seen == 3 * 2 * 64 + 2 * 2 * 128


def test_teacher_samples_are_sampled_once_and_trained_on(ray_cluster, tiny_model_dir, workdir, corpus):
    """data.teacher_samples: the job samples the teacher (in a Ray actor), resumably, appends the
    file to data.sources and trains on it; started again it reuses the complete file."""
    from linearard_ray.data.preprocess import MANIFEST
    from linearard_ray.training.driver import run_distill

    out = workdir / "ts" / "samples.jsonl"
    spec = {
        "num_samples": 6,
        "max_new_tokens": 80,
        "min_tokens": 8,
        "batch_size": 4,
        "top_p": 0.9,
        "seed": 3,
        "path": str(out),
    }
    cfg = _cfg(
        workdir,
        corpus,
        "tsamples",
        **{
            "data.teacher_samples": spec,
            "data.output_dir": str(workdir / "data-ts"),
            "train.num_workers": 1,
            "train.max_steps": 2,
            "train.eval_every": None,
            "train.grad_accum": 1,
        },
    )
    res = run_distill(cfg)
    assert res.final_step == 2
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert meta["batches_done"] == 2 and meta["written"] == len(recs) and meta["written"] + meta["skipped"] == 6
    assert recs and all(r["tokens"] >= 8 and r["text"] for r in recs)
    manifest = json.loads((workdir / "data-ts" / MANIFEST).read_text())
    assert manifest["sources"] == [str(corpus), str(out.resolve())]
    p = _params(cfg.tracking.resolved_uri(), res.mlflow_run_id)
    assert str(out.resolve()) in p["data.sources"]

    before = out.stat().st_mtime_ns
    again = run_distill(cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_name": "tsamples-2"})}))
    assert again.final_step == 2 and out.stat().st_mtime_ns == before
