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
    check_model_fit(cfg)


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
    preprocessing. Of a hub source only the grammar is checked: the hub is left to preprocessing,
    which may need the network."""
    if cfg.data.preprocessed:
        return  # the manifest's blocks are used; the sources are not read again
    from linearard_ray.data.sources import HF_PREFIX, DataError, parse_hf, resolve_source

    for name, sources in (("data.sources", cfg.data.sources), ("data.lm_sources", cfg.data.lm_sources or [])):
        for i, src in enumerate(sources):
            try:
                if src.startswith(HF_PREFIX):
                    parse_hf(src)
                else:
                    resolve_source(i, src, cfg.data.format, field=name)
            except DataError as e:
                raise ConfigError(f"{name}[{i}]: {e}" if src.startswith(HF_PREFIX) else str(e)) from None


def check_model_fit(cfg: Config) -> None:
    """Driver side, before Ray starts: every length the job runs a model at fits that model's
    window, and the relation layers exist. Reads the models' configs only (no weights, no network);
    a model whose config is not at hand yet (a hub id not cached, a built-in model not fetched) is
    left to the workers' loading."""
    from linearard_ray.models.loading import ModelError, read_model_config

    names = {"model.teacher": cfg.model.teacher}
    if cfg.model.student:
        names["model.student"] = cfg.model.student
    configs = {}
    for field, name in names.items():
        try:
            configs[field] = read_model_config(name, cfg.model)
        except ModelError as e:
            raise ConfigError(f"{field}={name!r}: {e}") from None
    teacher = configs["model.teacher"]
    student = configs.get("model.student", teacher)
    if teacher is None or student is None:
        return
    check_lengths(cfg, int(teacher.max_position_embeddings), student_window(cfg, teacher, student))
    layers = getattr(teacher, "num_hidden_layers", None)
    if cfg.objective.relation.weight > 0 and layers:
        cfg.objective.relation.layers.check_fits(int(layers), model=f"model.teacher={cfg.model.teacher!r}")


def student_window(cfg: Config, teacher, student) -> int:
    """The student's window once its RoPE is scaled, as models.loading.load_student scales it:
    from rope.original_max_position_embeddings or the teacher's native window. Dynamic NTK keeps
    max_position_embeddings native (models/rope.py says why) but stretches to native × factor."""
    from linearard_ray.models.rope import RopeError, build_rope_parameters, native_window

    rope = cfg.rope
    if rope.original_max_position_embeddings is None:
        rope = rope.model_copy(update={"original_max_position_embeddings": native_window(teacher)})
    try:
        _, native, window = build_rope_parameters(student, rope)
    except RopeError as e:
        raise ConfigError(str(e)) from None
    return round(native * rope.factor) if rope.type == "dynamic" else window


def check_lengths(cfg: Config, teacher_window: int, student_window: int) -> None:
    """Each length the job runs at against the window of each model that runs at it."""
    d, t, obj = cfg.data, cfg.train, cfg.objective
    teacher = f"the teacher's window (model.teacher={cfg.model.teacher!r}: max_position_embeddings {teacher_window})"
    student = (
        f"the student's window ({student_window} tokens: rope.type={cfg.rope.type}, rope.factor={cfg.rope.factor:g})"
    )
    limits = [(f"data.ctx_len={d.ctx_len}", d.ctx_len, student_window, student)]
    # the teacher runs at data.ctx_len for the KL terms and for the held-out evaluation
    if obj.needs_teacher or t.eval_every is not None:
        limits.append((f"data.ctx_len={d.ctx_len}", d.ctx_len, teacher_window, teacher))
    if d.lm_ctx_len is not None and obj.next_token.weight > 0:
        limits.append((f"data.lm_ctx_len={d.lm_ctx_len}", d.lm_ctx_len, student_window, student))
    if t.eval_long_len is not None:
        limits.append((f"train.eval_long_len={t.eval_long_len}", t.eval_long_len, student_window, student))
    if d.teacher_samples is not None:
        n = d.teacher_samples.max_new_tokens
        # generation starts from one start token, then samples n more
        limits.append((f"data.teacher_samples.max_new_tokens={n} (+1 start token)", n + 1, teacher_window, teacher))
    for what, length, window, whose in limits:
        if length > window:
            raise ConfigError(f"{what} is longer than {whose}")


def check_resumable(cfg: Config, storage_dir: str) -> None:
    """A start that would resume the run's newest checkpoint resumes it under this config: the same
    parallelism and the same global batch. Checked by the driver (and the dry run), so a refused
    resume fails in a second, not after Ray has retried the workers' refusal; the workers check
    again on the checkpoint Ray hands them."""
    from linearard_ray.training.checkpointing import check_resumes_under, newest_checkpoint_shape

    found = newest_checkpoint_shape(storage_dir)
    if found is None:
        return
    state, sharded = found
    try:
        check_resumes_under(state, sharded, cfg.train, cfg.train.num_workers)
    except RuntimeError as e:
        raise ConfigError(f"run {cfg.train.run_name!r} cannot resume its step-{state.step} checkpoint: {e}") from None
