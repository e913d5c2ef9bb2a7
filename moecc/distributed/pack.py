"""A dispatch's payload as ONE all-to-all: per destination rank its hidden rows' bytes, then its
pairs' (routing weight as float64 bits, local expert id, row index) as int64, in a uint8 buffer.

    buf, nbytes = pack_dispatch(rows [R, H], meta [N, META] int64, row_split [W], pair_split [W])
    rows, meta  = unpack_dispatch(received, row_recv [W], pair_recv [W], H, dtype)

So a chunk pays the collective's latency once per direction (moecc.distributed.ep.dispatch).
"""
from __future__ import annotations

import torch
from torch import Tensor

META = 3        # int64 per pair in a dispatch: routing weight (float64 bits), local expert id, row


def pack_dispatch(rows: Tensor, meta: Tensor, row_split: list[int], pair_split: list[int]
                  ) -> tuple[Tensor, list[int]]:
    """rows [R, H] and meta [N, META] int64, both grouped by destination rank (row_split[j] rows and
    pair_split[j] pairs for rank j) -> (one uint8 buffer: per rank its rows' bytes then its pairs',
    bytes per rank)."""
    rb = rows.reshape(-1).view(torch.uint8).view(rows.shape[0], rows.shape[1] * rows.element_size())
    mb = meta.reshape(-1).view(torch.uint8).view(meta.shape[0], META * 8)
    parts, nbytes = [], []
    for r, m in zip(rb.split(row_split), mb.split(pair_split)):
        parts += [r.reshape(-1), m.reshape(-1)]
        nbytes.append(r.numel() + m.numel())
    return torch.cat(parts), nbytes


def unpack_dispatch(buf: Tensor, row_split: list[int], pair_split: list[int], hidden: int,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """pack_dispatch's buffer as received (source-rank order) -> rows [R, H] dtype, meta [N, META]."""
    row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
    meta_bytes = META * 8
    rows, meta = [], []
    for piece, nr, nm in zip(buf.split([r * row_bytes + m * meta_bytes for r, m in zip(row_split, pair_split)]),
                             row_split, pair_split):
        rows.append(piece[: nr * row_bytes])
        meta.append(piece[nr * row_bytes:])
    rows_t = torch.cat(rows).view(dtype).view(sum(row_split), hidden)
    meta_t = torch.cat(meta).view(torch.int64).view(sum(pair_split), META)
    return rows_t, meta_t
