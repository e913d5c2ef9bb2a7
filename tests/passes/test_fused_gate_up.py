"""A SwiGLU FFN with ONE fused gate_up Linear (Phi-3: `.chunk(2, -1)`; interleaved: `[..., ::2]` /
`[..., 1::2]`) is split by canonicalize and upcycled exactly; near misses are refused with a reason
that the "no dense FFN found" error shows."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecc
from moecc.errors import MoeccError

H, FF = 16, 24


class FusedFFN(nn.Module):
    def __init__(self, layout: str, bias: bool, act=F.silu, combine=torch.mul):
        super().__init__()
        self.gate_up = nn.Linear(H, 2 * FF, bias=bias)
        self.down = nn.Linear(FF, H, bias=bias)
        self.layout, self.act, self.combine = layout, act, combine

    def forward(self, x):
        gu = self.gate_up(x)
        if self.layout == "chunk":
            g, u = gu.chunk(2, dim=-1)
        elif self.layout == "split":
            g, u = gu.split(FF, dim=-1)
        elif self.layout == "interleaved":
            g, u = gu[..., ::2], gu[..., 1::2]
        else:
            raise ValueError(layout)
        return self.down(self.combine(self.act(g), u))


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.ffn = FusedFFN(**kw)

    def forward(self, x):                       # [B, S, H]
        return x + self.ffn(x)


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, FF), nn.Linear(FF, H)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _upcycle(model, x, E=4, k=2):
    c = moecc.capture(model, (x,))
    pm = moecc.transform(c, [("upcycle", {"num_experts": E, "top_k": k})])
    return c, {r.name: r.stats for r in pm.records}


@pytest.mark.parametrize("layout", ["chunk", "split", "interleaved"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_gate_up_upcycled_exactly(layout, bias):
    torch.manual_seed(0)
    model = Block(layout=layout, bias=bias).eval()
    x = torch.randn(2, 6, H)
    c, stats = _upcycle(model, x)
    assert stats["canonicalize"]["gate_up_split"] == 1 and stats["upcycle"]["ffn_rewritten"] == 1
    (spec,) = [n.meta["moecc.spec"] for n in c.gm.graph.nodes if "moecc.spec" in n.meta]
    assert spec.activation == "swiglu" and spec.ffn == FF and spec.hidden == H and spec.expert_bias == bias
    names = {n for n, _ in c.gm.named_parameters()}
    assert not any(n.endswith("gate_up.weight") for n in names), "the fused weight is dropped once split"
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(c.gm(x), want, rtol=0, atol=1e-6)
        x2 = torch.randn(3, 9, H)                       # another token count (dynamic dims kept)
        torch.testing.assert_close(c.gm(x2), model(x2), rtol=0, atol=1e-6)


def test_fused_gate_up_through_moecc_compile(tmp_path):
    torch.manual_seed(1)
    model = Block(layout="interleaved", bias=True).eval()
    out = moecc.compile(model, (torch.randn(2, 5, H),), passes=[("upcycle", {"num_experts": 4, "top_k": 2})],
                        backend="torch", out=tmp_path / "a", progress=False)
    import json
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["ok"] and m["layers"][0]["activation"] == "swiglu"


@pytest.mark.parametrize("model,reason", [
    (Block(layout="chunk", bias=False, combine=torch.add), "split in halves, but silu/gelu(first half) * second half"),
    (Block(layout="chunk", bias=False, act=torch.sigmoid), "split in halves, but silu/gelu(first half)"),
    (Tanh(), "activation tanh is not one moecc rewrites"),
])
def test_no_ffn_says_which_candidates_were_refused_and_why(model, reason):
    with pytest.raises(MoeccError, match="no dense FFN found") as e:
        _upcycle(model.eval(), torch.randn(2, 6, H))
    assert "refused:" in str(e.value) and reason in str(e.value), str(e.value)
