"""An evaluation of an exported student reaches back to it: the student's model card gains a
model-index with the results, its training run the headline figures, its registered model
version the same figures as tags, and the evaluation's run names the student's run and version."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from linearard_ray.config import LoraConfig, ModelConfig, RopeConfig, build_config
from tests.evaluation.configs import tiny_eval_config
from tests.scripts import load_script


@pytest.fixture
def registered_student(tmp_path, cache_dir):
    """A tiny student exported and registered the way a training job does it (sqlite store)."""
    from linearard_ray import tracking
    from linearard_ray.models import card as cards
    from linearard_ray.models.loading import export_student, load_student, load_tokenizer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = ModelConfig(teacher="tiny:llama", cache_dir=str(cache_dir), dtype="float32")
    rope = RopeConfig(type="linear", factor=2.0)
    student = load_student(mc, rope, LoraConfig(r=4), device="cpu").eval()
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.02)
    cfg = build_config({"model": mc.model_dump(), "rope": rope.model_dump(), "train": {"run_name": "stu"}})
    card = cards.training_card(cfg, manifests={}, steps=9, tokens_seen=4096, dtype="float32")
    merged = export_student(student, load_tokenizer(mc), tmp_path / "students" / "stu", rope, card=card)["merged"]

    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "students"), "stu")
    logger = tracking.RunLogger(uri, run_id)
    card = cards.read_student_record(merged)
    card.mlflow = {"tracking_uri": uri, "experiment_id": logger.experiment_id, "run_id": run_id}
    card.mlflow |= tracking.register_student(logger, merged, "stu-x2", card.registry_tags(), copy=False)
    cards.write_model_card(merged, card)
    logger.finish("FINISHED")
    return uri, run_id, merged


def _eval_config(tmp_path, uri) -> dict:
    cfg = tiny_eval_config(tmp_path / "eval", relation_kl=False)
    return {**cfg, "tracking": {"tracking_uri": uri, "experiment": "evals"}}


def test_evaluating_a_student_links_its_card_run_and_registered_version(tmp_path, registered_student):
    from huggingface_hub import ModelCard
    from mlflow.tracking import MlflowClient

    uri, run_id, merged = registered_student
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(_eval_config(tmp_path, uri)))
    assert (
        load_script("pipelines/evaluate.py").main(["--config", str(cfg_path), "--set", f"eval.student_path={merged}"])
        == 0
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    eval_run = report["mlflow"]["run_id"]
    ppl = report["nll"]["main"]["restored"]["32"]["ppl"]
    recovery = report["restoration"]["main"]["restored"]["32"]["recovery_pct"]

    card = ModelCard.load(merged / "README.md")
    index = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert index[("perplexity", "32")] == pytest.approx(ppl, abs=1e-4)
    assert index[("recovery_pct", "32")] == pytest.approx(recovery, abs=1e-4)
    assert ("passkey_accuracy", None) in index
    assert card.data.base_model is None  # a random tiny teacher has no public name
    assert eval_run in card.text and "stu-x2" in card.text

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # linked without reopening the training run
    assert run.data.metrics["report/main.ppl_32"] == pytest.approx(ppl)
    assert run.data.metrics["report/passkey.acc"] == report["passkey"]["restored"]["accuracy_overall"]
    assert [h.step for h in client.get_metric_history(run_id, "report/main.ppl_32")] == [9]
    assert run.data.tags["evaluation.mlflow_run_id"] == eval_run
    assert not any(k.startswith("report/main.ppl") and ".teacher" in k for k in run.data.metrics)

    tags = client.get_model_version("stu-x2", "1").tags
    assert float(tags["eval.main.ppl_32"]) == pytest.approx(ppl) and tags["eval.run_id"] == eval_run
    assert tags["rope_type"] == "linear" and tags["rope_factor"] == "2.0" and tags["tokens_seen"] == "4096"
    eval_tags = client.get_run(eval_run).data.tags
    assert eval_tags["linearard.student.restored.run_id"] == run_id
    assert eval_tags["linearard.student.restored.model_version"] == "stu-x2/1"


def test_headline_metrics_leave_out_other_models():
    from linearard_ray.evaluation.students import headline_metrics

    report = {
        "nll": {"main": {}, "other": {}},
        "metrics": {
            "main.restored.ppl_512": 28.0,
            "main.restored.relkl_q_512": 0.1,
            "main.restored.p_vs_scaled_512": 0.01,
            "main.restored.v2.ppl_512": 1.0,
            "other.restored.recovery_pct_512": 90.0,
            "main.teacher.ppl_512": 27.0,
            "passkey.restored.acc": 0.5,
            "passkey.restored.acc_1024": 1.0,
        },
    }
    assert headline_metrics(report, "restored") == {
        "main.ppl_512": 28.0,
        "other.recovery_pct_512": 90.0,
        "passkey.acc": 0.5,
    }
    assert headline_metrics(report, "restored.v2") == {"main.ppl_512": 1.0}
