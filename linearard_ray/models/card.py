"""Model cards of an exported student: ``README.md`` with Hugging Face front matter, and the
record it is written from.

The facts a card states (teacher, RoPE scaling, recipe, data, tokens, MLflow run and registered
version, evaluation results) are a ``StudentCard``. It is kept beside the weights as
``linearard_student.json`` (``models.loading.STUDENT_RECORD``), so that a later step can find the
student's training run and registered version from the directory alone, and rewrite the card with
more facts: training adds the MLflow run and version after registering, evaluation its results
(``model-index``). The card parses with ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
LIBRARY_TAGS = ("linearard", "rope-scaling")


@dataclass
class EvalFigure:
    """One evaluation result of the student, as the card's ``model-index`` states it."""

    domain: str  # main | other | passkey
    dataset: str  # the text sources, as configured
    metric: str  # perplexity | recovery_pct | passkey_accuracy
    value: float
    length: int | None = None  # tokens; None for a figure over every length

    def title(self) -> str:
        at = f" at {self.length} tokens" if self.length else ""
        return f"{self.metric}{at} ({self.domain})"


@dataclass
class StudentCard:
    """What the card of an exported student says; every field but `rope` may be unknown."""

    rope: dict[str, Any] = field(default_factory=dict)  # rope_summary of the student's config (export fills it)
    base_model: str | None = None  # public name of the teacher; never a local path
    teacher: str | None = None  # model.teacher as configured, when it is a public name or a built-in
    recipe: str | None = None
    objective: str | None = None
    run_name: str | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    dtype: str | None = None
    lora: dict[str, Any] | None = None
    data: list[dict[str, Any]] = field(default_factory=list)  # one entry per token stream
    mlflow: dict[str, Any] | None = None  # tracking_uri, experiment_id, run_id, registered_model, version
    evaluation: list[EvalFigure] = field(default_factory=list)
    evaluation_source: dict[str, Any] | None = None  # where the results come from: report dir, MLflow run

    @classmethod
    def from_dict(cls, d: dict) -> StudentCard:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["evaluation"] = [EvalFigure(**e) for e in d.get("evaluation") or []]
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def rope_type(self) -> str:
        return str(self.rope.get("rope", {}).get("rope_type", "default"))

    def tags(self) -> list[str]:
        return [*LIBRARY_TAGS, self.rope_type()]

    def registry_tags(self) -> dict[str, Any]:
        """The tags of the student's registered model version: what tells students apart."""
        rope = self.rope.get("rope", {})
        tags = {
            "teacher": self.base_model or self.teacher,
            "rope_type": self.rope_type(),
            "rope_factor": rope.get("factor"),
            "max_position_embeddings": self.rope.get("max_position_embeddings"),
            "recipe": self.recipe,
            "objective": self.objective,
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "dtype": self.dtype,
        }
        return {k: v for k, v in tags.items() if v is not None}


# --------------------------------------------------------------------------- from a training job


def recipe_name(cfg) -> str:
    """``tracking.recipe``, else the objective recipe's name (``objective.name``)."""
    return cfg.tracking.recipe or cfg.objective.name


def _stream_entry(name: str, manifest: dict) -> dict[str, Any]:
    return {
        "stream": name,
        "sources": list(manifest.get("sources", [])),
        "documents": manifest.get("docs_used"),
        "tokens": manifest.get("tokens"),
        "tokens_in_blocks": manifest.get("tokens_in_blocks"),
        "ctx_len": manifest.get("ctx_len"),
    }


def read_manifests(directories: dict[str, str]) -> dict[str, dict]:
    """The manifests of the token streams {name: preprocessed directory} that have one."""
    out = {}
    for name, directory in directories.items():
        path = Path(directory) / "manifest.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def training_card(cfg, *, manifests: dict[str, dict], steps: int, tokens_seen: int, dtype: str) -> StudentCard:
    """The card facts a finished training job knows; `manifests` are its token streams' manifests."""
    from linearard_ray.models.loading import BUILTIN_MODELS, public_model_name
    from linearard_ray.models.tiny import TINY_PREFIX

    teacher = cfg.model.teacher
    public = public_model_name(teacher)
    named = public is not None or teacher in BUILTIN_MODELS or teacher.startswith(TINY_PREFIX)
    lora = cfg.lora
    return StudentCard(
        base_model=public,
        teacher=teacher if named else None,
        recipe=recipe_name(cfg),
        objective=cfg.objective.name,
        run_name=cfg.train.run_name,
        steps=steps,
        tokens_seen=tokens_seen,
        dtype=dtype,
        lora={"r": lora.r, "alpha": lora.alpha, "targets": list(lora.target_modules)} if lora.enabled else None,
        data=[_stream_entry(name, m) for name, m in manifests.items()],
    )


# --------------------------------------------------------------------------- the record


def write_student_record(model_dir: str | Path, card: StudentCard) -> Path:
    from linearard_ray.models.loading import STUDENT_RECORD

    path = Path(model_dir) / STUDENT_RECORD
    path.write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def read_student_record(model_dir: str | Path) -> StudentCard | None:
    """The record an exported student carries; None for a directory this package did not export."""
    from linearard_ray.models.loading import STUDENT_RECORD

    path = Path(model_dir) / STUDENT_RECORD
    if not path.is_file():
        return None
    try:
        return StudentCard.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- front matter


def _model_index(card: StudentCard, model_name: str) -> list:
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=f.dataset,
            dataset_name=f"{f.domain}: {f.dataset}",
            metric_type=f.metric,
            metric_value=round(float(f.value), 4),
            metric_name=f.title(),
            metric_config=str(f.length) if f.length else None,
        )
        for f in card.evaluation
    ]


def _front_matter(card: StudentCard, *, adapter: bool) -> str:
    from huggingface_hub import ModelCardData

    name = card.run_name or "linearard-student"
    extra: dict[str, Any] = {"linearard": _provenance(card)}
    data = ModelCardData(
        base_model=card.base_model,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=card.tags(),
        model_name=name if card.evaluation and not adapter else None,
        eval_results=_model_index(card, name) if card.evaluation and not adapter else None,
        **extra,
    )
    return data.to_yaml()


def _provenance(card: StudentCard) -> dict[str, Any]:
    """Machine-readable facts other tools may read from the front matter."""
    out: dict[str, Any] = {"recipe": card.recipe, "rope": card.rope.get("rope", {})}
    if card.tokens_seen is not None:
        out["tokens_seen"] = card.tokens_seen
    if card.mlflow:
        # the version's source is this directory as the training machine saw it: not for the card
        out["mlflow"] = {k: v for k, v in card.mlflow.items() if v is not None and k != "source"}
    return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------- body


def _title(card: StudentCard) -> str:
    teacher = card.base_model or card.teacher or "The teacher"
    rope = card.rope.get("rope", {})
    factor = f" ×{rope['factor']:g}" if isinstance(rope.get("factor"), (int, float)) else ""
    return (
        f"# {card.run_name or 'LinearARD student'}\n\n"
        f"{teacher} with {card.rope_type()}{factor} RoPE scaling, its short-text behaviour restored by "
        "LinearARD self-distillation from the native-RoPE model (linearard_ray)."
    )


def _rope_section(card: StudentCard) -> str:
    window = card.rope.get("max_position_embeddings")
    native = card.rope.get("original_max_position_embeddings")
    params = json.dumps(card.rope.get("rope", {}), sort_keys=True)
    return (
        "## RoPE scaling\n\n"
        f"- context window: {window} tokens (native {native})\n"
        f"- `rope_parameters` in config.json: `{params}`"
    )


def _recipe_section(card: StudentCard) -> str:
    lines = ["## Recipe", ""]
    facts = {
        "recipe": card.recipe,
        "objective": card.objective,
        "run name": card.run_name,
        "optimizer steps": card.steps,
        "training tokens seen": f"{card.tokens_seen:,}" if card.tokens_seen is not None else None,
        "weights dtype": card.dtype,
    }
    if card.lora:
        facts["LoRA"] = ", ".join(f"{k} {v}" for k, v in card.lora.items())
    known = [f"- {k}: {v}" for k, v in facts.items() if v is not None]
    return "\n".join(lines + known) if known else ""


def _data_section(card: StudentCard) -> str:
    if not card.data:
        return ""
    rows = [
        "## Training data",
        "",
        "| stream | sources | documents | tokens in blocks | block length |",
        "|---|---|---|---|---|",
    ]
    for d in card.data:
        sources = ", ".join(f"`{s}`" for s in d.get("sources", []))
        rows.append(
            f"| {d.get('stream')} | {sources} | {d.get('documents', '?')} | "
            f"{d.get('tokens_in_blocks', '?'):,} | {d.get('ctx_len', '?')} |"
        )
    return "\n".join(rows)


def _evaluation_section(card: StudentCard) -> str:
    if not card.evaluation:
        return ""
    rows = ["## Evaluation", "", "| figure | texts | value |", "|---|---|---|"]
    rows += [f"| {f.title()} | {f.dataset} | {f.value:.4g} |" for f in card.evaluation]
    src = card.evaluation_source or {}
    if src.get("report_dir"):
        rows += ["", f"Full report: `{src['report_dir']}/report.md`."]
    if src.get("mlflow_run_id"):
        rows += [f"Evaluation MLflow run: `{src['mlflow_run_id']}`."]
    return "\n".join(rows)


def _loading_section(adapter: bool, base_model: str | None) -> str:
    if adapter:
        base = base_model or "<the teacher>"
        return (
            "## How to load\n\n"
            "The adapter expects the base model with the RoPE settings of `rope_config.json`:\n\n"
            "```python\nimport json\nfrom peft import PeftModel\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n\n"
            'rope = json.load(open("rope_config.json"))\n'
            f'config = AutoConfig.from_pretrained("{base}")\n'
            'config.rope_parameters = rope["rope"]\n'
            'config.max_position_embeddings = rope["max_position_embeddings"]\n'
            f'base = AutoModelForCausalLM.from_pretrained("{base}", config=config)\n'
            'model = PeftModel.from_pretrained(base, "<this directory>")\n```'
        )
    return (
        "## How to load\n\n"
        "A plain transformers checkpoint (LoRA merged, RoPE settings in config.json):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("<this directory>", dtype="auto")\n'
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")\n```'
    )


def _mlflow_section(card: StudentCard) -> str:
    m = card.mlflow
    if not m:
        return ""
    lines = ["## MLflow", ""]
    if m.get("run_id"):
        lines.append(
            f"- training run: `{m['run_id']}` (experiment {m.get('experiment_id')}) at `{m.get('tracking_uri')}`"
        )
    if m.get("registered_model"):
        lines.append(f"- registered model: `{m['registered_model']}` version {m.get('version')}")
    return "\n".join(lines)


def render_card(card: StudentCard, *, adapter: bool = False) -> str:
    """The README.md text: YAML front matter, then what the student is and how to load it."""
    parts = [
        _title(card),
        _rope_section(card),
        _recipe_section(card),
        _data_section(card),
        "" if adapter else _evaluation_section(card),
        _loading_section(adapter, card.base_model),
        _mlflow_section(card),
    ]
    body = "\n\n".join(p for p in parts if p)
    return f"---\n{_front_matter(card, adapter=adapter)}\n---\n\n{body}\n"


def write_model_card(model_dir: str | Path, card: StudentCard) -> Path:
    """The merged student's README.md and its record, written together."""
    path = Path(model_dir) / CARD_FILE
    path.write_text(render_card(card))
    write_student_record(model_dir, card)
    return path


def write_adapter_card(adapter_dir: str | Path, card: StudentCard) -> Path:
    """The adapter's README.md in place of PEFT's template (which names the base model by the path
    it was loaded from)."""
    path = Path(adapter_dir) / CARD_FILE
    path.write_text(render_card(card, adapter=True))
    return path
