"""The Triton kernels of a decode step, apart from its attention (kernel_decode.py). Each is the
fast path of a PyTorch function that stays in model.py or gate.py as its reference: the choice
between the two is made there (model.on_triton, gate.use_triton), and test_all.py checks each
kernel against its own float64 reference (on the CPU in Triton's interpreter).

  rms_norm_kernel      model.RMSNorm (rms_norm, add_rms_norm): one program a row
  linear_kernel        model.linear: a decode step's projections, a few rows times a weight
  qk_norm_rope_kernel  model.qk_norm_rope: q/k norms, RoPE, the K/V page writes, seer's shares
  seer_pick            gate.Selector's seer step (seer_pool_step, seer_scores, pick_blocks)

Each is launched with programmatic dependent launch (pdl_launch): it starts while the kernel
before it ends. None has a backward; training's fused target kernel is in train_gate.py.
Shapes as in model.py: B batch, N tokens, Hq / Hk query / KV heads, D head_dim, Dg gate width,
P pages, S page size, NB blocks.
"""
import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: model.py's and gate.py's PyTorch paths
    triton = None


@functools.cache
def _sm90(device):
    return torch.cuda.get_device_capability(device)[0] >= 9


PDL = True   # False: every kernel launched plainly (bench.py --profile does, to time kernels apart)


def pdl_launch(x):
    """Keyword arguments that launch a decode step's Triton kernel (every one in this file) on x's
    device with programmatic dependent launch where it can (sm_90+, PDL on): the kernel starts
    while the one before it still runs, and its programs wait for that kernel's results
    (wait_and_release) before they read anything. With the RMSNorms as a Triton kernel too, a
    Qwen3-8B decode step (H200, 32K) took 0.17-0.30 ms less: batch 8 seer 4,096 6.57 -> 6.37
    ms, dense 12.96 -> 12.79; batch 1 5.45 -> 5.15 and 5.72 -> 5.47. (The RMSNorm kernel alone
    timed as Inductor's; an L2 prefetch of each GEMM's first weight columns before its wait
    made the step 0.25 ms slower.)
    Before its wait a kernel may read weights and what older kernels wrote: the kernel before
    it waited for the one before that before it let this one launch. Those reads bypass L1
    (".cg"). Done in the q/k, pick and RMSNorm kernels: 6.22 -> 6.12 ms at batch 8, 4.99 ->
    4.86 at batch 1 (seer 4,096, 32K, H200)."""
    on = PDL and x.is_cuda and _sm90(x.device)
    return dict(PDL=on, launch_pdl=on)


if triton is not None:
    @triton.jit
    def wait_and_release():
        """In a kernel launched with PDL, before it reads what the kernel before it wrote: wait until that
        kernel has finished and its writes are visible, then let the kernel after it launch (its programs
        wait the same way)."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# ---- RMSNorm ----

def rms_norm_kernel(x, residual, weight, eps):
    """model.rms_norm / add_rms_norm as one Triton kernel: x, residual [N, H] -> (normed, x + residual
    or None)."""
    N, H = x.shape
    add = residual is not None
    x, residual = x.contiguous(), (residual if add else x).contiguous()
    out = torch.empty_like(x)
    s = torch.empty_like(x) if add else None
    _rms_norm_kernel[(N,)](x, residual, weight, out, s if add else out, H, eps, BH=triton.next_power_of_2(H), ADD=add,
                           **pdl_launch(x))
    return out, s


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x, res, w, out, s_out, H, eps, BH: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
        """One program per row: rounded where model.add_rms_norm rounds (the sum to x's dtype, the normed
        row to x's dtype before the weight)."""
        r = tl.program_id(0).to(tl.int64) * H
        c = tl.arange(0, BH)
        DT = out.dtype.element_ty
        weight = tl.load(w + c, mask=c < H, other=0.0).to(tl.float32)   # before the wait: it overlaps the GEMM
        if PDL:
            wait_and_release()
        v = tl.load(x + r + c, mask=c < H, other=0.0)
        if ADD:
            v = (v.to(tl.float32) + tl.load(res + r + c, mask=c < H, other=0.0).to(tl.float32)).to(DT)
            tl.store(s_out + r + c, v, mask=c < H)
        v = v.to(tl.float32)
        v = (v * tl.rsqrt(tl.sum(v * v, 0) / H + eps)).to(DT).to(tl.float32)
        tl.store(out + r + c, (weight * v).to(DT), mask=c < H)


# ---- the projections ----

LINEAR_ROWS = 16   # rows of one tl.dot tile: the kernel's batch limit

if triton is not None:
    @triton.jit
    def _linear_kernel(x, w, out, M, N, K, ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PREC: tl.constexpr, GLU: tl.constexpr, PDL: tl.constexpr):
        """One program per BN output columns: all M (<= ROWS) rows, the whole K, BK at a time. With GLU
        the columns n of the gate and N + n of the up projection, silu(gate) * up written."""
        m = tl.arange(0, ROWS)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        DT = out.dtype.element_ty
        if PDL:
            wait_and_release()
        acc = tl.zeros([ROWS, BN], tl.float32)
        acc_up = tl.zeros([ROWS, BN], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            a = tl.load(x + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            at = w + n[None, :] * K + k[:, None]                          # [BK, BN]
            mask = (n[None, :] < N) & (k[:, None] < K)
            acc = tl.dot(a, tl.load(at, mask=mask, other=0.0), acc, input_precision=PREC)   # [ROWS, BK] @ [BK, BN]
            if GLU:
                acc_up = tl.dot(a, tl.load(at + N * K, mask=mask, other=0.0), acc_up, input_precision=PREC)
        y = acc.to(DT)
        if GLU:   # rounded where F.linear rounds, then silu_mul's float32 arithmetic
            g = y.to(tl.float32)
            y = (g * tl.sigmoid(g) * acc_up.to(DT).to(tl.float32)).to(DT)
        tl.store(out + m[:, None] * N + n[None, :], y, mask=(m[:, None] < M) & (n[None, :] < N))


def linear_kernel(x, w, glu=False):
    """x [M <= 16, K] @ w [N, K]^T -> [M, N] in x's dtype (glu: [M, N / 2], see model.linear), float32
    sums (float32 inputs: IEEE, as the CPU interpreter's tests need). Tiles and stages are the
    fastest of a sweep (BN 16-64, BK 128-512, 3-6 stages) for Qwen3-4B / 8B shapes at batch 8 and
    16 (H200, 2026-11-30); with glu a program reads BN / 2 columns of each half."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= LINEAR_ROWS and w.shape[1] == K and not (glu and N % 2), (x.shape, w.shape, glu)
    BN, BK, stages = (64, 128, 3) if N >= 16384 else (64, 256, 4) if N >= 6144 else (32, 256, 6)
    BK = BK // 2 if x.dtype == torch.float32 else BK   # float32 tiles: twice the shared memory a stage
    BN, N = (BN // 2, N // 2) if glu else (BN, N)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _linear_kernel[(triton.cdiv(N, BN),)](x.contiguous(), w.contiguous(), out, M, N, K, ROWS=LINEAR_ROWS, BN=BN, BK=BK,
                                          PREC="ieee" if x.dtype == torch.float32 else "tf32", GLU=glu,
                                          num_stages=stages, **pdl_launch(x))
    return out


# ---- q/k norms, RoPE, the K/V page writes ----

QK_ROWS = 16    # tokens per program of the q/k kernel making shares: tl.dot's smallest tile

if triton is not None:
    @triton.jit
    def _qk_norm_rope_kernel(qkv, q_norm, k_norm, cos, sin, q_out, qr_out, k_out, kr_out, k_pages, v_pages, slots,
                             wq, shares, N, eps, Hq: tl.constexpr, Hk: tl.constexpr, D: tl.constexpr,
                             R: tl.constexpr, WRITE: tl.constexpr, DG: tl.constexpr, PREC: tl.constexpr,
                             PDL: tl.constexpr):
        """One program per (R tokens t, head j): j < Hq a query head (and, with DG > 0, its gate-query
        share q @ wq[j], on the tensor cores: wq[j] read once for the R tokens), else key head j - Hq
        (and its value)."""
        i, j = tl.program_id(0), tl.program_id(1)
        DT = q_out.dtype.element_ty
        t = (i * R + tl.arange(0, R)).to(tl.int64)[:, None]             # [R, 1] this program's tokens
        live = t < N
        e = tl.arange(0, D // 2)[None, :]                                # RoPE turns pairs (e, e + D / 2)
        # Before the wait (pdl_launch), all but qkv: weights, and cos, sin and slots, which kernels before the
        # GEMM made, so these loads overlap the GEMM
        w = q_norm if j < Hq else k_norm
        w_lo, w_hi = tl.load(w + e).to(tl.float32), tl.load(w + D // 2 + e).to(tl.float32)
        c_lo = tl.load(cos + t * D + e, mask=live, cache_modifier=".cg").to(tl.float32)
        c_hi = tl.load(cos + t * D + D // 2 + e, mask=live, cache_modifier=".cg").to(tl.float32)
        s_lo = tl.load(sin + t * D + e, mask=live, cache_modifier=".cg").to(tl.float32)
        s_hi = tl.load(sin + t * D + D // 2 + e, mask=live, cache_modifier=".cg").to(tl.float32)
        if WRITE:
            slot = tl.load(slots + t, mask=live, cache_modifier=".cg")
        if DG > 0:   # this query head's wq[j] [D, DG] in two halves of D (none for key heads)
            d, n = tl.arange(0, D // 2)[:, None], tl.arange(0, DG)[None, :]
            mine = j + 0 * d < Hq                # [D / 2, 1] (a tensor: the interpreter takes no scalar mask)
            wq_lo = tl.load(wq + (j * D + d) * DG + n, mask=mine)
            wq_hi = tl.load(wq + (j * D + D // 2 + d) * DG + n, mask=mine)
        if PDL:
            wait_and_release()
        row = qkv + (t * (Hq + 2 * Hk) + j) * D
        lo = tl.load(row + e, mask=live, other=0.0).to(tl.float32)     # [R, D / 2]
        hi = tl.load(row + D // 2 + e, mask=live, other=0.0).to(tl.float32)
        r = tl.rsqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / D + eps)[:, None]   # RMSNorm in float32
        lo = ((lo * r).to(DT).to(tl.float32) * w_lo).to(DT)
        hi = ((hi * r).to(DT).to(tl.float32) * w_hi).to(DT)
        r_lo = (lo.to(tl.float32) * c_lo - hi.to(tl.float32) * s_lo).to(DT)
        r_hi = (hi.to(tl.float32) * c_hi + lo.to(tl.float32) * s_hi).to(DT)
        if j < Hq:
            at = (t * Hq + j) * D + e
            tl.store(q_out + at, lo, mask=live)
            tl.store(q_out + at + D // 2, hi, mask=live)
            tl.store(qr_out + at, r_lo, mask=live)
            tl.store(qr_out + at + D // 2, r_hi, mask=live)
            if DG > 0:   # q @ wq[j] [R, DG]: rounded to the gate's dtype as gate_query rounds, dot in float32
                WT = wq.dtype.element_ty   # (tf32 holds bf16 / fp16 products exactly; the interpreter can't dot bf16)
                share = tl.dot(lo.to(WT).to(tl.float32), wq_lo.to(tl.float32), input_precision=PREC)
                share = tl.dot(hi.to(WT).to(tl.float32), wq_hi.to(tl.float32), share, input_precision=PREC)
                tl.store(shares + (t * Hq + j) * DG + n, share, mask=live)
        else:
            at = (t * Hk + j - Hq) * D + e
            tl.store(k_out + at, lo, mask=live)
            tl.store(k_out + at + D // 2, hi, mask=live)
            tl.store(kr_out + at, r_lo, mask=live)
            tl.store(kr_out + at + D // 2, r_hi, mask=live)
            if WRITE:   # K (post-RoPE) and V into the page slot
                page = (slot * Hk + j - Hq) * D + e
                tl.store(k_pages + page, r_lo.to(k_pages.dtype.element_ty), mask=live)
                tl.store(k_pages + page + D // 2, r_hi.to(k_pages.dtype.element_ty), mask=live)
                v = row + Hk * D
                tl.store(v_pages + page, tl.load(v + e, mask=live).to(v_pages.dtype.element_ty), mask=live)
                tl.store(v_pages + page + D // 2, tl.load(v + D // 2 + e, mask=live).to(v_pages.dtype.element_ty),
                         mask=live)


def qk_norm_rope_kernel(qkv, q_norm, k_norm, cos, sin, hq, hk, eps, k_pages=None, v_pages=None, slots=None, wq=None):
    """model.qk_norm_rope as one Triton kernel (head_dim and the gate width powers of two)."""
    N = qkv.shape[0]
    D = qkv.shape[1] // (hq + 2 * hk)
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q, qr = (torch.empty(N, hq, D, dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    k, kr = (torch.empty(N, hk, D, dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    write = k_pages is not None
    shares = None if wq is None else torch.empty(N, hq, wq.shape[-1], dtype=torch.float32, device=qkv.device)
    R = 1 if wq is None else QK_ROWS   # (16 rows a program without shares: 2.6 -> 3.4 µs, H200)
    _qk_norm_rope_kernel[(triton.cdiv(N, R), hq + hk)](
        qkv, q_norm, k_norm, cos, sin, q, qr, k, kr, k_pages if write else k, v_pages if write else k,
        slots if write else qkv, k if wq is None else wq.contiguous(), k if wq is None else shares, N, eps, Hq=hq,
        Hk=hk, D=D, R=R, WRITE=write, DG=0 if wq is None else wq.shape[-1],
        PREC="ieee" if wq is not None and wq.dtype == torch.float32 else "tf32", **pdl_launch(qkv))
    return q, k, qr, kr, qkv.view(N, hq + 2 * hk, D)[:, hq + hk:], shares


# ---- seer's decode step in two kernels (CUDA) ----
# Compiled, seer_pool_step + seer_scores + pick_blocks are ~20 kernels per layer (the gate
# query's einsum, norm and RoPE; the running stats' gathers and writes, the gate-key GEMM; the
# gather-and-dot, a masked fill, torch.topk's two passes and sort, the id and token-count
# writes). Here the layer's q/k kernel (model.qk_norm_rope) has already written each query
# head's share of its group's gate query, q[b, j] @ Wq[j] in float32. The scoring is spread
# wide: one program per SCORE_BLK blocks of a (sequence, KV head) row sums the group's shares,
# norms and turns them (the row's gate query), gathers the blocks' gate keys through the page
# table and dots them with it. The picking is one small program per row: it keeps the row's
# scores in registers, finds the k-th largest by a bitwise search (32 counts over the row),
# writes the chosen ids in block order and the new token's block, and adds the tokens read to
# the counters. The search is up to 32 dependent reductions over the whole row, so it wants the
# row in one small program, where the scoring wants it spread over NB / SCORE_BLK programs:
# which is why the two are apart. The same program folds the
# row's new key into its page's max / min / sum and, when the key fills the page, makes the
# page's gate key as AttnGate.key does (rounding where PyTorch rounds). That page holds the
# new token, so no score of this step reads its key.
# Qwen3-8B, batch 8 x 32K, seer 4,096, H200 (2026-11-30), per layer: with the shares and the
# pooling in a kernel of their own (the former `seer_step`, 4.1 µs) the decode step ran 6.20 ms; without
# it (6156b1d) the q/k kernel took 2.6 -> 4.2 µs, the pick 8.1 -> 9.0, the scores 6.2 as
# before, the step 6.13. Reads moved ahead of the PDL wait (836daf8): q/k 3.8, pick 8.4, 6.12.

SCORE_BLK = 32    # blocks per scoring program (16 / 32 / 64 within 1 µs; H100, 2026-11-23)
POOL_ROWS = 16    # rows of Wk[h] at a time when the pick makes a gate key

if triton is not None:
    @triton.jit
    def _norm_rope(lo, hi, pos, norm, inv_freq, eps, e, WT: tl.constexpr, DG: tl.constexpr, HAS_NORM: tl.constexpr):
        """Gate vectors' two halves lo, hi [R, DG / 2] (float32 sums of the projection) -> rounded to WT as
        PyTorch's matmul rounds, RMS-normed, RoPE at pos [R]; each step rounded to WT as PyTorch rounds
        (returned in float32)."""
        lo, hi = lo.to(WT).to(tl.float32), hi.to(WT).to(tl.float32)
        if HAS_NORM:
            r = tl.rsqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / DG + eps)[:, None]
            lo = ((lo * r).to(WT).to(tl.float32) * tl.load(norm + e).to(tl.float32)[None, :]).to(WT).to(tl.float32)
            hi = ((hi * r).to(WT).to(tl.float32) * tl.load(norm + DG // 2 + e).to(tl.float32)[None, :])
            hi = hi.to(WT).to(tl.float32)
        angle = pos.to(tl.float32)[:, None] * tl.load(inv_freq + e)[None, :]
        cos = tl.cos(angle).to(WT).to(tl.float32)
        sin = tl.sin(angle).to(WT).to(tl.float32)
        return (lo * cos - hi * sin).to(WT).to(tl.float32), (hi * cos + lo * sin).to(WT).to(tl.float32)

    @triton.jit
    def _seer_score_kernel(shares, positions, qnorm, inv_freq, eps, gate_k, table, lengths, scores, NB, P, scale,
                           Hk: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, DG: tl.constexpr, S: tl.constexpr,
                           BLK: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr):
        if PDL:   # (its gate keys read before the wait made the step slower: 6.12 -> 6.20 ms, H200)
            wait_and_release()
        c, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        WT = qnorm.dtype.element_ty
        j = c * BLK + tl.arange(0, BLK)
        length = tl.load(lengths + b)
        page = tl.load(table + b * NB + j, mask=j < NB, other=0)          # (not waiting for the length)
        page = tl.minimum(tl.maximum(page, 0), P - 1).to(tl.int64)
        valid = j < tl.minimum(tl.maximum(length - 1, 0) // S, NB)       # complete blocks before the new token
        # the gate query [1, Dg / 2] x 2: the group's G shares summed, normed, RoPE at the token. Each of
        # the row's programs makes it again (~2 KB of L2 reads and a few hundred flops): cheaper than a kernel
        g = tl.arange(0, G_P2)[:, None]
        e = tl.arange(0, DG // 2)
        at = shares + ((b * Hk + h) * G + g) * DG + e[None, :]           # [G_P2, Dg / 2]
        lo = tl.sum(tl.load(at, mask=g < G, other=0.0), 0)[None, :]
        hi = tl.sum(tl.load(at + DG // 2, mask=g < G, other=0.0), 0)[None, :]
        lo, hi = _norm_rope(lo, hi, tl.load(positions + b + tl.arange(0, 1)), qnorm, inv_freq, eps, e, WT, DG,
                            HAS_NORM)
        k = gate_k + (page[:, None] * Hk + h) * DG + e[None, :]          # [BLK, Dg / 2]
        s = tl.sum(tl.load(k, mask=valid[:, None], other=0.0).to(tl.float32) * lo, 1)
        s += tl.sum(tl.load(k + DG // 2, mask=valid[:, None], other=0.0).to(tl.float32) * hi, 1)
        tl.store(scores + (b * Hk + h) * NB + j, s * scale, mask=j < NB)

    @triton.jit
    def _seer_pick_kernel(scores, lengths, out, read, total, NB, threshold, K, W, x, sx_b, sx_h, positions, page, kmax,
                          kmin, ksum, gate_k, wk, knorm, inv_freq, eps, Hk: tl.constexpr, D: tl.constexpr,
                          DG: tl.constexpr, S: tl.constexpr, TOP_K: tl.constexpr, NB_P2: tl.constexpr,
                          W_P2: tl.constexpr, HAS_NORM: tl.constexpr, PR: tl.constexpr, PDL: tl.constexpr):
        h, b = tl.program_id(0), tl.program_id(1)
        # Before the wait (pdl_launch), what older kernels wrote: the step's inputs, and the running stats
        # of the new key's page (this kernel's, at earlier steps), which the pooling below takes last
        length = tl.load(lengths + b, cache_modifier=".cg")
        pos = tl.load(positions + b, cache_modifier=".cg")
        off = pos % S
        d = tl.arange(0, D)
        ph = tl.load(page + b, cache_modifier=".cg").to(tl.int64) * Hk + h   # head h of the new token's page
        at = ph * D
        old_max = tl.load(kmax + at + d, cache_modifier=".cg").to(tl.float32)
        old_min = tl.load(kmin + at + d, cache_modifier=".cg").to(tl.float32)
        old_sum = tl.load(ksum + at + d, cache_modifier=".cg")
        if PDL:
            wait_and_release()
        xv = tl.load(x + b * sx_b + h * sx_h + d).to(tl.float32)        # the new key (the q/k kernel's)
        cur = tl.maximum(length - 1, 0) // S                             # block of the new token
        j = tl.arange(0, NB_P2)
        valid = j < tl.minimum(cur, NB)                                  # complete blocks before it
        score = tl.load(scores + (b * Hk + h) * NB + j, mask=valid, other=0.0)
        if TOP_K:   # the K best: the K-th largest key, bit by bit from the top
            bits = score.to(tl.int32, bitcast=True)
            key = (bits ^ ((bits >> 31) & 0x7FFFFFFF) ^ -2147483648).to(tl.uint32, bitcast=True)   # float order
            key = tl.where(valid, key, 0)   # below every score's key (only -NaN's bits would map to 0)
            kth, bit, n_top = tl.zeros([], tl.uint32), tl.full([], 31, tl.int32), tl.full([], -1, tl.int32)
            while (bit >= 0) & (n_top != K):   # done early once exactly K keys are >= kth: the K best
                cand = kth | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
                n_ge = tl.sum((key >= cand).to(tl.int32), 0)
                kth, n_top = tl.where(n_ge >= K, cand, kth), tl.where(n_ge >= K, n_ge, n_top)
                bit -= 1
            if n_top == K:   # exactly K keys >= kth: those, no tie to break (pick 6.3 -> 6.0 µs; step 6.01 -> 5.99 ms)
                chosen = valid & (key >= kth)
            else:
                above = key > kth
                tie_rank = tl.cumsum((key == kth).to(tl.int32), 0)               # ties: lowest ids first
                chosen = valid & (above | ((key == kth) & (tie_rank <= K - tl.sum(above.to(tl.int32), 0))))
            n = tl.minimum(K, tl.minimum(cur, NB))
        else:       # every block whose softmax weight exceeds the threshold
            e = tl.where(valid, tl.exp(score - tl.max(tl.where(valid, score, float("-inf")), 0)), 0.0)
            chosen = valid & (e > threshold * tl.sum(e, 0))
            n = tl.sum(chosen.to(tl.int32), 0)
        row = out + (b * Hk + h) * W
        tl.store(row + tl.cumsum(chosen.to(tl.int32), 0) - 1, j, mask=chosen)   # compacted, in block order
        w = tl.arange(0, W_P2)
        tl.store(row + w, tl.where(w == W - 1, cur, -1), mask=(w >= n) & (w < W))
        real = length > 1                                                # lengths <= 1: graph padding
        # relaxed: the counts are read after the step; Triton's default (acq_rel) fenced and synced every program
        tl.atomic_add(read, (n * S + length - cur * S).to(tl.float64), mask=real, sem="relaxed")
        tl.atomic_add(total, length.to(tl.float64), mask=real, sem="relaxed")
        # last, the new key into its page's running max / min (in float32: exact for bf16 / fp16, and Triton's
        # CPU interpreter compares bf16 as raw bits) and sum. (This pooling ahead of the search took the kernel
        # 17.2 µs, not 9.0: Qwen3-8B, batch 8 x 32K, H200.)
        new_max = tl.where(off == 0, xv, tl.maximum(old_max, xv))
        new_min = tl.where(off == 0, xv, tl.minimum(old_min, xv))
        new_sum = tl.where(off == 0, 0.0, old_sum) + xv
        tl.store(kmax + at + d, new_max.to(kmax.dtype.element_ty))
        tl.store(kmin + at + d, new_min.to(kmin.dtype.element_ty))
        tl.store(ksum + at + d, new_sum)
        if off == S - 1:   # the key filled its page: the gate key [max | min | avg] @ Wk[h], norm, RoPE
            tl.debug_barrier()                                           # the stats above, stored for all threads
            WT = wk.dtype.element_ty
            half = tl.arange(0, DG // 2)
            acc_lo = tl.zeros([PR, DG // 2], tl.float32)                # products summed by row slot: no
            acc_hi = tl.zeros([PR, DG // 2], tl.float32)                # reduction until the end
            for c in tl.static_range(3):                                 # Wk[h]'s max, min, avg rows
                for d0 in tl.static_range(0, D, PR):                    # (PR rows at a time: few registers)
                    dd = d0 + tl.arange(0, PR)
                    if c == 0:
                        part = tl.load(kmax + at + dd).to(tl.float32)
                    elif c == 1:
                        part = tl.load(kmin + at + dd).to(tl.float32)
                    else:
                        part = (tl.load(ksum + at + dd) / S).to(WT).to(tl.float32)
                    wrows = wk + (h * 3 * D + c * D + dd[:, None]) * DG + half[None, :]   # [PR, Dg / 2]
                    acc_lo += part[:, None] * tl.load(wrows).to(tl.float32)
                    acc_hi += part[:, None] * tl.load(wrows + DG // 2).to(tl.float32)
            lo, hi = tl.sum(acc_lo, 0)[None, :], tl.sum(acc_hi, 0)[None, :]
            start = tl.zeros([1], tl.int64) + (pos - off)                # RoPE at the block's first token
            lo, hi = _norm_rope(lo, hi, start, knorm, inv_freq, eps, half, WT, DG, HAS_NORM)
            tl.store(gate_k + ph * DG + half[None, :], lo)
            tl.store(gate_k + ph * DG + DG // 2 + half[None, :], hi)


def seer_pick(shares, x, positions, page, gate, freq, kmax, kmin, ksum, gate_k, table, lengths, S, k, threshold,
              read, total):
    """The kernels' take on seer_pool_step + seer_scores + pick_blocks: shares [B, Hq, Dg] (each
    query head's share of its group's gate query, from model.qk_norm_rope), the new pre-RoPE keys
    x [B, Hk, D] at positions [B] in pages page [B]; gate an AttnGate, freq [Dg / 2] its RoPE
    frequencies on the device (float32); kmax / kmin / ksum / gate_k one layer's, by
    page (updated in place) -> blocks [B, Hk, k + 1] (or [B, Hk, NB + 1] with k == 0 and a
    threshold), -1 padded."""
    B, Hq, Dg = shares.shape
    Hk, D, NB = x.shape[1], x.shape[2], table.shape[1]
    W = k + 1 if k else NB + 1
    table, lengths, positions = table.contiguous(), lengths.contiguous(), positions.contiguous()
    x = x if x.stride(2) == 1 else x.contiguous()      # rows and heads may be strided, channels not
    scores = torch.empty(B, Hk, NB, dtype=torch.float32, device=shares.device)
    out = torch.empty(B, Hk, W, dtype=torch.int32, device=shares.device)
    scale = 1.0 if k else 1.0 / math.sqrt(Dg)
    qnorm, knorm = gate.attngate_qnorm, gate.attngate_knorm   # RMSNorms, or None without QK-norm
    _seer_score_kernel[(triton.cdiv(NB, SCORE_BLK), Hk, B)](   # (no norm: Wq stands in, only its dtype read)
        shares.contiguous(), positions, gate.attngate_linear_q.weight if qnorm is None else qnorm.weight, freq,
        0.0 if qnorm is None else qnorm.eps, gate_k, table, lengths, scores, NB, gate_k.shape[0], scale, Hk=Hk,
        G=Hq // Hk, G_P2=triton.next_power_of_2(Hq // Hk), DG=Dg, S=S, BLK=SCORE_BLK, HAS_NORM=qnorm is not None,
        **pdl_launch(shares))
    nb_p2 = triton.next_power_of_2(NB)
    # one warp per 128 blocks, at most 4: batch 8, one warp 7.0 / 11.2 / 17.5 µs for both kernels at 128 / 512 /
    # 1024 blocks, four 8.5 / 10.5 / 12.9; the single kernel took 11.6 / 16.1 / 20.0 (H100, 2026-11-23)
    wk = gate.attngate_linear_k.weight
    _seer_pick_kernel[(Hk, B)](scores, lengths, out, read, total, NB, threshold, k, W, x, x.stride(0), x.stride(1),
                               positions, page.contiguous(), kmax, kmin, ksum, gate_k, wk,
                               wk if knorm is None else knorm.weight, freq, 0.0 if knorm is None else knorm.eps,
                               Hk=Hk, D=D, DG=Dg, S=S, TOP_K=k > 0, NB_P2=nb_p2, W_P2=triton.next_power_of_2(W),
                               HAS_NORM=knorm is not None, PR=min(POOL_ROWS, D),
                               num_warps=min(4, max(1, nb_p2 // 128)), **pdl_launch(shares))
    return out
