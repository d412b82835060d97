"""Paged block-sparse GQA flash-decode in TileLang: one new query token per sequence.

decode_attention(q, k_pages, v_pages, block_table, lengths, blocks=None, scale=None) takes the
arguments of model.decode_attention_ref (the PyTorch reference; tests use their own float64 one)
and a softmax scale (default 1/sqrt(D)):
q [B, Hq, D] bf16/fp16; k_pages, v_pages [P, S, Hk, D] (one layer's page pool, K after RoPE);
block_table [B, NBmax] int32 (logical block -> page); lengths [B] int32 (tokens incl. the new
one); blocks None (dense: every block of the sequence) or [B, Hk, K] int32 logical block ids,
-1 = padding anywhere. Query head i reads KV head i // G (G = Hq // Hk). Returns [B, Hq, D].

Algorithm (flash-decoding with split-KV, SPEC §6). Grid (split, KV head, sequence). A program
takes a contiguous share of its (sequence, KV head) work list -- the K selected ids, or in dense
mode blocks 0 .. ceil(len/S)-1 -- and first resolves the whole share to page ids in shared
memory, all threads at once (ids < 0 or >= ceil(len/S) become "skip": never read). Then a
warp-specialised pipeline: one warpgroup issues TMA copies of each page's K and V slice
[S, D] (one stage: the next page's K loads during this page's P V), the other computes a
[16, S] score tile Q K^T on tensor cores (the G query rows of the group padded to 16), masks
tokens past the length, does the online softmax in float32 (exp2, log2(e) folded into the
scale) and accumulates P V into [16, D].
Unwritten slots of the partial last page may hold NaN, so that page's V rows past the length
are zeroed in shared memory (0 * NaN would be NaN). Each program writes its normalised partial
output and log-sum-exp to float32 buffers; a combine kernel merges the splits with all loads
in flight at once. Both kernels launch plainly, not through programmatic dependent launch
(PDL, as the step's Triton kernels do): with the split waiting for the pick and the combine
for the split, the Qwen3-8B grid of bench.py e2e hung on the H100 in 4 of 4 runs (a kernel
spinning at ~125 W; README "Stalls"); without it the grid ran whole, each step 0.01-0.04 ms
slower (H100, 2026-12-05). Alone, sparse mode reading every block at 2^20 tokens is 8% slower
plain (README, the kernel section).

Memory traffic: every selected page slice of K and V once (S*D*2 bytes each, shared by the G
query heads of the group), plus q, the ids and their block-table entries; the partial buffers
add B*Hq*splits*(D+1)*4 bytes written and read back from L2, small next to the KV bytes.
The page layout fixes the access pattern: a page slice of one KV head is S rows of D*2 bytes,
Hk*D*2 bytes apart. The loop is memory bound; the target is copy bandwidth.

Splits are chosen on the host from B*Hk and the SM count (num_splits): enough programs to fill
the SMs in whole waves of two per SM, at least MIN_PAGES entries each, at most CHUNK entries
each. They depend on shapes only, never on lengths, so nothing syncs with the device.

Compiling once: one kernel per (dtype, Hq, Hk, D, S) and mode (sparse, dense), kept in
_KERNELS. B, P, NBmax, K and the number of splits are TileLang dynamic dims (T.dynamic), i.e.
runtime kernel arguments, and lengths and ids are data, so new shapes reuse the kernel.
Bad indices: by default (check=True) lengths, page ids and block ids are validated on the
host before launch, with a clear ValueError; that costs a few device syncs, which a CUDA graph
cannot hold, so the decode step (ids from our own page allocator and selectors) passes
check=False. Unchecked, the kernel still never reads out of bounds: it skips block ids past
the sequence and clamps page ids into the pool (a wrong answer at worst, never a fault).
"""
import math

import torch

try:
    import tilelang
    import tilelang.language as T
except ImportError:  # CPU-only installs run model.decode_attention_ref instead
    tilelang = None

MAX_SPLITS = 32  # most splits of one (sequence, KV head); the combine holds them all at once.
# With CHUNK that is 8192 blocks per sequence (128K tokens at page 16); 64 made the unrolled
# combine ~4 µs slower at batch 16 x 32K (H100, 2026-11-23).
CHUNK = 256  # most list entries one program walks (num_splits keeps shares under it)
ROWS = 16  # query rows per program: G (<= ROWS) padded to the tensor-core tile height
LOG2E = 1.4426950408889634


def build(dtype, Hq, Hk, D, S, dense, stages):
    """The TileLang program (split kernel + combine kernel) for one configuration."""
    threads = 64 if S == 16 else 128  # each warp needs >= 8 score columns of the [16, S] tile
    G = Hq // Hk
    dt = {torch.bfloat16: T.bfloat16, torch.float16: T.float16}[dtype]
    f32 = T.float32
    B, P, NB, K, NS = T.dynamic("B, P, NB, K, NS")

    def share(blocks, b, h, start, count, i):
        """Logical block id of entry i of a program's share of its list, -1 past the end."""
        return T.if_then_else(i < count, (start + i) if dense
                              else blocks[b, h, T.min(start + i, K - 1)], -1)

    def q_row(Q, b, h, i, d):  # query row i of the group, rows >= G zero
        return T.if_then_else(i < G, Q[b, h * G + T.min(i, G - 1), d], 0)

    @T.macro
    def split_kernel(Q, Kp, Vp, table, lengths, blocks, scale, lse_part, o_part):
        with T.Kernel(NS, Hk, B, threads=threads) as (s, h, b):
            q_r = T.alloc_fragment([ROWS, D], dt)
            q_s = T.alloc_shared([ROWS, D], dt)
            k_s = T.alloc_shared([S, D], dt)
            v_s = T.alloc_shared([S, D], dt)
            acc_s = T.alloc_fragment([ROWS, S], f32)
            p_s = T.alloc_shared([ROWS, S], dt)  # probabilities: the PV gemm splits D, not rows, over warps
            acc_o = T.alloc_fragment([ROWS, D], f32)
            m = T.alloc_fragment([ROWS], f32)
            m_prev = T.alloc_fragment([ROWS], f32)
            alpha = T.alloc_fragment([ROWS], f32)
            l_sum = T.alloc_fragment([ROWS], f32)
            l = T.alloc_fragment([ROWS], f32)
            ids = T.alloc_shared([CHUNK], T.int32, scope="shared")  # static: outside the K/V pipeline's pool
            pages = T.alloc_shared([CHUNK], T.int32, scope="shared")

            length = lengths[b]
            n_blk = T.min(T.ceildiv(length, S), NB)  # logical blocks of this sequence
            n_items = n_blk if dense else K          # this (b, h)'s work list
            per = T.ceildiv(n_items, NS)
            start = s * per
            count = T.max(T.min(T.min(per, n_items - start), CHUNK), 0)  # num_splits keeps per <= CHUNK

            if threads == 128:  # q to registers first, so its load overlaps the index loads
                for i, d in T.Parallel(ROWS, D):  # (no register layout is found for 2 warps)
                    q_r[i, d] = q_row(Q, b, h, i, d)
            # This program's share of the list, resolved to pages up front by all threads at
            # once, so the copy loop below waits on no index loads. -1 = skip. (No Python
            # temporaries here: a let of a thread-dependent value at kernel level defeats
            # TileLang's barrier planning for the loop below. One loop whose expressions
            # repeated share() three times took TileLang's simplifier ~20 s more to compile.)
            for i in T.Parallel(CHUNK):
                ids[i] = share(blocks, b, h, start, count, i)
            for i in T.Parallel(CHUNK):  # ids outside the sequence's blocks (padding -1 too): skip
                ids[i] = T.if_then_else((ids[i] >= 0) & (ids[i] < n_blk), ids[i], -1)
                pages[i] = T.if_then_else(ids[i] >= 0, T.max(T.min(table[b, ids[i]], P - 1), 0), 0)
            T.sync_threads()
            for i, d in T.Parallel(ROWS, D):
                q_s[i, d] = q_r[i, d] if threads == 128 else q_row(Q, b, h, i, d)
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, -T.infinity(f32))
            for k in T.Pipelined(count, num_stages=stages):
                j = ids[k]
                if j >= 0:
                    page = pages[k]
                    T.copy(Kp[page, 0:S, h, 0:D], k_s)
                    T.clear(acc_s)
                    T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    for i, t in T.Parallel(ROWS, S):  # mask the partial last page
                        acc_s[i, t] = T.if_then_else(j * S + t < lengths[b], acc_s[i, t] * scale,
                                                     -T.infinity(f32))
                    T.copy(m, m_prev)
                    T.reduce_max(acc_s, m, dim=1, clear=False)
                    for i in T.Parallel(ROWS):
                        alpha[i] = T.exp2(m_prev[i] - m[i])
                    for i, t in T.Parallel(ROWS, S):
                        acc_s[i, t] = T.exp2(acc_s[i, t] - m[i])
                    T.reduce_sum(acc_s, l_sum, dim=1)
                    for i in T.Parallel(ROWS):
                        l[i] = l[i] * alpha[i] + l_sum[i]
                    T.copy(acc_s, p_s)
                    for i, d in T.Parallel(ROWS, D):
                        acc_o[i, d] *= alpha[i]
                    T.copy(Vp[page, 0:S, h, 0:D], v_s)
                    if (j + 1) * S > lengths[b]:  # unwritten slots may hold NaN, and 0 * NaN = NaN
                        for t, d in T.Parallel(S, D):  # (a read of v_s: it must wait for the copy)
                            v_s[t, d] = T.if_then_else(j * S + t < lengths[b], v_s[t, d], T.cast(0, dt))
                        T.fence_proxy_async()  # order these writes before the next TMA into v_s
                    T.gemm(p_s, v_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
            for i, d in T.Parallel(ROWS, D):
                if i < G:
                    o_part[b, h * G + i, s, d] = T.if_then_else(l[i] > 0, acc_o[i, d] / l[i], 0)
            for i in T.Parallel(ROWS):
                if i < G:  # an empty share has lse -inf and weighs nothing in the combine
                    lse_part[b, h * G + i, s] = T.if_then_else(
                        l[i] > 0, T.log2(l[i]) + m[i], -T.infinity(f32))

    @T.macro
    def combine_kernel(lse_part, o_part, Out):
        # One program per (sequence, query head), one thread per channel. The split loops are
        # unrolled to MAX_SPLITS with clamped (always valid) addresses, so all loads are in
        # flight at once; a plain loop over NS would wait one L2 round trip per split.
        with T.Kernel(Hq, B, threads=D) as (hq, b):
            d = T.get_thread_binding()
            lse = T.alloc_local([MAX_SPLITS], f32)
            lse_max = T.alloc_var(f32)
            total = T.alloc_var(f32)
            acc = T.alloc_var(f32)
            lse_max = -T.infinity(f32)
            for s in T.unroll(MAX_SPLITS):
                x = lse_part[b, hq, T.min(s, NS - 1)]  # unconditional load, then select:
                lse[s] = T.if_then_else(s < NS, x, -T.infinity(f32))  # no branch per load
                lse_max = T.max(lse_max, lse[s])
            total = 0
            acc = 0
            for s in T.unroll(MAX_SPLITS):  # empty splits (lse -inf) weigh nothing
                y = o_part[b, hq, T.min(s, NS - 1), d]
                w = T.if_then_else(lse[s] > -T.infinity(f32), T.exp2(lse[s] - lse_max), 0)
                total += w
                acc += w * y
            Out[b, hq, d] = T.if_then_else(total > 0, acc / total, 0)

    if dense:
        @T.prim_func
        def decode(Q: T.Tensor([B, Hq, D], dt), Kp: T.Tensor([P, S, Hk, D], dt),
                   Vp: T.Tensor([P, S, Hk, D], dt), table: T.Tensor([B, NB], T.int32),
                   lengths: T.Tensor([B], T.int32), scale: f32,
                   lse_part: T.Tensor([B, Hq, NS], f32), o_part: T.Tensor([B, Hq, NS, D], f32),
                   Out: T.Tensor([B, Hq, D], dt)):
            split_kernel(Q, Kp, Vp, table, lengths, None, scale, lse_part, o_part)
            combine_kernel(lse_part, o_part, Out)
    else:
        @T.prim_func
        def decode(Q: T.Tensor([B, Hq, D], dt), Kp: T.Tensor([P, S, Hk, D], dt),
                   Vp: T.Tensor([P, S, Hk, D], dt), table: T.Tensor([B, NB], T.int32),
                   lengths: T.Tensor([B], T.int32), blocks: T.Tensor([B, Hk, K], T.int32),
                   scale: f32, lse_part: T.Tensor([B, Hq, NS], f32),
                   o_part: T.Tensor([B, Hq, NS, D], f32), Out: T.Tensor([B, Hq, D], dt)):
            split_kernel(Q, Kp, Vp, table, lengths, blocks, scale, lse_part, o_part)
            combine_kernel(lse_part, o_part, Out)
    return decode


PASS_CONFIGS = {"tl.disable_safe_memory_legalize": True}
_KERNELS = {}      # (dtype, Hq, Hk, D, S, dense, arch, STAGES) -> compiled kernel
# Pipeline stages (page buffers of K and of V per program). 2 hangs on the H200 (2026-11-30):
# a launch mixing rows that read all their entries with rows whose lists are mostly -1 (a
# CUDA-graph bucket's padding rows) never ends; see the README and
# test_decode_kernel_batch_of_full_rows_and_padding_rows. 1 runs it; at block 64 sparse calls
# time the same, dense mode at batch 32 x 32K is ~20% slower (1,157-1,176 us in three runs
# against 969; H200, 2026-11-30).
STAGES = 1
WAVES = 2          # resident programs per SM (registers and shared memory allow 2)
MIN_PAGES = 2      # fewer pages per program cost more in the combine than they save


def get_kernel(dtype, Hq, Hk, D, S, dense, arch):
    key = (dtype, Hq, Hk, D, S, dense, arch, STAGES)
    if key not in _KERNELS:
        # Every index in build() is clamped by hand, so TileLang's per-load bounds guards are
        # off: a guard is a branch around each load, and the combine's loads must all be in
        # flight at once.
        _KERNELS[key] = tilelang.compile(
            build(dtype, Hq, Hk, D, S, dense, STAGES), target={"kind": "cuda", "arch": arch},
            execution_backend="tvm_ffi", pass_configs=PASS_CONFIGS)
    return _KERNELS[key]


def least_splits(items):
    """The fewest splits of a list of `items` entries (a program walks at most CHUNK of them);
    ValueError if that is more than MAX_SPLITS. Splits may be least_splits(items) .. MAX_SPLITS."""
    least = math.ceil(items / CHUNK)
    if least > MAX_SPLITS:
        raise ValueError(f"at most {MAX_SPLITS * CHUNK} blocks per sequence, got {items}.")
    return least


def num_splits(batch, Hk, items, num_sm):
    """Splits per (sequence, KV head) list of `items` entries: the fewest that fill the SMs in
    whole waves (>= 85% of the best wave efficiency), >= MIN_PAGES entries per program, and
    enough that no share exceeds CHUNK."""
    programs, slots = batch * Hk, WAVES * num_sm
    most = max(1, min(MAX_SPLITS, math.ceil(items / MIN_PAGES)))
    eff = [programs * n / slots / math.ceil(programs * n / slots) for n in range(1, most + 1)]
    ns = 1 + next(i for i, e in enumerate(eff) if e >= 0.85 * max(eff))
    return max(ns, least_splits(items))


def unsupported(dtype, head_dim, page_size, group):
    """Why the kernel cannot serve this dtype / head_dim / page size / query heads per KV head, or None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"q must be bf16 or fp16, got {dtype}."
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128, got {head_dim}."
    if page_size not in (16, 32, 64, 128):
        return f"page size must be 16, 32, 64 or 128, got {page_size}."
    if group > ROWS:
        return f"at most {ROWS} query heads per KV head, got {group}."
    return None


def _check_inputs(q, k_pages, v_pages, block_table, lengths, blocks):
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(tilelang is not None, "decode_attention needs tilelang; use model.decode_attention_ref.")
    tensors = dict(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                   lengths=lengths, **({} if blocks is None else dict(blocks=blocks)))
    for name, t in tensors.items():
        need(isinstance(t, torch.Tensor) and t.is_contiguous(), f"{name} must be a contiguous tensor.")
    need(q.dim() == 3 and k_pages.dim() == 4, "q must be [B, Hq, D] and k_pages [P, S, Hk, D].")
    B, Hq, D = q.shape
    P, S, Hk, Dk = k_pages.shape
    need(k_pages.dtype == q.dtype and v_pages.dtype == q.dtype, "k_pages and v_pages need q's dtype.")
    need(v_pages.shape == k_pages.shape, "v_pages must have k_pages' shape.")
    need(Dk == D, f"head_dim of q ({D}) and k ({Dk}) differ.")
    need(Hq % Hk == 0, f"Hq ({Hq}) must be a multiple of Hk ({Hk}).")
    why = unsupported(q.dtype, D, S, Hq // Hk)
    need(why is None, why)
    need(B > 0 and P > 0, "need at least one sequence and one page.")
    need(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == B
         and block_table.shape[1] > 0, "block_table must be int32 [B, NBmax] with NBmax >= 1.")
    need(lengths.dtype == torch.int32 and lengths.shape == (B,), "lengths must be int32 [B].")
    if blocks is not None:
        need(blocks.dtype == torch.int32 and blocks.dim() == 3 and blocks.shape[:2] == (B, Hk)
             and blocks.shape[2] > 0, "blocks must be int32 [B, Hk, K] with K >= 1.")
    for name, t in tensors.items():   # last: without a GPU the tests still reach every check above
        need(t.is_cuda and t.device == q.device, f"{name} must be a CUDA tensor on q's device.")


def _check_values(k_pages, block_table, lengths, blocks):
    """Indices the kernel would skip or clamp are errors here (reads them: device syncs)."""
    if lengths.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("decode_attention(check=True) syncs with the device; "
                         "inside CUDA graph capture pass check=False.")
    P, S = k_pages.shape[:2]
    NB = block_table.shape[1]
    n_blk = (lengths.long() + S - 1) // S
    if bool(((lengths < 1) | (n_blk > NB)).any()):
        raise ValueError(f"lengths must be in [1, NBmax * S] = [1, {NB * S}].")
    used = torch.arange(NB, device=lengths.device)[None, :] < n_blk[:, None]
    if bool(((block_table < 0) | (block_table >= P))[used].any()):
        raise ValueError(f"block_table has a page id outside [0, {P}) for a block in use.")
    if blocks is not None:
        if bool(((blocks >= n_blk[:, None, None]) | (blocks < -1)).any()):
            raise ValueError("blocks holds a logical block id outside [-1, its sequence's block count).")
        ids = blocks.sort(-1).values
        if bool(((ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)).any()):
            raise ValueError("blocks repeats a logical block id within a (sequence, KV head) row.")


def decode_attention(q, k_pages, v_pages, block_table, lengths, blocks=None, scale=None, *,
                     check=True, splits=None):
    """Paged (block-sparse) GQA decode attention; see the module docstring for shapes.
    check: validate lengths, page ids and block ids first (device syncs; False inside CUDA graphs).
    splits: programs per (sequence, KV head); default num_splits(...)."""
    _check_inputs(q, k_pages, v_pages, block_table, lengths, blocks)
    if check:
        _check_values(k_pages, block_table, lengths, blocks)
    B, Hq, D = q.shape
    S, Hk = k_pages.shape[1], k_pages.shape[2]
    scale = (1.0 / math.sqrt(D) if scale is None else scale) * LOG2E
    props = torch.cuda.get_device_properties(q.device)
    arch = f"sm_{props.major}{props.minor}"
    kernel = get_kernel(q.dtype, Hq, Hk, D, S, blocks is None, arch)
    items = block_table.shape[1] if blocks is None else blocks.shape[2]
    least = least_splits(items)   # (num_splits keeps to it; a forced count is checked here)
    ns = num_splits(B, Hk, items, props.multi_processor_count) if splits is None else splits
    if not least <= ns <= MAX_SPLITS:
        raise ValueError(f"splits must be in [{least}, {MAX_SPLITS}], got {ns}.")
    lse_part = torch.empty(B, Hq, ns, device=q.device, dtype=torch.float32)
    o_part = torch.empty(B, Hq, ns, D, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    idx = () if blocks is None else (blocks,)
    kernel(q, k_pages, v_pages, block_table, lengths, *idx, scale, lse_part, o_part, out)
    return out
