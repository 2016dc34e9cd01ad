"""What the driver checks before Ray starts, from the config alone: a mistake found here fails in
a second with the field's name, not minutes later inside a worker."""

from __future__ import annotations

from linearard_ray.config import Config, ConfigError


def check_config(cfg: Config) -> None:
    """Checks that need no cluster: fail before Ray starts."""
    t = cfg.train
    if t.eval_long_len is not None and t.eval_long_len < 2:
        raise ConfigError("train.eval_long_len must be at least 2 tokens")
    if t.fail_at_step is not None and t.fail_at_step < 1:
        raise ConfigError("train.fail_at_step must be a step number >= 1")
    if "/" in t.run_name or not t.run_name.strip():
        raise ConfigError(f"train.run_name {t.run_name!r} must be a non-empty name without '/'")
    if cfg.data.lm_every > 1 and not (cfg.uses_lm_stream() and cfg.objective.needs_teacher):
        raise ConfigError(
            f"data.lm_every={cfg.data.lm_every} spaces out the next-token term's own stream between the KL terms' "
            "steps; it needs objective.next_token.weight > 0, a stream of its own (data.lm_sources, or a "
            "data.lm_ctx_len other than data.ctx_len) and a relation or logit term"
        )
    check_eval_sources(cfg)
    check_train_sources(cfg)


def check_eval_sources(cfg: Config) -> None:
    """Driver side, before Ray starts: every local train.eval_sources path exists (the schema
    checked the rest). Workers read them at the same paths, so on a cluster they must be on
    storage every node sees; builtin: corpora ship with the package."""
    from linearard_ray.evaluation.texts import TextsError, check_source

    for name, sources in cfg.train.eval_sources.items():
        for src in sources:
            try:
                check_source(src)
            except TextsError as e:
                raise ConfigError(f"train.eval_sources.{name}: {e}") from None


def check_train_sources(cfg: Config) -> None:
    """Driver side, before Ray starts: every local or built-in training source exists, so a
    mistyped path fails in a second with the field's name rather than a traceback from inside
    preprocessing. Hub sources are left to preprocessing, which may need the network."""
    if cfg.data.preprocessed:
        return  # the manifest's blocks are used; the sources are not read again
    from linearard_ray.data.sources import HF_PREFIX, DataError, resolve_source

    for name, sources in (("data.sources", cfg.data.sources), ("data.lm_sources", cfg.data.lm_sources or [])):
        for i, src in enumerate(sources):
            if src.startswith(HF_PREFIX):
                continue
            try:
                resolve_source(i, src, cfg.data.format, field=name)
            except DataError as e:
                raise ConfigError(str(e)) from None
