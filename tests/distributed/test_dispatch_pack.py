"""moecc.distributed.pack (pack_dispatch / unpack_dispatch): a dispatch's hidden rows and (weight, local id, row) pairs in
one byte buffer, per destination rank rows then pairs; what arrives unpacks exactly (bf16 / f32 /
f64 rows, routing weights through float64 bits, empty ranks)."""
import pytest
import torch

from moecc.distributed.pack import META, pack_dispatch, unpack_dispatch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_pack_round_trip_with_empty_ranks(dtype):
    g = torch.Generator().manual_seed(0)
    H, row_split, pair_split = 5, [3, 0, 2, 0], [4, 1, 3, 0]     # rank 1: pairs but no rows; rank 3: nothing
    rows = torch.randn(sum(row_split), H, generator=g).to(dtype)
    w = torch.rand(sum(pair_split), generator=g).to(dtype)
    meta = torch.stack([w.to(torch.float64).view(torch.int64), torch.arange(8), torch.arange(8) % 3], 1)
    buf, nbytes = pack_dispatch(rows, meta, row_split, pair_split)
    elt = rows.element_size()
    assert buf.dtype == torch.uint8 and nbytes == [r * H * elt + p * META * 8 for r, p in zip(row_split, pair_split)]
    # rank 0's bytes: its 3 rows, then its 4 pairs
    assert torch.equal(buf[: 3 * H * elt].view(dtype).view(3, H), rows[:3])
    got_rows, got_meta = unpack_dispatch(buf, row_split, pair_split, H, dtype)
    assert torch.equal(got_rows, rows) and torch.equal(got_meta, meta)
    assert torch.equal(got_meta[:, 0].view(torch.float64).to(dtype), w)          # weights exact
    none_rows, none_meta = unpack_dispatch(buf[:0], [0, 0], [0, 0], H, dtype)
    assert none_rows.shape == (0, H) and none_meta.shape == (0, META)
