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
On CUDA seer's step is two Triton kernels (kernel_step.seer_pick); seer_pool_step, seer_scores
and pick_blocks here are what they replace, and what CPUs run.
"""
import functools
import glob
import math
import os
import re

import torch
import torch.nn as nn

import kernel_step
from model import RMSNorm, cos_sin, fused, on_triton, read_config, rms_norm, rope_inv_freq, rotate, write_folder

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
        self.d, self.dg, self.block_size, self.rope_theta = d, dg, block_size, rope_theta
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


def gate_query(q, positions, wq, norm, theta):
    """q [N, Hq, D] pre-RoPE; wq [Hk, G, D, Dg]; norm [Dg] or None -> gate queries [N, Hk, Dg]."""
    hk, g, d, _ = wq.shape
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
    cfg = {**model.config.to_hf_dict(torch.float32), "base_model": getattr(model, "name_or_path", ""),
           "seerattn_gate_block_size": g.block_size, "seerattn_gate_hidden_size": g.dg,
           "seerattn_k_seq_pooling_type": "Kmaxminavg", "seerattn_q_head_pooling_type": "Qproj",
           "seerattn_use_qk_norm": g.attngate_qnorm is not None, "seerattn_use_rope": True,
           **(extra_config or {})}
    write_folder(path, {k: v.detach().float().contiguous().cpu() for k, v in gate_state(model).items()}, cfg)


def gate_block_size(gcfg, path):
    """A gate folder's block size, from its config.json (the published default: 64)."""
    S = gcfg.get("seerattn_gate_block_size", 64)
    if type(S) is not int or S < 1:
        raise ValueError(f"{path}/config.json: seerattn_gate_block_size {S!r} is not a positive integer")
    return S


def load_gates(model, path):
    """Attach the gates of a gate folder (ours or the published layout) to model; checks they fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    gcfg = read_config(path, "a gate folder")
    if gcfg.get("seerattn_k_seq_pooling_type", "Kmaxminavg") != "Kmaxminavg" or \
            gcfg.get("seerattn_q_head_pooling_type", "Qproj") != "Qproj" or not gcfg.get("seerattn_use_rope", True):
        raise ValueError(f"{path}: only Kmaxminavg key pooling, Qproj query pooling and RoPE in the gate are "
                         "supported")
    state = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        try:
            state.update({k: v for k, v in load_file(f).items() if ".attn_gate." in k})
        except SafetensorError as e:
            raise ValueError(f"{f}: cannot read it ({e})")
    if not state:
        raise FileNotFoundError(f"{path}: no attn_gate weights in any *.safetensors file")
    c = model.config
    layer_of = {k: re.match(r"model\.layers\.(\d+)\.self_attn\.attn_gate\.", k) for k in state}
    odd = [k for k, m in layer_of.items() if m is None]
    if odd:
        raise ValueError(f"{path}: {odd[0]}: gate weights must be named model.layers.N.self_attn.attn_gate.*")
    n_layers = 1 + max(int(m.group(1)) for m in layer_of.values())
    q0 = "model.layers.0.self_attn.attn_gate.attngate_linear_q.weight"
    if q0 not in state or state[q0].dim() != 4:
        raise ValueError(f"{path}: no [Hk, G, D, Dg] weight {q0}")
    hk, g, d, dg = state[q0].shape
    want = {"layers": c.num_hidden_layers, "kv heads": c.num_key_value_heads,
            "group size": c.num_attention_heads // c.num_key_value_heads, "head_dim": c.head_dim}
    have = {"layers": n_layers, "kv heads": hk, "group size": g, "head_dim": d}
    for k in ("hidden_size", "intermediate_size", "vocab_size"):   # the base model's, where the folder says
        if k in gcfg:
            want[k], have[k] = getattr(c, k), gcfg[k]
    diff = [f"{k} {have[k]} vs model {want[k]}" for k in want if have[k] != want[k]]
    if diff:
        base = f" (trained for {gcfg['base_model']})" if gcfg.get("base_model") else ""
        raise ValueError(f"{path}: gate folder{base} does not fit this model: {', '.join(diff)}")
    use_norm = "model.layers.0.self_attn.attn_gate.attngate_qnorm.weight" in state
    before = [getattr(layer.self_attn, "attn_gate", None) for layer in model.layers]   # kept if a layer fails
    attach_gates(model, dg, gate_block_size(gcfg, path), use_norm)
    p = next(model.parameters())
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}.self_attn.attn_gate."
        try:
            layer.self_attn.attn_gate.load_state_dict(
                {k[len(prefix):]: v.to(p.device, p.dtype) for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as e:   # a weight missing, extra or of another shape
            for layer, gate in zip(model.layers, before):
                layer.self_attn.attn_gate = gate
            raise ValueError(f"{path}: layer {i}'s gate weights do not fit: {' '.join(str(e).split())}")


# ---- selection at decode ----

class Selector:
    """Pooled keys beside the pages, and the choice of blocks each decode step reads.

    Per layer and page (indexed like cache.k's pages), in cache.pooled:
      seer:  kmax/kmin/ksum of the pre-RoPE keys written so far (running, O(1) per token),
             and gate_k, the gate key, computed once when the page fills;
      quest: rope_kmax/rope_kmin, elementwise max/min of the post-RoPE keys.
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
        # KV tokens read, and what dense steps would read: summed on the device, read once at the end
        self.read = torch.zeros(1, dtype=torch.float64, device=cache.k.device)
        self.total = torch.zeros(1, dtype=torch.float64, device=cache.k.device)
        L, P, _, Hk, D = cache.k.shape
        new = lambda *shape, dt=cache.k.dtype: torch.zeros(L, P, *shape, dtype=dt, device=cache.k.device)
        if attn == "seer":
            cache.pooled = dict(kmax=new(Hk, D), kmin=new(Hk, D), ksum=new(Hk, D, dt=torch.float32),
                                gate_k=new(Hk, gate.dg))
        elif attn == "quest":
            cache.pooled = dict(rope_kmax=new(Hk, D), rope_kmin=new(Hk, D))

    def sparsity(self):
        """Share of the KV tokens a dense step reads that these steps did not (dense: none, uncounted)."""
        return 0.0 if self.attn == "dense" else 1.0 - (self.read / self.total.clamp(min=1)).item()

    def prefill(self, layer, step, k, kr):
        """One prompt's keys k (pre-RoPE), kr (post-RoPE) [N, Hk, D], positions 0..N-1, were
        written at step.slots: pool them by whole blocks (and give the complete blocks gate keys)."""
        pooled, S = step.cache.pooled, step.cache.page_size
        if pooled is None:
            return
        names, x = (("kmax", "kmin", "ksum"), k) if self.attn == "seer" else (("rope_kmax", "rope_kmin"), kr)
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
                return kernel_step.seer_pick(shares, k, step.positions, step.pages, gate,
                                             inv_freq(gate.dg, gate.rope_theta, k.device), *stats,
                                             step.block_table, step.lengths, S, k_top, self.threshold or 0.0,
                                             self.read, self.total)
            seer_pool_step(k, step.positions, step.pages, cache.scratch, *stats, gate.attngate_linear_k.weight,
                           gate.knorm_weight, S, gate.rope_theta)
            score = seer_scores(q, step.positions, gate.attngate_linear_q.weight, gate.qnorm_weight,
                                stats[3], step.block_table, gate.rope_theta)     # [B, Hk, NB]
        elif self.attn == "quest":
            rope_kmax, rope_kmin = cache.pooled["rope_kmax"][layer], cache.pooled["rope_kmin"][layer]
            running_pool(kr, step.positions % S == 0, step.pages, rope_kmax, rope_kmin)
            G = q.shape[1] // Hk
            qg = qr.view(B, Hk, G, -1).float()
            table = step.block_table.long()
            kmax, kmin = rope_kmax[table].float(), rope_kmin[table].float()   # [B, NB, Hk, D]
            # Quest's bound sum_d max(q_d kmax_d, q_d kmin_d): kmax where q_d >= 0, kmin where it is not
            bound = torch.einsum("bhgd,bjhd->bhgj", qg.clamp(min=0), kmax) + \
                torch.einsum("bhgd,bjhd->bhgj", qg.clamp(max=0), kmin)
            score = bound.amax(2)                                      # [B, Hk, NB] max over the group
        elif self.attn == "oracle":
            score = block_attention(qr, cache.k[layer], step.block_table, step.lengths).log()
        else:                                                          # window: the most recent blocks
            score = torch.arange(NB, device=q.device).float().expand(B, Hk, NB)
        if self.threshold is not None:
            score = score / math.sqrt(gate.dg)
        return pick_blocks(score, step.lengths, S, k_top, self.threshold or 0.0, self.read, self.total)


# Decode-time helpers, those marked @fused each compiled into one graph on CUDA (a decode step
# at small batch is a chain of tiny ops, each otherwise its own kernel), plain PyTorch elsewhere.
# Buffers passed in (one layer's pooled stats, the token counters) are updated in place.

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
    """Whether seer's step on x takes kernel_step.seer_pick (model.on_triton, and power-of-two head
    and gate widths) rather than seer_pool_step, seer_scores and pick_blocks."""
    return on_triton(x) and all(n & (n - 1) == 0 for n in (gate.d, gate.dg))


@functools.cache
def inv_freq(dg, theta, device):
    """A gate's RoPE frequencies [Dg / 2] on device for kernel_step.seer_pick, made once (not in the
    step's graph)."""
    return rope_inv_freq(dg, theta, device)
