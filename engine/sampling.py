"""Token sampling: greedy, temperature, top-k, top-p, with a seeded generator per request so
that a request's samples do not depend on what it was batched with; and the acceptance rule
of speculative decoding, which keeps exactly the distribution of plain sampling."""

from __future__ import annotations

import secrets

import torch

from shared.messages import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask, in each row, everything outside the top-k tokens and the top-p probability mass."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[..., 0] = False  # the likeliest token stays, whatever top_p rounds to in float32
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from, per row."""
    return torch.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row of `logits` [B, vocab]."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[i] = int(torch.multinomial(probabilities(logits[i], p), 1, generator=gen).item())
    return tokens


def verify(
    logits: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens a speculative step yields: the accepted prefix of `draft`, then one token of
    the target's own (a correction, or a bonus when all were accepted).

    `logits` [k + 1, vocab] are the target's at the last known token and at each draft token;
    `draft_probs` [k, vocab] the distributions the draft tokens were drawn from, or None for a
    deterministic proposer (n-gram lookup, greedy draft). Greedy requests accept while the
    target's argmax agrees, so they get exactly the tokens of plain greedy decoding. Sampled
    requests use rejection sampling: accept token d with probability min(1, p(d) / q(d)),
    else draw from the normalised max(0, p - q), which leaves the target's distribution p
    unchanged.
    """
    if params.greedy:
        target = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == target[n]:
            n += 1
        return draft[:n] + [target[n]]
    p = probabilities(logits, params)
    if draft_probs is None:
        draft_probs = torch.zeros(len(draft), p.shape[-1], device=p.device)
        draft_probs[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)] = 1.0
    for j, token in enumerate(draft):
        u = float(torch.rand(1, generator=generator, device=p.device))
        if u * float(draft_probs[j, token]) < float(p[j, token]):
            continue
        residual = torch.clamp(p[j] - draft_probs[j], min=0)
        if float(residual.sum()) <= 0:
            residual = p[j]
        return draft[:j] + [int(torch.multinomial(residual, 1, generator=generator).item())]
    return draft + [int(torch.multinomial(p[len(draft)], 1, generator=generator).item())]
