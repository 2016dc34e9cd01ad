"""Passkey prompts: exact length, key at the requested depth, seeded keys, and the greedy check."""

from __future__ import annotations

import random

import pytest
import torch

from linearard_ray.evaluation.passkey import (
    ANSWER,
    FILLER,
    INSTRUCTION,
    KEY_LINE,
    QUESTION,
    PasskeyPrompt,
    accuracy_grid,
    build_prompt,
    distractor_keys,
    extract_answer,
    make_key,
    min_length,
    one_digit_neighbours,
    prompts_for,
    run_passkey,
    score_key_choices,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


def _n(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_prompt_has_exact_length_and_key_at_depth(tok):
    rng = random.Random(1234)
    base = min_length(tok)
    head, tail = _n(tok, INSTRUCTION), _n(tok, QUESTION)
    for _ in range(12):
        length = rng.randint(base, base + 900)
        depth = rng.random()
        key = str(rng.randint(10000, 99999))
        p = build_prompt(tok, length, depth, key)
        assert len(p.input_ids) == length
        key_ids = tok(KEY_LINE.format(key=key), add_special_tokens=False)["input_ids"]
        assert _find(p.input_ids, key_ids) == [p.key_start]  # present once, where it says
        n_filler = length - head - len(key_ids) - tail
        # the key line starts `depth` of the way through the filler tokens
        assert abs((p.key_start - head) / n_filler - depth) <= 0.5 / n_filler + 1e-12
        text = tok.decode(p.input_ids)
        assert text.startswith(INSTRUCTION.strip()[:20]) and text.endswith(QUESTION)
        assert text.count(key) == 2  # "The pass key is K. Remember it. K is the pass key."


def test_depth_extremes(tok):
    L = min_length(tok) + 500
    first = build_prompt(tok, L, 0.0, "11111")
    last = build_prompt(tok, L, 1.0, "11111")
    mid = build_prompt(tok, L, 0.5, "11111")
    head, tail = _n(tok, INSTRUCTION), _n(tok, QUESTION)
    assert first.key_start == head  # right after the instruction
    assert last.key_start + last.key_tokens == L - tail  # right before the question
    filler = tok(FILLER, add_special_tokens=False)["input_ids"]
    assert first.input_ids[head + first.key_tokens :][: len(filler)] == filler
    assert first.key_start < mid.key_start < last.key_start


def test_bos_prefix_is_counted(tok):
    L = min_length(tok, [0]) + 50
    p = build_prompt(tok, L, 0.3, "54321", prefix=[0])
    assert len(p.input_ids) == L and p.input_ids[0] == 0


def test_keys_seeded_and_reproducible(tok):
    a = prompts_for(tok, 300, [0.1, 0.9], 3, seed=7)
    b = prompts_for(tok, 300, [0.1, 0.9], 3, seed=7)
    c = prompts_for(tok, 300, [0.1, 0.9], 3, seed=8)
    assert [p.input_ids for p in a] == [p.input_ids for p in b]
    assert [p.key for p in a] == [p.key for p in b]
    assert [p.key for p in a] != [p.key for p in c]
    assert len({p.key for p in a}) == len(a)  # trials differ
    assert all(len(p.key) == 5 and p.key.isdigit() for p in a)
    assert make_key(7, 300, 0.1, 0) == a[0].key


def test_bad_depth_and_too_short(tok):
    with pytest.raises(ValueError, match="depth"):
        build_prompt(tok, 400, 1.5, "12345")
    n = min_length(tok)
    build_prompt(tok, n, 0.5, "12345")
    with pytest.raises(ValueError, match="passkey_lengths"):
        build_prompt(tok, n - 1, 0.5, "12345")


def test_extract_answer():
    assert extract_answer(" 48213. Remember") == "48213"
    assert extract_answer("the key: 7 and 8") == "7"
    assert extract_answer("no number") is None


class _Oracle(torch.nn.Module):
    """Answers with the key it reads from the prompt (or a wrong one), to test the checking logic."""

    def __init__(self, tok, prompts: list[PasskeyPrompt], wrong: bool):
        super().__init__()
        self.tok, self.wrong = tok, wrong
        self.by_ids = {tuple(p.input_ids): p for p in prompts}

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert kw["do_sample"] is False
        outs = []
        for row in input_ids.tolist():
            key = self.by_ids[tuple(row)].key
            ans = str((int(key) + 1) % 100000) if self.wrong else key
            gen = self.tok(f" {ans}.", add_special_tokens=False)["input_ids"][:max_new_tokens]
            outs.append(row + gen + [self.tok.eos_token_id] * (max_new_tokens - len(gen)))
        return torch.tensor(outs)


def test_run_passkey_scores_answers(tok):
    prompts = prompts_for(tok, 260, [0.0, 0.5, 1.0], 2, seed=3)
    right = run_passkey(_Oracle(tok, prompts, False), tok, prompts, batch_size=4, device="cpu")
    wrong = run_passkey(_Oracle(tok, prompts, True), tok, prompts, batch_size=4, device="cpu")
    assert all(r["correct"] for r in right) and not any(r["correct"] for r in wrong)
    assert [r["key"] for r in right] == [p.key for p in prompts]
    mixed = right[:3] + wrong[3:]
    assert accuracy_grid(mixed, [0.0, 0.5, 1.0]) == [1.0, 0.5, 0.0]


def test_run_passkey_is_greedy_decoding(tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompts = prompts_for(tok, 200, [0.25, 0.75], 1, seed=11)
    out = run_passkey(model, tok, prompts, batch_size=2, device="cpu", max_new_tokens=5)
    for p, r in zip(prompts, out, strict=False):
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            for _ in range(5):  # plain argmax loop, no cache
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert r["output"] == tok.decode(ids[0, len(p.input_ids) :].tolist(), skip_special_tokens=True)
        assert r["answer"] == extract_answer(r["output"])


def test_distractor_keys_are_seeded_distinct_and_never_the_key():
    for key in ("10000", "48213", "99999"):
        d = distractor_keys(key, 9)
        assert d == distractor_keys(key, 9) and len(set(d)) == 9 and key not in d
        assert all(len(k) == 5 and k.isdigit() for k in d)
    assert distractor_keys("48213", 9) != distractor_keys("48214", 9)


def test_one_digit_distractors_differ_from_the_key_in_exactly_one_digit():
    for key in ("10000", "48213", "99999", "72933"):
        pool = one_digit_neighbours(key)
        assert len(pool) == len(set(pool)) == 44 and key not in pool
        assert all(sum(a != b for a, b in zip(k, key, strict=False)) == 1 and k[0] != "0" for k in pool)
        d = distractor_keys(key, 9, "one_digit")
        assert d == distractor_keys(key, 9, "one_digit") and len(set(d)) == 9 and set(d) <= set(pool)
        assert sorted(distractor_keys(key, 44, "one_digit")) == sorted(pool)
    assert distractor_keys("48213", 9, "one_digit") != distractor_keys("48213", 9)
    with pytest.raises(ValueError, match="only 44"):
        distractor_keys("48213", 45, "one_digit")
    with pytest.raises(ValueError, match="passkey_distractors"):
        distractor_keys("48213", 9, "nearby")


def test_key_choices_match_full_forwards_without_a_cache(tok, tiny_model_dir):
    """Each candidate's score is log P(" <key>" | prompt) summed over its tokens; computed here by one
    plain forward of prompt + candidate per candidate, so a cache not cut back between candidates,
    a token scored from the wrong position or a padded token counted would all show."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompts = prompts_for(tok, 180, [0.2, 0.8], 2, seed=5)
    choices = 4
    got = score_key_choices(model, tok, prompts, choices, batch_size=3, device="cpu")
    assert len(got) == len(prompts)
    for p, g in zip(prompts, got, strict=False):
        scores = []
        for key in [p.key, *distractor_keys(p.key, choices - 1)]:
            cont = tok(ANSWER.format(key=key), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p.input_ids + cont])
            with torch.no_grad():
                logp = model(ids).logits[0].double().log_softmax(-1)
            pos = torch.arange(len(p.input_ids) - 1, ids.shape[1] - 1)
            scores.append(float(logp[pos, torch.tensor(cont)].sum()))
        assert g["key_logprob"] == pytest.approx(scores[0], abs=1e-4)
        assert g["choice_rank"] == sum(s >= scores[0] for s in scores[1:])
        assert g["choice_correct"] == (g["choice_rank"] == 0)


class _Reader(torch.nn.Module):
    """Puts its probability on the digits of the key written in the prompt: a model that retrieves
    perfectly but (like many small ones) would answer in words, for the forced choice to score."""

    def __init__(self, tok, prompts: list[PasskeyPrompt]):
        super().__init__()
        self.tok, self.vocab = tok, len(tok)
        self.keys = {
            tuple(p.input_ids): tok(ANSWER.format(key=p.key), add_special_tokens=False)["input_ids"] for p in prompts
        }

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        rows = input_ids.tolist()
        if past_key_values is None:  # the prompt: remember it, predict the key's first token
            past_key_values = _Cache([self.keys[tuple(r)] for r in rows])
            nxt = [[k[0]] for k in past_key_values.keys]
        else:
            done = past_key_values.grow(len(rows[0]))
            nxt = [
                [k[min(done + i, len(k) - 1)] for i in range(len(r))]
                for k, r in zip(past_key_values.keys, rows, strict=False)
            ]
        logits = torch.full((len(rows), len(nxt[0]), self.vocab), -5.0)
        for b, seq in enumerate(nxt):
            for i, t in enumerate(seq):
                logits[b, i, t] = 5.0
        return type("Out", (), {"logits": logits, "past_key_values": past_key_values})()


class _Cache:
    def __init__(self, keys):
        self.keys, self.extra = keys, 0

    def grow(self, n):
        before = self.extra + 1
        self.extra += n
        return before

    def crop(self, n):
        assert n < 0, "crop takes a negative count of tokens to remove"
        self.extra += n
        assert self.extra == 0, "the cache must be back at the prompt before the next candidate"


def test_forced_choice_credits_retrieval_that_greedy_wording_would_miss(tok):
    prompts = prompts_for(tok, 220, [0.1, 0.9], 3, seed=8)
    got = score_key_choices(_Reader(tok, prompts), tok, prompts, 10, batch_size=2, device="cpu")
    assert all(g["choice_correct"] and g["choice_rank"] == 0 for g in got)
    assert all(g["key_logprob"] > -1.0 for g in got)
    with pytest.raises(ValueError, match="passkey_choices"):
        score_key_choices(_Reader(tok, prompts), tok, prompts, 1, batch_size=2, device="cpu")


class _BlurryReader(_Reader):
    """Retrieves every token of the key but the last, where it spreads its probability evenly over
    the ten digits: a model that holds the key only roughly."""

    def __init__(self, tok, prompts: list[PasskeyPrompt]):
        super().__init__(tok, prompts)
        self.digits = []
        for d in "0123456789":
            ids = tok(ANSWER.format(key="1234" + d), add_special_tokens=False)["input_ids"]
            assert ids[:-1] == tok(ANSWER.format(key="12340"), add_special_tokens=False)["input_ids"][:-1]
            self.digits.append(ids[-1])

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        out = super().forward(input_ids, past_key_values, use_cache, logits_to_keep)
        last = {tuple(k): len(k) - 1 for k in out.past_key_values.keys}
        done = out.past_key_values.extra + 1 - input_ids.shape[1] if past_key_values is not None else 0
        for b, k in enumerate(out.past_key_values.keys):
            for i in range(out.logits.shape[1]):
                if done + i == last[tuple(k)]:
                    out.logits[b, i, self.digits] = 5.0
        return out


def test_one_digit_distractors_tell_a_rough_reader_from_an_exact_one(tok):
    """Random distractors almost never share the key's first four digits, so a reader that only
    roughly holds the last digit still picks the true key; against keys one digit away it ties
    with the neighbours that differ in the last digit and is no longer credited."""
    prompts = prompts_for(tok, 220, [0.1, 0.9], 3, seed=8)
    rough = score_key_choices(_BlurryReader(tok, prompts), tok, prompts, 10, batch_size=2, device="cpu")
    near = score_key_choices(
        _BlurryReader(tok, prompts), tok, prompts, 45, batch_size=2, device="cpu", distractors="one_digit"
    )
    exact = score_key_choices(
        _Reader(tok, prompts), tok, prompts, 45, batch_size=2, device="cpu", distractors="one_digit"
    )
    assert all(g["choice_correct"] for g in rough) and all(g["choice_correct"] for g in exact)
    assert not any(g["choice_correct"] for g in near)
    assert all(g["choice_rank"] == 9 for g in near)  # the nine other last digits score the same


def test_passkey_choices_of_one_is_a_named_config_error():
    from linearard_ray.config import build_config

    assert build_config({"eval": {"passkey_choices": 0}}).eval.passkey_choices == 0
    with pytest.raises(ValueError, match=r"eval\.passkey_choices.*nothing to choose between"):
        build_config({"eval": {"passkey_choices": 1}})
    assert (
        build_config({"eval": {"passkey_distractors": "one_digit", "passkey_choices": 45}}).eval.passkey_choices == 45
    )
    with pytest.raises(ValueError, match=r"passkey_choices: 46 with passkey_distractors 'one_digit'"):
        build_config({"eval": {"passkey_distractors": "one_digit", "passkey_choices": 46}})
    with pytest.raises(ValueError, match="passkey_distractors"):
        build_config({"eval": {"passkey_distractors": "nearby"}})
