"""Qwen3 in PyTorch, with a paged KV cache for ragged-batch decoding.

Follows Hugging Face's Qwen3 (SPEC §1): RMSNorm in float32, q_norm/k_norm per head
before RoPE (rotate-half), GQA, SwiGLU MLP, tied or untied lm_head. Module names are
Hugging Face's minus the leading "model.", except that q/k/v_proj and gate/up_proj are each
one stacked weight (qkv_proj, gate_up_proj); from_pretrained / save_pretrained convert.
On CUDA the small elementwise steps are compiled (`fused`); at inference the RMSNorms, the q/k
norms with RoPE and the K/V page writes (`qk_norm_rope`, which also makes seer's gate-query
shares when the selector asks), and a decode step's projections (`linear`) run as Triton
kernels (kernel_step.py), each function here choosing between its kernel and its PyTorch code.

Shapes: B batch, T tokens, Hq/Hk query/KV heads, D head_dim, G = Hq // Hk,
P pages in the pool, S page size (= gate block size), NB blocks of a sequence.

Three ways to run it:
  model(input_ids)                  dense causal forward, no cache -> logits [B, T, V]
  model.prefill(ids, seq_id, cache) one prompt into the cache     -> last logits [V]
  model.decode(tokens, block_table, lengths, cache, select)
                                    one token for each live sequence -> [B, V]
Attention at decode goes through `decode_attention` (page tables, lengths, and an
optional list of selected blocks per KV head, which the step's selector picks just before),
the one place the TileLang kernel plugs in.
"""
import argparse
import functools
import json
import math
import os
import signal
import sys
import tempfile
from collections import deque
from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernel_step


# ---- Qwen3: its config, layers and decode step, the model ----

@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        lacks = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d and f.name != "head_dim"]
        if lacks:
            raise ValueError(f"config lacks {', '.join(lacks)}")
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):  # transformers >= 5
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", 1e6)
        d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_hf_dict(self, dtype):
        """config.json's fields, for weights stored in dtype (transformers 4 reads torch_dtype, 5 dtype)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        name = str(dtype).removeprefix("torch.")
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "attention_bias": False, "torch_dtype": name, "dtype": name, **d}


# Published Qwen3 shapes (SPEC §1), for random-weight runs with nothing to download: bench.py e2e,
# train_gate.py --random-init
SHAPES = {
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen3-14b": dict(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def fused(fn):
    """fn through torch.compile when its first argument is a CUDA tensor, plain PyTorch elsewhere.
    A decode step at small batch is a chain of tiny elementwise ops, each its own kernel
    (~2 µs even inside a CUDA graph); compiled, each function below is one kernel (nano-vllm
    does the same). Compiled for dynamic shapes, once per process, at the first CUDA call: made
    at import, torch.compile would import its compiler (~2 s) for every --help and CPU run."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        compiled = compiled or torch.compile(fn, dynamic=True)
        return compiled(*args)
    return run


def on_triton(x):
    """Whether a call on x takes kernel_step's Triton kernels: CUDA, triton installed, and no
    autograd (the kernels have no backward)."""
    return kernel_step.triton is not None and x.is_cuda and not torch.is_grad_enabled()


@fused
def rms_norm(x, weight, eps):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """x [..., dim] -> normed; with residual: (norm(x + residual), x + residual), the add fused
        in. Flattened to 2-D: one Triton kernel (CUDA, no autograd) or one compiled variant for
        every caller."""
        flat = x.reshape(-1, x.shape[-1])
        res = None if residual is None else residual.reshape(flat.shape)
        if on_triton(flat) and self.weight.dtype == x.dtype:
            h, s = kernel_step.rms_norm_kernel(flat, res, self.weight, self.eps)
        elif res is None:
            h, s = rms_norm(flat, self.weight, self.eps), None
        else:
            h, s = add_rms_norm(flat, res, self.weight, self.eps)
        return h.view(x.shape) if s is None else (h.view(x.shape), s.view(x.shape))


@fused
def add_rms_norm(x, residual, weight, eps):
    x = x + residual
    return rms_norm(x, weight, eps), x


def rope_inv_freq(dim, theta, device):
    """RoPE's float32 inverse frequencies [dim / 2], as Hugging Face computes them."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


@fused
def cos_sin(positions, dim, theta, dtype):
    """positions [N] -> cos, sin [N, dim] for RoPE (angles in float32, as Hugging Face does)."""
    angles = positions.float()[:, None] * rope_inv_freq(dim, theta, positions.device)   # [N, dim/2]
    angles = torch.cat([angles, angles], dim=-1)                 # [N, dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


@fused
def rotate(x, cos, sin):
    """RoPE, rotate-half convention: x [N, H, dim], cos / sin [N, dim] broadcast over heads."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin[:, None, :]


def decode_attention_ref(q, k_pages, v_pages, block_table, lengths, blocks=None):
    """Paged decode attention in plain PyTorch: the CPU path, and what the kernel replaces on CUDA.

    q [B, Hq, D]; k_pages, v_pages [P, S, Hk, D]; block_table [B, NB] int32 (logical block ->
    page; entries past a sequence's end are ignored); lengths [B] tokens incl. the new one;
    blocks None (dense) or [B, Hk, K] logical block ids, -1 = padding. Returns [B, Hq, D].
    """
    B, Hq, D = q.shape
    P, S, Hk = k_pages.shape[:3]
    NB = block_table.shape[1]
    scale = 1.0 / math.sqrt(D)
    if blocks is None:                                           # every block of the sequence
        pages = block_table.long().clamp(0, P - 1)
        k = k_pages[pages].reshape(B, NB * S, Hk, D).transpose(1, 2)   # [B, Hk, NB*S, D]
        v = v_pages[pages].reshape(B, NB * S, Hk, D).transpose(1, 2)
        pos = torch.arange(NB * S, device=q.device)[None, None]  # [1, 1, NB*S]
        keep = pos < lengths[:, None, None].long()               # [B, 1, NB*S]
    else:                                                        # only the chosen blocks, as the kernel
        K = blocks.shape[2]
        ids = blocks.long()                                      # [B, Hk, K], -1 = padding
        pages = block_table.long().gather(1, ids.clamp(min=0).view(B, Hk * K)).view(B, Hk, K).clamp(0, P - 1)
        heads = torch.arange(Hk, device=q.device)[None, :, None]
        k = k_pages.transpose(1, 2)[pages, heads].flatten(2, 3)  # [B, Hk, K*S, D]
        v = v_pages.transpose(1, 2)[pages, heads].flatten(2, 3)
        pos = ids[..., None] * S + torch.arange(S, device=q.device)  # [B, Hk, K, S] token positions
        keep = ((ids[..., None] >= 0) & (pos < lengths[:, None, None, None].long())).flatten(2)  # [B, Hk, K*S]
    v = torch.where(keep[..., None], v, 0)                      # unwritten slots may hold NaN
    qg = q.view(B, Hk, Hq // Hk, D).float()
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale  # [B, Hk, G, T]
    scores = scores.masked_fill(~keep[:, :, None, :], float("-inf"))
    out = torch.einsum("bhgt,bhtd->bhgd", scores.softmax(-1), v.float())
    return out.reshape(B, Hq, D).to(q.dtype)


decode_attention = decode_attention_ref  # generate.py swaps in the TileLang kernel on CUDA


class Linear(nn.Linear):
    """A block's projection: decode-sized calls go through `linear`'s kernel. (MLP.gate_up_proj is
    an nn.Linear that MLP.forward hands to linear(glu=True); lm_head stays an nn.Linear: cuBLAS
    reads it at 98% of copy speed.)"""
    def forward(self, x):
        return linear(x, self.weight)


def linear(x, w, glu=False):
    """x [..., K] @ w [N, K]^T; with glu, w stacks a gate and an up projection [2I, K] and the result
    is silu(x @ gate^T) * (x @ up^T) [..., I] (the MLP's first half). A decode step multiplies a
    few rows (the batch) by each weight, so its time is the weight's read. cuBLAS reads the
    Qwen3-8B block weights at batch 8 at 54-78% of copy speed (split-K and a reduce kernel for
    some), kernel_step.linear_kernel at 61-87% (back to back, H200); a Qwen3-8B batch 8 x 32K decode
    step went 7.32 -> 6.83 ms (seer) and 13.88 -> 13.41 (dense); the silu_mul kernel folded into
    gate_up's kernel took it 6.78 -> 6.70 and 13.41 -> 13.26 more (another H200). It serves up to
    kernel_step.LINEAR_ROWS rows of bf16 / fp16 on CUDA without autograd; the rest is F.linear."""
    N, K = w.shape
    rows = x.numel() // K
    if (not on_triton(x) or rows > kernel_step.LINEAR_ROWS or x.dtype not in (torch.bfloat16, torch.float16)
            or w.dtype != x.dtype):
        return silu_mul(*F.linear(x, w).chunk(2, -1)) if glu else F.linear(x, w)
    return kernel_step.linear_kernel(x.reshape(rows, K), w, glu).view(*x.shape[:-1], N // 2 if glu else N)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.hq + 2 * self.hk) * self.d, bias=False)  # q, k, v stacked
        self.o_proj = Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.capture = None   # train_gate.py: capture(layer_idx, q, k, qr, kr) sees each layer's q and k

    def forward(self, x, cos, sin, step=None):
        """x [B, T, hidden]; cos, sin [B*T, D] -> [B, T, hidden]."""
        B, T, _ = x.shape
        pages = (step.cache.k[self.layer_idx], step.cache.v[self.layer_idx], step.slots) if step is not None else ()
        decode = step is not None and step.block_table is not None   # else dense causal over these T tokens
        select = step.select if step is not None else None
        wq = select.share_weight(self.layer_idx, x) if decode and select is not None else None   # seer: shares
        q, k, qr, kr, v, shares = qk_norm_rope(self.qkv_proj(x).view(B * T, -1), self.q_norm.weight,
                                               self.k_norm.weight, cos, sin, self.hq, self.hk, self.q_norm.eps,
                                               *pages, wq=wq)       # [B*T, H, D] each; shares [B*T, Hq, Dg]
        if self.capture is not None:
            self.capture(self.layer_idx, *(t.view(B, T, -1, self.d) for t in (q, k, qr, kr)))
        if not decode:
            if select is not None:                                    # prefill: pool the prompt's keys
                select.prefill(self.layer_idx, step, k, kr)
            qr, kr, v = (t.view(B, T, -1, self.d).transpose(1, 2) for t in (qr, kr, v))   # [B, H, T, D]
            o = F.scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        else:                                                         # decode: T == 1, through the pages
            blocks = select(self.layer_idx, step, q, qr, k, kr, shares) if select is not None else None
            o = decode_attention(qr, step.cache.k[self.layer_idx], step.cache.v[self.layer_idx],
                                 step.block_table, step.lengths, blocks)
        return self.o_proj(o.reshape(B, T, self.hq * self.d))


def qk_norm_rope(qkv, q_norm, k_norm, cos, sin, hq, hk, eps, k_pages=None, v_pages=None, slots=None, wq=None):
    """One layer's projections qkv [N, (Hq + 2 Hk) D] -> q, k (QK-normed, pre-RoPE: what the gate
    reads), qr, kr (post-RoPE), v, each [N, H, D], and shares; cos, sin [N, D]. With a layer's pages
    k_pages, v_pages [P, S, Hk, D], kr and v are also written at flat slots [N]. With a gate's
    query weight wq [Hk, G, D, Dg], the kernel also writes shares [N, Hq, Dg] float32, q[n, j] @
    wq's slice for query head j: the head's share of its group's gate query (kernel_step.seer_pick
    sums, norms and turns it). Else shares is None, and the selector makes its gate query
    itself. On CUDA without autograd (and power-of-two widths), one Triton kernel does it all:
    compiled, the norms, RoPE and writes were 8 kernels, 17.5 µs per layer in a Qwen3-8B batch-8
    decode step, the kernel 2.5 µs, 3.8 with the shares (H200, 836daf8)."""
    d = qkv.shape[1] // (hq + 2 * hk)
    if on_triton(qkv) and d & (d - 1) == 0 and (wq is None or wq.shape[-1] & (wq.shape[-1] - 1) == 0):
        return kernel_step.qk_norm_rope_kernel(qkv, q_norm, k_norm, cos, sin, hq, hk, eps, k_pages, v_pages, slots,
                                               wq)
    q, k, qr, kr, v = qk_norm_rope_torch(qkv, q_norm, k_norm, cos, sin, hq, hk, eps)
    if k_pages is not None:
        k_pages.view(-1, hk, kr.shape[-1])[slots] = kr.to(k_pages.dtype)
        v_pages.view(-1, hk, v.shape[-1])[slots] = v.to(v_pages.dtype)
    return q, k, qr, kr, v, None


@fused
def qk_norm_rope_torch(qkv, q_norm, k_norm, cos, sin, hq: int, hk: int, eps: float):
    q, k, v = qkv.view(qkv.shape[0], hq + 2 * hk, -1).split([hq, hk, hk], 1)
    q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    return q, k, rotate(q, cos, sin), rotate(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate, up stacked
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(linear(x, self.gate_up_proj.weight, glu=True))   # silu(x @ gate) * (x @ up)


@fused
def silu_mul(gate, up):
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, step=None):
        """x: the last block's MLP output (the embeddings at the first block, where residual is
        None), residual: the stream it adds to -> (this block's MLP output, the stream)."""
        h, residual = (self.input_layernorm(x), x) if residual is None else self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, step), residual)
        return self.mlp(h), residual


@dataclass
class Step:
    """What every layer of one cached forward shares (nano-vllm's context object)."""
    cache: "PagedKVCache"
    slots: torch.Tensor                 # [N] flat slot (page * S + offset) of each new token
    positions: torch.Tensor             # [N] position of each new token
    block_table: torch.Tensor = None    # [B, NB] int32, decode only
    lengths: torch.Tensor = None        # [B] int32 tokens incl. the new one, decode only
    pages: torch.Tensor = None          # [B] int64 page of each new token, decode only
    select: object = None               # a selector from gate.py, or None for dense


class Qwen3(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, x):
        x = self.norm(x)
        return x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)

    def hidden(self, input_ids, positions, step=None):
        x, residual = self.embed_tokens(input_ids), None              # [B, T, hidden]
        cos, sin = cos_sin(positions.expand(input_ids.shape).reshape(-1), self.config.head_dim,
                           self.config.rope_theta, x.dtype)           # [B*T, D] each
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, step)
        return x + residual

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self.logits(self.hidden(input_ids, positions))

    @torch.inference_mode()
    def prefill(self, ids, seq_id, cache, select=None):
        """Dense causal forward of one prompt (list of ids), K/V written to its pages -> logits [V]."""
        if len(ids) == 0:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        cache.allocate(seq_id, len(ids))
        device = cache.k.device
        positions = torch.arange(len(ids), device=device)
        step = Step(cache, cache.slots(seq_id, positions), positions, select=select)
        x = self.hidden(torch.tensor([ids], device=device), positions[None], step)
        return self.logits(x[0, -1])

    @torch.inference_mode()
    def decode(self, tokens, block_table, lengths, cache, select=None):
        """One new token for each live sequence -> logits [B, V].

        tokens [B] ids; block_table [B, NB] int32 pages (allocated ahead); lengths [B] int32
        tokens already cached. Pure tensor work, no host sync: CUDA-graph capturable."""
        S = cache.page_size
        positions = lengths.long()                                    # [B] the new token's position
        pages = block_table.gather(1, (positions // S)[:, None])[:, 0].long()
        step = Step(cache, pages * S + positions % S, positions, block_table, lengths + 1, pages, select)
        x = self.hidden(tokens[:, None], positions[:, None], step)
        return self.logits(x[:, 0])

    @classmethod
    def random(cls, cfg, device, dtype, seed=0):
        """A Qwen3 of cfg with random weights (normal(0, 0.02), norms 1), made on device with no CPU
        copy: for speed runs (bench.py e2e, train_gate.py --random-init)."""
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model = model.to_empty(device=device)
        gen = torch.Generator(device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=gen)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        """Load a Hugging Face Qwen3 folder (config.json + one or sharded safetensors)."""
        from safetensors import SafetensorError, safe_open
        raw = read_config(path, "a Hugging Face model folder")
        cfg_path = os.path.join(path, "config.json")
        if "seerattn_gate_block_size" in raw:
            raise ValueError(f"{path} is a gate folder: give it as --gate, and the model it was trained for as --model")
        if raw.get("model_type") != "qwen3" and "Qwen3ForCausalLM" not in raw.get("architectures", []):
            raise ValueError(f"{cfg_path}: model_type {raw.get('model_type')!r} is not qwen3")
        try:
            cfg = Qwen3Config.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map of tensor names to files")
            files = sorted(set(map(str, weight_map.values())))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in hf_names(model.state_dict(), cfg).items()}
        state = {}
        for fname in files:
            try:
                with safe_open(os.path.join(path, fname), framework="pt", device=str(device)) as f:
                    for name in f.keys():
                        state[name.removeprefix("model.")] = f.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"{os.path.join(path, fname)}: cannot read it ({e})")
        if cfg.tie_word_embeddings and "lm_head.weight" in state:   # some tied checkpoints store a copy
            copy = state.pop("lm_head.weight")
            if "embed_tokens.weight" in state and not torch.equal(copy, state["embed_tokens.weight"]):
                raise ValueError(f"{path}: config.json ties lm_head to the embedding, but the checkpoint stores a "
                                 "different lm_head.weight: set tie_word_embeddings to false to use it, or delete it")
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config: missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{' ...' if len(unexpected) > 4 else ''}")
        for key, t in state.items():
            if t.shape != expected[key]:
                raise ValueError(f"{path}: weight {key} has shape {tuple(t.shape)}, "
                                 f"config says {tuple(expected[key])}")
        dtype = dtype or next(iter(state.values())).dtype
        model.load_state_dict(merge_projections({k: t.to(dtype) for k, t in state.items()}), assign=True)
        return model.eval()

    def save_pretrained(self, path, dtype=None, extra_config=None):
        """Write config.json (with extra_config's fields) + model.safetensors (Hugging Face layout,
        weights in dtype if given), atomically."""
        dtype = dtype or next(self.parameters()).dtype
        state = {"model." + k if not k.startswith("lm_head") else k: t.detach().to(dtype).contiguous().cpu()
                 for k, t in hf_names(self.state_dict(), self.config).items()}
        write_folder(path, state, {**self.config.to_hf_dict(dtype), **(extra_config or {})})


# ---- what the scripts share: --help, --device, model folders, the tokenizer, Ctrl-C ----

class CLIHelp(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, and each flag's default where it has
    one its help text does not already state."""

    def _get_help_string(self, action):
        unset = action.default in (None, [], argparse.SUPPRESS) or action.default is False   # (not 0)
        shown = not unset and "default" not in action.help
        return action.help + (" (default: %(default)s)" if shown else "")


def check_device(parser, device):
    """A script's --device: cpu, or cuda / cuda:N naming a GPU of this machine, else argparse's error.
    A GPU becomes the current device, so that streams, events, graphs and memory queries use it."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index is not None) or \
            (dev.type == "cuda" and (dev.index or 0) >= gpus):
        parser.error(f"--device {device}: give cpu, or cuda (cuda:N) naming one of this machine's {gpus} GPUs")
    if dev.type == "cuda" and dev.index is not None:   # (plain cuda: the current device already)
        torch.cuda.set_device(dev)


def read_json(path):
    """A JSON file holding an object -> dict; a one-line error naming the file if it is not."""
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except ValueError as e:                        # not JSON, or not UTF-8
            raise ValueError(f"{path}: not valid JSON ({e})")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def read_lines(path):
    """A UTF-8 text file's lines, as open() gives them; a one-line error naming the line that is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):            # ("\n" is never inside a UTF-8 character)
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path} line {n}: not UTF-8 text") from None
        raise


def read_config(folder, kind):
    """folder/config.json as a dict; a one-line error if folder is not `kind` or the file not a JSON object."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        why = "a file, not a folder" if os.path.isfile(folder) else "no config.json there"
        raise FileNotFoundError(f"{folder}: {why} (expected {kind})")
    return read_json(path)


def note_signals(stop):
    """Training's Ctrl-C: SIGINT and SIGTERM appended to the list stop instead of raised, so the loop
    can end its step, save and exit; a second one of a kind gets that kind's own handler back (a
    second Ctrl-C aborts at once). -> the handlers replaced, to restore with signal.signal."""
    def note(signum, _):
        if not stop:
            print(f"\n[signal {signum}: stopping after this step to save; send it again to stop at once]",
                  file=sys.stderr, flush=True)
        stop.append(signum)
        signal.signal(signum, replaced[signum])
    replaced = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    return replaced


def load_tokenizer(folder, vocab_size=None):
    """folder/tokenizer.json; a one-line error if it is missing or unreadable, or (given the model's
    vocab_size) if it makes ids the model has no embedding for."""
    from tokenizers import Tokenizer
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no tokenizer.json, needed to encode text")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:                       # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path}: cannot read it ({e})")
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise ValueError(f"{path}: {tok.get_vocab_size()} tokens, more than the model's vocab_size {vocab_size}")
    return tok


def check_writable(folder):
    """Make folder if need be and create a file in it: a script's --out found unwritable before
    any work, in one line, not at its first save. The folders it made are removed again (the
    first save makes them), so a run that fails later leaves no empty --out behind."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--out {folder} is a file, not a folder")
    made, f = [], os.path.abspath(folder)
    while not os.path.exists(f):                      # the folders makedirs will make, deepest first
        made, f = made + [f], os.path.dirname(f)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"--out {folder} cannot be written ({e.strerror})")
    finally:
        for f in made:
            if os.path.isdir(f):
                os.rmdir(f)


def unreadable(path):
    """Why path cannot be read as a file ("does not exist", "is a directory"), or None. Pipes and
    devices pass: /dev/null reads as an empty file, <(...) as its contents."""
    return "does not exist" if not os.path.exists(path) else "is a directory" if os.path.isdir(path) else None


def folder_contents(folder):
    """A few of the names in folder ("a, b, c ..."), or None if it is new or empty: an --out must be."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else None


def replace_file(tmp, path):
    """Rename the written file tmp to path, its data flushed to the disk first and the folder's
    entry after: a crash or a power loss then leaves the old file or the new one, whole."""
    def sync(p):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    sync(tmp)
    os.replace(tmp, path)
    sync(os.path.dirname(path) or ".")


def write_folder(path, state, config):
    """config.json and model.safetensors into folder path, each through a temp file and
    replace_file, so a failed write leaves the old file whole (and no temp file behind). The
    weights get config.json's permissions (safetensors' save_file makes its file owner-only)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg_tmp, tmp = os.path.join(path, "config.json.tmp"), os.path.join(path, "model.safetensors.tmp")
    try:
        with open(cfg_tmp, "w") as f:
            json.dump(config, f, indent=2)
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, os.stat(cfg_tmp).st_mode)
        replace_file(tmp, os.path.join(path, "model.safetensors"))
        replace_file(cfg_tmp, os.path.join(path, "config.json"))
    except BaseException:
        for t in (tmp, cfg_tmp):
            if os.path.exists(t):
                os.remove(t)
        raise


# Hugging Face keeps q/k/v_proj and gate/up_proj apart; each set is one stacked weight here, so
# a decode step reads it in one GEMM (nano-vllm does the same). Checkpoints map through these.
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_names(state, cfg):
    """Our state dict -> Hugging Face's names (without "model."): stacked weights split (as views)."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    rows = {"qkv_proj": [cfg.num_attention_heads * cfg.head_dim, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}
    out = {}
    for key, t in state.items():
        prefix, name, leaf = key.rsplit(".", 2) if key.count(".") >= 2 else ("", "", key)
        if name in MERGED:
            out.update({f"{prefix}.{part}.{leaf}": w for part, w in zip(MERGED[name], t.split(rows[name]))})
        else:
            out[key] = t
    return out


def merge_projections(state):
    """Hugging Face's names (without "model.") -> ours: each layer's MERGED parts stacked."""
    out = dict(state)
    for name, parts in MERGED.items():
        for key in [k for k in state if k.endswith(f".{parts[0]}.weight")]:
            prefix = key[: -len(f"{parts[0]}.weight")]
            out[f"{prefix}{name}.weight"] = torch.cat([out.pop(f"{prefix}{part}.weight") for part in parts])
    return out


# ---- the paged KV cache ----

class CacheFull(RuntimeError):
    pass


class PagedKVCache:
    """One pool of pages per layer for K (post-RoPE) and V, a free list, and per sequence
    a page table. Pooled keys for the gate and Quest live beside the pages (gate.py fills
    `cache.pooled`, indexed like the pages). One extra page, `scratch`, is never handed
    out: padded rows of a CUDA-graph batch write there."""

    def __init__(self, cfg, num_pages, page_size=64, device="cpu", dtype=torch.float32):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages} and {page_size}")
        L, Hk, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.page_size, self.num_pages, self.scratch = page_size, num_pages, num_pages
        self.k = torch.empty(L, num_pages + 1, page_size, Hk, D, device=device, dtype=dtype)
        self.v = torch.empty(L, num_pages + 1, page_size, Hk, D, device=device, dtype=dtype)
        self.free = deque(range(num_pages))
        self.pages = {}      # seq_id -> [physical page of logical block 0, 1, ...]
        self.pooled = None

    def allocate(self, seq_id, n_tokens):
        """Make seq_id own enough pages for n_tokens."""
        pages = self.pages.setdefault(seq_id, [])
        need = -(-n_tokens // self.page_size) - len(pages)
        if need > len(self.free):
            raise CacheFull(f"KV cache out of pages: sequence {seq_id} needs {need} more page(s) of "
                            f"{self.page_size} tokens, {len(self.free)} of {self.num_pages} are free; "
                            f"raise --num-pages{' / --kv-memory-fraction' if self.k.is_cuda else ''} or shorten "
                            "--max-new-tokens")
        pages.extend(self.free.popleft() for _ in range(max(need, 0)))

    def release(self, seq_id):
        self.free.extend(self.pages.pop(seq_id))

    def slots(self, seq_id, positions):
        """Flat slots (page * S + offset) of seq_id's positions: where their K and V go."""
        pages = torch.tensor(self.pages[seq_id], device=positions.device)
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    def block_table(self, seq_ids):
        """[B, NB] int32 page table, NB the most pages of any of these sequences; past a sequence's
        pages: the scratch page."""
        width = max(len(self.pages[s]) for s in seq_ids)
        table = [self.pages[s] + [self.scratch] * (width - len(self.pages[s])) for s in seq_ids]
        return torch.tensor(table, dtype=torch.int32, device=self.k.device)
