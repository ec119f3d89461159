"""Reference kernels against dense attention on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spotattn.kernels import reference as R
from spotattn.kernels.checks import num_query_blocks
from spotattn.selection import full_selection, mask_to_selection


def dense_oracle(q, k, v, seq_start=None):
    """Float64 SDPA with an explicit bottom-right causal + padding mask."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    group = hq // k.shape[1]
    key_pos = torch.arange(lk)
    q_pos = torch.arange(lk - lq, lk).unsqueeze(-1)
    mask = (key_pos <= q_pos).expand(b, 1, lq, lk)
    if seq_start is not None:
        mask = mask & (key_pos >= seq_start.view(-1, 1, 1, 1))
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ vv
    return out, lse


def random_inputs(b, hq, hkv, lq, lk, d, dtype):
    q = torch.randn(b, hq, lq, d, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, dtype=dtype)
    return q, k, v


def valid_rows(lq, lk, seq_start):
    """(B, 1, Lq) mask of queries that see at least one key."""
    q_pos = torch.arange(lk - lq, lk)
    return (q_pos >= seq_start.view(-1, 1)).unsqueeze(1)


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_reference_matches_sdpa(group, dtype):
    q, k, v = random_inputs(2, 2 * group, 2, 45, 45, 16, dtype)
    seq_start = torch.tensor([0, 7])
    out, lse = R.dense_attention_ref(q, k, v, seq_start=seq_start, chunk=16)
    ref, ref_lse = dense_oracle(q, k, v, seq_start)
    rows = valid_rows(45, 45, seq_start).unsqueeze(-1)
    assert torch.allclose((out.double() * rows), ref * rows, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(lse[rows.squeeze(-1).expand_as(lse)].double(), ref_lse[rows.squeeze(-1).expand_as(lse)],
                          atol=1e-4)
    assert torch.isneginf(lse[1, :, :7]).all() and (out[1, :, :7] == 0).all()


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk,bs", [(77, 77, 16), (33, 101, 32), (5, 64, 16)])
def test_full_prefill_selection_equals_dense(group, dtype, lq, lk, bs):
    q, k, v = random_inputs(2, 2 * group, 2, lq, lk, 16, dtype)
    seq_start = torch.tensor([3, 0])
    rows = num_query_blocks(lq, lk, bs)
    nb = math.ceil(lk / bs)
    first = (lk - lq) // bs
    sel = full_selection(2, nb, torch.arange(first, first + rows), bs, first)
    out, lse = R.block_sparse_prefill_ref(q, k, v, sel.block_ids, sel.counts, bs, seq_start=seq_start, chunk=19)
    ref, ref_lse = dense_oracle(q, k, v, seq_start)
    keep = valid_rows(lq, lk, seq_start).unsqueeze(-1)
    assert torch.allclose(out.double() * keep, ref * keep, atol=TOL[dtype], rtol=TOL[dtype])


def test_sparse_prefill_matches_masked_dense():
    """A random block subset equals dense attention restricted to those blocks (token mask)."""
    b, hq, hkv, lq, d, bs = 2, 6, 3, 70, 8, 16
    q, k, v = random_inputs(b, hq, hkv, lq, lq, d, torch.float32)
    nb = math.ceil(lq / bs)
    keep = torch.rand(b, hkv, nb, nb) < 0.5
    keep |= torch.eye(nb, dtype=torch.bool)  # every row reads its own block
    keep &= torch.ones(nb, nb, dtype=torch.bool).tril()
    sel = mask_to_selection(keep, bs)
    out, _ = R.block_sparse_prefill_ref(q, k, v, sel.block_ids, sel.counts, bs)
    # Expected: per kv-group token mask from the block mask.
    token = keep.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :lq, :lq]
    token &= torch.ones(lq, lq, dtype=torch.bool).tril()
    mask = token.repeat_interleave(hq // hkv, 1)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    )
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("t", [1, 3, 8])
def test_sparse_decode_full_equals_dense_and_subset_is_masked(group, t):
    b, hkv, lk, d, bs = 2, 2, 93, 16, 16
    q, k, v = random_inputs(b, hkv * group, hkv, t, lk, d, torch.float32)
    seq_start = torch.tensor([0, 11])
    nb = math.ceil(lk / bs)
    ids = torch.arange(nb, dtype=torch.int32).expand(b, hkv, nb).contiguous()
    counts = torch.full((b, hkv), nb, dtype=torch.int32)
    out, lse = R.sparse_decode_ref(q, k, v, ids, counts, bs, seq_start=seq_start)
    ref, ref_lse = dense_oracle(q, k, v, seq_start)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    # Shared list (G = 1) with variable counts: compare with an explicit token mask.
    shared = torch.tensor([[[0, 2, nb - 1, -1]], [[1, nb - 1, -1, -1]]], dtype=torch.int32)
    cnt = torch.tensor([[3], [2]], dtype=torch.int32)
    out, _ = R.sparse_decode_ref(q, k, v, shared, cnt, bs, seq_start=seq_start)
    block_of = torch.arange(lk) // bs
    chosen = torch.stack([torch.isin(block_of, shared[i, 0, : cnt[i, 0]].long()) for i in range(b)])
    q_pos = torch.arange(lk - t, lk).unsqueeze(-1)
    mask = chosen.view(b, 1, 1, lk) & (torch.arange(lk) <= q_pos) & (torch.arange(lk) >= seq_start.view(-1, 1, 1, 1))
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask
    )
    assert torch.allclose(out, expected, atol=1e-5)


def test_bad_kernel_inputs_are_named():
    q, k, v = random_inputs(1, 4, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        R.dense_attention_ref(q[:, :3], k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        R.dense_attention_ref(q, k.half(), v)
    with pytest.raises(ValueError, match="same shape"):
        R.dense_attention_ref(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="more queries"):
        R.dense_attention_ref(torch.randn(1, 4, 9, 16), k, v)
    with pytest.raises(ValueError, match="query-block rows"):
        R.block_sparse_prefill_ref(q, k, v, torch.zeros(1, 2, 5, 1, dtype=torch.int32),
                                   torch.ones(1, 2, 5, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        R.sparse_decode_ref(q[:, :, :1], k, v, torch.zeros(1, 2, 1), torch.ones(1, 2), 8)
