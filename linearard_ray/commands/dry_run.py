"""What the commands' ``--dry-run`` reports, found without starting Ray or any worker: where the
token blocks of a stream would go and whether they are already there, who holds a run name, and
the step plan when the data is preprocessed. Not a command itself (``COMMANDS`` does not list it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from linearard_ray.config import Config


def data_dir(cfg: Config, stream: Literal["main", "lm"] = "main") -> tuple[Path, dict | None]:
    """The directory ``data.preprocess.ensure_preprocessed`` would use for ``stream`` and its
    manifest when it already holds this config's blocks (None: it would be built). Reads the
    sources' sizes and the tokenizer, as that function does, but tokenises nothing."""
    from linearard_ray.data.manifest import read_manifest
    from linearard_ray.data.preprocess import stream_target, tokenizer_path_for
    from linearard_ray.data.sources import DataError

    if cfg.data.preprocessed and (stream == "main" or not cfg.data.lm_data_differs()):  # given: it must exist
        return Path(cfg.data.preprocessed), read_manifest(cfg.data.preprocessed)
    _, out, h = stream_target(cfg, stream, tokenizer_path_for(cfg.model.teacher))
    try:
        manifest = read_manifest(out)
    except DataError:
        return out, None
    return out, manifest if manifest.get("config_hash") == h else None


def data_line(stream: str, out: Path, manifest: dict | None, force: bool = False) -> str:
    if manifest is None:
        return f"data ({stream}): {out} (not there yet: it would be preprocessed)"
    then = "--force: preprocessed again" if force else "reused"
    return f"data ({stream}): {out} (preprocessed: {manifest['blocks']} blocks × {manifest['ctx_len']} tokens; {then})"


def lock_line(storage_dir: str, run_name: str, takeover: bool) -> str:
    """Who holds the run name, read without taking the lock."""
    from linearard_ray.training.run_lock import lock_path, read_owner

    owner = read_owner(storage_dir)
    if owner is None:
        return f"run lock: {run_name!r} is free ({lock_path(storage_dir)})"
    gone = owner.gone_because()
    if gone is not None:
        return f"run lock: {run_name!r} was held by {owner.describe()}, which is gone ({gone}): it would be taken over"
    action = "--force given: it would be taken over" if takeover else "the run would be refused (--force takes it over)"
    return f"run lock: {run_name!r} is HELD by {owner.describe()}; {action}"


def checkpoint_line(storage_dir: str) -> str:
    """Where a start of this run would begin: the newest checkpoint whose files have their recorded
    sizes (a dry run does not hash gigabytes; the resume itself checks the sha256s), or step 0."""
    from linearard_ray.training.checkpointing import newest_complete_checkpoint

    found = newest_complete_checkpoint(storage_dir)
    if found is None:
        return "checkpoint: none intact; a start begins at step 0"
    step, path = found
    return f"checkpoint: a start resumes at step {step} ({path})"


def tracking_line(cfg: Config, experiment: str | None = None) -> str:
    """Where the runs go; ``experiment`` when the command names its own (a sweep's is its name)."""
    if not cfg.tracking.enabled:
        return "tracking: off"
    name = experiment or cfg.tracking.experiment
    return f"tracking: {cfg.tracking.resolved_uri()} (experiment {name!r})"


def step_plan_line(cfg: Config, found: dict[str, tuple[Path, dict | None]]) -> str:
    """The step count and tokens per step, from the manifests of the streams training reads."""
    from linearard_ray.training.plan import StreamSpec, plan_steps

    needs_main = cfg.objective.needs_teacher or not cfg.uses_lm_stream()
    wanted = (["train"] if needs_main else []) + (["lm"] if cfg.uses_lm_stream() else [])
    streams: dict[str, StreamSpec] = {}
    for name in wanted:
        out, manifest = found["main" if name == "train" else "lm"]
        if manifest is None:
            return "steps: known once the data is preprocessed (train.max_steps / train.budget_tokens set the budget)"
        streams[name] = StreamSpec(name, str(out), int(manifest["blocks"]), int(manifest["ctx_len"]))
    total, tokens = plan_steps(cfg, streams, "train" if needs_main else "lm", cfg.train.num_workers)
    return f"steps: {total} × {tokens} tokens on {cfg.train.num_workers} worker(s)"


def training_lines(cfg: Config) -> list[str]:
    """A training job's plan: run name and lock, storage, export, tracking, data and steps. Raises
    what ``run_distill`` would raise for a config it refuses (``check_config``, the step plan)."""
    from linearard_ray.training.checks import check_config, check_resumable
    from linearard_ray.training.plan import job_paths

    check_config(cfg)
    storage_dir, export_dir = job_paths(cfg)
    check_resumable(cfg, storage_dir)
    lines = [
        "config: checks passed (run name, sources, block lengths against the models' windows, relation layers)",
        sources_line(cfg),
        lock_line(storage_dir, cfg.train.run_name, cfg.train.takeover),
        f"storage (checkpoints): {storage_dir}",
        checkpoint_line(storage_dir),
        f"export: {export_dir}",
        tracking_line(cfg),
        *memory_lines(cfg),
    ]
    cfg, samples, ready = with_finished_teacher_samples(cfg)
    lines += [samples] if samples else []
    if not ready:
        return [*lines, "data and steps: known once the teacher samples exist"]
    found = {"main": data_dir(cfg, "main")}
    if cfg.uses_lm_stream():
        found["lm"] = data_dir(cfg, "lm")
    lines += [data_line(name, *found[name]) for name in found]
    lines.append(step_plan_line(cfg, found))
    return lines


def sources_line(cfg: Config) -> str:
    """What the job trains on, held-out parts and teacher text included, so the plan shows the mix."""
    from linearard_ray.data.blocks import layout_name

    sources = list(cfg.data.sources)
    if cfg.data.teacher_samples is not None:
        sources.append("text sampled from the teacher (data.teacher_samples)")
    line = f"training text: {', '.join(sources)}" + (f", {layout_name(cfg.data.pack)}" if cfg.data.pack else "")
    if cfg.data.lm_sources:
        line += f"; next-token stream: {', '.join(cfg.data.lm_sources)}"
    return line


def memory_lines(cfg: Config) -> list[str]:
    """The per-GPU memory estimate and its verdict (training.memory), from the teacher's config
    as the window checks read it (no weights, no network). A CPU job (train.use_gpu false) has
    none; a model whose config is not at hand yet gets a line saying so."""
    from linearard_ray.models.loading import ModelError, read_model_config
    from linearard_ray.training.memory import plan_lines

    if cfg.train.use_gpu is False:
        return []
    try:
        hf = read_model_config(cfg.model.teacher, cfg.model)
    except ModelError:
        hf = None  # check_config has already reported a config that cannot be read
    if hf is None:
        return [f"memory per GPU: known once the config of {cfg.model.teacher!r} is at hand (fetched or cached)"]
    try:
        return plan_lines(cfg, hf)
    except ValueError as e:  # not a Llama-family decoder: the estimate's formulas do not apply
        return [f"memory per GPU: no estimate ({e})"]


def with_finished_teacher_samples(cfg: Config) -> tuple[Config, str | None, bool]:
    """``cfg`` with its teacher samples in ``data.sources`` when they are complete (training adds
    them there, and they decide the data's hash), a line about them (None without any), and
    whether the data can be looked up yet."""
    ts = cfg.data.teacher_samples
    if ts is None:
        return cfg, None, True
    from linearard_ray.data.sampling import is_complete
    from linearard_ray.data.teacher_samples import samples_path

    out = samples_path(cfg)
    if not is_complete(out, cfg.model, ts):
        return (
            cfg,
            f"teacher samples: {out} ({ts.num_samples} samples would be drawn from {cfg.model.teacher} first)",
            False,
        )
    if str(out) not in cfg.data.sources:
        data = cfg.data.model_copy(update={"sources": [*cfg.data.sources, str(out)]})
        cfg = cfg.model_copy(update={"data": data})
    return cfg, f"teacher samples: {out} (complete, reused)", True
