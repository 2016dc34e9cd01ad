"""Scores from lm-evaluation-harness per model (an optional extra: ``eval.lm_eval_tasks``)."""

from __future__ import annotations

from linearard_ray.config import Config
from linearard_ray.evaluation.specs import EvalError, ModelSpec, eval_device, load_eval_model


def check_lm_eval(tasks: list[str]) -> None:
    """Fail early, with the fix, when lm-evaluation-harness tasks are asked for but not installed."""
    if not tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            f"eval.lm_eval_tasks={tasks} needs lm-evaluation-harness, which is not installed: "
            "`pip install 'linearard_ray[lm-eval]'` or `pip install 'lm-eval[hf]'` (its task data must be "
            "downloadable or already in the HF datasets cache), "
            "or set eval.lm_eval_tasks=[]"
        ) from None


def run_lm_eval(specs: list[ModelSpec], cfg: Config) -> dict:
    """lm-evaluation-harness scores per model (optional extra)."""
    check_lm_eval(cfg.eval.lm_eval_tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from linearard_ray.models.loading import load_tokenizer

    device = eval_device(cfg)
    tok = load_tokenizer(cfg.model)
    out = {}
    for s in specs:
        model = load_eval_model(s, cfg, device)
        try:
            r = simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.eval.batch_size),
                tasks=list(cfg.eval.lm_eval_tasks),
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
