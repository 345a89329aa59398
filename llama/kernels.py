"""Decoding attention as Triton kernels: a few queries per row (one for a decode step, the
last token and k proposals for a speculative verify step), over a KV cache whose rows
each have their own length, read from a tensor on the device.

Why not SDPA: a decode step replayed from a CUDA graph has fixed shapes, so with SDPA it
must attend over a fixed span of the cache and mask the positions a row has not reached,
and SDPA's masked kernels give each (row, head) pair one thread block: at batch 1 most of
the GPU idles while a long cache is read. Here every row's keys are cut into blocks of
`split` positions (split-KV, "flash decoding"), which about PROGRAMS programs per launch,
spread over the (row, key/value head) pairs, share out, up to the row's length only. So
one graph serves every context length and reads only the keys that exist. A second kernel
merges the blocks' partial softmax results, unless the whole cache is one block (a
max_seq_len up to SPLIT): then the first kernel normalises and writes the output itself.

A program handles every query of its row for the query heads that share its key/value
head, as the rows of one tile: the keys are read once for all of them, and the tile has
16 rows at least anyway (tl.dot's minimum), so at 7B (no grouping) up to 16 queries cost
what one does.

Used on CUDA when Triton is installed (it ships with PyTorch's Linux CUDA wheels) and the
head size is a power of two of at least 16 (`available`); otherwise decoding steps attend
through `model.attend` (SDPA).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; attention then goes through SDPA
    triton = None

# Launch settings, chosen by timing the kernel at 4k to 100k keys on an H200
# (docs/design.md).
SPLIT = 1024  # keys per block: each block leaves one partial result
BLOCK_N = 64  # keys per loop iteration inside a block
# Programs per launch, about 8 per SM of a large GPU: each program takes every
# PROGRAMS-th block of its (row, head), so a cache far longer than the context does not
# launch thousands of programs with nothing to do.
PROGRAMS = 1024
MERGE_CHUNK = 64  # partial results a merge program reads per iteration
MAX_QUERIES = 16  # per row: a verify step of up to 15 proposals; longer chunks use SDPA


def available(device: torch.device, head_dim: int) -> bool:
    """Whether decode_attention runs here: CUDA, Triton, and a head size that Triton's
    block shapes allow (a power of two, at least 16: Code Llama's is 128)."""
    return (triton is not None and device.type == "cuda" and head_dim >= 16
            and head_dim & (head_dim - 1) == 0)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lengths: torch.Tensor, split: int = SPLIT, block_n: int = BLOCK_N,
                     num_warps: int = 0, num_stages: int = 3,
                     programs: int = PROGRAMS) -> torch.Tensor:
    """Softmax attention of up to MAX_QUERIES consecutive queries per row: the last query
    of row b sees the row's first lengths[b] keys, each query before it one key fewer
    (the causal mask of tokens at consecutive positions, written to the cache already).

    q: (bsz, heads, queries, head_dim); k, v: (bsz, kv_heads, kv_len, head_dim), views
    into a larger cache are fine (only the last dimension must be contiguous); lengths:
    (bsz,) integers in [queries, kv_len]. Query heads that share a key/value head are
    adjacent (grouped-query attention as in SDPA's enable_gqa). Scores and softmax are
    float32; in bf16/fp16 the probabilities are rounded to the value dtype for their
    product with the values, as flash attention does. num_warps 0: 4, or 8 for tiles of
    more than 32 rows. Returns (bsz, heads, queries, head_dim) in q's dtype.
    """
    bsz, heads, queries, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if queries > MAX_QUERIES:
        raise ValueError(f"decode_attention takes up to {MAX_QUERIES} queries per row, "
                         f"got {queries}")
    tile_rows = max(16, triton.next_power_of_2(queries * group))  # tl.dot needs 16 rows
    num_warps = num_warps or (4 if tile_rows <= 32 else 8)
    n_splits = triton.cdiv(kv_len, split)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention needs {name} contiguous in its last dimension")
    # Laid out (bsz, queries, heads, head_dim), which the output projection reads.
    out = torch.empty(bsz, queries, heads, head_dim, dtype=q.dtype,
                      device=q.device).transpose(1, 2)
    # A cache of at most one block (short max_seq_len): each (row, head) has one block,
    # which the first kernel normalises and writes out; no partials, no merge kernel.
    direct = n_splits == 1
    if direct:
        acc = maxes = sums = out  # not touched by the kernel
    else:
        partial_shape = (bsz, kv_heads, n_splits, tile_rows)
        acc = torch.empty(*partial_shape, head_dim, dtype=torch.float32, device=q.device)
        maxes = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
        sums = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    per_row_head = max(1, min(n_splits, triton.cdiv(programs, bsz * kv_heads)))
    _split_attention[(bsz * kv_heads, per_row_head)](
        q, k, v, lengths, acc, maxes, sums, out, kv_heads, n_splits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        # The scale is a compile-time constant: as a Python float argument, torch.compile
        # passes it as float64 and the scores would silently turn float64.
        SCALE=head_dim ** -0.5, GROUP=group, QUERIES=queries, TILE_ROWS=tile_rows,
        HEAD_DIM=head_dim, SPLIT=split, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        DIRECT=direct, num_warps=num_warps, num_stages=num_stages,
    )
    if direct:
        return out
    _merge_splits[(bsz * heads * queries,)](
        acc, maxes, sums, lengths, out, heads, n_splits, out.stride(0), out.stride(1),
        out.stride(2), GROUP=group, QUERIES=queries, TILE_ROWS=tile_rows,
        HEAD_DIM=head_dim, SPLIT=split, CHUNK=MERGE_CHUNK, num_warps=4,
    )
    return out


if triton is not None:

    @triton.jit
    def _attend_block(q, k_row, v_row, first, end, seen, stride_kn, stride_vn,
                      SCALE: tl.constexpr, TILE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax of the tile's queries q over keys first .. end - 1, tile row i
        seeing keys below seen[i]: (unnormalised output, maximum score, sum of
        exponentials) per row."""
        d = tl.arange(0, HEAD_DIM)
        running_max = tl.full([TILE_ROWS], float("-inf"), tl.float32)
        running_sum = tl.zeros([TILE_ROWS], dtype=tl.float32)
        acc = tl.zeros([TILE_ROWS, HEAD_DIM], dtype=tl.float32)
        for n0 in range(first, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_row + n[:, None] * stride_kn + d[None, :],
                        mask=(n < end)[:, None], other=0.0)
            if IEEE:  # float32 models: no TF32 rounding of the scores
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(n[None, :] < seen[:, None], scores * SCALE, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            # An earlier query may see no key of this block yet: keep its row at zero
            # instead of exp(-inf - -inf).
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_max - shift)
            p = tl.exp(scores - shift[:, None])
            running_sum = running_sum * rescale + tl.sum(p, 1)
            v = tl.load(v_row + n[:, None] * stride_vn + d[None, :],
                        mask=(n < end)[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * rescale[:, None] + pv
            running_max = new_max
        return acc, running_max, running_sum

    @triton.jit
    def _split_attention(q_ptr, k_ptr, v_ptr, lengths_ptr, acc_ptr, max_ptr, sum_ptr,
                         out_ptr, kv_heads, n_splits,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_os,
                         SCALE: tl.constexpr, GROUP: tl.constexpr, QUERIES: tl.constexpr,
                         TILE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                         DIRECT: tl.constexpr):
        """For one (row, key/value head), the blocks of SPLIT keys numbered program_id(1)
        + i * num_programs(1) that hold keys of the row: each block's unnormalised output,
        maximum score and sum of exponentials, for its QUERIES x GROUP (query, head) pairs
        at once (tile row r: query r // GROUP, head r % GROUP of the group). DIRECT (the
        whole cache is one block): the normalised output instead, into out."""
        row_head = tl.program_id(0)
        b = row_head // kv_heads
        h = row_head % kv_heads
        length = tl.load(lengths_ptr + b)
        r = tl.arange(0, TILE_ROWS)
        used = r < QUERIES * GROUP
        query, g = r // GROUP, r % GROUP
        # Keys each tile row sees: the last query the row's length, each earlier one fewer.
        seen = tl.where(used, length - (QUERIES - 1) + query, length)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh
                    + query[:, None] * stride_qs + d[None, :], mask=used[:, None], other=0.0)
        k_row = k_ptr + b * stride_kb + h * stride_kh
        v_row = v_ptr + b * stride_vb + h * stride_vh
        for split in range(tl.program_id(1), tl.cdiv(length, SPLIT), tl.num_programs(1)):
            acc, running_max, running_sum = _attend_block(
                q, k_row, v_row, split * SPLIT, tl.minimum(split * SPLIT + SPLIT, length),
                seen, stride_kn, stride_vn, SCALE, TILE_ROWS, HEAD_DIM, BLOCK_N, IEEE)
            if DIRECT:
                out = (out_ptr + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh
                       + query[:, None] * stride_os + d[None, :])
                tl.store(out, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty),
                         mask=used[:, None])
            else:
                out = (row_head * n_splits + split) * TILE_ROWS + r
                tl.store(acc_ptr + out[:, None] * HEAD_DIM + d[None, :], acc)
                tl.store(max_ptr + out, running_max)
                tl.store(sum_ptr + out, running_sum)

    @triton.jit
    def _merge_splits(acc_ptr, max_ptr, sum_ptr, lengths_ptr, out_ptr, heads, n_splits,
                      stride_ob, stride_oh, stride_os, GROUP: tl.constexpr,
                      QUERIES: tl.constexpr, TILE_ROWS: tl.constexpr,
                      HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr):
        """One (row, query head, query): combine the blocks that hold keys the query sees,
        each weighted by exp(its maximum - the overall maximum), and normalise."""
        pid = tl.program_id(0)
        query = pid % QUERIES
        b = pid // (heads * QUERIES)
        head = (pid // QUERIES) % heads
        seen = tl.load(lengths_ptr + b) - (QUERIES - 1) + query
        used = tl.cdiv(seen, SPLIT)
        first = ((b * (heads // GROUP) + head // GROUP) * n_splits) * TILE_ROWS \
            + query * GROUP + head % GROUP
        c = tl.arange(0, CHUNK)
        d = tl.arange(0, HEAD_DIM)
        maxes = tl.full([CHUNK], float("-inf"), tl.float32)
        for s0 in range(0, used, CHUNK):
            s = s0 + c
            maxes = tl.maximum(maxes, tl.load(max_ptr + first + s * TILE_ROWS, mask=s < used,
                                              other=float("-inf")))
        overall = tl.max(maxes, 0)
        sums = tl.zeros([CHUNK], dtype=tl.float32)
        acc = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, used, CHUNK):
            s = s0 + c
            in_use = s < used
            weight = tl.exp(tl.load(max_ptr + first + s * TILE_ROWS, mask=in_use,
                                    other=float("-inf")) - overall)
            sums += weight * tl.load(sum_ptr + first + s * TILE_ROWS, mask=in_use, other=0.0)
            part = tl.load(acc_ptr + (first + s * TILE_ROWS)[:, None] * HEAD_DIM + d[None, :],
                           mask=in_use[:, None], other=0.0)
            acc += weight[:, None] * part
        out = tl.sum(acc, 0) / tl.sum(sums, 0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + query * stride_os + d,
                 out.to(out_ptr.dtype.element_ty))
