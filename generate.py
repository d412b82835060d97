"""Generate text with a Qwen3 checkpoint through the paged KV cache.

  python generate.py --model DIR --prompt "..." [--prompt "..."] [--chat] [--temperature 0.7]

Prompts are prefilled one by one (dense), then decoded together as a ragged batch: one
new token per live sequence per step; a sequence that hits EOS frees its pages while the
others go on.
"""
import argparse
import json
import os
import sys
import time

import torch

import gate as GT
import model as M


def load_tokenizer(path):
    from tokenizers import Tokenizer
    f = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: no tokenizer.json, needed to encode text prompts")
    return Tokenizer.from_file(f)


def eos_ids(path):
    """EOS token ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                eos = json.load(fh).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {eos}
    return set()


def chat_prompt(text, think=True):
    """The Qwen3 chat template for one user turn; thinking off adds an empty think block."""
    s = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return s if think else s + "<think>\n\n</think>\n\n"


def sample(logits, temperature, top_p, generator):
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p              # keep the smallest set with mass >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, choice)[:, 0]


def generate(model, cache, prompts, max_new_tokens, eos=(), temperature=0.0, top_p=1.0, seed=0,
             select=None, on_token=None, graphs=False):
    """prompts: lists of token ids -> lists of generated ids (EOS included when hit).

    Each sequence gets all its pages at admission (prompt + max_new_tokens, capped at
    max_position_embeddings), so the page table is static while it decodes: the step itself
    never waits on the host, and it replays as a CUDA graph when graphs=True."""
    limit = [min(max_new_tokens, model.config.max_position_embeddings - len(p)) for p in prompts]
    for i, p in enumerate(prompts):
        cache.allocate(i, len(p) + limit[i])
    logits = torch.stack([model.prefill(ids, i, cache, select) for i, ids in enumerate(prompts)])
    generator = torch.Generator().manual_seed(seed)
    live = list(range(len(prompts)))
    table = cache.block_table(live)                                    # [B, NB]
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=table.device)
    step = GraphRunner(model, cache, select, len(live), table.shape[1]) if graphs else \
        lambda tok, tab, lens: model.decode(tok, tab, lens, cache, select)
    out = [[] for _ in prompts]
    while live:
        tokens = sample(logits, temperature, top_p, generator)        # [B] on the device
        keep = []
        for row, (i, t) in enumerate(zip(live, tokens.tolist())):
            out[i].append(t)
            if on_token:
                on_token(i, t)
            if t in eos or len(out[i]) >= limit[i]:
                cache.release(i)                                       # finished: its pages go back
            else:
                keep.append(row)
        if len(keep) < len(live):                                      # the batch shrinks
            rows = torch.tensor(keep, dtype=torch.long, device=table.device)
            live, table, lengths, tokens = [live[r] for r in keep], table[rows], lengths[rows], tokens[rows]
        if live:
            logits = step(tokens, table, lengths)
            lengths = lengths + 1
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


def use_kernel(kind, device):
    """Point model.decode_attention at the TileLang kernel or the PyTorch reference."""
    if kind == "tilelang" and not device.startswith("cuda"):
        raise ValueError("--kernel tilelang runs on cuda only; use --device cuda or --kernel torch")
    want = kind == "tilelang" or (kind == "auto" and device.startswith("cuda"))
    if want:
        try:
            import kernel_decode
            M.decode_attention = kernel_decode.decode_attention
            return
        except ImportError as e:
            if kind == "tilelang":
                raise ValueError(f"--kernel tilelang needs tilelang and CUDA: {e}")
    M.decode_attention = M.decode_attention_ref


def pages_needed(prompts, max_new_tokens, page_size):
    return sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face Qwen3 folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the Qwen3 chat template")
    p.add_argument("--no-think", action="store_true", help="with --chat: thinking mode off (empty think block)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop each sequence after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--attn", default="dense", choices=GT.SELECTORS,
                   help="which KV blocks each decode step reads: all (dense), the gate's top blocks (seer), "
                        "Quest's bound, the exact attention's top blocks (oracle), or the most recent (window)")
    p.add_argument("--gate", help="gate folder (config.json + safetensors) for --attn seer")
    p.add_argument("--budget", type=int, help="KV tokens per step and KV head (a multiple of --block-size), "
                                              "on top of the block holding the new token")
    p.add_argument("--threshold", type=float, help="seer only: keep blocks whose gate probability > this, in (0, 1)")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "tilelang"],
                   help="decode attention: the TileLang kernel (cuda + tilelang) or the PyTorch reference; "
                        "auto picks TileLang when it can")
    p.add_argument("--block-size", type=int, default=64, help="KV page size in tokens (= the gate's block size)")
    p.add_argument("--num-pages", type=int, default=0, help="KV pages in the pool (0 = just enough for the prompts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")
    args = p.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise SystemExit(f"error: --prompts-file {args.prompts_file} does not exist")
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be >= 1")
    try:
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
        net = M.Qwen3.from_pretrained(args.model, device=args.device, dtype=dtype)
        if args.gate:
            GT.load_gates(net, args.gate)
        use_kernel(args.kernel, args.device)
        tok = load_tokenizer(args.model)
        texts = [chat_prompt(t, not args.no_think) if args.chat else t for t in prompts]
        ids = [tok.encode(t).ids for t in texts]
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"prompt {i} is empty after tokenization")
        num_pages = args.num_pages or pages_needed(ids, args.max_new_tokens, args.block_size)
        cache = M.PagedKVCache(net.config, num_pages, args.block_size, args.device, dtype)
        select = GT.Selector(args.attn, net, cache, args.budget, args.threshold)
        stream = len(ids) == 1
        printed = [""]

        def on_token(i, t, seen=[]):
            seen.append(t)
            text = tok.decode(seen)
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

        t0 = time.perf_counter()
        out = generate(net, cache, ids, args.max_new_tokens, eos_ids(args.model), args.temperature,
                       args.top_p, args.seed, select, on_token=on_token if stream else None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except (FileNotFoundError, ValueError, M.CacheFull) as e:
        raise SystemExit(f"error: {e}")
    if stream:
        print()
    else:
        for i, o in enumerate(out):
            print(f"--- [{i}] {prompts[i]!r}\n{tok.decode(o)}")
    n_gen = sum(len(o) for o in out)
    print(f"[prompt tokens {sum(map(len, ids))} | generated tokens {n_gen} | {n_gen / dt:.1f} tokens/s | "
          f"attn {args.attn} | sparsity {select.sparsity():.1%}]")


if __name__ == "__main__":
    main()
