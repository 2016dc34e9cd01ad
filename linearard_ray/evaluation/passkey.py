"""Passkey retrieval, generated offline: a five-digit key hidden at a chosen depth inside filler
text of an exact token length, then greedy decoding of the answer.

The prompt follows the common passkey test (Mohtashami & Jaggi 2023): an instruction, filler
sentences, the key line at `depth` (0 = start of the filler, 1 = end), the filler's remainder and
the question. Pieces are tokenised separately and joined as ids, so the prompt has exactly the
requested number of tokens and the key sits at a known token position.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import numpy as np
import torch

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important info there.\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    input_ids: list[int]
    key: str
    length: int
    depth: float
    key_start: int  # token index where the key line starts
    key_tokens: int  # tokens of the key line


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_key(seed: int, length: int, depth: float, trial: int) -> str:
    """The trial's five-digit key; a function of (seed, length, depth, trial) only."""
    rng = np.random.default_rng([seed, length, int(round(depth * 1000)), trial])
    return str(int(rng.integers(10000, 100000)))


def min_length(tokenizer, prefix: list[int] | None = None) -> int:
    """Shortest prompt possible (no filler) with this tokenizer."""
    return (
        len(prefix or [])
        + len(_ids(tokenizer, INSTRUCTION))
        + len(_ids(tokenizer, KEY_LINE.format(key="99999")))
        + len(_ids(tokenizer, QUESTION))
        + 1
    )


def build_prompt(tokenizer, length: int, depth: float, key: str, prefix: list[int] | None = None) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens with `key` at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"eval.passkey_depths: depth {depth} must be within [0, 1]")
    prefix = list(prefix or [])
    head = prefix + _ids(tokenizer, INSTRUCTION)
    key_ids = _ids(tokenizer, KEY_LINE.format(key=key))
    tail = _ids(tokenizer, QUESTION)
    n_filler = length - len(head) - len(key_ids) - len(tail)
    if n_filler < 1:
        raise ValueError(
            f"eval.passkey_lengths: {length} tokens is shorter than the passkey prompt itself "
            f"(needs at least {len(head) + len(key_ids) + len(tail) + 1})"
        )
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    before = int(round(depth * n_filler))
    ids = head + filler[:before] + key_ids + filler[before:] + tail
    assert len(ids) == length
    return PasskeyPrompt(ids, key, length, depth, len(head) + before, len(key_ids))


def prompts_for(
    tokenizer, length: int, depths: list[float], trials: int, seed: int, prefix: list[int] | None = None
) -> list[PasskeyPrompt]:
    return [
        build_prompt(tokenizer, length, d, make_key(seed, length, d, t), prefix) for d in depths for t in range(trials)
    ]


def extract_answer(text: str) -> str | None:
    """The first number in the generated text (the model's answer)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def _batches(prompts: list[PasskeyPrompt], batch_size: int, device):
    """(prompts, their ids as one tensor) per batch; prompts of one length have the same number of
    tokens, so batches need no padding."""
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        if len({len(p.input_ids) for p in chunk}) != 1:
            raise ValueError("passkey prompts of one batch must have the same length")
        yield chunk, torch.tensor([p.input_ids for p in chunk], dtype=torch.long, device=device)


@torch.no_grad()
def run_passkey(
    model, tokenizer, prompts: list[PasskeyPrompt], batch_size: int, device, max_new_tokens: int | None = None
) -> list[dict]:
    """Greedy-decode each prompt; one {'depth', 'key', 'answer', 'correct'} per prompt.

    Prompts of one length have the same number of tokens, so batches need no padding.
    """
    if max_new_tokens is None:
        max_new_tokens = len(_ids(tokenizer, " 99999.")) + 2
    out = []
    for chunk, ids in _batches(prompts, batch_size, device):
        mask = torch.ones_like(ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for p, g in zip(chunk, gen[:, ids.shape[1] :], strict=False):
            text = tokenizer.decode(g.tolist(), skip_special_tokens=True)
            ans = extract_answer(text)
            out.append({"depth": p.depth, "key": p.key, "answer": ans, "output": text, "correct": ans == p.key})
    return out


ANSWER = " {key}"  # what a right answer to QUESTION starts with


DISTRACTOR_KINDS = ("random", "one_digit")


def one_digit_neighbours(key: str) -> list[str]:
    """Every five-digit key that differs from ``key`` in exactly one digit (44: no leading zero)."""
    return [
        key[:i] + d + key[i + 1 :]
        for i in range(len(key))
        for d in "0123456789"
        if d != key[i] and not (i == 0 and d == "0")
    ]


def distractor_keys(key: str, n: int, kind: str = "random") -> list[str]:
    """``n`` distinct five-digit keys other than ``key``, a function of the key alone, so every model
    is offered the same choices for a prompt.

    'random' draws them from all five-digit keys: any retrieval at all tells the true key apart.
    'one_digit' draws them from the 44 keys one digit away: only a model that holds every digit
    picks the true one. That is where PI's compressed positions show (a doubled digit written once)."""
    if kind not in DISTRACTOR_KINDS:
        raise ValueError(f"eval.passkey_distractors: {kind!r} is not one of {DISTRACTOR_KINDS}")
    rng = np.random.default_rng([int(key), n] + ([1] if kind == "one_digit" else []))
    if kind == "one_digit":
        pool = one_digit_neighbours(key)
        if n > len(pool):
            raise ValueError(
                f"eval.passkey_choices: {n + 1} choices need {n} one-digit neighbours of a key, "
                f"which has only {len(pool)}"
            )
        return [pool[i] for i in rng.permutation(len(pool))[:n]]
    out: list[str] = []
    while len(out) < n:
        k = str(int(rng.integers(10000, 100000)))
        if k != key and k not in out:
            out.append(k)
    return out


@torch.no_grad()
def score_key_choices(
    model, tokenizer, prompts: list[PasskeyPrompt], choices: int, batch_size: int, device, distractors: str = "random"
) -> list[dict]:
    """Forced-choice retrieval: the log-probability the model gives the true key right after the
    question, against ``choices - 1`` distractor keys, teacher-forced. One {'key_logprob',
    'choice_rank', 'choice_correct'} per prompt; rank 0 means the true key scored strictly highest.

    Greedy answers also measure the answer's wording: a model that replies "a key that is used to
    unlock ..." fails however well it read the key. Every candidate here has the same form, so this
    score is retrieval alone; chance is 1 / ``choices``.

    The prompt is run once; each candidate then runs on its key-value cache, which is cut back to
    the prompt before the next one (a negative ``crop`` removes tokens in every transformers 5).
    """
    if choices < 2:
        raise ValueError(
            f"eval.passkey_choices: {choices} leaves nothing to choose between (use 0 to turn it off, or ≥ 2)"
        )
    # transformers 5.24 renamed forward's past_key_values to cache (the old name goes in 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    for chunk, ids in _batches(prompts, batch_size, device):
        res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        first = res.logits[:, -1].float().log_softmax(-1)
        cache = getattr(res, "cache", None)
        if cache is None:
            cache = res.past_key_values
        cands = [[p.key, *distractor_keys(p.key, choices - 1, distractors)] for p in chunk]
        scores = torch.zeros(len(chunk), choices, dtype=torch.float64)
        for c in range(choices):
            conts = [_ids(tokenizer, ANSWER.format(key=row[c])) for row in cands]
            n = max(len(x) for x in conts)
            # padding after a row's last token cannot change its earlier positions (causal), and is not scored
            toks = torch.tensor([x + [x[-1]] * (n - len(x)) for x in conts], dtype=torch.long, device=device)
            lp = first.gather(1, toks[:, :1]).squeeze(1).double()
            if n > 1:
                r = model(input_ids=toks[:, :-1], use_cache=True, **{cache_arg: cache})
                tok_lp = r.logits.float().log_softmax(-1).gather(2, toks[:, 1:, None]).squeeze(2).double()
                real = (
                    torch.arange(1, n, device=device)[None, :]
                    < torch.tensor([len(x) for x in conts], device=device)[:, None]
                )
                lp = lp + (tok_lp * real).sum(1)
                cache.crop(-(n - 1))
            scores[:, c] = lp.cpu()
        for row in scores:
            rank = int((row[1:] >= row[0]).sum())
            out.append({"key_logprob": float(row[0]), "choice_rank": rank, "choice_correct": rank == 0})
    return out


def accuracy_grid(results: list[dict], depths: list[float]) -> list[float]:
    """Accuracy per depth (in the order of `depths`)."""
    acc = []
    for d in depths:
        rows = [r for r in results if r["depth"] == d]
        acc.append(float(np.mean([r["correct"] for r in rows])) if rows else float("nan"))
    return acc
