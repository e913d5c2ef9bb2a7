"""The IR's data: `MoESpec` and `RouterSpec`, frozen and JSON-serializable.

One MoE layer is one `torch.ops.moecc.moe` node; its spec travels twice: as the op's `spec` string
argument (so it survives torch.export.save/load and reaches every backend's translation) and as
`node.meta["moecc.spec"]` (parsed, for passes).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from .errors import MoeccError

ACTIVATIONS = ("relu", "relu2", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh", "swiglu_oai",
               "swiglu_clamp", "swiglu_softcap")
GATED = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai", "swiglu_clamp", "swiglu_softcap")
ROUTER_KINDS = {
    "softmax_topk": "softmax over all E, then top-k (optionally renormalize the k weights)",
    "topk_softmax": "top-k of the raw logits, then softmax over the k",
    "sigmoid_topk": "sigmoid scores; a per-expert correction bias chooses (not weighs) experts; "
                    "optional group-limited top-k; weights renormalized and scaled",
    "expert_choice": "each expert takes its top tokens up to capacity (batch-dependent)",
    "hash": "token id -> expert by a fixed table, no parameters",
    "hierarchical": "a first router picks groups of experts, a second picks experts within them",
    "topk_unit": "top-k of the raw logits, each chosen expert weighted 1 (MoEfication: experts are "
                 "disjoint slices of one dense FFN, so all experts on = the dense FFN)",
}
# How an expert's output o (activation dtype) is scaled by its routing weight w (the router's dtype,
# float32 for an fp32 router); the scaled outputs are then summed into zeros of the activation dtype
# in ascending expert order (index_add_), the shared expert added last. Same in float32; they differ
# only when the activations are half/bfloat16 (by up to an ulp per expert).
COMBINES = {
    "weight_in_act": "w rounded to the activation dtype, o * w in that dtype (Qwen2/3-MoE, OLMoE, "
                     "Switch, GPT-OSS)",
    "weight_fp32": "o * w in float32 (w kept in float32), then rounded to the activation dtype "
                   "(Mixtral, DeepSeek-V3)",
}
# Where an expert bias is added (expert_bias): inside the GEMM (F.linear: x·Wᵀ + b rounded once) or
# to the GEMM's result already rounded to the activation dtype (x @ W, then + b: GPT-OSS).
BIAS_ADDS = ("in_gemm", "after_gemm")
# Fields added after artifacts were first written: left out of to_dict() at their default, so the
# JSON (spec keys, autotune tables, manifests) of every spec that does not use them is unchanged.
_OMIT_AT_DEFAULT = {"combine": "weight_in_act", "bias_add": "in_gemm"}


@dataclass(frozen=True)
class RouterSpec:
    """How tokens choose experts. Logits are computed outside the op (a Linear, fp32 if asked)."""

    kind: str = "softmax_topk"
    top_k: int = 2
    renormalize: bool = True        # softmax_topk / sigmoid_topk: divide the k weights by their sum
    scaling: float = 1.0            # routed scaling factor applied to the final weights
    n_groups: int = 1               # group-limited / hierarchical: experts split in n_groups groups
    topk_groups: int = 1            # ... of which this many are kept
    capacity_factor: float | None = None   # None = dropless
    fp32: bool = True               # the router's softmax/sigmoid in float32
    noisy: bool = False             # noisy top-k (training only; noise added outside the op)
    group_score: str = "top2_sum"   # sigmoid_topk groups: "top2_sum" (DeepSeek-V3) or "max"
    capacity: int = 0               # fixed slots per expert (Switch's expert_capacity); 0 = from the factor
    capacity_per_row: bool = False  # capacity counted per row of x [B, S, H] (per sequence), not per call

    def describe(self) -> str:
        return ROUTER_KINDS[self.kind]


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer: E experts of hidden→ffn→hidden, routed top-k, optional shared expert.

    Weights (stacked, nn.Linear layout): w_in [E, F or 2F, H], w_out [E, H, F]; gated activations
    keep gate rows first then up rows ([gate; up]) unless `interleaved` (row 2i gate, 2i+1 up).
    """

    num_experts: int
    hidden: int
    ffn: int
    activation: str = "gelu"
    router: RouterSpec = field(default_factory=RouterSpec)
    expert_bias: bool = False       # b_in [E, F or 2F], b_out [E, H]
    interleaved: bool = False       # gated w_in rows interleaved (GPT-OSS)
    act_alpha: float = 1.702        # swiglu_oai: gate * sigmoid(alpha * gate); swiglu_softcap: up's cap
    act_limit: float = 7.0          # swiglu_oai, swiglu_clamp: clamp; swiglu_softcap: the gate's cap
    shared_ffn: int = 0             # width of the always-on shared expert (0 = none)
    shared_gated: bool = False      # shared expert output scaled by sigmoid(x @ shared_gate^T)
    name: str = ""                  # the layer's name in the source model (for messages, traces)
    combine: str = "weight_in_act"  # how o · w is rounded in half precision: a COMBINES key
    bias_add: str = "in_gemm"       # expert biases: added in the GEMM or after it (BIAS_ADDS)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def in_rows(self) -> int:
        return 2 * self.ffn if self.gated else self.ffn

    @property
    def shared_in_rows(self) -> int:
        """Rows of the shared expert's w_in [R_s, H]: 2·shared_ffn for a gated activation (its own
        [gate; up], as the routed experts'), else shared_ffn. shared_gated (a sigmoid scale on the
        output, weight [1, H]) does not change it."""
        return 2 * self.shared_ffn if self.gated else self.shared_ffn

    def validate(self) -> "MoESpec":
        where = f"MoE layer {self.name or '?'}"
        r = self.router
        if self.num_experts < 2:
            raise MoeccError(f"{where}: needs at least 2 experts, got E={self.num_experts}")
        if r.kind not in ROUTER_KINDS:
            raise MoeccError(f"{where}: unknown router {r.kind!r}; choose one of {sorted(ROUTER_KINDS)}")
        if r.kind != "expert_choice" and not 1 <= r.top_k <= self.num_experts:
            raise MoeccError(f"{where}: top-k must be in 1..E={self.num_experts}, got k={r.top_k}")
        if self.activation not in ACTIVATIONS:
            raise MoeccError(f"{where}: unknown activation {self.activation!r}; one of {ACTIVATIONS}")
        if self.combine not in COMBINES:
            raise MoeccError(f"{where}: unknown combine {self.combine!r}; one of {sorted(COMBINES)}")
        if self.bias_add not in BIAS_ADDS:
            raise MoeccError(f"{where}: unknown bias_add {self.bias_add!r}; one of {BIAS_ADDS}")
        if r.capacity_factor is not None and r.capacity_factor <= 0:
            raise MoeccError(f"{where}: capacity factor must be > 0, got {r.capacity_factor}")
        if r.capacity < 0:
            raise MoeccError(f"{where}: capacity must be ≥ 0 slots per expert (0 = from the factor), got {r.capacity}")
        if r.n_groups > 1 or r.kind == "hierarchical":
            if self.num_experts % r.n_groups:
                raise MoeccError(f"{where}: n_groups={r.n_groups} does not divide E={self.num_experts}")
            if not 1 <= r.topk_groups <= r.n_groups:
                raise MoeccError(f"{where}: topk_groups={r.topk_groups} must be in 1..n_groups={r.n_groups}")
            per_group = self.num_experts // r.n_groups
            if r.top_k > r.topk_groups * per_group:
                raise MoeccError(f"{where}: k={r.top_k} exceeds the {r.topk_groups} kept groups × "
                                 f"{per_group} experts each")
        return self

    def replace(self, **kw) -> "MoESpec":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key, default in _OMIT_AT_DEFAULT.items():
            if d[key] == default:
                del d[key]
        return d

    def to_json(self) -> str:
        """The op's spec string; kept on the (frozen) instance after the first call: every MoE op call
        passes it, and asdict + dumps cost ~40 µs, a sixth of a small layer (MoEfied MiniLM, T = 64)."""
        js = self.__dict__.get("_json")
        if js is None:
            js = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_json", js)
        return js

    @staticmethod
    def from_dict(d: dict) -> "MoESpec":
        d = dict(d)
        d["router"] = RouterSpec(**d.get("router", {}))
        return MoESpec(**d)

    @staticmethod
    def from_json(s: str) -> "MoESpec":
        return _from_json(s)

    # params / FLOPs per token, for `moecc inspect`
    def expert_params(self) -> int:
        p = self.in_rows * self.hidden + self.hidden * self.ffn
        if self.expert_bias:
            p += self.in_rows + self.hidden
        return p

    def shared_params(self) -> int:
        return self.shared_in_rows * self.hidden + self.hidden * self.shared_ffn + (self.hidden if self.shared_gated else 0)

    def params(self) -> tuple[int, int]:
        """(total, active per token) parameters, router included."""
        router = self.num_experts * self.hidden
        shared = self.shared_params() if self.shared_ffn else 0
        total = self.num_experts * self.expert_params() + router + shared
        active = self.top_k * self.expert_params() + router + shared
        return total, active


@functools.lru_cache(maxsize=1024)
def _from_json(s: str) -> MoESpec:
    """Specs are frozen: one instance per spec string (the op parses its string on every call)."""
    return MoESpec.from_dict(json.loads(s))
