"""Scores from lm-evaluation-harness per model (an optional extra: ``eval.lm_eval_tasks``, with
``eval.lm_eval_args`` passed through to lm-eval)."""

from __future__ import annotations

import inspect
from typing import Any

from linearard_ray.config import Config
from linearard_ray.evaluation.specs import EvalError, ModelSpec, eval_device, load_eval_model

INSTALL_HINT = 'pip install "linearard_ray[lm-eval]"'
# Arguments this module sets itself: the model and its tokenizer, the tasks, eval.batch_size.
RESERVED_ARGS = ("model", "model_args", "tasks", "pretrained", "tokenizer", "batch_size")


def check_lm_eval(tasks: list[str], args: dict[str, Any] | None = None) -> None:
    """Fail early, with the fix, when lm-evaluation-harness is asked for but not installed, or
    ``eval.lm_eval_args`` holds an argument lm-eval does not take."""
    args = args or {}
    if args and not tasks:
        raise EvalError(f"eval.lm_eval_args={args} without eval.lm_eval_tasks: name the tasks to run them with")
    if not tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            f"eval.lm_eval_tasks={tasks} needs lm-evaluation-harness, which is not installed: "
            f"`{INSTALL_HINT}` (or `pip install 'lm-eval[hf]'`; its task data must be "
            "downloadable or already in the HF datasets cache), "
            "or set eval.lm_eval_tasks=[]"
        ) from None
    split_lm_eval_args(args)


def split_lm_eval_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``eval.lm_eval_args`` as (simple_evaluate's keyword arguments, HFLM's), by lm-eval's own
    signatures, so that any argument of the installed version passes through (RULER's
    ``metadata: {max_seq_lengths: [...]}`` goes to simple_evaluate, ``max_length`` to the model)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    reserved = sorted(k for k in args if k in RESERVED_ARGS)
    if reserved:
        raise EvalError(
            f"eval.lm_eval_args: {reserved} are set from the evaluation itself (models, lm_eval_tasks, "
            "batch_size); leave them out"
        )
    run_params = _keyword_names(simple_evaluate)
    model_params = _keyword_names(HFLM.__init__)
    unknown = sorted(k for k in args if k not in run_params and k not in model_params)
    if unknown:
        raise EvalError(
            f"eval.lm_eval_args: lm-eval takes no argument {unknown}; simple_evaluate takes "
            f"{sorted(run_params - set(RESERVED_ARGS))}, HFLM takes {sorted(model_params - set(RESERVED_ARGS))}"
        )
    run = {k: v for k, v in args.items() if k in run_params}
    model = {k: v for k, v in args.items() if k not in run_params}
    return run, model


def _keyword_names(fn) -> set[str]:
    return {
        n
        for n, p in inspect.signature(fn).parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def run_lm_eval(specs: list[ModelSpec], cfg: Config) -> dict:
    """lm-evaluation-harness scores per model (optional extra)."""
    check_lm_eval(cfg.eval.lm_eval_tasks, cfg.eval.lm_eval_args)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from linearard_ray.models.loading import load_tokenizer

    run_args, model_args = split_lm_eval_args(cfg.eval.lm_eval_args)
    device = eval_device(cfg)
    tok = load_tokenizer(cfg.model)
    out = {}
    for s in specs:
        model = load_eval_model(s, cfg, device)
        try:
            r = simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.eval.batch_size, **model_args),
                tasks=list(cfg.eval.lm_eval_tasks),
                **run_args,
            )
        except Exception as e:  # dataset download refused offline, unknown task, ...
            raise EvalError(
                f"lm-evaluation-harness failed for tasks {cfg.eval.lm_eval_tasks} on model {s.name}: "
                f"{type(e).__name__}: {e}. Offline, its datasets must already be in the HF cache."
            ) from e
        out[s.name] = {
            t: {k: v for k, v in m.items() if isinstance(v, (int, float))}
            for t, m in (r or {}).get("results", {}).items()
        }
        del model
    return out
