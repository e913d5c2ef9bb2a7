"""Router math: ONE reference per router family, shared by the op, the nn module, the losses, the tests.

    route(logits [T, L], spec, correction_bias [E]?, token_ids [T]?) -> (weights [T, S], ids [T, S])

S = k for token-choice routers, S = E for expert choice. A slot whose token was dropped (capacity) or
not picked (expert choice) has id -1 and weight 0. Token-choice slots are ordered by the score that
chose them, best first (torch.topk sorted): that order is the capacity priority, and it makes every
backend agree. Logits come from a Linear outside the op (L = E, or G + E for hierarchical: groups first).

    softmax_topk   p = softmax(l); top-k of p [; w / Σw]       Switch (k=1), GShard, Mixtral, Qwen-MoE
                   n_groups > 1: group-limited greedy, top groups by max/top-2 score   DeepSeek-V2
    topk_softmax   top-k of l; softmax over the k                 GPT-OSS
    sigmoid_topk   s = σ(l); choose top-k of s + b (b: correction bias, choosing only), within the
                   topk_groups groups of best top-2-sum (or max) of s + b; w = s[ids] [/ (Σ + 1e-20)]
                   DeepSeek-V3, exactly as transformers' DeepseekV3TopkRouter
    expert_choice  p = softmax(l); expert e takes its C top tokens by p[:, e]   Zhou et al. 2022
    hash           token id -> k experts by a fixed hash; w = 1/k             Roller et al. 2021
    topk_unit      top-k of l; w = 1 for each chosen expert              MoEfication (moefy)
    hierarchical   p(e) = softmax(l_G)[g(e)] · softmax(l_E within g(e)); top groups, then top-k of p
    every family:  w *= scaling (routed scaling factor)

Capacity (token-choice routers): C = ceil(capacity_factor · T · k / E) slots per expert. Assignments
are served slot-major (every token's 1st choice in token order, then every 2nd choice, ...); those
past C are dropped (id -1, weight 0): the token keeps its other experts and the residual carries it.
capacity_factor None = dropless. A fixed `capacity` (slots, Switch's expert_capacity) overrides the
factor; `capacity_per_row` keeps one queue per sequence of x [B, S, H] (Switch/T5X), not per call.
Dynamic capacity = the factor recomputed OUTSIDE the op, between steps, from the demand (choices
before dropping) observed over a window of steps (`capacity_factor_for`, moecc.monitor.dynamic_capacity):
capacity then equals the busiest expert's recent demand (× margin), and the op stays a pure function.

Expert choice is batch-dependent: a token's experts depend on the other tokens in the call. In
decoding (one token per call) every expert takes that token — the output differs from prefill.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from .errors import MoeccError
from .spec import MoESpec

GROUPED = ("softmax_topk", "sigmoid_topk", "hierarchical")
GROUP_SCORES = ("top2_sum", "max")

# CLI spelling -> one line, for `moecc inspect --routers` (kind = spelling with '-' -> '_')
ROUTER_HELP = {
    "softmax-topk": "softmax over all E experts, keep the top-k (renormalize the k weights or not); "
                    "with --n-groups: group-limited top-k (DeepSeek-V2). Switch, GShard, Mixtral, Qwen-MoE",
    "topk-softmax": "top-k of the raw logits, softmax over those k (GPT-OSS)",
    "sigmoid-topk": "sigmoid scores; a per-expert correction bias (aux-loss-free balancing) only chooses; "
                    "group-limited top-k; weights renormalized and scaled (DeepSeek-V3)",
    "expert-choice": "each expert takes its top tokens up to capacity (Zhou et al. 2022); batch-dependent: "
                     "decoding one token at a time routes differently from prefill",
    "hash": "token id -> k experts by a fixed hash, no router parameters (Roller et al. 2021); "
            "needs the model's token ids",
    "hierarchical": "a first router picks the top groups of experts, a second picks experts within them "
                    "(logits: G group + E expert columns)",
    "topk-unit": "top-k of the raw logits, each chosen expert weighted 1: the experts are disjoint "
                 "slices of one dense FFN (moefy), so all experts on = the dense FFN",
}


def kind_of(spelling: str) -> str:
    """CLI spelling ('sigmoid-topk') or kind ('sigmoid_topk') -> kind."""
    return spelling.strip().lower().replace("-", "_")


def check(spec: MoESpec) -> MoESpec:
    """spec.validate() plus the router constraints only the router math knows."""
    spec.validate()
    r, where = spec.router, f"MoE layer {spec.name or '?'}"
    if r.n_groups > 1 and r.kind not in GROUPED:
        raise MoeccError(f"{where}: n_groups={r.n_groups} (group-limited routing) applies to "
                         f"{', '.join(GROUPED)}, not {r.kind}")
    if r.group_score not in GROUP_SCORES:
        raise MoeccError(f"{where}: group_score must be one of {GROUP_SCORES}, got {r.group_score!r}")
    if r.kind == "hierarchical" and r.n_groups < 2:
        raise MoeccError(f"{where}: hierarchical routing needs n_groups ≥ 2, got {r.n_groups}")
    return spec


def logits_width(spec: MoESpec) -> int:
    """L: the router Linear's output width."""
    return spec.num_experts + (spec.router.n_groups if spec.router.kind == "hierarchical" else 0)


HALF = (torch.float16, torch.bfloat16)     # the dtypes whose rounding order shows (fp32 routers, combine)


def _router_float(logits: Tensor, spec: MoESpec) -> Tensor:
    """fp32 router = at least fp32 (float64 stays float64, for gradcheck)."""
    if spec.router.fp32 and logits.dtype in HALF:
        return logits.float()
    return logits


def route(logits: Tensor, spec: MoESpec, correction_bias: Tensor | None = None,
          token_ids: Tensor | None = None, rows: int = 1) -> tuple[Tensor, Tensor]:
    """rows: the T tokens are `rows` sequences of T/rows (x [rows, S, H]); only per-row capacity reads it."""
    r = spec.router
    logits = _router_float(logits, spec)                                  # [T, L]
    if r.kind == "softmax_topk":
        weights, ids = _softmax_topk(logits, spec)
    elif r.kind == "topk_softmax":
        top, ids = torch.topk(logits, r.top_k, dim=-1)                   # [T, k]
        weights = torch.softmax(top, dim=-1)
    elif r.kind == "sigmoid_topk":
        weights, ids = _sigmoid_topk(logits, spec, correction_bias)
    elif r.kind == "hierarchical":
        weights, ids = _hierarchical(logits, spec)
    elif r.kind == "expert_choice":
        return _expert_choice(logits, spec)
    elif r.kind == "hash":
        weights, ids = _hash(logits, spec, token_ids)
    elif r.kind == "topk_unit":
        ids = torch.topk(logits, r.top_k, dim=-1)[1]                      # [T, k]
        weights = torch.ones(ids.shape, dtype=logits.dtype, device=logits.device)
    else:
        raise MoeccError(f"MoE layer {spec.name or '?'}: unknown router kind {r.kind!r}")
    if r.scaling != 1.0:
        weights = weights * r.scaling
    if r.capacity_factor is not None or r.capacity:
        weights, ids = apply_capacity(weights, ids, spec, rows)
    return weights, ids


def _renorm(weights: Tensor, eps: float = 0.0) -> Tensor:
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


def group_limit(choice: Tensor, spec: MoESpec, group_scores: Tensor | None = None) -> Tensor:
    """[T, E] -> [T, E] with the experts outside each token's topk_groups best groups set to -inf.
    Group score: given [T, G], else the max or the sum of the top-2 of `choice` within the group."""
    r, E = spec.router, spec.num_experts
    grouped = choice.view(-1, r.n_groups, E // r.n_groups)               # [T, G, E/G]
    if group_scores is None and r.group_score == "max":
        group_scores = grouped.amax(dim=-1)                               # [T, G]
    elif group_scores is None:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(group_scores, r.topk_groups, dim=-1)[1]        # [T, g]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, group_ids, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(-1, E)           # [T, E]
    return choice.masked_fill(~keep, float("-inf"))


def _softmax_topk(logits: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    r = spec.router
    probs = torch.softmax(logits, dim=-1)                                 # [T, E]
    choice = group_limit(probs, spec) if r.n_groups > 1 else probs
    ids = torch.topk(choice, r.top_k, dim=-1)[1]                          # [T, k]
    weights = probs.gather(1, ids)
    return (_renorm(weights) if r.renormalize else weights), ids


def _sigmoid_topk(logits: Tensor, spec: MoESpec, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: the bias only chooses; the weights are the unbiased sigmoid scores."""
    r = spec.router
    scores = torch.sigmoid(logits)                                        # [T, E]
    choice = scores.detach() + bias.to(scores.dtype) if bias is not None else scores.detach()
    if r.n_groups > 1:
        choice = group_limit(choice, spec)
    ids = torch.topk(choice, r.top_k, dim=-1)[1]                          # [T, k]
    weights = scores.gather(1, ids)
    return (_renorm(weights, 1e-20) if r.renormalize else weights), ids


def _hierarchical(logits: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    r, G = spec.router, spec.router.n_groups
    probs = hierarchical_probs(logits, spec)                              # [T, E]
    choice = group_limit(probs, spec, group_scores=logits[:, :G])         # groups by the 1st router
    ids = torch.topk(choice, r.top_k, dim=-1)[1]                          # [T, k]
    weights = probs.gather(1, ids)
    return (_renorm(weights) if r.renormalize else weights), ids


def hierarchical_probs(logits: Tensor, spec: MoESpec) -> Tensor:
    """[T, G+E] -> [T, E]: p(e) = softmax(group logits)[g(e)] * softmax(expert logits in g(e))."""
    E, G = spec.num_experts, spec.router.n_groups
    if logits.shape[-1] != G + E:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hierarchical routing needs G+E={G + E} "
                         f"logits (groups first), got {logits.shape[-1]}")
    group_p = torch.softmax(logits[:, :G], dim=-1)                        # [T, G]
    inner = torch.softmax(logits[:, G:].reshape(-1, G, E // G), dim=-1)   # [T, G, E/G]
    return (group_p.unsqueeze(-1) * inner).reshape(-1, E)


CAPACITY_DENOMINATOR = 10 ** 6


def ceil_scaled(factor: float, num, den: int) -> int:
    """ceil(factor · num / den), factor taken as its nearest fraction with a denominator <= 10^6
    (0.07 is 7/100: 100 tokens at 0.07 give 7 slots, where the float product 7.000000000000001 gave
    8). num may be symbolic (a torch.export.Dim token count): then integer + and //, ops every
    backend imports and torch.export serializes (math.ceil of a SymFloat is not)."""
    f = Fraction(factor).limit_denominator(CAPACITY_DENOMINATOR)
    if isinstance(num, (int, float)):                 # a plain count (a float: a cost model's mean)
        return math.ceil(f * Fraction(num) / den)
    q = f.denominator * den
    return (f.numerator * num + q - 1) // q           # num a whole SymInt: the same ceiling


def expert_choice_capacity(tokens: int, spec: MoESpec) -> int:
    """C = ceil(c · T / E) tokens per expert, c = capacity_factor (default k), 1 ≤ C ≤ T (0 if T = 0).
    sym_min/sym_max: a symbolic T (torch.export.Dim) stays symbolic, no guard on its value."""
    cf = spec.router.capacity_factor or float(spec.top_k)
    return torch.sym_min(tokens, torch.sym_max(1, ceil_scaled(cf, tokens, spec.num_experts)))


def _expert_choice(logits: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    T, E = logits.shape[0], spec.num_experts
    probs = torch.softmax(logits, dim=-1)                                 # [T, E]
    cap = expert_choice_capacity(T, spec)
    tok = torch.topk(probs.detach().t(), cap, dim=-1)[1]                  # [E, C]
    picked = torch.zeros_like(probs, dtype=torch.bool).scatter(0, tok.t(), True)  # [T, E]
    weights = probs * picked * spec.router.scaling
    ids = torch.arange(E, device=logits.device).expand(T, E)
    return weights, torch.where(picked, ids, -1)


HASH_MULT = 2654435761  # Knuth's multiplicative hash


def hash_experts(token_ids: Tensor, num_experts: int, k: int) -> Tensor:
    """token id -> k distinct experts: ((id * HASH_MULT) mod 2^31 + j) mod E, j = 0..k-1."""
    base = (token_ids.long() * HASH_MULT) % (2 ** 31)                      # [T]
    return (base.unsqueeze(-1) + torch.arange(k, device=token_ids.device)) % num_experts


def _hash(logits: Tensor, spec: MoESpec, token_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    if token_ids is None:
        raise MoeccError(f"MoE layer {spec.name or '?'}: hash routing needs token ids, but the layer "
                         f"has none (the model's input has no token ids reaching this layer)")
    ids = hash_experts(token_ids.reshape(-1), spec.num_experts, spec.top_k)
    weights = torch.full(ids.shape, 1.0 / spec.top_k, dtype=logits.dtype, device=logits.device)
    return weights, ids


def router_probs(logits: Tensor, spec: MoESpec) -> Tensor:
    """[T, L] -> [T, E]: the router's distribution over experts (rows sum to 1), for balancing
    losses and monitors. sigmoid: s / Σs (DeepSeek-V3's sequence-wise loss); hash: none (error)."""
    r = spec.router
    logits = _router_float(logits, spec)
    if r.kind == "hierarchical":
        return hierarchical_probs(logits, spec)
    if r.kind == "sigmoid_topk":
        return _renorm(torch.sigmoid(logits))
    if r.kind == "hash":
        raise MoeccError(f"MoE layer {spec.name or '?'}: hash routing has no router probabilities")
    return torch.softmax(logits, dim=-1)


def token_capacity(tokens: int, spec: MoESpec) -> int:
    """Slots per expert: the fixed `capacity`, else ceil(capacity_factor * T * k / E)."""
    if spec.router.capacity:
        return spec.router.capacity
    return torch.sym_max(1, ceil_scaled(spec.router.capacity_factor, tokens * spec.top_k, spec.num_experts))


def expected_load(spec: MoESpec, tokens: int) -> tuple[float, float]:
    """(experts hit, tokens per hit expert) for `tokens` tokens routed uniformly at random: the
    expected load a kernel cost model (torch, onnx) prices, capacity limits included."""
    E, r = spec.num_experts, spec.router
    if r.kind == "expert_choice":
        return float(E), float(expert_choice_capacity(tokens, spec))
    k = min(r.top_k, E)
    hit = E * (1.0 - (1.0 - k / E) ** tokens)
    pairs = float(tokens * k)
    if r.capacity_factor is not None or r.capacity:
        pairs = min(pairs, E * token_capacity(tokens, spec))
    return hit, pairs / hit if hit else 0.0


def apply_capacity(weights: Tensor, ids: Tensor, spec: MoESpec, rows: int = 1) -> tuple[Tensor, Tensor]:
    """Drop assignments past each expert's capacity; priority: slot 0 of every token, then slot 1, ...
    capacity_per_row: each of the `rows` sequences (T/rows tokens each) has its own queues (Switch)."""
    T, k = ids.shape
    R = rows if spec.router.capacity_per_row and rows > 0 else 1
    cap = token_capacity(T // R, spec)
    flat = ids.reshape(R, T // R, k).transpose(1, 2).reshape(R, -1)       # [R, k*S] slot-major per row
    # [R, k*S, E]; an empty slot (-1) matches no expert. A comparison, not F.one_hot: its decomposition
    # asserts min(ids) >= 0, a data-dependent check that TVM evaluated on garbage at T = 0
    onehot = (flat.unsqueeze(-1) == torch.arange(spec.num_experts, device=flat.device)).long()
    position = (onehot.cumsum(1) * onehot).sum(-1) - 1                    # [R, k*S] place in its queue
    keep = ((position < cap) & (flat >= 0)).reshape(R, k, -1).transpose(1, 2).reshape(T, k)  # [T, k]
    return weights * keep, torch.where(keep, ids, -1)


def capacity_factor_for(max_load_fraction: float, spec: MoESpec, margin: float = 1.0) -> float:
    """The capacity factor whose capacity equals the observed busiest load (× margin).

    max_load_fraction = max_e (assignments to e) / (T·k), observed over recent steps.
    C = ceil(cf·T·k/E) ≥ max_load_fraction·T·k  ⇔  cf = E · max_load_fraction (× margin)."""
    if not 0 < max_load_fraction <= 1 or margin <= 0:
        raise MoeccError(f"MoE layer {spec.name or '?'}: dynamic capacity needs a load fraction in "
                         f"(0, 1] and a margin > 0, got {max_load_fraction}, {margin}")
    return spec.num_experts * max_load_fraction * margin


def expert_load(ids: Tensor, num_experts: int) -> Tensor:
    """[T, S] ids (−1 = none) -> [E] assignment counts (float)."""
    flat = ids.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts).to(torch.float32)


def dropped_fraction(ids: Tensor, spec: MoESpec | None = None) -> float:
    """Token-choice: fraction of (token, slot) assignments dropped by capacity.
    Expert choice (spec given): fraction of tokens no expert took."""
    if not ids.numel():
        return 0.0
    if spec is not None and spec.router.kind == "expert_choice":
        return float((ids < 0).all(dim=-1).float().mean())
    return float((ids < 0).float().mean())
