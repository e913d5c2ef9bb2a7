"""backends/tvm/lower.py end to end: an exported model with dense parts and two MoE layers becomes ONE
library serving every batch × sequence, numerically the PyTorch model; kernel choices are recorded;
unsupported ops, unavailable targets and wrong options fail with one clear line."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from moecc.backends.tvm import kernels, lower, runtime
from moecc.errors import MoeccError
from moecc.nn import MoE
from numerics import assert_numerically_equal
from tvm_cases import spec

H = 16


class TwoLayers(nn.Module):
    """Linear → MoE (softmax top-2, gated shared expert) → LayerNorm → MoE (DeepSeek-V3 router) → Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(H, H), nn.LayerNorm(H), nn.Linear(H, H)
        self.moe1 = MoE(spec("moe1", H=H, F=24, act="swiglu", top_k=2, shared_ffn=8, shared_gated=True),
                        init_std=H ** -0.5)
        self.moe2 = MoE(spec("moe2", E=8, H=H, F=12, act="gelu", kind="sigmoid_topk", top_k=2, n_groups=4,
                             topk_groups=2, scaling=2.0), init_std=H ** -0.5)
        with torch.no_grad():
            self.moe2.correction_bias.copy_(torch.randn(8) * 0.1)
        self.eval()

    def forward(self, x):
        h = self.moe1(self.inp(x))
        return self.out(self.moe2(self.norm(h)) + h)


def export(model: nn.Module, *args) -> torch.export.ExportedProgram:
    dims = tuple({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in args)
    return torch.export.export(model, args, dynamic_shapes=dims)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = TwoLayers()
    out = tmp_path_factory.mktemp("tvm_art")
    lowered = lower.lower(export(model, torch.randn(2, 6, H)), out, {"tokens": 12})   # one library (no dispatch)
    return model, out, lowered


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (3, 17)])
def test_one_library_serves_other_token_counts(artifact, shape):
    model, out, _ = artifact
    x = torch.randn(*shape, H, generator=torch.Generator().manual_seed(sum(shape)))
    want = model(x).detach().numpy()
    got = runtime.load(out, {})([x.numpy()])
    assert len(got) == 1 and np.abs(want).max() > 0.1
    assert_numerically_equal(got[0], want, atol=1e-5, rtol=1e-5, what=f"x {shape}")


def test_kernel_choices_and_files_are_recorded(artifact):
    _, out, lowered = artifact
    assert [k.layer for k in lowered.kernels] == ["moe1", "moe2"]
    for k in lowered.kernels:
        assert k.kernel in kernels.KERNELS and "T=12" in k.reason
        assert set(k.rejected) == set(kernels.KERNELS) - {k.kernel}
    assert lowered.files == ["model.so", "params.npz", "tvm_meta.json"]
    assert all((out / f).exists() for f in lowered.files)
    meta = json.loads((out / "tvm_meta.json").read_text())
    (x,) = meta["inputs"]
    assert x["dtype"] == "float32" and x["shape"][2] == H and all(isinstance(d, str) for d in x["shape"][:2])
    assert "p_moe2_correction_bias" in meta["param_names"] and "p_moe1_w_in" in meta["param_names"]
    assert lowered.notes["compile_s"] > 0 and json.dumps(lowered.to_dict())


def test_forced_kernel_and_host_target(tmp_path):
    model = MoE(spec("only", top_k=2), init_std=0.25).eval()
    x = torch.randn(2, 5, H)
    low = lower.lower(export(model, x), tmp_path, {"kernel": "tvm.dense_masked", "target": "host"})
    assert [k.kernel for k in low.kernels] == ["tvm.dense_masked"]
    assert "mcpu" in json.loads((tmp_path / "tvm_meta.json").read_text())["target"]
    x = torch.randn(4, 3, H)
    assert_numerically_equal(runtime.load(tmp_path)([x.numpy()])[0], model(x).detach().numpy(), atol=1e-5)


def test_unsupported_op_names_the_op_and_the_node(tmp_path):
    class Histogram(nn.Module):
        def forward(self, x):
            return torch.histc(x, bins=4) + 1

    with pytest.raises(MoeccError, match=r"node 'histc' calls aten\.histc\.default.*does not support"):
        lower.lower(torch.export.export(Histogram(), (torch.randn(8),)), tmp_path, {})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("target,message", [("cuda", "not available"), ("rocm", "not available"),
                                            ("no-such-target", "not a valid target")])
def test_unavailable_target(target, message):
    with pytest.raises(MoeccError, match=message):
        lower.resolve_target(target)


def test_hash_router_without_token_ids(tmp_path):
    model = MoE(spec("hashed", kind="hash", top_k=2)).eval()
    with pytest.raises(MoeccError, match="hashed: hash routing needs token ids"):
        lower.lower(export(model, torch.randn(2, 3, H)), tmp_path, {})


def test_kernel_option_must_name_a_tvm_kernel(tmp_path):
    model = MoE(spec("opt", top_k=2)).eval()
    with pytest.raises(MoeccError, match="'torch.gather' is not a TVM kernel"):
        lower.lower(export(model, torch.randn(2, 3, H)), tmp_path, {"kernel": "torch.gather"})


class MaskLike(nn.Module):
    """transformers' packed-sequence mask arithmetic on dynamic shapes (diff → != → cumsum of bool,
    views by symbolic sizes): what TVM 0.27's importer mistranslates without backends/tvm/importer.py."""

    def __init__(self):
        super().__init__()
        self.moe = MoE(spec("masked", top_k=2), init_std=H ** -0.5).eval()

    def forward(self, x):
        B, S, _ = x.shape
        pos = torch.arange(S).expand(B, -1)                                   # [B, S]
        seg = (pos.diff(dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)      # [B, S] int64
        y = self.moe(x).view(B * S, -1).view(B, S, -1)
        return y * (seg + 2).unsqueeze(-1)


def test_importer_gaps_on_dynamic_shapes_are_closed(tmp_path):
    model = MaskLike().eval()
    low = lower.lower(export(model, torch.randn(2, 6, H)), tmp_path, {})
    assert low.kernels[0].layer == "masked"
    x = torch.randn(3, 10, H)
    want = model(x).detach().numpy()
    assert_numerically_equal(runtime.load(tmp_path)([x.numpy()])[0], want, atol=1e-5, what="mask-like")


@pytest.mark.parametrize("combine", ["weight_in_act", "weight_fp32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(tmp_path, dtype, combine):
    """Weights saved and fed back in the model's dtype (bfloat16 via ml_dtypes); experts accumulate
    in float32, so the result is the reference's within its own rounding (2 ulp), for either
    MoESpec.combine."""
    import ml_dtypes
    model = MoE(spec("half", top_k=2, act="swiglu").replace(combine=combine), init_std=0.25).eval().to(dtype)
    lower.lower(export(model, torch.randn(2, 5, H, dtype=dtype)), tmp_path, {"kernel": "tvm.grouped_gemm"})
    x = torch.randn(3, 7, H, dtype=dtype)
    feed = x.numpy() if dtype == torch.float16 else x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    (got,) = runtime.load(tmp_path)([feed])
    want = model(x).detach().float().numpy()
    assert str(got.dtype) == str(dtype).removeprefix("torch.")
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    assert_numerically_equal(got.astype(np.float32), want, atol=2 * ulp * np.abs(want).max(), rtol=0)


class CausalConvState(nn.Module):
    """A mamba-style conv state padded by `kernel - seq` (grows or crops: symbolic, any sign) and an
    unsorted top-k of a group-limited router (DeepSeek's `topk(sorted=False)`): ordinary ops TVM 0.27's
    importer refuses without backends/tvm/aten.py."""

    def forward(self, x):                                                     # [B, S, H]
        state = nn.functional.pad(x.transpose(1, 2), (4 - x.shape[1], 0))    # [B, H, 4]
        tail = nn.functional.pad(x, (0, 0, 1, x.shape[1] - 2), value=0.5)    # [B, 2S - 1, H]
        ids = torch.topk(x, k=2, dim=-1, sorted=False)[1].sort(-1)[0]        # [B, S, 2]
        return state.sum(-1).unsqueeze(1) + tail.sum(1, keepdim=True) + x.gather(-1, ids).sum(-1, keepdim=True)


def test_symbolic_pads_and_unsorted_topk(tmp_path):
    model = CausalConvState()
    lower.lower(export(model, torch.randn(2, 6, H)), tmp_path, {})
    run = runtime.load(tmp_path)
    for S in (3, 4, 9):                                                       # grows, equal, crops
        x = torch.randn(1, S, H, generator=torch.Generator().manual_seed(S))
        assert_numerically_equal(run([x.numpy()])[0], model(x).numpy(), atol=1e-5, what=f"S={S}")


class ChunkedPositions(nn.Module):
    """Llama 4's chunked attention: int64 positions floor-divided by a Python int (TVM's importer made
    the int an int32 constant, which floor_divide refuses beside int64)."""

    def forward(self, x):                                                     # [B, S, H]
        pos = torch.arange(x.shape[1], device=x.device)                       # [S] int64
        chunk = torch.div(pos, 3, rounding_mode="floor")                      # [S]
        same = chunk[:, None] == chunk[None, :]                               # [S, S]
        return same.to(x.dtype) @ x + chunk.to(x.dtype)[None, :, None]


def test_floor_division_of_int64_by_a_python_int(tmp_path):
    model = ChunkedPositions()
    lower.lower(export(model, torch.randn(2, 6, H)), tmp_path, {})
    run = runtime.load(tmp_path)
    for S in (1, 5, 11):
        x = torch.randn(1, S, H, generator=torch.Generator().manual_seed(S))
        assert_numerically_equal(run([x.numpy()])[0], model(x).numpy(), atol=1e-5, what=f"S={S}")


class ChunkedScan(nn.Module):
    """Kimi-Linear / Qwen3-Next's chunked linear attention: the sequence padded to a multiple of the
    chunk (`(-S) % C`: torch's symbolic Mod / FloorDiv in the shapes), reshaped to chunks, scanned
    within each chunk, cropped back to S."""

    def forward(self, x):                                                     # [B, S, H]
        B, S, H_ = x.shape
        pad = (4 - S % 4) % 4
        chunks = nn.functional.pad(x, (0, 0, 0, pad)).reshape(B, -1, 4, H_)   # [B, ceil(S/4), 4, H]
        y = chunks.cumsum(2) * (torch.arange(chunks.shape[1]) + 1.0)[None, :, None, None]
        return y.reshape(B, -1, H_)[:, :S] + x


def test_symbolic_modulo_and_floor_division_in_shapes(tmp_path):
    model = ChunkedScan()
    lower.lower(export(model, torch.randn(2, 6, H)), tmp_path, {})
    run = runtime.load(tmp_path)
    for S in (1, 4, 7, 13):                                                   # pad 3, 0, 1, 3
        x = torch.randn(2, S, H, generator=torch.Generator().manual_seed(S))
        assert_numerically_equal(run([x.numpy()])[0], model(x).numpy(), atol=1e-5, what=f"S={S}")


def test_torch_size_functions_become_tvm_expressions():
    """torch's Mod / FloorDiv of sizes (the pad and chunk count above) convert to tirx floormod /
    floordiv that evaluate like Python's at every length: repair_shape matches results to them."""
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer
    from moecc.backends.tvm import importer
    program = export(ChunkedScan(), torch.randn(2, 6, H))
    sizes = {n.name: n.meta["val"] for n in program.graph.nodes if n.name in ("mod_1", "floordiv")}
    assert set(sizes) == {"mod_1", "floordiv"}
    seq = str(program.graph_module.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1])
    symbols = {seq: tirx.Var(seq, "int64")}
    for S in range(1, 14):
        analyzer = Analyzer()
        analyzer.bind(symbols[seq], tirx.IntImm("int64", S))
        got = {name: analyzer.simplify(importer.symbolic(size, symbols)) for name, size in sizes.items()}
        assert [int(got["mod_1"]), int(got["floordiv"])] == [(4 - S % 4) % 4, (S + (4 - S % 4) % 4) // 4], S


class ChunkBias(nn.Module):
    """Kimi-Linear's chunked attention: the padded length P split as reshape(B, P // 8, -1, H), whose -1
    is P // (P // 8) to torch and TVM alike, added to a static [8, H] per-position term: torch asserted
    the two equal when it exported, TVM's broadcast check cannot prove it."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, H))

    def forward(self, x):                                                     # [B, S, H]
        B, S, H_ = x.shape
        padded = nn.functional.pad(x, (0, 0, 0, (8 - S % 8) % 8))
        P = padded.shape[1]
        chunks = padded.reshape(B, P // 8, -1, H_) + self.pos                 # [B, P/8, 8, H]
        return chunks.cumsum(1).reshape(B, P, H_)[:, :S]


def test_broadcast_operands_agree_with_torch_on_unprovable_sizes(tmp_path):
    model = ChunkBias()
    program = export(model, torch.randn(2, 11, H))
    lower.lower(program, tmp_path, {})
    run = runtime.load(tmp_path)
    for S in (3, 8, 13):
        x = torch.randn(2, S, H, generator=torch.Generator().manual_seed(S))
        assert_numerically_equal(run([x.numpy()])[0], model(x).detach().numpy(), atol=1e-5, what=f"S={S}")


class OneChunkDelta(nn.Module):
    """Qwen3-Next / Kimi-Linear's chunked delta rule as transformers writes it for export: the sequence
    padded to the chunk C and reshaped to [B, n, C, H], a triangular system solved by in-place row
    updates, and a scan `for i in range(n)` over chunks that export unrolls once (S ≤ C, checked):
    torch knows n = 1 and P // (P // C) = C, TVM's importer does not; `out[:, i] = ...` writes through
    a view. `bounded`: the model checks S ≤ C (else export only asserts n = 1 at run time, and TVM
    sees sizes like P // (P // C) it cannot simplify)."""

    def __init__(self, bounded: bool):
        super().__init__()
        self.bounded = bounded

    def forward(self, x):                                                     # [B, S, H]
        B, S, H_ = x.shape
        if self.bounded:
            torch._check(S <= CHUNK)
        c = nn.functional.pad(x, (0, 0, 0, (CHUNK - S % CHUNK) % CHUNK)).reshape(B, -1, CHUNK, H_)
        attn = (c @ c.transpose(-1, -2)).tril()                               # [B, n, C, C]
        for i in range(1, CHUNK):
            row = attn[..., i, :i].clone()
            attn[..., i, :i] = row + (row.unsqueeze(-1) * attn[..., :i, :i]).sum(-2)
        v = attn @ c
        out, state = torch.zeros_like(c), torch.zeros(B, H_, H_)
        for i in range(c.shape[1]):
            out[:, i] = v[:, i] + c[:, i] @ state
            state = state + c[:, i].transpose(-1, -2) @ c[:, i]
        return out.reshape(B, -1, H_)[:, :S]


CHUNK = 8


@pytest.mark.parametrize("bounded", [True, False])
def test_one_chunk_scan_with_in_place_writes(tmp_path, caplog, bounded):
    """In-place writes are functionalized before import (the importer would keep `out` zeros); bounded:
    sizes torch knows as one number over the export's range (n = 1, P // (P // 8) = 8 for S ≤ 8) are
    that number to TVM too, and the crop [:, :S] is in bounds by that range; unbounded: the row updates
    scatter into an axis of size P // (P // 8) (TVM's own slice_scatter wants a constant)."""
    model = OneChunkDelta(bounded)
    program = export(model, torch.randn(2, 6, H))
    with caplog.at_level("INFO", logger="moecc"):
        lower.lower(program, tmp_path, {})
    assert "functionalized" in caplog.text
    run = runtime.load(tmp_path)
    for B, S in ((1, 1), (3, 5), (2, 8))[:3 if bounded else 2]:    # unbounded: torch's export rejects
        x = 0.3 * torch.randn(B, S, H, generator=torch.Generator().manual_seed(S))
        want = model(x)
        assert want.abs().max() > 0.5
        assert_numerically_equal(run([x.numpy()])[0], want.numpy(), atol=1e-5, what=f"B={B} S={S}")


class WriteIntoSequence(nn.Module):
    """`y[:, 1:5:2] = z` into an axis of dynamic length: functionalized to slice_scatter on a symbolic
    axis, which TVM 0.27's own legalization refuses (it wants a constant size)."""

    def forward(self, x, z):                                                  # [B, S, H], [B, 2, H]
        y = x.clone()
        y[:, 1:5:2] = z * 2.0
        y[:, :1] = 0.0
        return y + 1.0


def test_write_into_a_slice_of_a_dynamic_axis(tmp_path):
    model = WriteIntoSequence()
    program = torch.export.export(model, (torch.randn(2, 7, H), torch.randn(2, 2, H)),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
                                                  {0: torch.export.Dim.AUTO}))
    lower.lower(program, tmp_path, {})
    run = runtime.load(tmp_path)
    for B, S in ((1, 5), (3, 9)):
        x, z = torch.randn(B, S, H), torch.randn(B, 2, H)
        assert_numerically_equal(run([x.numpy(), z.numpy()])[0], model(x, z).numpy(), atol=1e-6,
                                 what=f"B={B} S={S}")


class EmptyCache(nn.Module):
    """DeepSeek-V4's attention: keys of the sequence concatenated with a cache of 0 compressed keys
    (a [B, 0, D] tensor made per call); TVM 0.27 compiles the empty operand's expand_dims into an
    undefined variable ("Var ... is not defined")."""

    def forward(self, x):                                                     # [B, S, H]
        cache = torch.zeros(x.shape[0], 0, H)
        keys = torch.cat([x.unsqueeze(1), cache.unsqueeze(1)], dim=2)          # [B, 1, S, H]
        return (keys.expand(-1, 4, -1, -1) * torch.arange(1.0, 5.0)[None, :, None, None]).sum(1)


def test_concatenation_with_an_empty_operand(tmp_path):
    model = EmptyCache()
    lower.lower(export(model, torch.randn(2, 6, H)), tmp_path, {})
    run = runtime.load(tmp_path)
    x = torch.randn(3, 5, H)
    assert_numerically_equal(run([x.numpy()])[0], model(x).numpy(), atol=1e-5, what="B=3 S=5")


class FromTheEnd(nn.Module):
    """ZAYA's shifts: x[:, :-1] and x[:, -S:] (bounds counted from the end; TVM left T.min / T.max /
    if_then_else shapes that crashed its KillAfterLastUse)."""

    def forward(self, x):                                                     # [B, S, H]
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return shifted * 2.0 + x[:, -x.shape[1]:]


def test_slices_counted_from_the_end(tmp_path):
    model = FromTheEnd()
    lower.lower(export(model, torch.randn(2, 6, H)), tmp_path, {})
    run = runtime.load(tmp_path)
    for S in (2, 7):
        x = torch.randn(2, S, H)
        assert_numerically_equal(run([x.numpy()])[0], model(x).numpy(), atol=1e-6, what=f"S={S}")
