"""Train the AttnGates of a frozen Qwen3 by self-distillation (SPEC §5).

  python train_gate.py --model DIR --data traces.jsonl --out gates/       # one GPU or CPU
  torchrun --nproc_per_node 8 train_gate.py --model DIR --data ... --out gates/
  python train_gate.py --random-init qwen3-4b --seq-len 32768 --steps 5 --out /tmp/g   # speed, no weights

The base model runs without autograd; each attention layer hands its q, k (pre- and post-RoPE)
to a callback (Attention.capture) that trains that layer's gate on the spot and lets go, so
memory holds one layer's work at a time. Per chunk of queries a fused pass (Triton on GPU,
chunked PyTorch on CPU) walks the keys once and returns, per head and block of S tokens, the max
attention score, the block's log-sum-exp and the row's log-sum-exp; the target
T[t, h, j] = max over the block's tokens and the G heads of the group of the attention
probability, over complete blocks before t's own block, renormalised — [L, L] scores never
exist. Loss: KL(T || softmax(gate)) over the last (1 - --loss-from) of each sequence, heads and
layers, times --loss-scale. Only gate parameters train (float32, AdamW); data-parallel ranks
all-reduce their gradients. A checkpoint's files (the gate folder's, train_state.pt) are each
written atomically, the state last; --resume continues where a run stopped (within ~1e-7, not
bit for bit: torch.compile's first-shape and dynamic kernels round differently on CUDA, and MKL's
matmuls by their buffers' memory alignment on the CPU), Ctrl-C / SIGTERM save first (a second
Ctrl-C stops at once, unsaved). Not here: FSDP (the gates are small, every rank holds them all)
and sequence parallelism.
Shapes: T tokens, Hq/Hk query/KV heads, G = Hq // Hk, D head_dim, S block, NB = T // S complete
blocks, C queries in a chunk.
"""
import argparse
import json
import math
import os
import signal
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import gate as GT
import model as M

try:                                     # GPU machines; CPUs use the PyTorch path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# ---- data: jsonl / txt -> token ids -> sequences of --seq-len ----

def render(rec):
    """One JSON record -> text (the Qwen3 chat template for chats), or None if it has no usable field."""
    turn = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"
    if not isinstance(rec, dict):
        return None
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in msgs):
        return "".join(turn(m["role"], m["content"]) for m in msgs)
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return turn("user", rec["prompt"]) + turn("assistant", rec["response"])
    return rec["text"] if isinstance(rec.get("text"), str) else None


def read_texts(paths):
    """-> (texts, malformed line count). Raises on a missing file or an unknown extension."""
    texts, bad = [], 0
    for path in paths:
        if why := M.unreadable(path):
            raise FileNotFoundError(f"data file {path} {why}")
        if not path.endswith((".jsonl", ".txt")):
            raise ValueError(f"data file {path}: expected .jsonl or .txt")
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith(".txt"):
                texts.append(f.read())
                continue
            for line in f:
                if line.strip():
                    try:
                        text = render(json.loads(line))
                    except json.JSONDecodeError:
                        text = None
                    if text is None:
                        bad += 1
                    else:
                        texts.append(text)
    return [t for t in texts if t], bad


def load_sequences(paths, folder, seq_len, S, pack, vocab_size=None):
    """Tokenize with folder/tokenizer.json (checked against the model's vocab_size); pack (documents
    joined by <|endoftext|>) or truncate to seq_len -> (flat int32 tokens, [(start, end)] spans).
    Sequences shorter than two blocks are dropped."""
    tok = M.load_tokenizer(folder, vocab_size)
    texts, bad = read_texts(paths)
    if not texts:
        raise ValueError(f"no usable text in {', '.join(paths)} ({bad} malformed line(s) skipped)")
    sep = tok.token_to_id("<|endoftext|>")
    docs = []
    for i in tqdm(range(0, len(texts), 1024), desc="tokenizing", leave=False):
        docs += [np.asarray(e.ids + ([sep] if pack and sep is not None else []), dtype=np.int32)
                 for e in tok.encode_batch(texts[i:i + 1024])]
    flat = np.concatenate(docs)
    if pack:
        spans = [(a, min(a + seq_len, len(flat))) for a in range(0, len(flat), seq_len)]
    else:
        ends = np.cumsum([len(d) for d in docs])
        spans = [(e - len(d), e - len(d) + min(len(d), seq_len)) for d, e in zip(docs, ends.tolist())]
    keep = [(a, b) for a, b in spans if b - a >= 2 * S]
    unk = getattr(tok.model, "unk_token", None)        # word-level vocabularies (the tiny model's) have one
    n_unk = int((flat == tok.token_to_id(unk)).sum()) if unk else 0
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"data: {len(texts)} documents, {len(flat)} tokens -> {len(keep)} sequences; skipped {bad} malformed "
              f"line(s), {len(spans) - len(keep)} sequence(s) shorter than two blocks ({2 * S} tokens)"
              + (f"; {n_unk / len(flat):.0%} of the tokens are {unk} (words not in the vocabulary)" if n_unk else ""))
    if not keep:
        raise ValueError(f"no sequence of at least two blocks ({2 * S} tokens) in {', '.join(paths)}")
    return torch.from_numpy(flat), keep


class Order:
    """The i-th training sequence: a fresh permutation per epoch from the seed (resumable from i alone)."""
    def __init__(self, tokens, spans, seed):
        self.tokens, self.spans, self.seed, self.epoch, self.perm = tokens, spans, seed, None, None

    def __getitem__(self, i):
        epoch, r = divmod(i, len(self.spans))
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(len(self.spans), generator=torch.Generator().manual_seed(self.seed + epoch))
        a, b = self.spans[self.perm[r]]
        return self.tokens[a:b].long()


# ---- the fused target pass: per block, max score and log-sum-exp; per row, log-sum-exp ----

def block_stats_torch(qr, kr, t0, t1, S, with_blse=False, max_elems=2 ** 26):
    """qr [T, Hq, D], kr [T, Hk, D] post-RoPE; queries t0..t1-1 attend causally to keys 0..t ->
    bmax, blse [C, Hk, G, ceil(T/S)] (per block: max score, log-sum-exp of scores; -inf past t)
    and lse [C, Hk, G] (the row's log-sum-exp). Query sub-chunks keep C x keys x Hq bounded."""
    T, Hq, D = qr.shape
    Hk, nball, nk = kr.shape[1], -(-T // S), -(-t1 // S)
    step = max(1, max_elems // (Hq * nk * S))
    outs = []
    k = F.pad(kr[:t1].float(), (0, 0, 0, 0, 0, nk * S - t1))          # [nk*S, Hk, D]
    for a in range(t0, t1, step):
        b = min(t1, a + step)
        q = qr[a:b].float().view(b - a, Hk, Hq // Hk, D)                # [c, Hk, G, D]
        s = torch.einsum("chgd,thd->chgt", q, k) / math.sqrt(D)        # [c, Hk, G, nk*S]
        causal = torch.arange(nk * S, device=q.device)[None, :] <= torch.arange(a, b, device=q.device)[:, None]
        s = s.masked_fill(~causal[:, None, None, :], float("-inf"))
        lse = s.logsumexp(-1)
        s = s.view(*s.shape[:3], nk, S)                                 # [c, Hk, G, nk, S]
        pad = lambda x: F.pad(x, (0, nball - nk), value=float("-inf"))
        outs.append((pad(s.amax(-1)), pad(s.logsumexp(-1)) if with_blse else None, lse))
    return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]) if with_blse else None,
            torch.cat([o[2] for o in outs]))


if triton is not None:
    @triton.jit
    def _block_stats_kernel(Q, K, BMAX, BLSE, LSE, t0, n_rows, scale, sq_t, sq_h, sk_t, sk_h, so_h, so_j,
                            G: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BLOCK_M: tl.constexpr,
                            WITH_BLSE: tl.constexpr):
        """One program: BLOCK_M query rows of one head, one pass over their causal keys, S at a time."""
        h, pid = tl.program_id(0), tl.program_id(1)
        r = pid * BLOCK_M + tl.arange(0, BLOCK_M)                    # row in the chunk
        t = t0 + r                                                    # its position
        d = tl.arange(0, D)
        q = tl.load(Q + t[:, None] * sq_t + h * sq_h + d[None, :], mask=(r < n_rows)[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        hi = t0 + tl.minimum(pid * BLOCK_M + BLOCK_M, n_rows)         # keys < hi are causal for some row
        for j in range(0, tl.cdiv(hi, S)):
            c = j * S + tl.arange(0, S)
            k = tl.load(K + c[:, None] * sk_t + (h // G) * sk_h + d[None, :], mask=(c < hi)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale                        # [BLOCK_M, S]
            s = tl.where(c[None, :] <= t[:, None], s, float("-inf"))
            bmax = tl.max(s, 1)
            m_new = tl.maximum(m, bmax)                               # finite: block 0 holds key 0 <= t
            p_sum = tl.sum(tl.exp(s - m_new[:, None]), 1)
            l = l * tl.exp(m - m_new) + p_sum
            m = m_new
            tl.store(BMAX + h * so_h + j * so_j + r, bmax, mask=r < n_rows)
            if WITH_BLSE:
                tl.store(BLSE + h * so_h + j * so_j + r, m_new + tl.log(p_sum), mask=r < n_rows)
        tl.store(LSE + h * n_rows + r, m + tl.log(l), mask=r < n_rows)


def block_stats_triton(qr, kr, t0, t1, S, with_blse=False):
    """Same contract as block_stats_torch, one Triton pass over the keys (S >= 16; S and D powers of two).
    The launch, 256 rows a program, 4 warps, 2 stages: the fastest of 17 tried (64-512 rows, 4-16 warps,
    1-4 stages) at Qwen3-4B / 8B heads, S 64, rows 16K-32K of 32K: 10.5 ms a layer against 11.1 at
    256 / 8 / 2 and 12.5 at 64 / 4 / 3, the same outputs bit for bit (H200, 2026-12-03). train_gate 4B
    at 32K: 18.9K tokens/s; 18.5K-18.9K at 256 / 8 / 2, 17.9K-18.1K at 64 / 4 / 3 (README, gate training)."""
    block_m = 256
    T, Hq, D = qr.shape
    Hk, C, nball = kr.shape[1], t1 - t0, -(-T // S)
    assert qr.stride(2) == 1 and kr.stride(2) == 1
    bmax = torch.full((Hq, nball, C), float("-inf"), device=qr.device)   # [Hq, NBall, C]: rows contiguous
    blse = torch.full_like(bmax, float("-inf")) if with_blse else bmax
    lse = torch.empty(Hq, C, device=qr.device)
    grid = (Hq, triton.cdiv(C, block_m))             # heads of one group side by side: they share K in L2
    _block_stats_kernel[grid](qr, kr, bmax, blse, lse, t0, C, 1 / math.sqrt(D), qr.stride(0), qr.stride(1),
                              kr.stride(0), kr.stride(1), nball * C, C, G=Hq // Hk, D=D, S=S, BLOCK_M=block_m,
                              WITH_BLSE=with_blse, num_warps=4, num_stages=2)
    view = lambda x: x.permute(2, 0, 1).view(C, Hk, Hq // Hk, nball)    # [C, Hk, G, NBall]
    return view(bmax), view(blse) if with_blse else None, lse.T.view(C, Hk, Hq // Hk)


def block_stats(qr, kr, t0, t1, S, with_blse=False):
    """The Triton pass where it can run, else the PyTorch one (CPU, tiny blocks)."""
    D = qr.shape[-1]
    fast = triton is not None and qr.is_cuda and S >= 16 and S & (S - 1) == 0 and D & (D - 1) == 0
    return (block_stats_triton if fast else block_stats_torch)(qr, kr, t0, t1, S, with_blse)


def visible(rows, nb, S):
    """[C, NB]: complete blocks before each row's own block (what the gate chooses among)."""
    return torch.arange(nb, device=rows.device)[None, :] < (rows // S)[:, None]


def target(bmax, lse, rows, nb, S):
    """Block max attention probability, max over the group, renormalised over visible blocks -> [C, Hk, NB]."""
    p = (bmax[..., :nb] - lse[..., None]).exp().amax(2)              # [C, Hk, NB]
    p = p * visible(rows, nb, S)[:, None, :]
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


# ---- one layer's gate: keys once, queries and loss per chunk ----

def gate_logits(gate, q, rows, gk):
    """q [C, Hq, D] pre-RoPE at positions rows -> scores [C, Hk, NB], -inf outside the visible blocks."""
    s = torch.einsum("che,jhe->chj", gate.query(q, rows), gk).float() / math.sqrt(gate.dg)
    return s.masked_fill(~visible(rows, gk.shape[0], gate.block_size)[:, None, :], float("-inf"))


def counted_rows(T, S, loss_from):
    return max(S, int(T * loss_from)), T     # rows before S have no complete block before them


def train_layer(gate, q, k, qr, kr, loss_from, chunk, weight):
    """Backward KL(target || gate) * weight for one sequence's layer, chunk by chunk -> summed KL.
    The gate keys are shared by all chunks: their graph is kept once and fed the gathered gradient."""
    S, T = gate.block_size, q.shape[0]
    nb = T // S
    a, b = counted_rows(T, S, loss_from)
    total = torch.zeros((), device=q.device)
    with torch.enable_grad():
        gk = gate.block_keys(k)
        gk_leaf = gk.detach().requires_grad_()
        for t0 in range(a, b, chunk):
            t1 = min(b, t0 + chunk)
            rows = torch.arange(t0, t1, device=q.device)
            bmax, _, lse = block_stats(qr, kr, t0, t1, S)
            tgt = target(bmax, lse, rows, nb, S)                              # [C, Hk, NB]
            logp = gate_logits(gate, q[t0:t1], rows, gk_leaf).log_softmax(-1)
            logp = logp.masked_fill(~visible(rows, nb, S)[:, None, :], 0.0)
            kl = (torch.xlogy(tgt, tgt) - tgt * logp).sum()
            (kl * weight).backward()
            total += kl.detach()
        gk.backward(gk_leaf.grad)
    return total


FAR_MASS, FAR_BLOCKS = 0.5, 3   # a far needle: one block >= 3 blocks back holding >= half a head's attention


@torch.no_grad()
def recall_layer(gate, q, k, qr, kr, loss_from, chunk, budgets, sums):
    """Attention recall of gate, Quest and oracle selections at each budget (top budget/S visible
    blocks + the query's own block): share of the group's exact attention mass they cover.
    And far needles: (row, KV head) cases whose most-attended visible block (a head of the group
    giving it >= FAR_MASS of its attention) lies >= FAR_BLOCKS blocks before the row's own; how
    many of them each selection holds. Averaged recall hides these misses, since most rows
    attend locally, yet one missed lookup can derail a decode."""
    S, T, Hk = gate.block_size, q.shape[0], k.shape[1]
    nb = T // S
    G = q.shape[1] // Hk
    gk = gate.block_keys(k)
    kb = kr[: nb * S].float().view(nb, S, Hk, -1)                               # [NB, S, Hk, D]
    kmax, kmin = kb.amax(1), kb.amin(1)
    a, b = counted_rows(T, S, loss_from)
    for t0 in range(a, b, chunk):
        t1 = min(b, t0 + chunk)
        rows = torch.arange(t0, t1, device=q.device)
        bmax, blse, lse = block_stats(qr, kr, t0, t1, S, with_blse=True)
        p_block = (blse - lse[..., None]).exp()                                 # [C, Hk, G, NBall] per head
        mass = p_block.sum(2)                                                   # [C, Hk, NBall] group's mass
        own = mass.gather(-1, (rows // S)[:, None, None].expand(-1, Hk, 1))[..., 0]   # [C, Hk]
        vis = visible(rows, nb, S)                                              # [C, NB]
        peak, needle = p_block[..., :nb].amax(2).masked_fill(~vis[:, None, :], 0.0).max(-1)   # [C, Hk]
        far = (peak >= FAR_MASS) & (needle <= (rows // S)[:, None] - FAR_BLOCKS)
        qg = qr[t0:t1].float().view(t1 - t0, Hk, G, -1)                         # [C, Hk, G, D]
        quest = (torch.einsum("chgd,jhd->chgj", qg.clamp(min=0), kmax)          # SPEC §4 bound, max over G
                 + torch.einsum("chgd,jhd->chgj", qg.clamp(max=0), kmin)).amax(2)
        scores = {"gate": gate_logits(gate, q[t0:t1], rows, gk), "quest": quest,
                  "oracle": (bmax[..., :nb] - lse[..., None]).exp().amax(2)}
        for name, s in scores.items():
            s = s.masked_fill(~vis[:, None, :], float("-inf"))
            for budget in budgets:
                top = s.topk(min(budget // S, nb), dim=-1)
                got = (mass[..., :nb].gather(-1, top.indices) * (top.values > float("-inf"))).sum(-1) + own
                sums[name, budget] = sums.get((name, budget), 0.0) + (got / G).sum().double()
                found = far & (top.indices == needle[..., None]).any(-1)
                sums[name, budget, "far"] = sums.get((name, budget, "far"), 0.0) + found.sum().double()
        sums["n"] = sums.get("n", 0.0) + (t1 - t0) * Hk
        sums["far"] = sums.get("far", 0.0) + far.sum().double()


# ---- checkpoints ----

def setup_of(model, args, fingerprint):
    """What a resumed run must share with the one it continues."""
    c = model.config
    return {**{f"model {k}": getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "head_dim", "vocab_size")},
            "--gate-hidden": args.gate_hidden, "--block-size": args.block_size, "qk-norm": not args.no_qk_norm,
            "--seq-len": args.seq_len, "--batch": args.batch, "--seed": args.seed, "packing": not args.no_pack,
            **{f"--{k.replace('_', '-')}": getattr(args, k) for k in ("lr", "min_lr", "warmup", "weight_decay",
                                                                       "loss_scale", "loss_from")},
            "data (crc32, sequences)": fingerprint}


def save_checkpoint(model, opt, step, args, setup):
    """train_state.pt (gates, optimizer, step; the data order follows from step and --seed) + the
    gate folder; each file via temp + model.replace_file, the state renamed last, so a failed write
    leaves the previous state whole (a resume takes its gates from the state, not from the gate folder)."""
    path, tmp = os.path.join(args.out, "train_state.pt"), os.path.join(args.out, "train_state.pt.tmp")
    state = {"step": step, "setup": setup, "gates": {k: v.detach().cpu() for k, v in GT.gate_state(model).items()},
             "optimizer": opt.state_dict()}
    try:
        os.makedirs(args.out, exist_ok=True)
        torch.save(state, tmp)
        GT.save_gates(model, args.out, {"train_step": step})
        M.replace_file(tmp, path)
    except Exception as e:   # OSError, or torch.save's / safetensors' own error on a full disk
        if os.path.exists(tmp):                                          # (write_folder cleans up its own)
            os.remove(tmp)
        kept = "the previous checkpoint there is intact" if os.path.isfile(path) else "nothing was saved"
        raise SystemExit(f"error: could not save the step-{step} checkpoint to {args.out} ({e}); {kept}")


def check_out(args, rank):
    """--out must be a run's folder with --resume, else a new or empty one that can be written: found
    now, not at the first save. Only rank 0, which saves, tries a write: check_writable makes and
    removes the folder, which would race across ranks."""
    if args.resume:
        if not os.path.isfile(os.path.join(args.out, "train_state.pt")):
            raise FileNotFoundError(f"--resume: no train_state.pt in {args.out}")
        return
    if os.path.isfile(os.path.join(args.out, "train_state.pt")):
        raise ValueError(f"{args.out} already holds a run: pass --resume to continue it, or pick another --out")
    if names := M.folder_contents(args.out):
        raise ValueError(f"{args.out} already holds {names}: pick a new or empty --out")
    if rank == 0:
        M.check_writable(args.out)


def load_checkpoint(model, opt, args, setup):
    path = os.path.join(args.out, "train_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and {"setup", "gates", "optimizer", "step"} <= state.keys()):
            raise ValueError
    except Exception:                     # torch.load's many errors (zip, unpickling, EOF) or not our dict
        raise ValueError(f"--resume: {path} is not a readable checkpoint (truncated or corrupt?)") from None
    diff = [f"{k} {state['setup'].get(k)} there vs {v} now" for k, v in setup.items() if state["setup"].get(k) != v]
    if diff:
        raise ValueError(f"--resume: {args.out} was trained with a different setup: {'; '.join(diff)}")
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}.self_attn.attn_gate."
        layer.self_attn.attn_gate.load_state_dict({k[len(pre):]: v for k, v in state["gates"].items()
                                                   if k.startswith(pre)})
    opt.load_state_dict(state["optimizer"])
    return state["step"]


# ---- the run ----

def random_model(name, device, dtype):
    """A Qwen3 of a known shape (model.SHAPES) or a config.json, with random weights: for speed runs."""
    if name in M.SHAPES:
        cfg = dict(M.SHAPES[name])
    elif os.path.isfile(name):
        cfg = M.read_json(name)
    else:
        raise ValueError(f"--random-init {name}: not one of {', '.join(M.SHAPES)} nor a config.json file")
    try:
        config = M.Qwen3Config.from_dict(cfg)
    except ValueError as e:
        raise ValueError(f"--random-init {name}: {e}")
    return M.Qwen3.random(config, device, dtype)


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine down to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * done))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=M.CLIHelp)
    a = p.add_argument
    a("--model", help="Hugging Face Qwen3 folder (config.json, safetensors, tokenizer.json)")
    a("--random-init", help=f"instead of --model: random weights of a shape ({', '.join(M.SHAPES)}) or a config.json; "
                            "trains on random tokens (for speed and memory runs)")
    a("--data", nargs="+", default=[], help=".jsonl (text | prompt+response | messages) or .txt files")
    a("--eval-data", nargs="+", default=[], help="held-out files (default: the last --eval-seqs training sequences)")
    a("--eval-seqs", type=int, default=4, help="held-out sequences for the recall evaluation (0: none)")
    a("--out", required=True, help="gate folder to write (config.json, model.safetensors, train_state.pt): "
                                  "new or empty, or with --resume the run's own")
    a("--resume", action="store_true", help="continue the run saved in --out, with its model, data, gate and "
                                           "optimizer flags (a change is refused, naming it)")
    a("--steps", type=int, default=800, help="optimizer steps (the cosine schedule's length)")
    a("--stop-after", type=int, help="save and stop after this many steps of this run (e.g. a job time limit)")
    a("--batch", type=int, default=16, help="sequences per optimizer step, over all ranks")
    a("--micro-batch", type=int, default=1, help="sequences per forward (gradient accumulation up to --batch)")
    a("--seq-len", type=int, default=32768, help="tokens per sequence, a multiple of --block-size")
    a("--no-pack", action="store_true", help="one document per sequence, truncated, instead of packing")
    a("--block-size", type=int, default=64, help="gate block size S in tokens")
    a("--gate-hidden", type=int, default=128, help="gate hidden size Dg")
    a("--no-qk-norm", action="store_true", help="no RMSNorm on gate query and key")
    a("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    a("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    a("--warmup", type=int, default=20, help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--loss-scale", type=float, default=10.0, help="multiplies the KL loss (published recipe: 10)")
    a("--loss-from", type=float, default=0.5,
      help="share of each sequence before positions count in the loss, in [0, 1)")
    a("--q-chunk", type=int, default=2048, help="query rows per fused target pass (memory vs. speed)")
    a("--eval-every", type=int, default=100, help="evaluate recall every this many steps (0: only at the end)")
    a("--eval-budgets", help="token budgets for the recall table, comma-separated (default: --seq-len / 32, / 16 "
                             "and / 8 in whole blocks, e.g. 1024,2048,4096 at 32768: a budget that covers the "
                             "sequence recalls everything)")
    a("--log-every", type=int, default=10, help="print a log line every this many steps (0: only the last step)")
    a("--save-every", type=int, default=100,
      help="checkpoint every this many steps, and at the end (0: only at the end)")
    a("--seed", type=int, default=0, help="gate init and data order")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N (under torchrun: cuda, each rank on its LOCAL_RANK's GPU)")
    a("--dtype", choices=["float32", "bfloat16", "float16"],
      help="base model dtype (default: bfloat16 on cuda, float32 on cpu)")
    args = p.parse_args(argv)
    for flag, least in (("steps", 1), ("batch", 1), ("block_size", 1), ("micro_batch", 1), ("gate_hidden", 2),
                        ("q_chunk", 1), ("stop_after", 1), ("eval_seqs", 0), ("warmup", 0), ("eval_every", 0),
                        ("log_every", 0), ("save_every", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    for flag in ("lr", "loss_scale"):
        if not 0 < getattr(args, flag) < float("inf"):
            p.error(f"--{flag.replace('_', '-')} must be a finite number > 0, got {getattr(args, flag)}")
    if not 0 <= args.min_lr <= args.lr or not 0 <= args.weight_decay < float("inf"):
        p.error(f"need 0 <= --min-lr <= --lr and a finite --weight-decay >= 0, got {args.min_lr}, {args.lr} and "
                f"{args.weight_decay}")
    if args.gate_hidden % 2:
        p.error(f"--gate-hidden must be even (RoPE turns pairs), got {args.gate_hidden}")
    M.check_device(p, args.device)
    try:
        budgets = [int(b) for b in (args.eval_budgets or "").split(",") if b]
    except ValueError:
        p.error(f"--eval-budgets {args.eval_budgets}: integers, comma-separated")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if (args.model is None) == (args.random_init is None):
        p.error("give exactly one of --model and --random-init")
    if args.model and not args.data:
        p.error("--model needs --data")
    if args.random_init and (args.data or args.eval_data):
        p.error("--random-init trains and evaluates on random tokens; drop --data / --eval-data")
    if args.eval_data and not args.eval_seqs:
        p.error("--eval-data with --eval-seqs 0 would evaluate nothing")
    if args.seq_len % args.block_size or args.seq_len < 2 * args.block_size:
        p.error(f"--seq-len {args.seq_len} must be a multiple of --block-size {args.block_size}, at least two blocks")
    if world > 1 and args.device.startswith("cuda:"):
        p.error(f"--device {args.device}: under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda")
    if args.batch % (args.micro_batch * world):
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch} x {world} rank(s)")
    if not 0 <= args.loss_from < 1:
        p.error(f"--loss-from must be in [0, 1), got {args.loss_from}")
    S = args.block_size
    budgets = budgets or sorted({max(S, args.seq_len // f // S * S) for f in (32, 16, 8)})
    if any(b < S or b % S for b in budgets):
        p.error(f"--eval-budgets {args.eval_budgets}: each must be a positive multiple of {args.block_size}")
    args.budgets = budgets
    return args


def main(argv=None):
    args = parse(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    say = tqdm.write if rank == 0 else (lambda *_: None)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.warmup >= args.steps:
        say(f"[--warmup {args.warmup} >= --steps {args.steps}: the learning rate warms up to "
            f"{args.steps}/{args.warmup} of --lr and never decays]")
    try:
        check_out(args, rank)
        if args.random_init:
            net = random_model(args.random_init, args.device, dtype)
            g = torch.Generator().manual_seed(args.seed)
            n = 2 * args.batch + args.eval_seqs
            tokens = torch.randint(net.config.vocab_size, (n * args.seq_len,), generator=g, dtype=torch.int32)
            spans = [(i * args.seq_len, (i + 1) * args.seq_len) for i in range(n)]
        else:
            net = M.Qwen3.from_pretrained(args.model, device=args.device, dtype=dtype)
            net.name_or_path = args.model
            if args.seq_len > net.config.max_position_embeddings:
                raise ValueError(f"--seq-len {args.seq_len} is past {args.model}'s max_position_embeddings "
                                 f"{net.config.max_position_embeddings}")
            tokens, spans = load_sequences(args.data, args.model, args.seq_len, args.block_size, not args.no_pack,
                                           net.config.vocab_size)
        evals = []
        if args.eval_data:
            etok, espans = load_sequences(args.eval_data, args.model, args.seq_len, args.block_size, not args.no_pack,
                                          net.config.vocab_size)
            evals = [etok[a:b].long() for a, b in espans[:args.eval_seqs]]
        elif args.eval_seqs:
            if len(spans) <= args.eval_seqs:
                raise ValueError(f"{len(spans)} sequence(s) leave none for training after holding out "
                                 f"--eval-seqs {args.eval_seqs}; give more data, --eval-data or --eval-seqs 0")
            evals = [tokens[a:b].long() for a, b in spans[-args.eval_seqs:]]
            spans = spans[:-args.eval_seqs]
        net.requires_grad_(False)
        torch.manual_seed(args.seed)
        GT.attach_gates(net, args.gate_hidden, args.block_size, not args.no_qk_norm)
        gates = [layer.self_attn.attn_gate.float().requires_grad_(True) for layer in net.layers]
        params = [p for gate in gates for p in gate.parameters()]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        setup = setup_of(net, args, [zlib.crc32(memoryview(tokens.numpy())), len(spans)])
        step = 0
        if args.resume:
            step = load_checkpoint(net, opt, args, setup)
            if step >= args.steps:
                raise ValueError(f"--resume: {args.out} is at step {step} already, --steps {args.steps}: raise --steps "
                                 "to train on")
    except (OSError, ValueError) as e:   # OSError: a file missing or unreadable
        raise SystemExit(f"error: {e}")
    data = Order(tokens, spans, args.seed)
    L, Hk, S = len(net.layers), net.config.num_key_value_heads, args.block_size
    history = {"loss": [], "recall": {}}

    def run(seqs, work):
        """Frozen forward of equal-length sequences (else one by one); work(layer, q, k, qr, kr) per layer."""
        groups = [seqs] if len({len(s) for s in seqs}) == 1 else [[s] for s in seqs]
        for group in groups:
            ids = torch.stack(group).to(args.device)                              # [B, T]
            for layer in net.layers:
                layer.self_attn.capture = lambda i, q, k, qr, kr: [work(i, *x) for x in zip(q, k, qr, kr)]
            try:
                with torch.no_grad():
                    net.hidden(ids, torch.arange(ids.shape[1], device=args.device)[None])
            finally:
                for layer in net.layers:
                    layer.self_attn.capture = None

    def evaluate():
        sums = {}
        run(evals[rank::world], lambda i, *x: recall_layer(gates[i], *x, args.loss_from, args.q_chunk,
                                                           args.budgets, sums))
        names = ("gate", "quest", "oracle")
        keys = [(n, b, *f) for f in ((), ("far",)) for n in names for b in args.budgets] + ["n", "far"]
        tot = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=args.device) for k in keys])
        if world > 1:
            dist.all_reduce(tot)
        tot = dict(zip(keys, tot.tolist()))
        res = {k: v / max(tot["far" if len(k) == 3 else "n"], 1.0) for k, v in tot.items() if k not in ("n", "far")}
        res["far cases"] = tot["far"]
        say(f"attention recall at step {step} ({len(evals)} held-out sequences, queries from --loss-from on; "
            f"top budget/S blocks + own block), and the share of {tot['far']:.0f} far needles (a block >= "
            f"{FAR_BLOCKS} back with >= {FAR_MASS} of a head's attention) that the selection holds:\n"
            f"  budget    gate   quest  oracle   far: gate   quest  oracle\n" + "\n".join(
                f"  {b:6d}" + "".join(f"  {res[n, b]:.4f}" for n in names) + "      "
                + "".join(f"  {res[n, b, 'far']:.4f}" for n in names) for b in args.budgets))
        history["recall"][step] = res

    def work(i, q, k, qr, kr):
        """Train layer i's gate on one sequence; loss gathers the mean KL of the step."""
        a, b = counted_rows(q.shape[0], S, args.loss_from)
        w = 1.0 / ((b - a) * Hk * L * args.batch)                 # mean over rows, heads, layers, sequences
        kl = train_layer(gates[i], q, k, qr, kr, args.loss_from, args.q_chunk, w * args.loss_scale)
        loss.add_(kl * w)

    def stopping():
        """A signal reached any rank: all ranks stop at the same micro-batch."""
        flag = torch.tensor([float(len(stop))], device=args.device)
        if world > 1:
            dist.all_reduce(flag)
        return flag.item() > 0

    stop, loss = [], None
    handlers = M.note_signals(stop)
    first, last_eval = step, None
    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    try:
        if evals and step == 0 and args.eval_every:
            evaluate()                           # the untrained gate, next to Quest and the oracle
        while step < end:
            t_start, loss, ntok = time.perf_counter(), torch.zeros((), device=args.device), 0
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            mine = list(range(step * args.batch + rank, (step + 1) * args.batch, world))   # this rank's share
            interrupted = False
            for m in range(0, len(mine), args.micro_batch):
                if interrupted := stopping():
                    break
                seqs = [data[i] for i in mine[m:m + args.micro_batch]]
                ntok += sum(len(s) for s in seqs)
                run(seqs, work)
            if interrupted:
                opt.zero_grad(set_to_none=True)      # drop the partial step: state stays at `step`
                break
            if world > 1:
                for p in params:
                    dist.all_reduce(p.grad)
                dist.all_reduce(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t_start
            history["loss"].append(loss.item())
            tps = ntok * world / dt
            bar.update(1)
            bar.set_postfix(KL=f"{loss.item():.4f}", tok_s=f"{tps:.0f}")
            if (args.log_every and step % args.log_every == 0) or step == end:
                mem = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else 0
                say(f"step {step}/{args.steps} | KL {loss.item():.4f} | lr {lr_at(step - 1, args):.2e} | "
                    f"{tps:.0f} tokens/s | {dt:.2f} s/step" + (f" | peak mem {mem:.1f} GiB" if mem else ""))
            if args.eval_every and step % args.eval_every == 0 and evals:
                evaluate()
                last_eval = step
            if args.save_every and step % args.save_every == 0 and step < end:
                if rank == 0:
                    save_checkpoint(net, opt, step, args, setup)
                if world > 1:
                    dist.barrier()
        if evals and last_eval != step and not stop and step > first:
            evaluate()
        if rank == 0:
            save_checkpoint(net, opt, step, args, setup)
            say(f"saved step {step} to {args.out}" + (f" (of {args.steps}: continue with --resume)"
                                                        if step < args.steps and not stop else ""))
        if world > 1:
            dist.barrier()
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    if stop:
        raise SystemExit(f"stopped by signal {stop[0]} at step {step}; continue with --resume")
    return history


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # before training starts (then Ctrl-C saves and stops: see main)
        raise SystemExit("interrupted")
