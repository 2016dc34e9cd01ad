"""End to end: pipelines/evaluate.py on tiny models (teacher, RoPE-scaled, a perturbed 'restored'
student whose RoPE is read from its checkpoint), two text domains, skipped lengths, report files,
PNG plots, the MLflow run; lm-eval errors; evaluate_student; Ray task spreading."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

from linearard_ray.config import RopeConfig, build_config, load_config
from tests.evaluation.configs import tiny_eval_config
from tests.scripts import load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli():
    return load_script("pipelines/evaluate.py")


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory):
    """An 'exported student': the tiny model with PI×2 RoPE in its config and perturbed q_proj."""
    from transformers import AutoTokenizer

    from linearard_ray.config import ModelConfig
    from linearard_ray.models.loading import load_model

    src = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("student")
    m = load_model(
        str(src),
        ModelConfig(teacher=str(src), dtype="float32"),
        rope_cfg=RopeConfig(type="linear", factor=2.0),
        device="cpu",
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.add_(0.05 * torch.randn(layer.self_attn.q_proj.weight.shape, generator=g))
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _other_domain(tmp_path):
    """Short documents of another kind (so long windows must concatenate them), plus one empty one."""
    from linearard_ray.data.corpus import iter_builtin

    p = tmp_path / "other.jsonl"
    docs = [d["text"][:120] for d in iter_builtin("builtin:pydocs/tutorial")][:12]
    with open(p, "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"doc{i}", "text": t}) + "\n")
        f.write(json.dumps({"id": "empty", "text": ""}) + "\n")
    return p


def _cfg_dict(tmp_path, other):
    return {
        "model": {"teacher": "tiny:llama", "dtype": "float32"},
        "rope": {"type": "linear", "factor": 2.0},
        "eval": {
            "texts": ["builtin:sotu/extra"],
            "other_texts": [str(other)],
            "short_lengths": [32, 64],
            "long_lengths": [128, 50_000_000],
            "max_windows": 2,
            "passkey_lengths": [20, 200],
            "passkey_depths": [0.0, 1.0],
            "passkey_trials": 1,
            "batch_size": 2,
            "output_dir": str(tmp_path / "out"),
            "device": "cpu",
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "eval-test"},
    }


def _check_nll_against_full_logits(report: dict, cfg, student_dir) -> dict:
    """NLL of every model on the same windows as a direct full-logit computation; returns the
    passkey prompts the evaluation built."""
    from linearard_ray.config import ModelConfig
    from linearard_ray.evaluation.evaluate import prepare_inputs
    from linearard_ray.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model)
    windows, _, passkey, _ = prepare_inputs(cfg, tok)
    mc = ModelConfig(teacher="tiny:llama", dtype="float32")
    models = {
        "teacher": load_model("tiny:llama", mc, device="cpu"),
        "scaled": load_model("tiny:llama", mc, rope_cfg=cfg.rope, device="cpu"),
        "restored": load_model(str(student_dir), mc, device="cpu"),
    }
    for dom in ("main", "other"):
        for L in (32, 128):
            w = torch.as_tensor(windows[dom][L])
            for name, model in models.items():
                with torch.no_grad():
                    lp = torch.log_softmax(model(w).logits.double()[:, :-1], -1)
                want = -lp.gather(-1, w[:, 1:, None]).mean().item()
                assert report["nll"][dom][name][str(L)]["nll"] == pytest.approx(want, rel=1e-5)
                assert report["nll"][dom][name][str(L)]["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    return passkey


def _check_plots(out) -> None:
    """The plots are valid PNGs."""
    from PIL import Image

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "passkey_restored.png",
        "passkey_scaled.png",
        "passkey_summary.png",
        "passkey_teacher.png",
        "ppl_vs_length.png",
    ]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def _check_mlflow_run(report: dict, cfg) -> None:
    """The MLflow run holds the figures and the report files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(report["mlflow"]["run_id"])
    met = run.data.metrics
    assert met["main.restored.ppl_32"] == pytest.approx(report["nll"]["main"]["restored"]["32"]["ppl"])
    assert met["other.restored.recovery_pct_64"] == pytest.approx(
        report["restoration"]["other"]["restored"]["64"]["recovery_pct"]
    )
    assert met["other.restored.relkl_q_32"] == pytest.approx(
        report["relation_kl"]["other"]["restored"]["32"]["mean"]["q"]
    )
    assert met["passkey.restored.acc_200"] == pytest.approx(report["passkey"]["restored"]["accuracy_by_length"]["200"])
    hist = client.get_metric_history(run.info.run_id, "main.teacher.ppl")
    assert sorted(h.step for h in hist) == [32, 64, 128]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/report.json", "eval/report.md", "eval/ppl_vs_length.png"} <= arts
    assert run.data.params["eval.max_windows"] == "2"
    assert run.info.status == "FINISHED"


def test_cli_end_to_end(tmp_path, student_dir, cache_dir):
    cli = _cli()

    other = _other_domain(tmp_path)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_dict(tmp_path, other)))
    rc = cli.main(["--config", str(cfg_path), "--set", f"eval.student_path={student_dir}"])
    assert rc == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())

    # models: default trio; the restored student's RoPE comes from its checkpoint
    assert [m["name"] for m in report["models"]] == ["teacher", "scaled", "restored"]
    win = {m["name"]: m["max_position_embeddings"] for m in report["models"]}
    assert win == {"teacher": 256, "scaled": 512, "restored": 512}
    assert report["models"][2]["rope"] == "from checkpoint"

    # skipped lengths are reported, never dropped
    sk = {(s["section"], s.get("domain"), s["length"]) for s in report["skipped"]}
    assert sk == {("nll", "main", 50_000_000), ("nll", "other", 50_000_000), ("passkey", None, 20)}
    md = (out / "report.md").read_text()
    assert "50000000" in md and "needs 50000000 tokens" in md and "shorter than the passkey prompt" in md
    # the second domain's long windows are concatenations, and the report says so
    other_len = report["domains"]["other"]["lengths"]
    assert other_len["32"]["construction"] == "single documents"
    assert other_len["128"]["construction"] == "concatenated documents" and other_len["128"]["docs_per_window"] > 1
    assert report["domains"]["other"]["empty_documents_skipped"] == 1
    assert "Windows of 128 tokens were cut from **concatenated documents**" in md

    cfg = load_config(cfg_path, [f"eval.student_path={student_dir}"])
    passkey = _check_nll_against_full_logits(report, cfg, student_dir)
    # restoration tables for both domains, consistent with the NLLs
    from linearard_ray.evaluation.report import restoration

    for dom in ("main", "other"):
        n = report["nll"][dom]
        for name in ("scaled", "restored"):
            for L in ("32", "64"):
                want = restoration(n["teacher"][L]["nll"], n["scaled"][L]["nll"], n[name][L]["nll"])
                assert report["restoration"][dom][name][L] == pytest.approx(want)
        assert report["restoration"][dom]["scaled"]["32"]["gap_closed_pct"] == pytest.approx(0.0, abs=1e-9)
        assert set(report["relation_kl"][dom]) == {"scaled", "restored"}
        assert len(report["relation_kl"][dom]["restored"]["32"]["per_layer"]) == 2
    assert md.count("### Restoration") == 2
    # passkey grid: one cell per depth × non-skipped length, answers recorded per trial
    for name in ("teacher", "scaled", "restored"):
        pk = report["passkey"][name]
        assert pk["lengths"] == [200] and pk["depths"] == [0.0, 1.0]
        answers = pk["answers"]["200"]
        assert [a["key"] for a in answers] == [p.key for p in passkey[200]]
        assert [row[0] for row in pk["accuracy"]] == [float(a["correct"]) for a in answers]
        # beside each greedy answer, the forced choice among eval.passkey_choices (default 10) keys
        assert all(a["choice_correct"] == (a["choice_rank"] == 0) and a["key_logprob"] < 0 for a in answers)
        assert pk["forced_choice"]["choices"] == 10 and pk["forced_choice"]["prompts"] == len(answers)
    assert "Forced choice among 10 keys" in md

    _check_plots(out)

    _check_mlflow_run(report, cfg)


def test_cli_help_and_bad_input(capsys):
    cli = _cli()

    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "eval.student_path" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--set", "eval.max_windows=0"])
    assert e.value.code == 2
    assert (
        cli.main(
            [
                "--set",
                "model.teacher=tiny:llama",
                "--set",
                "eval.texts=[/no/such/file.txt]",
                "--set",
                "tracking.enabled=false",
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_lm_eval_missing_is_a_clear_error(monkeypatch, tmp_path):
    from linearard_ray.evaluation.evaluate import EvalError, evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    cfg = build_config(
        {"model": {"teacher": "tiny:llama"}, "eval": {"lm_eval_tasks": ["hellaswag"], "output_dir": str(tmp_path)}}
    )
    with pytest.raises(EvalError, match=r"pip install 'lm-eval\[hf\]'"):
        evaluate(cfg)
    assert not any(tmp_path.iterdir())  # failed before any work


def test_evaluate_student_plumbing(monkeypatch, tmp_path):
    import linearard_ray.evaluation.evaluate as ev
    from linearard_ray.evaluation.specs import model_specs

    seen = []
    monkeypatch.setattr(ev, "evaluate", lambda cfg, **kw: seen.append(cfg) or {"ok": True})
    cfg = build_config({"model": {"teacher": "tiny:llama"}})
    assert ev.evaluate_student(cfg, tmp_path / "stu") == {"ok": True}
    c = seen[-1]
    assert c.eval.student_path == str(tmp_path / "stu") and c.eval.output_dir == str(tmp_path / "stu" / "eval")
    assert [s.name for s in model_specs(c)] == ["teacher", "scaled", "restored"]
    assert cfg.eval.student_path is None  # the caller's config is not modified
    cfg2 = build_config(
        {"eval": {"output_dir": str(tmp_path / "mine"), "models": [{"name": "teacher", "path": "tiny:llama"}]}}
    )
    ev.evaluate_student(cfg2, tmp_path / "stu")
    c2 = seen[-1]
    assert c2.eval.output_dir == str(tmp_path / "mine")
    assert [(s.name, s.role) for s in model_specs(c2)] == [("teacher", "teacher"), ("restored", "model")]


def test_model_list_roles_and_duplicates():
    from linearard_ray.config import ConfigError
    from linearard_ray.evaluation.specs import model_specs

    cfg = build_config(
        {
            "eval": {
                "models": [
                    {"name": "a", "path": "x"},
                    {"name": "scaled", "path": "x", "rope": {"factor": 4}},
                    {"name": "b", "path": "y"},
                ]
            }
        }
    )
    assert [s.role for s in model_specs(cfg)] == ["teacher", "scaled", "model"]
    # no 'scaled' by name: the first entry with a RoPE setting is the baseline
    cfg = build_config(
        {
            "eval": {
                "models": [
                    {"name": "t", "path": "x"},
                    {"name": "cpt", "path": "c"},
                    {"name": "PI×4", "path": "x", "rope": {"factor": 4}},
                    {"name": "YaRN×4", "path": "x", "rope": {"type": "yarn", "factor": 4}},
                ]
            }
        }
    )
    assert [s.role for s in model_specs(cfg)] == ["teacher", "model", "scaled", "model"]
    cfg = build_config({"eval": {"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}})
    with pytest.raises(ConfigError, match="duplicate"):
        model_specs(cfg)


@pytest.mark.slow
def test_ray_tasks_match_in_process(tmp_path, tiny_model_dir):
    """(model, length) jobs as Ray tasks give the same figures as the in-process run."""
    import ray

    from linearard_ray.evaluation.evaluate import evaluate

    path = str(tiny_model_dir("llama"))
    base = {**tiny_eval_config(tmp_path / "local", path, long_lengths=[]), "tracking": {"enabled": False}}
    local = evaluate(build_config(base, {"eval.output_dir": str(tmp_path / "local")}), distribute=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from linearard_ray.evaluation.jobs import use_ray

        assert use_ray(None, None) is False  # a cluster without GPUs: stay in-process by default
        remote = evaluate(
            build_config(base, {"eval.output_dir": str(tmp_path / "ray")}),
            distribute=True,
            task_resources={"num_cpus": 1},
        )
    finally:
        ray.shutdown()
    for name in ("teacher", "scaled"):
        for L in ("32",):
            assert remote["nll"]["main"][name][L]["nll"] == pytest.approx(
                local["nll"]["main"][name][L]["nll"], rel=1e-6
            )
        got, want = remote["passkey"][name]["answers"]["200"], local["passkey"][name]["answers"]["200"]
        # a key's log-probability is a float sum: another thread count may move its last digits
        assert [{**a, "key_logprob": None} for a in got] == [{**a, "key_logprob": None} for a in want]
        assert [a["key_logprob"] for a in got] == pytest.approx([a["key_logprob"] for a in want], rel=1e-5)
    assert remote["relation_kl"]["main"]["scaled"]["32"]["mean"] == pytest.approx(
        local["relation_kl"]["main"]["scaled"]["32"]["mean"]
    )
    assert (tmp_path / "ray" / "report.md").exists()
    # Tasks' results reach the resume log as each finishes: teacher nll + passkey, scaled + relation KL.
    assert len((tmp_path / "ray" / "jobs.jsonl").read_text().splitlines()) == 5


def _fake_lm_eval(monkeypatch, simple_evaluate):
    import types

    pkg = types.ModuleType("lm_eval")
    pkg.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model, self.tokenizer = pretrained, tokenizer

    hf.HFLM = HFLM
    for name, mod in (("lm_eval", pkg), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_lm_eval_results_and_offline_failure(monkeypatch, tiny_model_dir):
    from linearard_ray.evaluation.harness import run_lm_eval
    from linearard_ray.evaluation.specs import EvalError, model_specs

    path = str(tiny_model_dir("llama"))
    cfg = build_config(
        {"model": {"teacher": path}, "rope": {"factor": 2.0}, "eval": {"lm_eval_tasks": ["hellaswag"], "device": "cpu"}}
    )
    calls = []

    def ok(model, tasks):
        calls.append((model.model.config.max_position_embeddings, tasks))
        return {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.25 + 0.01 * len(calls)}}}

    _fake_lm_eval(monkeypatch, ok)
    out = run_lm_eval(model_specs(cfg), cfg)
    assert out == {"teacher": {"hellaswag": {"acc,none": 0.26}}, "scaled": {"hellaswag": {"acc,none": 0.27}}}
    assert calls == [(256, ["hellaswag"]), (512, ["hellaswag"])]  # the scaled model really has its RoPE applied

    def offline(model, tasks):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    _fake_lm_eval(monkeypatch, offline)
    with pytest.raises(EvalError, match="Offline, its datasets must already be in the HF cache"):
        run_lm_eval(model_specs(cfg), cfg)


def test_relation_kl_skipped_for_other_architecture(tmp_path, tiny_model_dir):
    from linearard_ray.evaluation.jobs import run_model_jobs
    from linearard_ray.evaluation.report import build_report
    from linearard_ray.evaluation.specs import ModelSpec
    from linearard_ray.models.tiny import build_tiny_model

    teacher = str(tiny_model_dir("llama"))
    other = str(build_tiny_model("llama", tmp_path / "three", num_hidden_layers=3))
    cfg = build_config(
        {"model": {"teacher": teacher, "dtype": "float32"}, "eval": {"device": "cpu", "short_lengths": [16]}}
    )
    t = ModelSpec("teacher", teacher, None, "teacher")
    m = ModelSpec("deeper", other, None, "model")
    w = np.random.default_rng(0).integers(3, 500, size=(2, 16))
    res = run_model_jobs(m, t, [("nll", "main", 16), ("relkl", "main", 16)], {"windows": {"main": {16: w}}}, cfg)
    assert res[0]["kind"] == "nll" and res[1]["kind"] == "skip"
    assert "num_hidden_layers: teacher 2, student 3" in res[1]["reason"]
    models = [t.as_dict(), m.as_dict()]
    rep = build_report(
        cfg,
        models,
        {"main": {"sources": ["x"], "documents": 1, "empty_documents_skipped": 0, "tokens": 32, "lengths": {}}},
        res,
        [],
        {},
    )
    assert rep["skipped"] == [
        {"section": "relation_kl", "model": "deeper", "domain": "main", "length": 16, "reason": res[1]["reason"]}
    ]
    assert rep["relation_kl"]["main"] == {}


def _resume_cfg(tmp_path, teacher: str, **over):
    base = tiny_eval_config(tmp_path / "out", teacher, passkey_depths=[0.3, 0.7])
    return build_config({**base, "tracking": {"enabled": False}}, over)


def _count_calls(monkeypatch):
    """Count the jobs that really run (NLL, relation KL, passkey), by wrapping their workers."""
    import linearard_ray.evaluation.jobs as ev

    calls = []
    for name in ("nll_windows", "relation_kl_windows", "run_passkey"):
        real = getattr(ev, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(ev, name, wrapped)
    return calls


def _figures(report):
    return (report["nll"], report["relation_kl"], {m: p["answers"] for m, p in report["passkey"].items()})


def test_interrupted_evaluation_resumes_from_its_job_log(tmp_path, tiny_model_dir, monkeypatch):
    from linearard_ray.evaluation.evaluate import evaluate

    cfg = _resume_cfg(tmp_path, str(tiny_model_dir("llama")))
    calls = _count_calls(monkeypatch)
    first = evaluate(cfg)
    log = tmp_path / "out" / "jobs.jsonl"
    lines = log.read_text().splitlines()
    # teacher: nll@32, nll@64, passkey; scaled: the same + relation KL@32
    assert len(calls) == len(lines) == 7

    # Interrupted after three jobs, the fourth torn mid-line.
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    calls.clear()
    resumed = evaluate(cfg)
    assert len(calls) == 4
    assert _figures(resumed) == _figures(first)
    assert len({json.loads(ln)["key"] for ln in log.read_text().splitlines()}) == 7  # every line whole again

    # Complete: nothing runs again, and the report is the same.
    calls.clear()
    again = evaluate(cfg)
    assert calls == [] and _figures(again) == _figures(first)

    # Other inputs are other jobs: eval.seed picks other windows and other passkey keys.
    calls.clear()
    evaluate(_resume_cfg(tmp_path, str(tiny_model_dir("llama")), **{"eval.seed": 1}))
    assert sorted(calls) == sorted(["nll_windows"] * 4 + ["relation_kl_windows"] + ["run_passkey"] * 2)

    # The forced choice's size is part of a passkey job: changing it reruns the passkey jobs only.
    calls.clear()
    fewer = evaluate(_resume_cfg(tmp_path, str(tiny_model_dir("llama")), **{"eval.passkey_choices": 4}))
    assert sorted(calls) == ["run_passkey"] * 2
    assert {p["forced_choice"]["choices"] for p in fewer["passkey"].values()} == {4}
    # ... and so are its distractors; 'random' (the default) keeps the keys of records made before
    # the setting existed, so the default run above was not rerun by it
    calls.clear()
    near = evaluate(
        _resume_cfg(
            tmp_path,
            str(tiny_model_dir("llama")),
            **{"eval.passkey_choices": 4, "eval.passkey_distractors": "one_digit"},
        )
    )
    assert sorted(calls) == ["run_passkey"] * 2
    assert {p["forced_choice"]["distractors"] for p in near["passkey"].values()} == {"one_digit"}
    assert "the distractors one digit away" in (tmp_path / "out" / "report.md").read_text()

    # resume off: everything runs, and the log starts over with this run's jobs only.
    calls.clear()
    evaluate(_resume_cfg(tmp_path, str(tiny_model_dir("llama")), **{"eval.resume": False}))
    assert len(calls) == 7 and len(log.read_text().splitlines()) == 7


def test_resume_reruns_a_student_retrained_into_the_same_directory(tmp_path, student_dir, tiny_model_dir, monkeypatch):
    import os
    import shutil

    from linearard_ray.evaluation.evaluate import evaluate

    student = tmp_path / "student"
    shutil.copytree(student_dir, student)
    models = [{"name": "teacher", "path": str(tiny_model_dir("llama"))}, {"name": "restored", "path": str(student)}]
    cfg = _resume_cfg(tmp_path, str(tiny_model_dir("llama")), **{"eval.models": models, "eval.long_lengths": []})
    calls = _count_calls(monkeypatch)
    first = evaluate(cfg)
    assert len(calls) == 5  # teacher nll + passkey; restored nll + relation KL + passkey

    # The student record (where evaluations log their figures) rewritten: no job runs again.
    record = student / "linearard_student.json"
    record.write_text(json.dumps({"figures": "logged by an earlier evaluation"}) + "\n")
    calls.clear()
    assert _figures(evaluate(cfg)) == _figures(first) and calls == []

    weights = next(student.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "retrained": new file
    calls.clear()
    second = evaluate(cfg)
    assert sorted(calls) == ["nll_windows", "relation_kl_windows", "run_passkey"]  # the student only
    assert second["nll"]["main"]["restored"] == first["nll"]["main"]["restored"]
