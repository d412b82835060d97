"""Generate text with a Qwen3 checkpoint through the paged KV cache.

  python generate.py                                  # the shipped tiny model (tiny/) on a fresh problem, seer
  python generate.py --model DIR --prompt "..." [--prompt "..."] [--chat] [--temperature 0.7]
  python generate.py --model DIR --gate GATE_DIR --budget 2048 --prompt "..."     # seer attention
  python generate.py --eval problems.jsonl --task tiny  # accuracy over --eval-attn x --eval-budgets

Prompts are prefilled one by one (dense), then decoded together as a ragged batch: one
new token per live sequence per step; a sequence that hits EOS frees its pages while the
others go on.
"""
import argparse
import contextlib
import functools
import glob
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import gate as GT
import model as M


def eos_ids(path):
    """EOS token ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            eos = M.read_json(f).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {eos}
    return set()


def chat_prompt(text, think=True):
    """The Qwen3 chat template for one user turn; thinking off adds an empty think block."""
    s = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return s if think else s + "<think>\n\n</think>\n\n"


def sample(logits, temperature, top_p, generator):
    """logits [B, V] -> token ids [B]. temperature 0 is greedy. Drawn on the logits' device (the
    generator's too), with no host sync: a draw from weights p is argmax(p / e), e ~ Exp(1) i.i.d.,
    and for p = softmax(logits / T) that is argmax(logits - T log e), no softmax needed."""
    if temperature == 0:
        return logits.argmax(-1)
    e = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    e = e.exponential_(generator=generator).clamp_min_(1e-10)          # [B, V], kept > 0
    if top_p == 1:
        return torch.add(logits, e.log_(), alpha=-temperature).argmax(-1)
    logits, order = logits.sort(-1, descending=True)                  # [B, V]: the nucleus is a prefix
    p = (logits.float() / temperature).softmax(-1)
    # keep the shortest prefix with mass >= top_p: drop a token when the mass before it in its row is over
    # top_p. One float64 scan over all rows, each row's start subtracted (torch scans few long rows slowly)
    before = p.view(-1).cumsum(0, dtype=torch.float64).view(p.shape) - p        # [B, V]: mass before each token
    p.masked_fill_(before > before[:, :1] + top_p, 0.0)
    return order.gather(-1, (p / e).argmax(-1, keepdim=True))[:, 0]


def new_token_limits(prompts, max_new_tokens, max_len):
    """New tokens each prompt may get: max_new_tokens, capped so that its sequence stays within
    max_len positions (max_position_embeddings), at least one."""
    return [max(1, min(max_new_tokens, max_len - len(p))) for p in prompts]


def generate(model, cache, prompts, max_new_tokens, eos=(), temperature=0.0, top_p=1.0, seed=0,
             select=None, on_token=None, graphs=False):
    """prompts: lists of token ids -> lists of generated ids (EOS included when hit).

    Each sequence gets all its pages at admission (prompt + max_new_tokens, capped at
    max_position_embeddings), so the page table is static while it decodes: the step itself
    never waits on the host, and it replays as a CUDA graph when graphs=True. The step for a
    token is queued before the host reads that token, so the GPU decodes while the host checks
    for EOS and streams text; a sequence that has just ended wastes that one step."""
    limit = new_token_limits(prompts, max_new_tokens, model.config.max_position_embeddings)
    for i, p in enumerate(prompts):
        cache.allocate(i, len(p) + limit[i])                           # the last new token is fed too
    logits = torch.stack([model.prefill(ids, i, cache, select) for i, ids in enumerate(prompts)])
    live = list(range(len(prompts)))
    table = cache.block_table(live)                                    # [B, NB]
    generator = torch.Generator(table.device).manual_seed(seed)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=table.device)
    step = GraphRunner(model, cache, select, len(live), table.shape[1]) if graphs else \
        lambda tok, tab, lens: model.decode(tok, tab, lens, cache, select)
    out = [[] for _ in prompts]
    tokens = sample(logits, temperature, top_p, generator)            # [B] on the device
    while live:
        landed = torch.cuda.Event() if tokens.is_cuda else None
        host = tokens.to("cpu", non_blocking=True)                     # on cuda: a copy that lands before the step
        if landed is not None:
            landed.record()
        nb = -(-max(len(prompts[i]) + len(out[i]) + 1 for i in live) // cache.page_size)  # the blocks in use
        logits = step(tokens, table[:, :nb].contiguous(), lengths)
        lengths = lengths + 1
        if landed is not None:
            landed.synchronize()                                       # the copy, not the step
        keep = []
        for row, (i, t) in enumerate(zip(live, host.tolist())):
            out[i].append(t)
            if on_token:
                on_token(i, t)
            if t in eos or len(out[i]) >= limit[i]:
                cache.release(i)                                       # finished: its pages go back
            else:
                keep.append(row)
        if len(keep) < len(live):                                      # the batch shrinks
            rows = torch.tensor(keep, dtype=torch.long, device=table.device)
            live, table, lengths, logits = [live[r] for r in keep], table[rows], lengths[rows], logits[rows]
        if live:
            tokens = sample(logits, temperature, top_p, generator)
    return out


class GraphRunner:
    """model.decode captured in CUDA graphs, one per batch-size bucket (1, 2, 4, 8, ...), over
    static input buffers; a step copies its inputs in and replays (nano-vllm's scheme).
    Padded rows point at the cache's scratch page with length 0."""

    def __init__(self, model, cache, select, max_batch, max_blocks):
        dev = cache.k.device
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch] + [max_batch]
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.scratch = cache.scratch
        self.table = torch.full((max_batch, max_blocks), cache.scratch, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.graphs, self.logits, pool = {}, {}, None
        for bs in reversed(self.buckets):                              # largest first: it sizes the pool
            run = lambda: model.decode(self.tokens[:bs], self.table[:bs], self.lengths[:bs], cache, select)
            run()                                                      # warm up (kernel compile, allocator)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool):
                self.logits[bs] = run()
            pool = g.pool()
            self.graphs[bs] = g
        if select is not None:
            select.read.zero_(), select.total.zero_()                  # forget the warm-up steps

    def __call__(self, tokens, table, lengths):
        B, NB = table.shape
        bs = next(b for b in self.buckets if b >= B)
        self.tokens[:B], self.table[:B, :NB], self.lengths[:B] = tokens, table, lengths
        self.tokens[B:bs], self.table[B:bs], self.lengths[B:bs] = 0, self.scratch, 0
        self.graphs[bs].replay()
        return self.logits[bs][:B]


def use_kernel(kind, device, net, page_sizes):
    """Point model.decode_attention at the TileLang kernel or the PyTorch reference. "auto" takes
    the kernel on cuda when it serves the model's dtype, head_dim and group and every page size."""
    if kind == "tilelang" and not device.startswith("cuda"):
        raise ValueError("--kernel tilelang runs on cuda only; use --device cuda or --kernel torch")
    M.decode_attention = M.decode_attention_ref
    if kind == "torch" or not device.startswith("cuda"):
        return
    import kernel_decode                                           # (it imports without tilelang)
    c, dtype = net.config, next(net.parameters()).dtype
    why = None if kernel_decode.tilelang is not None else "tilelang is not installed"
    for S in page_sizes:
        why = why or kernel_decode.unsupported(dtype, c.head_dim, S, c.num_attention_heads // c.num_key_value_heads)
    if why is None:   # unchecked: our allocator and selectors make the ids, and a check would sync
        M.decode_attention = functools.partial(kernel_decode.decode_attention, check=False)
    elif kind == "tilelang":
        raise ValueError(f"--kernel tilelang: {why}")
    else:
        print(f"[no TileLang kernel for this run ({why}); decoding with the PyTorch attention]",
              file=sys.stderr)


def pages_in_memory(net, kv_bytes, page_size, dtype, attn):
    """Pages that fit in kv_bytes with the cache's scratch page: K and V of every layer, and the
    pooled keys gate.Selector keeps for attn (seer: max, min, a float32 sum and the gate key;
    quest: max and min)."""
    c, elem = net.config, torch.tensor([], dtype=dtype).element_size()
    D = c.head_dim
    pooled = 0                                                     # bytes per layer, KV head and page
    if attn == "seer":
        pooled = 2 * D * elem + 4 * D + net.layers[0].self_attn.attn_gate.dg * elem
    elif attn == "quest":
        pooled = 2 * D * elem
    return max(1, kv_bytes // (c.num_hidden_layers * c.num_key_value_heads * (2 * page_size * D * elem + pooled)) - 1)


def pages_needed(prompts, max_new_tokens, page_size, max_len):
    """Pages for the prompts and the new tokens generate lets them have."""
    limits = new_token_limits(prompts, max_new_tokens, max_len)
    return sum(-(-(len(p) + n) // page_size) for p, n in zip(prompts, limits))


TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")   # the shipped default


def gates_by_block_size(gate_dirs):
    """The --gate folders as {block size: folder} (a gate is trained for one block size)."""
    sizes = {}
    for d in gate_dirs:
        S = GT.gate_block_size(M.read_config(d, "a gate folder"), d)
        if S in sizes:
            raise ValueError(f"--gate {sizes[S]} and --gate {d} are both for block size {S}: give one")
        sizes[S] = d
    return sizes


def pick_gate(gates, block_size):
    """The folder of gates ({block size: folder}) trained for this block size."""
    if not gates:
        raise ValueError("seer needs gates: give --gate DIR")
    if block_size not in gates:
        raise ValueError(f"no gate for block size {block_size} (have {sorted(gates)}); "
                         f"set --block-size (--eval-blocks with --eval) or give a matching --gate")
    return gates[block_size]


def boxed(text):
    """Contents of the last \\boxed{...} in text (nested braces allowed), else None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed")
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k].strip()
    return None


def score(task, record, text):
    """-> (answer correct, steps correct, steps total); steps only for --task tiny."""
    if task == "tiny":
        import tiny
        return tiny.score(record["prompt"], text)
    want = boxed(record["answer"]) or record["answer"].strip()
    got = boxed(text)
    return (got is not None and got.replace(" ", "") == want.replace(" ", "")), 0, 0


def encode(tok, texts, max_len, name):
    """texts -> token id lists; a one-line error naming (name(i)) a prompt that is empty or longer than
    max_len (max_position_embeddings), and a note of words the tokenizer does not know."""
    ids = [tok.encode(t).ids for t in texts]
    for i, x in enumerate(ids):
        if not x or len(x) > max_len:
            raise ValueError(f"{name(i)} is empty after tokenization" if not x else
                             f"{name(i)} has {len(x)} tokens, past the model's max_position_embeddings {max_len}")
    unk = getattr(tok.model, "unk_token", None)       # word-level vocabularies (the tiny model's) have one
    if unk and (n := sum(x.count(tok.token_to_id(unk)) for x in ids)):
        print(f"[{n} prompt word(s) not in the tokenizer's vocabulary, read as {unk}]", file=sys.stderr)
    return ids


def run(net, ids, eos, args, attn, budget, block, graphs, on_token=None):
    """Decode a batch of prompts (token ids) with one selector -> (generated ids, sparsity, seconds in
    all, seconds to the first new tokens: prefill, and on cuda graph capture and any kernel compile).
    args: the flags, with main()'s gates and kv_bytes."""
    if attn == "seer":
        GT.load_gates(net, pick_gate(args.gates, block))
    dtype = next(net.parameters()).dtype
    num_pages = args.num_pages or pages_needed(ids, args.max_new_tokens, block, net.config.max_position_embeddings)
    if args.kv_bytes:
        torch.cuda.empty_cache()                     # an --eval row before this one freed its pool
        num_pages = pages_in_memory(net, args.kv_bytes, block, dtype, attn)
    try:
        cache = M.PagedKVCache(net.config, num_pages, block, args.device, dtype)
    except RuntimeError as e:                        # torch.OutOfMemoryError too
        lower = ("--kv-memory-fraction" if args.kv_bytes else "--num-pages" if args.num_pages else
                 "--max-new-tokens or the batch")                 # whichever sized the pool
        raise ValueError(f"a KV pool of {num_pages} pages of {block} tokens does not fit in memory: lower {lower} "
                         f"({str(e).splitlines()[0][:200]})")
    select = GT.Selector(attn, net, cache, budget, args.threshold)
    t0, first = time.perf_counter(), None

    def tick(i, t):                                  # notes when the first new tokens are read
        nonlocal first
        first = first or time.perf_counter() - t0
        if on_token:
            on_token(i, t)
    out = generate(net, cache, ids, args.max_new_tokens, eos, args.temperature, args.top_p, args.seed,
                   select, tick, graphs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, select.sparsity(), time.perf_counter() - t0, first


def progress(n_seqs, max_new_tokens, eos, desc):
    """A bar over n_seqs x max_new_tokens new tokens and the on_token that moves it: a sequence
    ended by EOS counts its unused tokens as done."""
    made = [0] * n_seqs
    bar = tqdm(total=n_seqs * max_new_tokens, desc=desc, unit=" tok", leave=False, dynamic_ncols=True)

    def on_token(i, t):
        made[i] += 1
        bar.update(max_new_tokens - made[i] + 1 if t in eos else 1)
    return bar, on_token


def evaluate(net, tok, eos, args, graphs):
    """Every selector x budget x block size over the --eval records -> a table."""
    def pct(x):                                     # a share, or "-" where there is none
        return "-" if x is None else f"{x:.1%}"
    records = []
    for n, line in enumerate(M.read_lines(args.eval), 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.eval} line {n}: not JSON ({e})")
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or \
                    not isinstance(r.get("answer"), str):
                raise ValueError(f"{args.eval} line {n}: need a JSON object with a string 'prompt' and a "
                                 "string 'answer'")
            records.append(r)
    if not records:
        raise ValueError(f"{args.eval}: no records (JSON lines with 'prompt' and 'answer')")
    if args.task == "tiny":
        import tiny
        for n, r in enumerate(records, 1):
            try:
                tiny.parse_prompt(r["prompt"])
            except ValueError as e:
                raise ValueError(f"{args.eval} record {n}: {e}")
    elif all("<prog>" in r["prompt"] for r in records):
        print("[these look like tiny-task problems (tiny.py data), scored here by a \\boxed{} answer: "
              "give --task tiny to score them by the task's check]", file=sys.stderr)
    texts = [chat_prompt(r["prompt"], not args.no_think) if args.chat else r["prompt"] for r in records]
    ids = encode(tok, texts, net.config.max_position_embeddings, lambda i: f"{args.eval} record {i + 1}")
    budgets, blocks, attns = args.eval_budgets, args.eval_blocks, args.eval_attn.split(",")
    for attn in attns:                  # every row's setup checked before the first row runs
        if attn not in GT.SELECTORS:
            raise ValueError(f"--eval-attn: unknown selector {attn!r}; choose from {', '.join(GT.SELECTORS)}")
        if attn != "dense" and not any(b % block == 0 for b in budgets for block in blocks):
            raise ValueError(f"--eval-budgets {budgets}: none is a multiple of a block size in {blocks}")
    if attns != ["dense"]:              # the pairs left out below, said once
        unused = [f"block {k} with budget {', '.join(str(b) for b in budgets if b % k)}" for k in blocks
                  if any(b % k for b in budgets)]
        if unused:
            print(f"[left out, as a budget is whole blocks: {'; '.join(unused)}]", file=sys.stderr)
    for block in blocks if "seer" in attns else []:
        GT.load_gates(net, pick_gate(args.gates, block))  # each fits the model (loaded again in its rows)
    rows = []
    for attn in attns:
        for block in blocks[:1] if attn == "dense" else blocks:
            for budget in [None] if attn == "dense" else budgets:
                if budget is not None and budget % block:
                    continue
                bar, count = progress(len(texts), args.max_new_tokens, eos, f"{attn} block {block} budget {budget}")
                with bar:
                    out, sparsity, dt, _ = run(net, ids, eos, args, attn, budget, block, graphs, on_token=count)
                scores = [score(args.task, r, tok.decode(o)) for r, o in zip(records, out)]
                steps = sum(s[2] for s in scores)
                rows.append((attn, "-" if attn == "dense" else block, budget or "-",
                             sum(s[0] for s in scores) / len(scores),
                             sum(s[1] for s in scores) / steps if steps else None,   # None: no steps (boxed)
                             sparsity, sum(map(len, out)) / len(out), dt))
                print(f"  {rows[-1][0]:7s} block {rows[-1][1]!s:>3} budget {rows[-1][2]!s:>5}: "
                      f"answer {rows[-1][3]:.1%} steps {pct(rows[-1][4])} sparsity {sparsity:.1%} ({dt:.0f} s)",
                      flush=True)
    print(f"\n{len(records)} problems from {args.eval}, {args.device}\n")
    print("| attn | block | budget | answer acc | step acc | sparsity | mean gen tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for a, blk, b, acc, sacc, sp, n, _ in rows:
        print(f"| {a} | {blk} | {b} | {acc:.1%} | {pct(sacc)} | {sp:.1%} | {n:.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=M.CLIHelp)
    p.add_argument("--model", help="Hugging Face Qwen3 folder (config.json, safetensors, tokenizer.json); "
                                   "default: the shipped tiny model, on a fresh problem of its task")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--eval", help="a .jsonl of {prompt, answer} records: score every selector x budget x block "
                                  "size and print a table")
    p.add_argument("--task", choices=["tiny", "boxed"],
                   help="--eval scoring: the tiny task's per-step check, or the last \\boxed{} answer "
                        "(default: tiny for the shipped model, else boxed)")
    p.add_argument("--eval-attn", default="dense,seer,quest,oracle,window", help="--eval: selectors, comma-separated")
    p.add_argument("--eval-budgets", default="128,256,512,1024", help="--eval: token budgets, comma-separated")
    p.add_argument("--eval-blocks", help="--eval: block sizes, comma-separated (one gate each; default: "
                                         "--block-size's default)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the Qwen3 chat template")
    p.add_argument("--no-think", action="store_true", help="with --chat: thinking mode off (empty think block)")
    p.add_argument("--max-new-tokens", type=int, help="stop each sequence after this many new tokens, or "
                                                      "at the model's max_position_embeddings (default 256; 8192 "
                                                      "for the tiny task)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0); with the shipped model also its "
                                            "problem's seed, a random one if not given")
    p.add_argument("--attn", default=None, choices=GT.SELECTORS,
                   help="which KV blocks each decode step reads: all (dense, the default without --gate), the "
                        "gate's top blocks (seer, the default with --gate and for the tiny model), Quest's bound, "
                        "the exact attention's top blocks "
                        "(oracle), or the most recent (window)")
    p.add_argument("--gate", action="append", default=[],
                   help="gate folder for --attn seer; repeat to give one per block size")
    p.add_argument("--budget", type=int, help="KV tokens per step and KV head (a multiple of --block-size), "
                                              "on top of the block holding the new token (default: none; 512 "
                                              "for the shipped tiny model)")
    p.add_argument("--threshold", type=float, help="seer only: keep blocks whose gate probability > this, in (0, 1)")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "tilelang"],
                   help="decode attention: the TileLang kernel (cuda + tilelang) or the PyTorch reference; "
                        "auto picks TileLang when it can")
    p.add_argument("--block-size", type=int, help="KV page size in tokens (= the gate's block size); "
                   "default: a single --gate's block size, else 16 for the shipped tiny model, else 64")
    p.add_argument("--num-pages", type=int, default=0,
                   help="KV pages in the pool (default: just enough for the prompts + --max-new-tokens)")
    p.add_argument("--kv-memory-fraction", type=float,
                   help="cuda: size the KV pool to this share, in (0, 1), of the GPU memory free after loading "
                        "the model, instead of --num-pages (every --eval row gets the same bytes)")
    p.add_argument("--no-graph", action="store_true", help="cuda: run decode eagerly instead of in CUDA graphs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")
    args = p.parse_args(argv)
    M.check_device(p, args.device)
    if args.kv_memory_fraction is not None and not 0 < args.kv_memory_fraction < 1:
        p.error(f"--kv-memory-fraction must be in (0, 1), got {args.kv_memory_fraction}")
    if args.num_pages < 0:
        p.error(f"--num-pages must be >= 1, or 0 for just enough; got {args.num_pages}")
    if args.num_pages and args.kv_memory_fraction is not None:
        p.error("--num-pages and --kv-memory-fraction both size the KV pool: give one")
    if args.kv_memory_fraction is not None and not args.device.startswith("cuda"):
        p.error("--kv-memory-fraction sizes the pool from free GPU memory: give --num-pages on cpu")
    if args.eval and (args.attn or args.budget is not None or args.threshold is not None or args.block_size):
        p.error("--attn, --budget, --threshold and --block-size set one run's selection; --eval takes --eval-attn, "
                "--eval-budgets and --eval-blocks")
    if args.eval and (args.prompt or args.prompts_file):
        p.error("--eval runs the prompts of its .jsonl: drop --prompt / --prompts-file")
    if args.no_think and not args.chat:
        p.error("--no-think sets the chat template's thinking mode: give --chat too")
    if not 0 <= args.temperature < float("inf") or not 0 < args.top_p <= 1:   # (NaN fails both)
        p.error(f"need a finite --temperature >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    if args.block_size is not None and args.block_size < 1:
        p.error(f"--block-size must be >= 1, got {args.block_size}")
    try:
        args.eval_budgets = [int(b) for b in args.eval_budgets.split(",")]
        args.eval_blocks = [int(b) for b in args.eval_blocks.split(",")] if args.eval_blocks else []
    except ValueError:
        p.error(f"--eval-budgets {args.eval_budgets} / --eval-blocks {args.eval_blocks}: integers, comma-separated")
    if min(args.eval_budgets + args.eval_blocks) < 1:
        p.error("--eval-budgets / --eval-blocks must be >= 1")

    tiny_default = args.model is None
    problem = None
    if tiny_default:                                    # the shipped model, a fresh problem of its task
        import tiny
        args.model = TINY
        args.gate = args.gate or sorted(glob.glob(os.path.join(TINY, "gate-*")))
        args.attn = args.attn or "seer"
        if args.attn != "dense" and args.budget is None and args.threshold is None:
            args.budget = 512
        args.task = args.task or "tiny"
        if not args.eval and not args.prompt and not args.prompts_file:
            seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
            problem = tiny.make_problem(random.Random(seed))
            args.prompt = [problem["prompt"]]
            print(f"[tiny task, problem seed {seed}]")
    try:
        args.gates = gates_by_block_size(args.gate)   # {block size: folder}, read by run() and evaluate()
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    # one gate: its block size; the shipped model's: block 16, its best (README, tiny model results)
    block = next(iter(args.gates)) if len(args.gates) == 1 else 16 if tiny_default else 64
    args.block_size = args.block_size or block
    args.eval_blocks = args.eval_blocks or [block]
    args.attn = args.attn or ("seer" if args.gates else "dense")
    if args.attn == "seer" and not args.gates and not args.eval:   # (--eval: its rows say, from --eval-attn)
        raise SystemExit("error: --attn seer needs gates: give --gate DIR")
    args.task = args.task or "boxed"
    args.seed = args.seed or 0
    if args.max_new_tokens is None:
        args.max_new_tokens = 8192 if args.task == "tiny" else 256
    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be >= 1")
    prompts = list(args.prompt)
    if args.prompts_file:
        if why := M.unreadable(args.prompts_file):
            raise SystemExit(f"error: --prompts-file {args.prompts_file} {why}")
        try:
            prompts += [line.rstrip("\n") for line in M.read_lines(args.prompts_file) if line.strip()]
        except ValueError as e:
            raise SystemExit(f"error: --prompts-file {e}")
    if not prompts and not args.eval:
        raise SystemExit(f"error: --prompts-file {args.prompts_file} holds no prompt" if args.prompts_file else
                         "error: give --prompt TEXT (repeatable), --prompts-file FILE or --eval FILE.jsonl")
    if args.attn == "dense" and (args.budget is not None or args.threshold is not None):
        raise SystemExit("error: --budget and --threshold choose blocks for a sparse --attn; dense reads every block")
    if args.eval and (why := M.unreadable(args.eval)):
        raise SystemExit(f"error: --eval {args.eval} {why}")
    try:
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
        net = M.Qwen3.from_pretrained(args.model, device=args.device, dtype=dtype)
        args.kv_bytes = 0                            # bytes of each run()'s KV pool; 0: --num-pages or just enough
        if args.kv_memory_fraction:
            torch.cuda.empty_cache()                 # the allocator still holds what loading merged and freed
            args.kv_bytes = int(torch.cuda.mem_get_info()[0] * args.kv_memory_fraction)
        use_kernel(args.kernel, args.device, net, args.eval_blocks if args.eval else [args.block_size])
        tok, eos = M.load_tokenizer(args.model, net.config.vocab_size), eos_ids(args.model)
        graphs = args.device.startswith("cuda") and not args.no_graph
        if args.eval:
            return evaluate(net, tok, eos, args, graphs)
        texts = [chat_prompt(t, not args.no_think) if args.chat else t for t in prompts]
        ids = encode(tok, texts, net.config.max_position_embeddings, lambda i: f"prompt [{i}]")
        seen, start = [], [0, 0]        # tokens so far; where the window decoded last starts and ends

        def on_token(i, t):             # stream text, decoding a short window (vLLM's incremental detokenize)
            seen.append(t)
            shown = tok.decode(seen[start[0]:start[1]])
            text = tok.decode(seen[start[0]:])
            if len(text) > len(shown) and not text.endswith("\ufffd"):   # not half a UTF-8 character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                start[:] = [start[1], len(seen)]

        stream = len(texts) == 1         # one sequence streams its text; several show a bar
        bar, callback = (contextlib.nullcontext(), on_token) if stream else \
            progress(len(texts), args.max_new_tokens, eos, "decoding")
        with bar:
            out, sparsity, dt, first = run(net, ids, eos, args, args.attn, args.budget, args.block_size, graphs,
                                           callback)
    except (OSError, ValueError, M.CacheFull) as e:   # OSError: a file missing or unreadable
        raise SystemExit(f"error: {e}")
    if stream:
        print()
    else:
        for i, o in enumerate(out):
            print(f"--- [{i}] {prompts[i]!r}\n{tok.decode(o)}")
    if problem is not None:
        ok, steps, total = score("tiny", problem, tok.decode(out[0]))
        print(f"[answer {'correct' if ok else 'WRONG'} (expected {problem['answer']}) | steps correct {steps}/{total}]")
    n_gen = sum(len(o) for o in out)
    how = "" if args.attn == "dense" else f" block {args.block_size}"
    how += f" budget {args.budget}" if args.budget else (f" threshold {args.threshold}" if args.threshold else "")
    rate = f"{(n_gen - len(out)) / (dt - first):.1f}" if n_gen > len(out) else "-"   # after the first tokens
    at_eos = sum(bool(o) and o[-1] in eos for o in out)  # the others stopped at their token limit
    print(f"[prompt tokens {sum(map(len, ids))} | first tokens after {first:.1f} s | generated tokens {n_gen} | "
          f"decode {rate} tokens/s | attn {args.attn}{how} | sparsity {sparsity:.1%} | "
          f"ended by EOS {at_eos} of {len(out)}]")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted")
