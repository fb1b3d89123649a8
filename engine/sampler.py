"""The sampler: from one step's logits to one token per sequence (and its logprobs).

Order of operations, per row:

1. logprobs, when asked, are ``log_softmax`` of the RAW logits (before anything below);
2. ``min_tokens``: while fewer tokens have been generated, EOS (unless ``ignore_eos``) and
   ``stop_token_ids`` are masked to ``-inf``;
3. penalties: repetition (vLLM/HF: over prompt and generated tokens, positive logits divided
   by the penalty, negative ones multiplied), then frequency and presence (OpenAI: over
   generated tokens, ``logit -= frequency * count + presence * (count > 0)``);
4. greedy rows (``temperature == 0``) take the argmax here;
5. other rows: divide by the temperature, then top-k, top-p, min-p (Hugging Face's order),
   then draw (inverse CDF: one uniform number a row). A request with a seed draws only from
   its own ``torch.Generator``, reseeded before each draw from (seed, output index) by
   ``step_seed``: its k-th token depends on nothing but the seed, k and the logits, so
   neither its batch companions nor the worker that samples it (prefill worker, decode
   worker, or the one a request migrated to) matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request
from engine.scheduler_output import TokenLogprobs


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """The per-request generator for a request with ``SamplingParams.seed``."""
    return torch.Generator(device=device).manual_seed(seed)


_MASK64 = (1 << 64) - 1


def step_seed(seed: int, output_index: int) -> int:
    """The generator seed for a seeded request's ``output_index``-th token: splitmix64 of
    the pair, so neighbouring indices and seeds give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + (output_index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class PenaltyInputs:
    """Present only when some row of the step has a non-neutral penalty."""

    presence: torch.Tensor  # [num_seqs] float32
    frequency: torch.Tensor  # [num_seqs] float32
    repetition: torch.Tensor  # [num_seqs] float32
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]


@dataclass
class SamplingMetadata:
    """One step's sampling inputs, one row per sequence being sampled."""

    temperature: torch.Tensor  # [num_seqs] float32; 1.0 on greedy rows (unused there)
    greedy: torch.Tensor  # [num_seqs] bool
    all_greedy: bool
    any_greedy: bool
    top_k: torch.Tensor | None  # [num_seqs] int64, <= 0 disables; None: no row uses it
    top_p: torch.Tensor | None  # [num_seqs] float32, 1.0 disables
    min_p: torch.Tensor | None  # [num_seqs] float32, 0.0 disables
    generators: list[torch.Generator | None]  # per row: its own generator, or the global RNG
    penalties: PenaltyInputs | None
    # min_tokens: row -> token ids masked this step.
    banned_token_ids: dict[int, list[int]]
    num_logprobs: list[int | None]  # per row: None, or N (top-N alternatives)

    @property
    def max_num_logprobs(self) -> int | None:
        wanted = [n for n in self.num_logprobs if n is not None]
        return max(wanted) if wanted else None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # None when no row asked; otherwise one entry per row, None for rows that did not ask.
    logprobs: list[TokenLogprobs | None] | None


def _banned_token_ids(request: Request) -> list[int]:
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    banned = set(params.stop_token_ids)
    if request.eos_token_id is not None and not params.ignore_eos:
        banned.add(request.eos_token_id)
    return sorted(banned)


def build_sampling_metadata(
    requests: list[Request],
    generators: dict[str, torch.Generator],
    device: torch.device,
) -> SamplingMetadata:
    """Rows follow ``requests``; ``generators`` holds the seeded requests' generators, each
    reseeded here for the token it is about to draw (``step_seed``)."""
    params = [r.sampling_params for r in requests]
    for request in requests:
        generator = generators.get(request.request_id)
        if generator is not None:
            seed = request.sampling_params.seed
            generator.manual_seed(step_seed(seed, request.num_output_tokens))

    def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    greedy = [p.greedy for p in params]
    use_penalties = any(
        p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
        for p in params
    )
    banned = {row: ids for row, r in enumerate(requests) if (ids := _banned_token_ids(r))}
    penalties = None
    if use_penalties:
        penalties = PenaltyInputs(
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            repetition=column([p.repetition_penalty for p in params]),
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
        )
    return SamplingMetadata(
        temperature=column([1.0 if p.greedy else p.temperature for p in params]),
        greedy=column(greedy, torch.bool),
        all_greedy=all(greedy),
        any_greedy=any(greedy),
        top_k=column([p.top_k for p in params], torch.int64)
        if any(p.top_k > 0 for p in params)
        else None,
        top_p=column([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
        min_p=column([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None,
        generators=[generators.get(r.request_id) for r in requests],
        penalties=penalties,
        banned_token_ids=banned,
        num_logprobs=[p.logprobs for p in params],
    )


# -- logits processing (each a pure function, tested on hand-made numbers) --------------------


def token_counts(
    token_ids: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:  # [num_seqs, vocab_size] int32: how often each token occurs in each row
    max_len = max((len(ids) for ids in token_ids), default=0)
    padded = torch.full((len(token_ids), max_len), vocab_size, dtype=torch.int64)
    for row, ids in enumerate(token_ids):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    padded = padded.to(device)  # padding points at an extra column, dropped below
    counts = torch.zeros((len(token_ids), vocab_size + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,  # [num_seqs, vocab_size] float32
    prompt_counts: torch.Tensor,  # [num_seqs, vocab_size] int
    output_counts: torch.Tensor,  # [num_seqs, vocab_size] int
    presence_penalties: torch.Tensor,  # [num_seqs]
    frequency_penalties: torch.Tensor,  # [num_seqs]
    repetition_penalties: torch.Tensor,  # [num_seqs]
) -> torch.Tensor:  # [num_seqs, vocab_size] float32
    seen = (prompt_counts > 0) | (output_counts > 0)
    repetition = repetition_penalties[:, None]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    logits = logits - frequency_penalties[:, None] * output_counts
    return logits - presence_penalties[:, None] * (output_counts > 0)


# How many of a row's largest logits top-k / top-p look at, widening, before sorting the
# whole row: a trained model's nucleus is mostly within the first (SmolLM2, top-p 0.95 at
# temperature 1 on real text: a median of ~100 tokens, a few rows of thousands), and a top-k
# of 256 over its 49,152 logits costs 6.5 ms at 32 rows, of 4,096 24 ms, a sort 137 ms (one
# CPU core, each op timed alone; the whole function: ``benchmarks/sampler_cpu.py``).
TOP_CANDIDATES = (256, 4096)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [num_seqs, vocab_size] float32 (temperature applied)
    top_k: torch.Tensor | None,  # [num_seqs] int64, <= 0 disables
    top_p: torch.Tensor | None,  # [num_seqs] float32, 1.0 disables
) -> torch.Tensor:  # [num_seqs, vocab_size], masked entries -inf
    """Hugging Face's order: top-k keeps the logits >= the k-th largest; top-p then keeps the
    fewest most likely tokens whose probability (renormalized over what top-k kept) reaches
    p, ties with the last one kept included. Each row is decided on its largest logits
    (``TOP_CANDIDATES``, or k + 1 where k is larger) once its kept set ends inside them, and
    on the whole sorted row where it never does."""
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[1]
    k = None if top_k is None else torch.where(top_k <= 0, vocab_size, top_k.clamp(max=vocab_size))
    # Rows neither limit touches keep everything.
    free = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if k is not None:
        free &= k == vocab_size
    if top_p is not None:
        free &= top_p >= 1.0
    cuts = torch.full_like(logits[:, :1], float("-inf"))  # the smallest logit each row keeps
    pending = (~free).nonzero().flatten()
    for candidates in TOP_CANDIDATES:
        if not pending.numel():
            break
        rows_k = None if k is None else k[pending]
        largest_k = 0 if rows_k is None else int(rows_k.masked_fill(rows_k == vocab_size, 0).max())
        width = max(candidates, largest_k + 1)
        if width >= vocab_size:
            break
        every_row = pending.numel() == logits.shape[0]
        rows_p = None if top_p is None else top_p[pending]
        cut = _top_k_top_p_cut(logits if every_row else logits[pending], rows_k, rows_p, width)
        settled = ~cut.squeeze(1).isnan()
        cuts[pending[settled]] = cut[settled]
        pending = pending[~settled]
    out = logits.masked_fill(logits < cuts, float("-inf"))
    if pending.numel():
        out[pending] = _top_k_top_p_sorted(
            logits[pending],
            None if k is None else k[pending],
            None if top_p is None else top_p[pending],
        )
    return out


def _top_k_top_p_cut(
    logits: torch.Tensor,  # [num_seqs, vocab_size]
    k: torch.Tensor | None,  # [num_seqs] int64 in [1, vocab_size]; vocab_size: off
    top_p: torch.Tensor | None,  # [num_seqs] float32; 1.0: off
    width: int,  # > every k below vocab_size
) -> torch.Tensor:  # [num_seqs, 1]: the smallest logit kept; NaN where it may lie past width
    vocab_size = logits.shape[1]
    values = logits.topk(width, dim=-1).values  # largest first
    keep = torch.ones_like(values, dtype=torch.bool)
    if k is not None:
        top_k_on = (k < vocab_size).unsqueeze(1)
        kth = values.gather(1, (k.clamp(max=width) - 1).unsqueeze(1))
        keep &= ~top_k_on | (values >= kth)
    if top_p is not None:
        # Probabilities renormalized over what top-k kept (the whole row where it is off), in
        # float64 as in the sorted path: the two can differ only within ~1e-16 of a boundary.
        kept = values.double().masked_fill(~keep, float("-inf"))
        if k is not None and bool(top_k_on.all()):
            log_total = kept.logsumexp(dim=-1, keepdim=True)  # no row needs the whole row's
        else:
            log_total = logits.double().logsumexp(dim=-1, keepdim=True)
            if k is not None:
                log_total = torch.where(top_k_on, kept.logsumexp(dim=-1, keepdim=True), log_total)
        probs = (kept - log_total).exp()
        before = probs.cumsum(dim=-1) - probs  # the mass of the more likely candidates
        keep &= (before < top_p.double().unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1)
        keep[:, 0] = True
    num_kept = keep.sum(dim=-1, keepdim=True)
    cut = values.gather(1, num_kept - 1)
    # All candidates kept: the kept set (or top-k's ties) may go on past them.
    return cut.masked_fill(num_kept == width, float("nan"))


def _top_k_top_p_sorted(
    logits: torch.Tensor,  # [num_seqs, vocab_size]
    k: torch.Tensor | None,  # [num_seqs] int64 in [1, vocab_size]
    top_p: torch.Tensor | None,  # [num_seqs] float32
) -> torch.Tensor:  # [num_seqs, vocab_size], masked entries -inf
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[1]
    if k is not None:
        kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        # Drop the least likely tokens while their total stays <= 1 - top_p; keep the best one.
        cumulative = sorted_logits.double().softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p.double()).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits.scatter(1, order, sorted_logits)


def apply_min_p(
    logits: torch.Tensor,  # [num_seqs, vocab_size] float32
    min_p: torch.Tensor,  # [num_seqs] float32, 0.0 disables
) -> torch.Tensor:  # [num_seqs, vocab_size], masked entries -inf
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def _draw(
    probs: torch.Tensor,  # [num_seqs, vocab_size]
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # [num_seqs] int64
    """One token a row: a uniform draw (from the row's own generator where it has one) looked
    up in the row's cumulative probabilities (``inverse_cdf``)."""
    uniform = torch.empty(probs.shape[0], dtype=torch.float64, device=probs.device)
    if any(g is None for g in generators):
        uniform.uniform_()
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row].uniform_(generator=generator)
    return inverse_cdf(probs, uniform)


def inverse_cdf(
    probs: torch.Tensor,  # [num_seqs, vocab_size], rows summing to ~1, masked entries 0
    uniform: torch.Tensor,  # [num_seqs] float64 in [0, 1)
) -> torch.Tensor:  # [num_seqs] int64
    """The first token whose running total of probability exceeds ``uniform * total``: token
    i with probability p_i, and never a token of probability 0 (its running total equals its
    predecessor's). One number and one cumulative sum a row: 2.5 ms at 32 rows of SmolLM2's
    49,152 tokens on one CPU core, where an exponential per vocabulary entry (the
    "exponential race") took 38 ms (``benchmarks/sampler_cpu.py``). The sum is in float64, so
    rounding shifts no token's share by more than ~1e-16."""
    cumulative = probs.to(torch.float64).cumsum_(dim=-1)
    targets = uniform.unsqueeze(1) * cumulative[:, -1:]
    token_ids = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    token_ids.clamp_(max=probs.shape[1] - 1)
    # ``uniform * total`` can round up to the total itself: the clamp then lands on the last
    # token, which may be masked. Such a row takes its most likely token instead.
    missed = probs.gather(1, token_ids.unsqueeze(1)).squeeze(1) == 0
    if missed.any():
        token_ids = torch.where(missed, probs.argmax(dim=-1), token_ids)
    return token_ids


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab_size] float32
        metadata: SamplingMetadata,
    ) -> SamplerOutput:
        assert logits.shape[0] == len(metadata.generators), "one row of logits per sequence"
        wants_logprobs = metadata.max_num_logprobs is not None
        raw_logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None
        logits = self._process(logits, metadata)
        token_ids = logits.argmax(dim=-1) if metadata.any_greedy else None
        if not metadata.all_greedy:
            logits = logits / metadata.temperature.unsqueeze(1)
            logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
            if metadata.min_p is not None:
                logits = apply_min_p(logits, metadata.min_p)
            sampled = _draw(logits.softmax(dim=-1), metadata.generators)
            token_ids = (
                sampled if token_ids is None else torch.where(metadata.greedy, token_ids, sampled)
            )
        token_id_list = token_ids.tolist()
        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(
                raw_logprobs, token_ids, token_id_list, metadata.num_logprobs
            )
        return SamplerOutput(token_ids=token_id_list, logprobs=logprobs)

    @staticmethod
    def _process(
        logits: torch.Tensor,  # [num_seqs, vocab_size] float32
        metadata: SamplingMetadata,
    ) -> torch.Tensor:  # [num_seqs, vocab_size] float32
        if metadata.banned_token_ids:
            logits = logits.clone()
            for row, ids in metadata.banned_token_ids.items():
                logits[row, ids] = float("-inf")
        penalties = metadata.penalties
        if penalties is not None:
            vocab_size, device = logits.shape[1], logits.device
            logits = apply_penalties(
                logits,
                token_counts(penalties.prompt_token_ids, vocab_size, device),
                token_counts(penalties.output_token_ids, vocab_size, device),
                penalties.presence,
                penalties.frequency,
                penalties.repetition,
            )
        return logits


def _gather_logprobs(
    raw_logprobs: torch.Tensor,  # [num_seqs, vocab_size] float32
    token_ids: torch.Tensor,  # [num_seqs] int64
    token_id_list: list[int],
    num_logprobs: list[int | None],
) -> list[TokenLogprobs | None]:
    max_n = max(n for n in num_logprobs if n is not None)
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = raw_logprobs.topk(max_n, dim=-1)  # sorted, largest first
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    out: list[TokenLogprobs | None] = []
    for row, n in enumerate(num_logprobs):
        if n is None:
            out.append(None)
            continue
        top = dict(zip(top_ids_list[row][:n], top_values_list[row][:n], strict=True))
        out.append(
            TokenLogprobs(token_id=token_id_list[row], logprob=sampled[row], top_logprobs=top)
        )
    return out
