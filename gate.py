"""The AttnGate of SeerAttention-R, its gate folders, and the block selectors for decode.

AttnGate (SPEC §2), one per attention layer, reads the layer's q and k after q_norm/k_norm
and before RoPE:
  gate query  gq[t, h] = sum_{g,d} q[t, h*G+g, d] * Wq[h, g, d, :]        -> [T, Hk, Dg]
  gate key    gk[j, h] = [max | min | avg of k over block j] @ Wk[h]      -> [NB, Hk, Dg]
  optional RMSNorm on both, RoPE inside the gate (query at t, key at j*S, the block's start)
  score       s[t, h, j] = gq[t, h] . gk[j, h] / sqrt(Dg) over complete blocks before t's block.
Parameter names are the published checkpoints' (`...self_attn.attn_gate.attngate_linear_q.weight`),
so a published gate folder loads unchanged.

Selector (SPEC §3-4) keeps the pooled keys beside the KV pages and, at every decode step,
returns per (sequence, KV head) the logical block ids to read, padded with -1 — what the
decode kernel takes. The block holding the new token is always kept, on top of the budget.
"""
import functools
import glob
import json
import math
import os

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs pick blocks with PyTorch (pick_blocks)
    triton = None

from model import RMSNorm, cos_sin, fused, rms_norm, pdl_launch, rope_inv_freq, rotate, write_folder

if triton is not None:
    from model import wait_and_release

SELECTORS = ("dense", "seer", "quest", "oracle", "window")
GATE_EPS = 1e-6   # the gate's q/k RMSNorm epsilon


class Weight(nn.Module):
    """A bare parameter under the name `.weight` (the published gate layout)."""
    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape) / math.sqrt(math.prod(shape[:-1]) / shape[0]))


class AttnGate(nn.Module):
    def __init__(self, hk, g, d, dg=128, block_size=64, use_qk_norm=True, rope_theta=1e6):
        super().__init__()
        self.hk, self.g, self.d, self.dg, self.block_size, self.rope_theta = hk, g, d, dg, block_size, rope_theta
        self.attngate_linear_q = Weight(hk, g, d, dg)
        self.attngate_linear_k = Weight(hk, 3 * d, dg)
        self.attngate_qnorm = RMSNorm(dg, GATE_EPS) if use_qk_norm else None
        self.attngate_knorm = RMSNorm(dg, GATE_EPS) if use_qk_norm else None

    def query(self, q, positions):
        """q [N, Hq, D] pre-RoPE, positions [N] -> gate queries [N, Hk, Dg]."""
        return gate_query(q, positions, self.attngate_linear_q.weight, self.qnorm_weight, self.rope_theta)

    def key(self, pooled, block_ids):
        """pooled [M, Hk, 3D] ([max | min | avg] of pre-RoPE keys), block_ids [M] -> gate keys [M, Hk, Dg]."""
        return gate_key(pooled, block_ids, self.attngate_linear_k.weight, self.knorm_weight, self.block_size,
                        self.rope_theta)

    @property
    def qnorm_weight(self):   # None without QK-norm
        return self.attngate_qnorm.weight if self.attngate_qnorm is not None else None

    @property
    def knorm_weight(self):
        return self.attngate_knorm.weight if self.attngate_knorm is not None else None

    def block_keys(self, k):
        """Pre-RoPE keys k [T, Hk, D] of one sequence -> gate keys [T // S, Hk, Dg] of its complete blocks."""
        nb = k.shape[0] // self.block_size
        blocks = k[: nb * self.block_size].unflatten(0, (nb, self.block_size))   # [NB, S, Hk, D]
        avg = blocks.mean(1, dtype=torch.promote_types(k.dtype, torch.float32)).to(k.dtype)
        return self.key(torch.cat([blocks.amax(1), blocks.amin(1), avg], -1), torch.arange(nb, device=k.device))

    def scores(self, q, k):
        """Training/analysis view over one whole sequence: q [T, Hq, D], k [T, Hk, D] (pre-RoPE)
        -> scores [T, Hk, NB] over the NB = T // S complete blocks, -inf where block j is not
        complete-and-before t's own block."""
        T, S = q.shape[0], self.block_size
        nb = T // S
        ar = torch.arange(T, device=q.device)
        gq = self.query(q, ar)                                         # [T, Hk, Dg]
        gk = self.block_keys(k)                                        # [NB, Hk, Dg]
        s = torch.einsum("the,jhe->thj", gq, gk) / math.sqrt(self.dg)  # [T, Hk, NB]
        visible = torch.arange(nb, device=q.device)[None, :] < (ar // S)[:, None]  # [T, NB]
        s = s.to(torch.promote_types(s.dtype, torch.float32))         # softmax in >= float32
        return s.masked_fill(~visible[:, None, :], float("-inf"))


def gate_query(q, positions, wq, norm, theta):
    """q [N, Hq, D] pre-RoPE; wq [Hk, G, D, Dg]; norm [Dg] or None -> gate queries [N, Hk, Dg]."""
    hk, g, d, dg = wq.shape
    gq = torch.einsum("nhgd,hgde->nhe", q.reshape(q.shape[0], hk, g, d).to(wq.dtype), wq)
    return norm_rope(gq, norm, positions, theta)


def gate_key(pooled, block_ids, wk, norm, block_size, theta):
    """pooled [M, Hk, 3D]; wk [Hk, 3D, Dg]; norm [Dg] or None -> gate keys [M, Hk, Dg], RoPE at
    each block's first token."""
    gk = torch.einsum("mhc,hce->mhe", pooled.to(wk.dtype), wk)
    return norm_rope(gk, norm, block_ids * block_size, theta)


def norm_rope(x, norm, positions, theta):
    """x [N, Hk, Dg] -> RMS-normed with weight norm (unless None), then RoPE at positions [N]."""
    if norm is not None:
        x = rms_norm(x.reshape(-1, x.shape[-1]), norm, GATE_EPS).view(x.shape)
    return rotate(x, *cos_sin(positions, x.shape[-1], theta, x.dtype))


# ---- gate folders: config.json (base model config + seerattn_* fields) + safetensors ----

def attach_gates(model, dg=128, block_size=64, use_qk_norm=True):
    """Fresh gates on every attention layer; only they will train."""
    c = model.config
    p = next(model.parameters())
    for layer in model.layers:
        gate = AttnGate(c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim,
                        dg, block_size, use_qk_norm, c.rope_theta)
        layer.self_attn.attn_gate = gate.to(p.device, p.dtype)
    return model


def gate_state(model):
    return {f"model.layers.{i}.self_attn.attn_gate.{k}": v for i, layer in enumerate(model.layers)
            for k, v in layer.self_attn.attn_gate.state_dict().items()}


def save_gates(model, path, extra_config=None):
    """Write a gate folder atomically (temp file + rename): config.json and model.safetensors."""
    g = model.layers[0].self_attn.attn_gate
    cfg = {**model.config.to_hf_dict(), "base_model": getattr(model, "name_or_path", ""),
           "seerattn_gate_block_size": g.block_size, "seerattn_gate_hidden_size": g.dg,
           "seerattn_k_seq_pooling_type": "Kmaxminavg", "seerattn_q_head_pooling_type": "Qproj",
           "seerattn_use_qk_norm": g.attngate_qnorm is not None, "seerattn_use_rope": True,
           **(extra_config or {})}
    write_folder(path, {k: v.detach().float().contiguous().cpu() for k, v in gate_state(model).items()}, cfg)


def load_gates(model, path):
    """Attach the gates of a gate folder (ours or the published layout) to model; checks they fit."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json there (expected a gate folder)")
    with open(cfg_path) as f:
        gcfg = json.load(f)
    if gcfg.get("seerattn_k_seq_pooling_type", "Kmaxminavg") != "Kmaxminavg" or \
            gcfg.get("seerattn_q_head_pooling_type", "Qproj") != "Qproj":
        raise ValueError(f"{path}: only Kmaxminavg key pooling and Qproj query pooling are supported")
    state = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update({k: v for k, v in load_file(f).items() if ".attn_gate." in k})
    if not state:
        raise FileNotFoundError(f"{path}: no attn_gate weights in any *.safetensors file")
    c = model.config
    n_layers = 1 + max(int(k.split(".")[2]) for k in state)
    hk, g, d, dg = state["model.layers.0.self_attn.attn_gate.attngate_linear_q.weight"].shape
    want = {"layers": c.num_hidden_layers, "kv heads": c.num_key_value_heads,
            "group size": c.num_attention_heads // c.num_key_value_heads, "head_dim": c.head_dim}
    have = {"layers": n_layers, "kv heads": hk, "group size": g, "head_dim": d}
    diff = [f"{k} {have[k]} vs model {want[k]}" for k in want if have[k] != want[k]]
    if diff:
        raise ValueError(f"{path}: gate folder does not fit this model: {', '.join(diff)}")
    use_norm = "model.layers.0.self_attn.attn_gate.attngate_qnorm.weight" in state
    attach_gates(model, dg, gcfg.get("seerattn_gate_block_size", 64), use_norm)
    p = next(model.parameters())
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}.self_attn.attn_gate."
        layer.self_attn.attn_gate.load_state_dict(
            {k[len(prefix):]: v.to(p.device, p.dtype) for k, v in state.items() if k.startswith(prefix)})
    return gcfg


# ---- selection at decode ----

class Selector:
    """Pooled keys beside the pages, and the choice of blocks each decode step reads.

    Per layer and page (indexed like cache.k's pages), in cache.pooled:
      seer:  kmax/kmin/ksum of the pre-RoPE keys written so far (running, O(1) per token),
             and gate_k, the gate key, computed once when the page fills;
      quest: qmax/qmin, elementwise max/min of the post-RoPE keys.
    """

    def __init__(self, attn, model, cache, budget=None, threshold=None):
        S = cache.page_size
        if attn not in SELECTORS:
            raise ValueError(f"unknown selector {attn!r}; choose one of {', '.join(SELECTORS)}")
        if budget is not None and threshold is not None:
            raise ValueError("give either a token budget or a threshold, not both")
        if threshold is not None and (attn != "seer" or not 0 < threshold < 1):
            raise ValueError(f"threshold must be in (0, 1) and only applies to seer, got {threshold} for {attn}")
        if attn not in ("dense", "seer") and budget is None:
            raise ValueError(f"--attn {attn} needs a token budget")
        if attn == "seer" and budget is None and threshold is None:
            raise ValueError("--attn seer needs a token budget or a threshold")
        if budget is not None and (budget < S or budget % S):
            near = max(S, round(budget / S) * S)
            raise ValueError(f"budget {budget} must be a positive multiple of the block size {S}; try {near}")
        gate = getattr(model.layers[0].self_attn, "attn_gate", None)
        if attn == "seer":
            if gate is None:
                raise ValueError("--attn seer needs gates: give --gate DIR")
            if gate.block_size != S:
                raise ValueError(f"gate block size {gate.block_size} != page size {S}: set --block-size "
                                 f"{gate.block_size}")
        self.attn, self.model, self.budget, self.threshold = attn, model, budget, threshold
        # KV tokens read, and what dense steps would read; shape [1], not 0-d: torch.compile drops
        # in-place updates of 0-d CPU tensors (seen with torch 2.13)
        self.read = torch.zeros(1, dtype=torch.float64, device=cache.k.device)
        self.total = torch.zeros(1, dtype=torch.float64, device=cache.k.device)
        L, P, _, Hk, D = cache.k.shape
        new = lambda *shape, dt=cache.k.dtype: torch.zeros(L, P, *shape, dtype=dt, device=cache.k.device)
        if attn == "seer":
            cache.pooled = dict(kmax=new(Hk, D), kmin=new(Hk, D), ksum=new(Hk, D, dt=torch.float32),
                                gate_k=new(Hk, gate.dg))
        elif attn == "quest":
            cache.pooled = dict(qmax=new(Hk, D), qmin=new(Hk, D))

    def sparsity(self):
        """Share of the KV tokens a dense step reads that these steps did not (dense: none, uncounted)."""
        return 0.0 if self.attn == "dense" else 1.0 - (self.read / self.total.clamp(min=1)).item()

    def prefill(self, layer, step, k, kr):
        """One prompt's keys k (pre-RoPE), kr (post-RoPE) [N, Hk, D], positions 0..N-1, were
        written at step.slots: pool them by whole blocks (and give the complete blocks gate keys)."""
        pooled, S = step.cache.pooled, step.cache.page_size
        if pooled is None:
            return
        names, x = (("kmax", "kmin", "ksum"), k) if self.attn == "seer" else (("qmax", "qmin"), kr)
        N = x.shape[0]
        nb = -(-N // S)
        pad = torch.full((nb * S - N, *x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
        blocks = torch.cat([x, pad]).view(nb, S, *x.shape[1:])                 # [nb, S, Hk, D]
        pages = (step.slots // S)[::S]                                         # page of each block
        new = (blocks.nan_to_num(float("-inf")).amax(1), blocks.nan_to_num(float("inf")).amin(1),
               blocks.float().nan_to_num(0.0).sum(1))
        new = [t.to(pooled[n].dtype) for n, t in zip(names, new)]              # [nb, Hk, D] each
        for n, t in zip(names, new):
            pooled[n][layer, pages] = t
        if self.attn == "seer":               # the complete blocks (all but a partial last one) get gate keys
            gk = self.model.layers[layer].self_attn.attn_gate.block_keys(k)            # [N // S, Hk, Dg]
            pooled["gate_k"][layer, pages[:N // S]] = gk.to(pooled["gate_k"].dtype)

    def share_weight(self, layer, x):
        """The gate query weight whose per-head shares seer's kernels take from the layer's q/k
        kernel (model.qk_norm_rope) at decode, x being on the step's device; else None."""
        if self.attn != "seer":
            return None
        gate = self.model.layers[layer].self_attn.attn_gate
        return gate.attngate_linear_q.weight if use_triton(x, gate) else None

    def __call__(self, layer, step, q, qr, k, kr, shares=None):
        """One decode step: q, qr [B, Hq, D] and k, kr [B, Hk, D] (pre-/post-RoPE; k, kr already in
        the pages at step.slots), and shares [B, Hq, Dg] if the q/k kernel made them (share_weight) -> blocks
        [B, Hk, K] logical ids, -1 padded, or None (dense). The new keys are folded into their
        pages' pooled keys on the way."""
        if self.attn == "dense":
            return None
        cache, S = step.cache, step.cache.page_size
        B, NB = step.block_table.shape
        Hk = cache.k.shape[3]
        gate = None
        k_top = 0 if self.threshold is not None else min(self.budget // S, NB)
        if self.attn == "seer":
            gate = self.model.layers[layer].self_attn.attn_gate
            stats = [cache.pooled[n][layer] for n in ("kmax", "kmin", "ksum", "gate_k")]
            if shares is not None:   # two kernels: scores; picks + pooled keys
                return seer_pick(shares, k, step.positions, step.pages, gate, *stats, step.block_table, step.lengths,
                                 S, k_top, self.threshold or 0.0, self.read, self.total)
            seer_pool_step(k, step.positions, step.pages, cache.scratch, *stats, gate.attngate_linear_k.weight,
                           gate.knorm_weight, S, gate.rope_theta)
            score = seer_scores(q, step.positions, gate.attngate_linear_q.weight, gate.qnorm_weight,
                                stats[3], step.block_table, gate.rope_theta)     # [B, Hk, NB]
        elif self.attn == "quest":
            qmax, qmin = cache.pooled["qmax"][layer], cache.pooled["qmin"][layer]
            running_pool(kr, step.positions % S == 0, step.pages, qmax, qmin)
            G = q.shape[1] // Hk
            qg = qr.view(B, Hk, G, -1).float()
            kmax, kmin = qmax[step.block_table.long()].float(), qmin[step.block_table.long()].float()  # [B, NB, Hk, D]
            bound = torch.maximum(torch.einsum("bhgd,bjhd->bhgjd", qg, kmax),
                                  torch.einsum("bhgd,bjhd->bhgjd", qg, kmin)).sum(-1)
            score = bound.amax(2)                                      # [B, Hk, NB] max over the group
        elif self.attn == "oracle":
            score = block_attention(qr, cache.k[layer], step.block_table, step.lengths).log()
        else:                                                          # window: the most recent blocks
            score = torch.arange(NB, device=q.device).float().expand(B, Hk, NB)
        if self.threshold is not None:
            score = score / math.sqrt(gate.dg)
        return pick_blocks(score, step.lengths, S, k_top, self.threshold or 0.0, self.read, self.total)


# Decode-time helpers, each compiled into one graph on CUDA (a decode step at small batch is
# a chain of tiny ops, each otherwise its own kernel), plain PyTorch elsewhere. Buffers passed
# in (one layer's pooled stats, the token counters) are updated in place.

@fused
def pick_blocks(score, lengths, S: int, k: int, threshold: float, read, total):
    """score [B, Hk, NB] of every block slot -> blocks [B, Hk, K] logical ids, -1 padded: the k
    best (or those with softmax > threshold when k == 0) of the complete blocks before the new
    token's block, then that block. Adds the KV tokens they hold to read, a dense step's to total."""
    B, Hk, NB = score.shape
    cur = (lengths.long() - 1) // S                                    # [B] block of the new token
    j = torch.arange(NB, device=score.device)
    before = j[None, :] < cur[:, None]                                 # [B, NB] complete blocks before it
    score = score.float().masked_fill(~before[:, None, :], float("-inf"))
    if k == 0:
        chosen = torch.where((score.softmax(-1) > threshold) & before[:, None, :], j, -1)  # [B, Hk, NB]
    else:
        top = score.topk(k, dim=-1)
        chosen = torch.where(top.values > float("-inf"), top.indices, -1)                # [B, Hk, k]
    blocks = torch.cat([chosen, cur[:, None, None].expand(B, Hk, 1)], -1).int()          # [B, Hk, K]
    count_tokens(lengths, blocks, S, Hk, read, total)
    return blocks


@fused
def count_tokens(lengths, blocks, S: int, Hk: int, read, total):
    """read += KV tokens in blocks [B, Hk, K], total += a dense step's. Rows with lengths == 1
    are CUDA-graph padding and are not counted."""
    real = lengths > 1
    tokens = torch.where(blocks >= 0, (lengths[:, None, None] - blocks * S).clamp(0, S), 0)
    read += (tokens * real[:, None, None]).sum()
    total += (lengths * real).sum() * Hk


@fused
def seer_scores(q, positions, wq, norm, gate_k, table, theta: float):
    """q [B, Hq, D] pre-RoPE; gate_k [P, Hk, Dg], one layer's gate keys by page; table [B, NB]
    -> [B, Hk, NB] float32 scores (the gate query, the gather and the dot products in one graph)."""
    gq = gate_query(q, positions, wq, norm, theta)                     # [B, Hk, Dg]
    gk = gate_k[table.long()]                                          # [B, NB, Hk, Dg]
    return (gq[:, None].float() * gk.float()).sum(-1).transpose(1, 2)


@fused
def running_pool(x, first, page, kmax, kmin, ksum=None):
    """Fold the new key x [B, Hk, D] of each sequence into its page's running max / min (/ sum)
    (one layer's [P, Hk, D] stats, in place), restarting where first [B] (a new page) -> the new stats."""
    f, xs = first[:, None, None], x.to(kmax.dtype)
    new = [torch.where(f, xs, torch.maximum(kmax[page], xs)), torch.where(f, xs, torch.minimum(kmin[page], xs))]
    if ksum is not None:
        new.append(torch.where(f, 0.0, ksum[page]) + x.float())
    for buf, t in zip((kmax, kmin, ksum), new):
        buf[page] = t
    return new


@fused
def seer_pool_step(x, positions, page, scratch: int, kmax, kmin, ksum, gate_k, wk, norm, S: int, theta: float):
    """Seer at decode: fold the new pre-RoPE keys x [B, Hk, D] into their pages' running stats,
    and give every page that just filled its gate key. Branch-free for CUDA graphs: every row
    computes a key, and rows whose page is not full write theirs to the scratch page."""
    off = positions % S
    kmax_new, kmin_new, ksum_new = running_pool(x, off == 0, page, kmax, kmin, ksum)
    pooled = torch.cat([kmax_new, kmin_new, (ksum_new / S).to(kmax_new.dtype)], -1)  # [B, Hk, 3D]
    gk = gate_key(pooled, positions // S, wk, norm, S, theta)
    gate_k[torch.where(off == S - 1, page, scratch)] = gk.to(gate_k.dtype)


def block_attention(qr, k_pages, block_table, lengths):
    """Exact attention of this step, per block the max probability over its tokens and the G
    heads of the group: qr [B, Hq, D], k_pages [P, S, Hk, D] -> [B, Hk, NB]."""
    B, Hq, D = qr.shape
    S, Hk = k_pages.shape[1], k_pages.shape[2]
    NB = block_table.shape[1]
    k = k_pages[block_table.long()].reshape(B, NB * S, Hk, D)          # [B, NB*S, Hk, D]
    s = torch.einsum("bhgd,bthd->bhgt", qr.view(B, Hk, Hq // Hk, D).float(), k.float()) / math.sqrt(D)
    valid = torch.arange(NB * S, device=qr.device)[None, :] < lengths[:, None].long()
    p = s.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)   # [B, Hk, G, NB*S]
    return p.view(B, Hk, -1, NB, S).amax(dim=(2, 4))


def use_triton(x, gate):
    """The Triton kernels below serve CUDA tensors with power-of-two head and gate widths."""
    return triton is not None and x.is_cuda and all(n & (n - 1) == 0 for n in (gate.d, gate.dg))


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
# the counters. The search is 32 dependent reductions: cheap within a few warps, dear across
# the 16 that the scoring wants, which is why the two are apart. The same program folds the
# row's new key into its page's max / min / sum and, when the key fills the page, makes the
# page's gate key as AttnGate.key does (rounding where PyTorch rounds). That page holds the
# new token, so no score of this step reads its key.
# Qwen3-8B, batch 8 x 32K, seer 4,096, H200 (2026-11-30), per layer: with the shares and the
# pooling in a kernel of their own (`seer_step`, 4.1 µs) the decode step ran 6.20 ms; without
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
        # Before the wait (model.pdl_launch), what older kernels wrote: the step's inputs, and the running stats
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


@functools.cache
def inv_freq(dg, theta, device):
    """A gate's RoPE frequencies [Dg / 2] on device, made once (not in the step's graph)."""
    return rope_inv_freq(dg, theta, device)


def seer_pick(shares, x, positions, page, gate, kmax, kmin, ksum, gate_k, table, lengths, S, k, threshold,
              read, total):
    """The kernels' take on seer_pool_step + seer_scores + pick_blocks: shares [B, Hq, Dg] (each
    query head's share of its group's gate query, from model.qk_norm_rope), the new pre-RoPE keys
    x [B, Hk, D] at positions [B] in pages page [B]; kmax / kmin / ksum / gate_k one layer's, by
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
    freq = inv_freq(Dg, gate.rope_theta, shares.device)
    norm = gate.qnorm_weight   # without one, Wq stands in: the kernel then reads only its dtype
    _seer_score_kernel[(triton.cdiv(NB, SCORE_BLK), Hk, B)](
        shares.contiguous(), positions, gate.attngate_linear_q.weight if norm is None else norm, freq, GATE_EPS,
        gate_k, table, lengths, scores, NB, gate_k.shape[0], scale, Hk=Hk, G=Hq // Hk,
        G_P2=triton.next_power_of_2(Hq // Hk), DG=Dg, S=S, BLK=SCORE_BLK, HAS_NORM=norm is not None,
        **pdl_launch(shares))
    nb_p2 = triton.next_power_of_2(NB)
    # one warp per 128 blocks, at most 4: batch 8, one warp 7.0 / 11.2 / 17.5 µs for both kernels at 128 / 512 /
    # 1024 blocks, four 8.5 / 10.5 / 12.9; the single kernel took 11.6 / 16.1 / 20.0 (H100, 2026-11-23)
    wk, knorm = gate.attngate_linear_k.weight, gate.knorm_weight
    _seer_pick_kernel[(Hk, B)](scores, lengths, out, read, total, NB, threshold, k, W, x, x.stride(0), x.stride(1),
                               positions, page.contiguous(), kmax, kmin, ksum, gate_k, wk,
                               wk if knorm is None else knorm, freq, GATE_EPS, Hk=Hk, D=D, DG=Dg, S=S, TOP_K=k > 0,
                               NB_P2=nb_p2, W_P2=triton.next_power_of_2(W), HAS_NORM=knorm is not None,
                               PR=min(POOL_ROWS, D), num_warps=min(4, max(1, nb_p2 // 128)), **pdl_launch(shares))
    return out


