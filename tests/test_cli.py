"""The `linearard-ray` console script: it lists its commands and runs each with the pipelines' own
argument handling, so a bad configuration fails the same way under both names."""

from __future__ import annotations

import pytest

from linearard_ray.cli import main
from linearard_ray.commands import COMMANDS


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_no_command_is_a_usage_error_and_version_answers(capsys):
    from linearard_ray import __version__

    assert main([]) == 2
    assert "usage: linearard-ray <command>" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"linearard-ray {__version__}\n"


def test_unknown_command_is_refused_with_the_choices(capsys):
    assert main(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and "distill" in err


def _exit_status(argv: list[str]) -> int:
    """A command's exit status, whether it returns it or exits with it (argparse-style)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("command", ["distill", "preprocess", "evaluate", "tune"])
def test_bad_field_fails_under_the_console_script_name(command, capsys):
    assert _exit_status([command, "--set", "rope.factr=8"]) == 2
    err = capsys.readouterr().err
    assert f"linearard-ray {command}: invalid configuration" in err and "rope.factr: unknown field" in err


@pytest.mark.parametrize(
    "command,extra",
    [
        ("distill", []),
        ("preprocess", []),
        ("evaluate", []),
        ("tune", []),
        ("sample-teacher", ["--out", "x.jsonl", "--samples", "1"]),
    ],
)
def test_yaml_syntax_error_fails_the_same_way_under_every_command(command, extra, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [a.txt\n  ctx_len: 64\n")
    assert _exit_status([command, "--config", str(bad), *extra]) == 2
    err = capsys.readouterr().err
    assert f"linearard-ray {command}: invalid configuration: {bad}:3:10:" in err and "Traceback" not in err


def test_preprocess_data_error_exits_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    """The same convention as distill: the user's data is exit 2, and it is found before Ray."""
    from linearard_ray.data import preprocess

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started for data that should have been refused")

    monkeypatch.setattr(preprocess, "ensure_ray", tripwire)
    missing = tmp_path / "missing.txt"
    argv = ["preprocess", "--set", "model.teacher=tiny:llama", "--set", f"data.sources=[{missing}]"]
    assert _exit_status(argv) == 2
    assert f"data.sources[0]: '{missing}' does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- --print-config, --dry-run, --help


@pytest.mark.parametrize("command", ["distill", "tune", "evaluate", "preprocess"])
def test_print_config_prints_yaml_that_loads_back_to_the_same_config(command, tmp_path, capsys):
    from linearard_ray.config import load_config

    argv = [command, "--set", "train.max_steps=7", "--set", "rope.factor=8", "--print-config"]
    assert _exit_status(argv) == 0
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(capsys.readouterr().out)
    cfg = load_config(dumped)
    assert cfg.train.max_steps == 7 and cfg.rope.factor == 8
    if command == "tune":  # a bare tune run is the small default sweep
        from linearard_ray.commands.tune import SWEEP_DEFAULTS

        assert cfg.data.ctx_len == SWEEP_DEFAULTS["data.ctx_len"]


@pytest.fixture
def preprocessed_run(tmp_path, tiny_model_dir, monkeypatch):
    """A distill config on a local text file whose token blocks are already there: the directory
    preprocessing would use holds a finished manifest with this config's hash."""
    import json

    from linearard_ray.config import build_config
    from linearard_ray.data.preprocess import config_hash, tokenizer_path_for

    tiny_model_dir("llama")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text to train on\n" * 50)
    overrides = {
        "model.teacher": "tiny:llama",
        "data.sources": [str(tmp_path / "corpus.txt")],
        "data.ctx_len": 64,
        "data.output_dir": str(tmp_path / "blocks"),
        "train.max_steps": 5,
        "train.run_name": "dry",
        "train.storage_path": str(tmp_path / "ray"),
    }
    cfg = build_config({}, overrides)
    h = config_hash(cfg.data, tokenizer_path_for(cfg.model.teacher))
    (tmp_path / "blocks").mkdir()
    manifest = {"complete": True, "config_hash": h, "blocks": 40, "ctx_len": 64}
    (tmp_path / "blocks" / "manifest.json").write_text(json.dumps(manifest))
    argv = [f"--set={k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    return cfg, argv


def test_distill_dry_run_shows_the_plan_and_the_lock_holder_without_starting_ray(preprocessed_run, capsys):
    import ray

    from linearard_ray.training import run_lock
    from linearard_ray.training.plan import job_paths

    cfg, argv = preprocessed_run
    storage_dir, export_dir = job_paths(cfg)
    held = run_lock.acquire(storage_dir, "dry")  # another job (this process) holds the run name
    try:
        assert _exit_status(["distill", "--dry-run", *argv]) == 0
        out = capsys.readouterr().out
        assert run_lock.read_owner(storage_dir) == held.owner  # read, not taken
    finally:
        run_lock.release(storage_dir, held.owner)
    assert not ray.is_initialized()
    assert "steps: 5 × 64 tokens on 1 worker(s)" in out
    assert f"'dry' is HELD by {held.owner.describe()}" in out and "--force" in out
    assert f"storage (checkpoints): {storage_dir}" in out and f"export: {export_dir}" in out
    assert "(preprocessed: 40 blocks × 64 tokens; reused)" in out
    assert f"training text: {', '.join(cfg.data.sources)}\n" in out  # what it trains on, before it trains


def test_distill_dry_run_shows_the_memory_estimate_and_its_verdict(preprocessed_run, capsys):
    """The per-GPU lines come from the teacher's config alone; the card from train.accelerator_type,
    or train.gpu_memory_gib; a GPU too small gets 'does NOT fit'; a CPU job gets no lines."""
    from linearard_ray.models.loading import read_model_config
    from linearard_ray.training.memory import estimate_for_config

    cfg, argv = preprocessed_run
    assert _exit_status(["distill", "--dry-run", *argv, "--set", "train.accelerator_type=A10G"]) == 0
    out = capsys.readouterr().out
    want = estimate_for_config(cfg, read_model_config("tiny:llama"), 22.1)
    assert f"memory per GPU (ddp, 1 worker(s); estimate, docs/memory.md): {want.breakdown_line()}" in out
    assert "memory verdict: fits (A10G, 22.1 GiB;" in out
    assert _exit_status(["distill", "--dry-run", *argv, "--set", "train.gpu_memory_gib=1.5"]) == 0
    out = capsys.readouterr().out
    assert "memory verdict: does NOT fit (train.gpu_memory_gib, 1.5 GiB;" in out and "memory: would fit with" in out
    assert _exit_status(["distill", "--dry-run", *argv]) == 0
    assert "memory verdict: no verdict: the GPU's memory is unknown" in capsys.readouterr().out
    assert _exit_status(["distill", "--dry-run", *argv, "--set", "train.use_gpu=false"]) == 0
    assert "memory" not in capsys.readouterr().out


def test_dry_run_refuses_what_run_distill_would_refuse(preprocessed_run, capsys):
    import ray

    _, argv = preprocessed_run
    assert _exit_status(["distill", "--dry-run", *argv, "--set", "train.max_steps=100000"]) == 2
    assert "train.epochs_max" in capsys.readouterr().err and not ray.is_initialized()


@pytest.mark.parametrize(
    "command,extra",
    [("preprocess", []), ("tune", []), ("evaluate", []), ("sample-teacher", ["--out", "t.jsonl", "--samples", "2"])],
)
def test_every_command_has_a_dry_run_that_starts_nothing(command, extra, preprocessed_run, capsys):
    import ray

    _, argv = preprocessed_run
    if command in ("evaluate", "sample-teacher"):
        argv = ["--set", "model.teacher=tiny:llama"]
    if command == "tune":  # the tiny model's window at the sweep's smallest rope.factor (2) is 512 tokens
        argv = [*argv, "--set", "train.eval_long_len=512"]
    assert _exit_status([command, "--dry-run", *argv, *extra]) == 0
    out = capsys.readouterr().out
    assert "--dry-run: checks passed; nothing was started" in out and not ray.is_initialized()


def test_quiet_and_verbose_set_the_level_the_workers_get(preprocessed_run, capsys):
    import logging

    from linearard_ray.logs import LEVEL_ENV, get_logger, setup_logging
    from linearard_ray.ray_env import worker_env

    _, argv = preprocessed_run
    log = get_logger("linearard_ray.training.driver")
    try:
        assert _exit_status(["distill", "--quiet", "--dry-run", *argv]) == 0
        assert not log.isEnabledFor(logging.INFO) and worker_env()[LEVEL_ENV] == "WARNING"
        log.info("[distill] hidden")
        assert _exit_status(["distill", "--verbose", "--dry-run", *argv]) == 0
        log.debug("[distill] shown")
        assert worker_env()[LEVEL_ENV] == "DEBUG"
        out = capsys.readouterr().out
        assert "[distill] shown" in out and "[distill] hidden" not in out
    finally:
        setup_logging()


def test_help_shows_readable_types_and_the_bare_runs_values(capsys):
    assert _exit_status(["distill", "--help"]) == 0
    out = capsys.readouterr().out
    assert "UnionType" not in out and "NoneType" not in out
    assert "train.max_steps (int | None) = 24 (bare run; schema default None)" in out
    assert "rope.type (linear | dynamic | yarn | llama3 | longrope) = 'linear'" in out
    assert "train.eval_sources (dict[str, list[str]])" in out
    for flag in ("--print-config", "--dry-run", "--quiet", "--verbose"):
        assert flag in out
    assert _exit_status(["tune", "--help"]) == 0
    assert "train.max_steps (int | None) = 4 (bare run; schema default None)" in capsys.readouterr().out


def test_distill_dry_run_says_from_which_checkpoint_a_start_resumes(preprocessed_run, capsys):
    import torch

    from linearard_ray.training.checkpointing import TrainState, save_checkpoint
    from linearard_ray.training.plan import job_paths

    cfg, argv = preprocessed_run
    storage_dir, _ = job_paths(cfg)
    assert _exit_status(["distill", "--dry-run", *argv]) == 0
    assert "checkpoint: none intact; a start begins at step 0" in capsys.readouterr().out
    for step in (2, 4):
        save_checkpoint(
            f"{storage_dir}/checkpoint_step{step:07d}",
            trainable={"w": torch.zeros(8)},
            optimizer_state={},
            scheduler_state={},
            rng_states=[],
            state=TrainState(step=step),
        )
    trainable = f"{storage_dir}/checkpoint_step0000004/trainable.pt"
    with open(trainable, "r+b") as f:
        f.truncate(10)  # the newest is broken: a start goes back to step 2
    assert _exit_status(["distill", "--dry-run", *argv]) == 0
    assert f"checkpoint: a start resumes at step 2 ({storage_dir}/checkpoint_step0000002)" in capsys.readouterr().out


def test_evaluate_dry_run_names_the_held_out_domains_and_their_windows(tmp_path, monkeypatch, capsys):
    """The plan says which named domains the report averages and how many windows each gets, and
    which models get their own RoPE, so a user sees before a long evaluation what it holds; a genre
    not built yet fails the dry run as it would fail the run, naming the build command."""
    argv = ["evaluate", "--dry-run", "--set", "model.teacher=tiny:llama"]
    assert _exit_status([*argv, "--set", "eval.domains={docs: [builtin:pydocs]}", "--set", "eval.max_windows=3"]) == 0
    out = capsys.readouterr().out
    assert "held-out domains: docs (3 windows of 512, 3 windows of 2048 tokens each;" in out
    assert "(scaled): tiny:llama, rope linear ×4" in out and "(teacher): tiny:llama\n" in out
    assert _exit_status(argv) == 0
    assert "held-out domains: none" in capsys.readouterr().out
    monkeypatch.setenv("LINEARARD_CACHE", str(tmp_path / "cache"))
    assert _exit_status([*argv, "--set", "eval.domains={legal: [genre:legal]}"]) == 2
    assert "eval.domains.legal: 'genre:legal': genre 'legal' has not been built" in capsys.readouterr().err


@pytest.mark.parametrize("config", [None, "configs/smollm2-135m-x4-restore-general.yaml"])
def test_distills_next_step_evaluates_that_student_as_it_was_trained(config, tmp_path):
    """The line a finished distill.py prints: a command that evaluate.py parses into the job's own
    teacher and RoPE scaling (its config and its overrides) and the exported student, its report
    beside the student as train.evaluate_at_end puts it, even where the path needs quoting."""
    import shlex

    from linearard_ray.cli import build_parser, parse_config
    from linearard_ray.commands.distill import next_step

    overrides = ["rope.factor=8", "model.teacher=tiny:llama"]
    argv = [*(["--config", config] if config else []), *[w for o in overrides for w in ("--set", o)]]
    _, trained = parse_config(build_parser("distill.py", ""), argv)
    student = tmp_path / "run with spaces" / "merged"
    words = shlex.split(next_step(config, overrides, str(student), trained).split(": ", 1)[1])
    assert words[:2] == ["python", "pipelines/evaluate.py"]
    _, cfg = parse_config(build_parser("evaluate.py", ""), words[2:])
    assert cfg.eval.student_path == str(student) and cfg.eval.output_dir == str(student / "eval")
    assert (cfg.model, cfg.rope, cfg.data.pack) == (trained.model, trained.rope, trained.data.pack)
    assert cfg.rope.factor == 8.0 and cfg.model.teacher == "tiny:llama"
