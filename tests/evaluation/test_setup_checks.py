"""What an evaluation settles before its first model job: the preset and the fields that override
it, the models' paths (an export directory without /merged), lm-eval's arguments, and the overall
progress line."""

from __future__ import annotations

import sys
import types

import pytest

from linearard_ray.config import EvalConfig, build_config, load_config
from linearard_ray.config.evaluation import EVAL_PRESETS


def test_a_preset_fills_in_only_the_fields_the_config_leaves_out(tmp_path):
    quick = build_config({"eval": {"preset": "quick"}}).eval
    for k, v in EVAL_PRESETS["quick"].items():
        assert getattr(quick, k) == v
    assert quick.preset_overrides() == {}
    # set in the file or with --set: the user's value wins, whatever the order
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  max_windows: 5\n  preset: quick\n")
    cfg = load_config(path, ["eval.short_lengths=[256]"])
    assert (cfg.eval.max_windows, cfg.eval.short_lengths) == (5, [256])
    assert cfg.eval.long_lengths == EVAL_PRESETS["quick"]["long_lengths"]
    assert cfg.eval.preset_overrides() == {"max_windows": (2, 5), "short_lengths": ([512], [256])}
    # an explicit value equal to the schema default still counts as set
    assert build_config({}, {"eval.preset": "quick", "eval.max_windows": 8}).eval.max_windows == 8
    # standard is the schema's defaults; the preset's lists are copies
    assert build_config({"eval": {"preset": "standard"}}).eval == EvalConfig()
    full = build_config({}, {"eval.preset": "full"}).eval
    full.passkey_lengths.append(1)
    assert 1 not in build_config({}, {"eval.preset": "full"}).eval.passkey_lengths
    with pytest.raises(Exception, match="eval.preset"):
        build_config({"eval": {"preset": "fast"}})


def test_an_export_directory_without_merged_fails_before_any_job(tmp_path, tiny_model_dir):
    from linearard_ray.evaluation.evaluate import EvalError, evaluate

    run_dir = tmp_path / "students" / "linearard-default"
    (run_dir / "merged").mkdir(parents=True)
    (run_dir / "adapter").mkdir()
    for f in tiny_model_dir("llama").iterdir():
        (run_dir / "merged" / f.name).symlink_to(f)
    out = tmp_path / "out"
    cfg = build_config(
        {"model": {"teacher": "tiny:llama"}, "eval": {"student_path": str(run_dir), "output_dir": str(out)}}
    )
    with pytest.raises(EvalError, match=r"eval.student_path=.*merged/ subdirectory: .*linearard-default/merged"):
        evaluate(cfg)
    assert not out.exists()  # nothing ran
    # a relative path whose first directory exists is a local path, not a hub id
    missing = build_config({"model": {"teacher": "tiny:llama"}, "eval": {"student_path": "tests/no-such-student"}})
    with pytest.raises(EvalError, match="eval.student_path='tests/no-such-student': .* does not exist"):
        evaluate(missing)
    listed = build_config(
        {"eval": {"models": [{"name": "teacher", "path": "tiny:llama"}, {"name": "a", "path": str(tmp_path)}]}}
    )
    with pytest.raises(EvalError, match=r"eval.models\[a\].path=.*without config.json"):
        evaluate(listed)


def _fake_lm_eval(monkeypatch, calls: list):
    """lm_eval's two entry points with the signatures of lm-eval 0.4 (a subset of their arguments)."""
    pkg = types.ModuleType("lm_eval")

    def simple_evaluate(model=None, model_args=None, tasks=None, num_fewshot=None, limit=None, metadata=None):
        calls.append(
            {"model": model.kwargs, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit, "metadata": metadata}
        )
        return {"results": {t: {"acc,none": 0.5} for t in tasks}}

    class HFLM:
        def __init__(self, pretrained=None, tokenizer=None, batch_size=1, max_length=None, truncation=False):
            self.kwargs = {"batch_size": batch_size, "max_length": max_length}

    pkg.simple_evaluate = simple_evaluate
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    for name, mod in (
        ("lm_eval", pkg),
        ("lm_eval.models", types.ModuleType("lm_eval.models")),
        ("lm_eval.models.huggingface", hf),
    ):
        monkeypatch.setitem(sys.modules, name, mod)


def test_lm_eval_args_pass_through_to_the_run_and_the_model(monkeypatch, tiny_model_dir):
    """RULER's lengths (metadata.max_seq_lengths) reach simple_evaluate and max_length reaches the
    HFLM model, routed by lm-eval's own signatures; a name lm-eval does not take fails up front."""
    from linearard_ray.evaluation.harness import check_lm_eval, run_lm_eval
    from linearard_ray.evaluation.specs import EvalError, model_specs

    calls: list = []
    _fake_lm_eval(monkeypatch, calls)
    args = {"metadata": {"max_seq_lengths": [512]}, "max_length": 512, "limit": 3}
    cfg = build_config(
        {
            "model": {"teacher": str(tiny_model_dir("llama"))},
            "rope": {"factor": 2.0},
            "eval": {"lm_eval_tasks": ["niah_single_1"], "lm_eval_args": args, "device": "cpu"},
        }
    )
    out = run_lm_eval(model_specs(cfg), cfg)
    assert set(out) == {"teacher", "scaled"}
    for c in calls:
        assert c["metadata"] == {"max_seq_lengths": [512]} and c["limit"] == 3 and c["num_fewshot"] is None
        assert c["model"] == {"batch_size": 1, "max_length": 512} and c["tasks"] == ["niah_single_1"]
    with pytest.raises(EvalError, match=r"no argument \['max_seq_len'\].*simple_evaluate takes .*metadata"):
        check_lm_eval(["niah_single_1"], {"max_seq_len": 8192})
    with pytest.raises(EvalError, match=r"\['tasks'\] are set from the evaluation itself"):
        check_lm_eval(["niah_single_1"], {"tasks": ["x"]})


def test_lm_eval_args_without_tasks_or_without_lm_eval_fail_before_any_job(monkeypatch, tmp_path):
    from linearard_ray.evaluation.evaluate import EvalError, evaluate

    out = tmp_path / "out"
    cfg = build_config(
        {"model": {"teacher": "tiny:llama"}, "eval": {"lm_eval_args": {"limit": 3}, "output_dir": str(out)}}
    )
    with pytest.raises(EvalError, match="without eval.lm_eval_tasks"):
        evaluate(cfg)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    cfg = build_config(
        {"model": {"teacher": "tiny:llama"}, "eval": {"lm_eval_tasks": ["ruler"], "output_dir": str(out)}}
    )
    with pytest.raises(EvalError, match=r'pip install "linearard_ray\[lm-eval\]"'):
        evaluate(cfg)
    assert not out.exists()


def test_overall_progress_counts_jobs_and_estimates_the_rest(monkeypatch, capsys):
    """One line per finished job: done of total (reused jobs counted done) and the time left, from
    the time per token so far, so a long job ahead weighs more than a short one behind."""
    from linearard_ray.evaluation import jobs

    now = [100.0]
    monkeypatch.setattr(jobs.time, "time", lambda: now[0])
    weights = {("t", ("nll", "main", 512)): 1024.0, ("t", ("nll", "main", 4096)): 8192.0}
    p = jobs.OverallProgress(weights, reused=1)
    now[0] += 10.0
    line = p.job_done("t", ("nll", "main", 512))
    assert line == "2/3 jobs done, 10s elapsed, about 1m20s left"  # 8192 tokens at 1024 per 10 s
    now[0] += 75.0
    assert p.job_done("t", ("nll", "main", 4096)) == "3/3 jobs done, 1m25s elapsed"
    assert "[evaluate] 2/3 jobs done" in capsys.readouterr().out
