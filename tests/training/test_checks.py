"""The distill command in-process: a bad config fails with its field named and exit status 2
before Ray starts (``ensure_ray`` is replaced by a tripwire), whether the schema rejects it at
parse time or the driver's checks (training/checks.py) do in ``run_distill``."""

from __future__ import annotations

import pytest

from linearard_ray.commands.distill import main
from linearard_ray.config import ConfigError, build_config
from linearard_ray.training import driver
from linearard_ray.training.checks import check_config


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """Fail the test if the driver gets as far as starting Ray; run in an empty directory."""

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started for a config that should have been refused")

    monkeypatch.setattr(driver, "ensure_ray", tripwire)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse and the config parser exit directly
        return e.code


@pytest.mark.parametrize(
    "args,field",
    [
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "train.lrr=0.1"], "train.lrr: unknown field"),
        (["--set", "rope.factor=0.5"], "rope.factor"),
        (["--set", "objective.name=distill"], "objective.name"),
        (["--set", "train.max_steps=null"], "train"),  # no budget at all
        (["--set", "train.fail_at_step=0"], "train.fail_at_step"),
        (["--set", "train.run_name=a/b"], "train.run_name 'a/b'"),
        (["--set", "train.eval_long_len=1"], "train.eval_long_len"),
        (
            ["--set", "data.sources=[builtin:sotu/train, /no/such/dir/teacher_samples.jsonl]"],
            "data.sources[1]: '/no/such/dir/teacher_samples.jsonl' does not exist",
        ),
        (
            ["--set", "objective.next_token.weight=0.1", "--set", "data.lm_sources=[builtin:sotu/nope]"],
            "data.lm_sources[0]",
        ),
        (
            ["--set", "train.eval_every=2", "--set", "train.eval_sources.mine=[/no/such/eval.txt]"],
            "train.eval_sources.mine",
        ),
        (["--set", "data.lm_every=2"], "data.lm_every=2"),
    ],
)
def test_bad_config_is_refused_naming_the_field_before_ray_starts(no_ray, capsys, args, field):
    assert _exit_status(args) == 2
    assert field in capsys.readouterr().err
    assert list(no_ray.iterdir()) == []  # nothing written: no data, no outputs


def test_missing_config_file_is_named(no_ray, capsys):
    assert _exit_status(["--config", str(no_ray / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_help_lists_the_config_fields(capsys):
    assert _exit_status(["--help"]) == 0
    out = capsys.readouterr().out
    for s in ("--config", "--set", "train.budget_tokens", "objective.name", "rope.factor", "LinearARD"):
        assert s in out


def test_a_good_config_passes_the_checks_and_reaches_ray(no_ray):
    """The tripwire fires for a config the checks accept: the refusals above are the checks' doing."""
    cfg = build_config({"model": {"teacher": "tiny:llama"}, "data": {"ctx_len": 64}, "train": {"max_steps": 2}})
    check_config(cfg)
    with pytest.raises(AssertionError, match="Ray was started"):
        driver.run_distill(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train.fail_at_step": 0}, "train.fail_at_step must be a step number >= 1"),
        ({"train.run_name": " "}, "train.run_name ' ' must be a non-empty name"),
        ({"train.eval_long_len": 1}, "train.eval_long_len must be at least 2 tokens"),
    ],
)
def test_check_config_refuses_what_the_schema_lets_through(overrides, message):
    cfg = build_config({"model": {"teacher": "tiny:llama"}, "train": {"max_steps": 2}}, overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


# --------------------------------------------------------------------------- the models' windows and layers

TINY = ["--set", "model.teacher=tiny:llama"]  # 2 layers, a 256-token window; PI×4 gives the student 1024


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "data.ctx_len=512"], "data.ctx_len=512 is longer than the teacher's window"),
        (
            ["--set", "objective.name=cpt", "--set", "data.ctx_len=2048"],
            "data.ctx_len=2048 is longer than the student's window (1024 tokens: rope.type=linear, rope.factor=4)",
        ),
        (
            ["--set", "objective.name=cpt", "--set", "data.ctx_len=64", "--set", "data.lm_ctx_len=4096"],
            "data.lm_ctx_len=4096 is longer than the student's window",
        ),
        (
            ["--set", "data.ctx_len=64", "--set", "rope.factor=2", "--set", "train.eval_long_len=1024"],
            "train.eval_long_len=1024 is longer than the student's window (512 tokens",
        ),
        (
            ["--set", "data.ctx_len=64", "--set", "data.teacher_samples={num_samples: 2, max_new_tokens: 256}"],
            "data.teacher_samples.max_new_tokens=256 (+1 start token) is longer than the teacher's window",
        ),
        (
            ["--set", "data.ctx_len=64", "--set", "objective.relation.layers=last:999"],
            "objective.relation.layers: 'last:999' selects 999 layers, but model.teacher='tiny:llama' has 2 layers",
        ),
        (["--set", "data.ctx_len=64", "--set", "objective.relation.layers=first:3"], "'first:3' selects 3 layers"),
        (["--set", "data.ctx_len=64", "--set", "objective.relation.layers=range:1-4"], "'range:1-4' selects layers"),
        (["--set", "data.ctx_len=64", "--set", "objective.relation.layers=[0, 5]"], "layer indices [5]"),
        (["--set", "data.ctx_len=64", "--set", "model.teacher=./no/such/model"], "model.teacher='./no/such/model'"),
        (
            ["--set", "data.ctx_len=64", "--set", "rope.type=llama3", "--set", "rope.beta_fast=3"],
            "rope.beta_fast does not apply to rope.type 'llama3'",
        ),
    ],
)
def test_what_the_model_cannot_run_is_refused_before_ray_starts(no_ray, capsys, args, message):
    assert _exit_status(TINY + args) == 2
    assert message in capsys.readouterr().err
    assert list(no_ray.iterdir()) == []


@pytest.mark.parametrize(
    "args,fields",
    [
        (
            ["--set", "objective.relation.weights={q: 0, k: 0, v: 0}"],
            ["objective.relation.weight=1", "weights.q=0, weights.k=0, weights.v=0"],
        ),
        (
            ["--set", "objective.name=custom", "--set", "objective.relation.weight=0"],
            ["objective.relation.weight, objective.logits.weight, objective.next_token.weight"],
        ),
    ],
)
def test_weights_that_switch_everything_off_are_refused_at_validation(no_ray, capsys, args, fields):
    assert _exit_status(TINY + args) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and all(f in err for f in fields)


def test_relation_weights_with_one_part_on_pass(no_ray):
    for weights in ({"q": 0, "k": 0, "v": 1}, {"q": 0, "k": 0, "v": 0, "qk": 1}):
        build_config({"objective": {"relation": {"weights": weights}}})
    build_config({"objective": {"relation": {"weight": 0, "weights": {"q": 0}}, "logits": {"weight": 1}}})


def _local_model(root, window: int) -> str:
    """A model directory holding only a config (the checks read nothing else)."""
    from linearard_ray.models.tiny import tiny_config

    tiny_config("llama", max_position_embeddings=window).save_pretrained(root / "model")
    return str(root / "model")


def test_a_local_models_window_is_read_from_its_config(no_ray):
    model = _local_model(no_ray, 128)
    base = {"model": {"teacher": model}, "train": {"max_steps": 2}}
    check_config(build_config(base, {"data.ctx_len": 128}))
    with pytest.raises(ConfigError, match=r"data.ctx_len=129 is longer than the teacher's window .*128"):
        check_config(build_config(base, {"data.ctx_len": 129}))
    # dynamic NTK keeps max_position_embeddings native but reaches native × factor
    dynamic = build_config(base, {"data.ctx_len": 64, "rope.type": "dynamic", "train.eval_long_len": 512})
    check_config(dynamic)
    with pytest.raises(ConfigError, match="train.eval_long_len=513 is longer than the student's window .512"):
        check_config(dynamic.model_copy(update={"train": dynamic.train.model_copy(update={"eval_long_len": 513})}))


def test_a_hub_model_not_in_the_cache_is_left_to_loading(no_ray, monkeypatch):
    """Offline and uncached, its config cannot be read: the check steps aside without an error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(no_ray / "hf"))
    cfg = build_config(
        {"model": {"teacher": "some-org/not-cached-model"}, "data": {"ctx_len": 1 << 20}, "train": {"max_steps": 2}}
    )
    check_config(cfg)


def test_the_shipped_configs_fit_their_models():
    """The embedded default and every recipe pass (models whose config is not cached are skipped)."""
    from pathlib import Path

    from linearard_ray.config import load_config
    from linearard_ray.training.checks import check_model_fit

    check_config(build_config())
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        check_model_fit(load_config(path))


# --------------------------------------------------------------------------- reading the config


def test_yaml_syntax_error_names_the_file_line_and_column(no_ray, capsys):
    path = no_ray / "bad.yaml"
    path.write_text("train:\n  lr: [1e-3\n  max_steps: 3\n")
    assert _exit_status(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration: {path}:3:12: expected ',' or ']', but got ':'" in err
    assert "Traceback" not in err


def test_unparsable_set_value_is_named(no_ray, capsys):
    assert _exit_status(["--set", "data.sources=[a.txt,"]) == 2
    assert "invalid configuration: --set data.sources=[a.txt,: not a YAML value" in capsys.readouterr().err


# --------------------------------------------------------------------------- exit status


def test_an_internal_failure_is_not_reported_as_the_users(no_ray, monkeypatch):
    """Exit 2 is kept for the user's input: anything else keeps its traceback (Python exits 1)."""

    def broken(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(driver, "run_distill", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(TINY + ["--set", "data.ctx_len=64"])


def test_a_resume_the_workers_would_refuse_is_refused_by_the_driver_and_the_dry_run(
    no_ray, tiny_model_dir, tmp_path, capsys
):
    """A checkpoint written by 1 DDP worker with a global batch of 4 blocks: a start under fsdp, or
    with a changed global batch, fails before Ray starts, naming what to set; the dry run says the
    same instead of passing."""
    from pathlib import Path

    import torch

    from linearard_ray.training.checkpointing import capture_rng, new_checkpoint_dir_name
    from linearard_ray.training.checks import check_resumable
    from linearard_ray.training.distributed import gather_objects
    from linearard_ray.training.plan import StreamSpec, job_paths
    from linearard_ray.training.trainee import build_trainee, write_checkpoint
    from tests.training.test_resume import _cfg, _job

    tiny_model_dir("llama")
    storage = {"train.storage_path": str(tmp_path / "ray"), "train.run_name": "resumable"}
    cfg = _cfg(**storage)
    storage_dir, _ = job_paths(cfg)
    check_resumable(cfg, storage_dir)  # nothing to resume yet
    job = _job(cfg, tmp_path, {"train": StreamSpec("train", "/unused", 10, 16)}, "train")
    trainee = build_trainee(cfg, job, torch.device("cpu"), 0, 1, loaded=None)
    checkpoint = Path(storage_dir) / new_checkpoint_dir_name(storage_dir, 0)
    write_checkpoint(checkpoint, trainee, gather_objects(capture_rng()))

    check_resumable(cfg, storage_dir)  # the same shape resumes
    check_resumable(_cfg(**storage, **{"train.num_workers": 2, "train.grad_accum": 1}), storage_dir)  # 2 × 2 × 1
    with pytest.raises(ConfigError, match="from 4 to 8 blocks per step.*Set train.grad_accum=1 to keep it"):
        check_resumable(_cfg(**storage, **{"train.num_workers": 2}), storage_dir)
    with pytest.raises(ConfigError, match="written with train.parallelism=ddp; resuming with fsdp"):
        check_resumable(_cfg(**storage, **{"train.parallelism": "fsdp"}), storage_dir)

    config = tmp_path / "job.yaml"
    config.write_text(f"train:\n  storage_path: {tmp_path / 'ray'}\n  run_name: resumable\n")
    for flags in (["--set", "train.parallelism=fsdp"], ["--set", "train.parallelism=fsdp", "--dry-run"]):
        assert _exit_status(["--config", str(config), *flags]) == 2
        err = capsys.readouterr().err
        assert "run 'resumable' cannot resume its step-0 checkpoint" in err and "Set train.parallelism=ddp" in err
