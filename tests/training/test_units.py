"""Fast checks of the training pieces that need no Ray cluster: lr schedule, checkpoint
round-trips, step planning, progress lines, held-out domains."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from linearard_ray.config import ConfigError, build_config
from linearard_ray.training.checkpointing import (
    StreamPosition,
    TrainState,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from linearard_ray.training.plan import StreamSpec, plan_steps
from linearard_ray.training.progress import progress_line
from linearard_ray.training.schedule import build_scheduler, lr_factor

# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("warmup,total,floor", [(4, 30, 0.1), (0, 10, 0.0), (3, 4, 0.9), (5, 5, 0.5), (2, 50, 0.9)])
def test_lr_schedule_matches_warmup_cosine_formula(warmup, total, floor):
    for s in range(total):
        got = lr_factor(s, warmup, total, floor)
        if s < warmup:
            want = (s + 1) / warmup
        else:
            span = total - warmup - 1
            p = 1.0 if span <= 0 else (s - warmup) / span
            want = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        assert got == pytest.approx(want, abs=1e-12), (s, got, want)
    if total > warmup:
        assert lr_factor(total - 1, warmup, total, floor) == pytest.approx(floor)
    post = [lr_factor(s, warmup, total, floor) for s in range(warmup, total)]
    assert all(a >= b - 1e-12 for a, b in zip(post, post[1:], strict=False))


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=2e-3)
    sched = build_scheduler(opt, warmup_steps=3, total_steps=12, min_lr_ratio=0.25)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-3 * lr_factor(s, 3, 12, 0.25) for s in range(12)])


# --------------------------------------------------------------------------- checkpoints


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _train_steps(model, opt, sched, xs):
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        sched.step()


def test_checkpoint_roundtrip_continues_identically(tmp_path):
    torch.manual_seed(123)
    xs = [torch.randn(4, 7) for _ in range(6)]
    # uninterrupted
    m1 = _model(0)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, weight_decay=0.01)
    s1 = build_scheduler(o1, 2, 6, 0.1)
    _train_steps(m1, o1, s1, xs)
    # three steps, checkpoint, fresh objects, restore, three more
    m2 = _model(0)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.01)
    s2 = build_scheduler(o2, 2, 6, 0.1)
    _train_steps(m2, o2, s2, xs[:3])
    state = TrainState(
        step=3,
        tokens_seen=12345,
        total_steps=6,
        world_size=2,
        data=StreamPosition(1, 17),
        lm_data=StreamPosition(0, 4),
        mlflow_run_id="abc",
    )
    save_checkpoint(
        tmp_path / "ck",
        trainable=dict(m2.state_dict()),
        optimizer_state=o2.state_dict(),
        scheduler_state=s2.state_dict(),
        rng_states=[capture_rng(), capture_rng()],
        state=state,
    )
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.state == state
    m3 = _model(99)
    m3.load_state_dict(ck.trainable)
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-2, weight_decay=0.01)
    s3 = build_scheduler(o3, 2, 6, 0.1)
    o3.load_state_dict(ck.optimizer_state)
    s3.load_state_dict(ck.scheduler_state)
    _train_steps(m3, o3, s3, xs[3:])
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=False):
        assert torch.equal(a, b)


def test_incomplete_checkpoint_is_reported(tmp_path):
    save_checkpoint(
        tmp_path,
        trainable={"w": torch.randn(2)},
        optimizer_state={},
        scheduler_state={},
        rng_states=[capture_rng()],
        state=TrainState(),
    )
    (tmp_path / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        load_checkpoint(tmp_path)


def test_rng_capture_restore_replays_every_generator(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    st = capture_rng()
    save_checkpoint(tmp_path, trainable={}, optimizer_state={}, scheduler_state={}, rng_states=[st], state=TrainState())
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(77), np.random.seed(77), torch.manual_seed(77)
    restore_rng(load_checkpoint(tmp_path).rng_states[0])
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert first == again


# --------------------------------------------------------------------------- planning


def _cfg(**over):
    base = {"model": {"teacher": "tiny:llama"}, "train": {"max_steps": 5}}
    return build_config(base, over)


def test_plan_steps_from_token_budget_and_epoch_limit():
    cfg = _cfg(
        **{
            "train.max_steps": None,
            "train.budget_tokens": 10_000,
            "train.micro_batch_size": 2,
            "train.grad_accum": 3,
            "data.ctx_len": 128,
        }
    )
    streams = {"train": StreamSpec("train", "/x", 1000, 128)}
    total, per_step = plan_steps(cfg, streams, "train", world_size=2)
    assert per_step == 2 * 2 * 3 * 128
    assert total == math.ceil(10_000 / per_step)
    both = _cfg(**{"train.max_steps": 3, "train.budget_tokens": 10**9})
    assert plan_steps(both, streams, "train", 1)[0] == 3
    tight = _cfg(**{"train.max_steps": 100, "train.epochs_max": 2})
    with pytest.raises(ConfigError, match="train.epochs_max"):
        plan_steps(tight, {"train": StreamSpec("train", "/x", 20, 128)}, "train", 2)


def test_lm_stream_only_when_the_next_token_term_has_its_own_data():
    assert not _cfg().uses_lm_stream()
    assert not _cfg(**{"data.lm_ctx_len": 1024}).uses_lm_stream()  # next-token weight 0
    assert _cfg(**{"objective.name": "cpt", "data.lm_ctx_len": 1024}).uses_lm_stream()
    assert not _cfg(**{"objective.name": "cpt"}).uses_lm_stream()
    mixed = _cfg(**{"objective.name": "custom", "objective.next_token.weight": 0.5, "data.lm_sources": ["a.txt"]})
    assert mixed.uses_lm_stream()
    cfg = _cfg(**{"objective.name": "custom", "objective.next_token.weight": 0.5, "data.lm_ctx_len": 256})
    streams = {"train": StreamSpec("train", "/x", 100, 64), "lm": StreamSpec("lm", "/y", 100, 256)}
    assert plan_steps(cfg, streams, "train", 1)[1] == 64 + 256


def test_naming_the_kl_terms_data_again_is_not_a_stream_of_its_own():
    """data.lm_sources equal to data.sources (and lm_ctx_len equal to ctx_len) reads the same
    blocks: training, preprocessing and sweeps must all see one stream."""
    same = {
        "objective.name": "custom",
        "objective.next_token.weight": 0.5,
        "data.sources": ["a.txt", "b.txt"],
        "data.lm_sources": ["a.txt", "b.txt"],
        "data.lm_ctx_len": 512,
        "data.ctx_len": 512,
    }
    assert not _cfg(**same).data.lm_data_differs()
    assert not _cfg(**same).uses_lm_stream()
    assert _cfg(**{**same, "data.lm_sources": ["b.txt", "a.txt"]}).uses_lm_stream()  # order is the stream
    assert _cfg(**{**same, "data.lm_ctx_len": 1024}).uses_lm_stream()


def test_lm_every_spaces_the_long_stream_in_the_budget_and_the_epoch_count():
    base = {
        "objective.name": "custom",
        "objective.next_token.weight": 0.5,
        "data.lm_ctx_len": 256,
        "train.micro_batch_size": 2,
    }
    streams = {"train": StreamSpec("train", "/x", 400, 64), "lm": StreamSpec("lm", "/y", 40, 256)}
    every = random.randint(2, 6)
    cfg = _cfg(**base, **{"data.lm_every": every, "train.max_steps": None, "train.budget_tokens": 64 * 2 * 100})
    steps, per_step = plan_steps(cfg, streams, "train", 1)
    mean = 2 * (64 + 256 / every)  # micro-batch 2
    assert per_step == round(mean) and steps == math.ceil(64 * 2 * 100 / mean)
    # the lm stream is read on ceil(steps / every) of the steps: 40 blocks last 20 of its draws
    tight = _cfg(**base, **{"data.lm_every": every, "train.max_steps": 20 * every + 1, "train.epochs_max": 1})
    with pytest.raises(ConfigError, match="lm stream"):
        plan_steps(tight, streams, "train", 1)
    assert (
        plan_steps(
            _cfg(**base, **{"data.lm_every": every, "train.max_steps": 20 * every, "train.epochs_max": 1}),
            streams,
            "train",
            1,
        )[0]
        == 20 * every
    )
    alone = {"lm": StreamSpec("lm", "/y", 40, 256)}  # cpt: the only stream drives every step
    assert (
        plan_steps(
            _cfg(
                **{
                    "objective.name": "cpt",
                    "data.lm_ctx_len": 256,
                    "data.lm_every": every,
                    "train.micro_batch_size": 2,
                    "train.max_steps": 3,
                }
            ),
            alone,
            "lm",
            1,
        )[1]
        == 2 * 256
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"data.lm_every": 2},  # no next-token term
        {"data.lm_every": 2, "objective.name": "custom", "objective.next_token.weight": 0.5},  # no stream of its own
        {"data.lm_every": 2, "objective.name": "cpt", "data.lm_ctx_len": 256},  # no KL term beside it
    ],
)
def test_lm_every_without_two_streams_is_refused_before_ray(overrides):
    from linearard_ray.training.checks import check_config

    with pytest.raises(ConfigError, match="data.lm_every=2"):
        check_config(_cfg(**overrides))


def test_progress_line_names_the_numbers():
    m = {"loss": 1.25, "relation_q": 0.5, "relation_k": 0.25, "relation_v": 0.125, "lr": 3e-4, "tokens_per_s": 812.4}
    line = progress_line(3, 30, m, 95, loss_avg=1.5)
    for part in (
        "step 3/30",
        "loss 1.2500 (avg 1.5000)",
        "q 0.5000",
        "k 0.2500",
        "v 0.1250",
        "lr 3.00e-04",
        "812 tok/s",
        "ETA 1m35s",
    ):
        assert part in line
    with_map = progress_line(3, 30, {**m, "relation_qk": 0.0625}, 95)
    assert "rel q 0.5000 k 0.2500 v 0.1250 qk 0.0625" in with_map


# --------------------------------------------------------------------------- held-out domains (train.eval_sources)


@pytest.mark.parametrize(
    "sources,field,message",
    [
        ({"pydocs": []}, "train.eval_sources.pydocs", "no sources"),
        ({"pydocs": [""]}, "train.eval_sources.pydocs", "empty source"),
        ({"pydocs": ["builtin:pydoc"]}, "train.eval_sources.pydocs", "unknown built-in corpus"),
        ({"pydocs": ["builtin:pydocs/manual"]}, "train.eval_sources.pydocs", "unknown pydocs split"),
        ({"web": ["s3://bucket/docs"]}, "train.eval_sources.web", "local files"),
        ({"py docs": ["builtin:pydocs"]}, "train.eval_sources.py docs", "domain name"),
        (["builtin:pydocs"], "train.eval_sources", "dictionary"),
    ],
)
def test_eval_sources_config_errors_name_the_field(sources, field, message):
    with pytest.raises(ConfigError) as e:
        _cfg(**{"train.eval_every": 2, "train.eval_sources": sources})
    assert f"{field}" in str(e.value) and message in str(e.value)


def test_eval_sources_shape_cadence_and_local_paths(tmp_path):
    from linearard_ray.training.checks import check_config

    cfg = _cfg(**{"train.eval_every": 2, "train.eval_sources.pydocs": "builtin:pydocs/tutorial"})
    assert cfg.train.eval_sources == {"pydocs": ["builtin:pydocs/tutorial"]}  # a bare string is one source
    assert _cfg().train.eval_sources == {}
    with pytest.raises(ConfigError, match="train.eval_every"):  # domains that would never be measured
        _cfg(**{"train.eval_sources": {"pydocs": ["builtin:pydocs"]}})
    missing = _cfg(**{"train.eval_every": 2, "train.eval_sources": {"mine": [str(tmp_path / "nope.txt")]}})
    with pytest.raises(ConfigError, match="train.eval_sources.mine: .*no such file"):
        check_config(missing)  # the driver checks local paths before Ray starts


def test_held_out_domains_report_prefixed_metrics_and_teacher_once(tiny_model_dir, tmp_path):
    """Each domain gets the default domain's metric set under eval_<name>_; a domain too short
    for the windows fails with its field named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearard_ray.data.corpus import iter_pydocs
    from linearard_ray.training.held_out import held_out_evals

    d = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    local = tmp_path / "docs.jsonl"
    local.write_text(
        "".join(
            json.dumps({"text": p["text"][:2000]}) + "\n" for _, p in zip(range(3), iter_pydocs("faq"), strict=False)
        )
    )
    cfg = _cfg(
        **{
            "data.ctx_len": 32,
            "train.eval_every": 1,
            "train.eval_texts": 2,
            "train.eval_long_len": 96,
            "train.eval_sources": {"pydocs": ["builtin:pydocs/tutorial"], "faq": [str(local)]},
        }
    )
    evals = held_out_evals(cfg, tok, torch.device("cpu"), rank=0, world=1)
    assert len(evals) == 4 and all(len(ev.short) == 2 and len(ev.long) == 1 for ev in evals[:3])
    for ev in evals:
        ev.compute_teacher(model)
    out = {k: v for ev in evals for k, v in ev(model).items()}
    domains = [out["eval_pydocs_recovery_pct"], out["eval_faq_recovery_pct"]]
    assert out["unseen_mean_recovery_pct"] == pytest.approx(sum(domains) / 2)
    assert out["unseen_worst_recovery_pct"] == min(domains)
    for prefix in ("", "eval_pydocs_", "eval_faq_"):
        m = {k: out[prefix + k] for k in ("student_nll", "teacher_nll", "nll_gap", "recovery_pct", "long_nll")}
        assert all(math.isfinite(v) for v in m.values())
        assert m["nll_gap"] == pytest.approx(m["student_nll"] - m["teacher_nll"])
        assert m["recovery_pct"] == pytest.approx(100 * math.exp(-m["nll_gap"]))
    assert len(out) == 17
    # the student is the teacher here: no gap; different texts give different NLLs
    assert out["eval_pydocs_nll_gap"] == pytest.approx(0.0, abs=1e-6)
    assert out["student_nll"] != pytest.approx(out["eval_pydocs_student_nll"])

    short = _cfg(**{"data.ctx_len": 4096, "train.eval_every": 1, "train.eval_sources": {"faq": [str(local)]}})
    with pytest.raises(ConfigError, match="train.eval_sources.faq: no held-out document"):
        held_out_evals(short, tok, torch.device("cpu"), rank=0, world=1)


def test_held_out_windows_come_from_few_long_documents_when_few_are_long():
    """Many documents long enough: the start of each (the rule the sweep figures were measured
    with); a genre of a few long texts: their consecutive pieces, every document contributing."""
    from linearard_ray.training.held_out import short_windows

    many = [list(range(100 * i, 100 * i + 50)) for i in range(5)]
    assert short_windows(many, 10, 3) == [d[:10] for d in many[:3]]
    few = [list(range(35)), list(range(1000, 1012)), list(range(2000, 2005))]
    assert short_windows(few, 10, 5) == [few[0][0:10], few[1][0:10], few[0][10:20], few[0][20:30]]
    assert short_windows(few, 10, 2) == [few[0][0:10], few[1][0:10]]
    assert short_windows([list(range(5))], 10, 3) == []
