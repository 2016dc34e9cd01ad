"""In-training held-out evaluation: the student's next-token NLL on text it is not trained on,
every ``train.eval_every`` steps, beside the teacher's (measured once)."""

from __future__ import annotations

import torch

from linearard_ray.config import UNSEEN_MEAN, UNSEEN_WORST, Config, ConfigError, domain_metric
from linearard_ray.training.distributed import all_reduce_sum, autocast

DEFAULT_EVAL_SOURCE = "builtin:sotu/eval"


class HeldOutEval:
    """Mean next-token NLL of the student (and once, the teacher) on the held-out blocks of one
    text domain: the first ``train.eval_texts`` documents of at least ``data.ctx_len`` tokens, cut
    to that length, and with ``train.eval_long_len`` the start of the documents joined.

    Windows are split across workers and the sums all-reduced, so every worker ends with the same
    numbers (they are reported through ``ray.train.report``, where a sweep reads them). Metric
    names carry ``prefix`` (empty for held-out SOTU, ``eval_<name>_`` for a train.eval_sources
    domain); ``field`` is the config field that errors name.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer,
        device: torch.device,
        rank: int,
        world: int,
        *,
        sources: tuple[str, ...] = (DEFAULT_EVAL_SOURCE,),
        prefix: str = "",
        field: str = "train.eval_every",
    ):
        self.cfg, self.device, self.rank, self.world, self.prefix = cfg, device, rank, world, prefix
        T, L = cfg.data.ctx_len, cfg.train.eval_long_len
        ids = self._documents(tokenizer, sources, field)
        short = short_windows(ids, T, cfg.train.eval_texts)
        if not short:
            raise ConfigError(f"{field}: no held-out document of {', '.join(sources)} has data.ctx_len={T} tokens")
        self.short = short
        self.long: list[list[int]] = []
        if L:
            flat = [t for d in ids for t in d]
            n = min(max(1, world), len(flat) // L)
            if n == 0:
                raise ConfigError(f"train.eval_long_len={L}: the held-out text of {field} has only {len(flat)} tokens")
            self.long = [flat[i * L : (i + 1) * L] for i in range(n)]
        self.teacher_nll: float | None = None
        self.latest: dict[str, float] = {}

    def _documents(self, tokenizer, sources: tuple[str, ...], field: str) -> list[list[int]]:
        """Token ids (with EOS) of the documents in order, tokenized only until there are enough
        for the windows: a large domain (all of pydocs) is not tokenized whole on every worker."""
        from linearard_ray.evaluation.texts import TextsError, load_documents

        c = self.cfg
        T, n_short, n_flat = c.data.ctx_len, c.train.eval_texts, self.world * (c.train.eval_long_len or 0)
        try:
            docs = load_documents(sources, c.data.text_column).documents
        except TextsError as e:
            raise ConfigError(f"{field}: {e}") from None
        eos = tokenizer.eos_token_id
        out: list[list[int]] = []
        long_enough = total = 0
        for doc in docs:
            ids = list(tokenizer(doc.text)["input_ids"]) + ([eos] if eos is not None else [])
            out.append(ids)
            long_enough += len(ids) >= T
            total += len(ids)
            if long_enough >= n_short and total >= n_flat:
                break
        return out

    def _mean_nll(self, model, windows: list[list[int]]) -> float:
        from linearard_ray.evaluation.metrics import sequence_nll

        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(self.cfg, self.device):
            for i in range(self._rounds(len(windows))):
                if i % self.world != self.rank:
                    continue
                # a sharded model's forward is a collective: a rank without a window of its own in
                # this round runs one anyway, and leaves it out of the sums
                ids = torch.tensor([windows[i % len(windows)]], dtype=torch.long, device=self.device)
                s, c = sequence_nll(model, ids, torch.ones_like(ids))
                if i < len(windows):
                    total += s
                    count += c
        if was_training:
            model.train()
        total, count = all_reduce_sum([total, float(count)], self.device)
        return total / max(count, 1.0)

    def _rounds(self, n: int) -> int:
        """Windows visited: ``n``, or with sharded models (train.parallelism=fsdp) enough that every
        worker runs as many forwards as the others."""
        if self.cfg.train.parallelism != "fsdp":
            return n
        return -(-n // self.world) * self.world

    def compute_teacher(self, teacher) -> None:
        self.teacher_nll = self._mean_nll(teacher, self.short)

    def __call__(self, student) -> dict[str, float]:
        from linearard_ray.evaluation.report import restoration

        s = self._mean_nll(student, self.short)
        out = {"student_nll": s}
        if self.teacher_nll is not None:
            out["teacher_nll"] = self.teacher_nll
            out["nll_gap"] = s - self.teacher_nll
            # the evaluation report's recovery: 100 × teacher perplexity ÷ student perplexity
            out["recovery_pct"] = restoration(self.teacher_nll, None, s)["recovery_pct"]
        if self.long:
            out["long_nll"] = self._mean_nll(student, self.long)
        self.latest = out
        return {self.prefix + k: v for k, v in out.items()}


def short_windows(docs: list[list[int]], length: int, n: int) -> list[list[int]]:
    """Up to ``n`` windows of ``length`` tokens: the start of each of the first ``n`` documents
    that long; when fewer documents are that long (a held-out genre of a few long texts), each long
    document's consecutive pieces instead, taken round-robin so that every document contributes."""
    starts = [d[:length] for d in docs if len(d) >= length]
    if len(starts) >= n:
        return starts[:n]
    pieces = [[d[i : i + length] for i in range(0, len(d) - length + 1, length)] for d in docs]
    out: list[list[int]] = []
    for k in range(max((len(p) for p in pieces), default=0)):
        out += [p[k] for p in pieces if k < len(p)]
    return out[:n]


class DomainSummary:
    """Recovery over the train.eval_sources domains, the figure a sweep can rank trials by when the
    domains are genres the student never trains on: the mean and the worst domain's
    ``recovery_pct`` (``unseen_mean_recovery_pct``, ``unseen_worst_recovery_pct``). It reads the
    domain evaluations' latest results, so it comes after them in the list."""

    def __init__(self, domains: list[HeldOutEval]):
        self.domains = domains

    def compute_teacher(self, teacher) -> None:
        pass  # the domains measure their own teacher NLL

    def __call__(self, student) -> dict[str, float]:
        recoveries = [ev.latest["recovery_pct"] for ev in self.domains if "recovery_pct" in ev.latest]
        if not recoveries:
            return {}
        return {
            UNSEEN_MEAN: sum(recoveries) / len(recoveries),
            UNSEEN_WORST: min(recoveries),
        }


def held_out_evals(
    cfg: Config, tokenizer, device: torch.device, rank: int, world: int
) -> list[HeldOutEval | DomainSummary]:
    """Held-out SOTU, then one evaluation per ``train.eval_sources`` domain (same windows rule,
    same cadence, metrics named ``eval_<name>_<metric>``) and, with any domain, their summary."""
    evals: list[HeldOutEval | DomainSummary] = [HeldOutEval(cfg, tokenizer, device, rank, world)]
    for name, sources in cfg.train.eval_sources.items():
        evals.append(
            HeldOutEval(
                cfg,
                tokenizer,
                device,
                rank,
                world,
                sources=tuple(sources),
                prefix=domain_metric(name, ""),
                field=f"train.eval_sources.{name}",
            )
        )
    if len(evals) > 1:
        evals.append(DomainSummary(evals[1:]))
    return evals
