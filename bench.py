"""Benchmarks on a CUDA GPU. `python bench.py e2e`: whole-model decode of Qwen3 shapes (random
weights) with dense and seer attention against Hugging Face transformers, each step beside its
byte floor; ours is the median of --steps replayed CUDA-graph steps, each between CUDA events (with
its input copies, greedy argmax and length update), transformers' the median interval between its
new tokens in the fastest of three calls per cache. `python bench.py kernel`: the paged block-sparse
decode kernel (kernel_decode.py) against dense SDPA and against its own dense mode, on random bf16 data,
Qwen3-4B/8B attention shapes (Hq 32, Hk 8, D 128); medians of CUDA-graph replays (launch cost
excluded, as in a graph-captured decode step), each replay running the call on several disjoint
sets of pages so that the bytes of one call are not served from L2 by the previous one.
"""
import argparse
import faulthandler
import importlib.util
import math
import os
import statistics
import time

import torch

HQ, HK, D = 32, 8, 128
L2_BYTES = 200 << 20  # rotate inputs until one replay touches about 4x the 50 MB L2
POOL_BYTES = 8 << 30  # ... within a page pool of at most this (or one set)


def median_ms(fn, reps):
    """Median ms of fn(): 10 warm-up calls, then reps calls queued back to back, each between CUDA events
    (no L2 flush between them: the callers make each call read more than the L2 holds)."""
    for _ in range(10):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def bench_graph(calls, reps=100):
    """Median µs of one call: all `calls` captured in one CUDA graph, `reps` replays each timed
    between CUDA events after a warm-up. Nothing flushes the L2 between replays: the callers'
    calls read disjoint pages, about 4x the L2 a replay. (triton's do_bench zeroes 256 MB before
    each run, and the write-back of those dirty lines then shares HBM with the call: 8.6-10.8 µs
    a replay on an H200, 72.1 against 63.2 µs at batch 16 x 32K x 0.9; see the README.)"""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in calls:  # compile / autotune / allocate outside the capture
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return median_ms(graph.replay, reps) * 1e3 / len(calls)


def copy_bandwidth(reps=100):
    """GB/s of a 2 GiB device-to-device copy, bytes read plus bytes written: the median of reps
    copies (median_ms: each copy moves 80x the L2; under do_bench's flush it read the same within
    0.3%, H200 2026-12-04).
    Launched eagerly: the same memcpy captured in a CUDA graph runs far slower (H200, 2026-11-30:
    2,710 against 4,240 GB/s eager, and 4,260 for an elementwise copy kernel)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def num_blocks(nblk, sparsity):
    """Whole blocks read of nblk at a sparsity."""
    return max(1, round((1 - sparsity) * nblk))


def select_blocks(B, nblk, sparsity, gen):
    """[B, HK, K] logical ids: the last block always, then the top of a random ranking."""
    k = num_blocks(nblk, sparsity)
    rank = torch.rand(B, HK, nblk - 1, generator=gen, device="cuda").argsort(-1)[..., :k - 1]
    last = torch.full((B, HK, 1), nblk - 1, device="cuda")
    return torch.cat([rank, last], -1).int().contiguous()


def bench_kernel(args):
    import kernel_decode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth()
    print(f"# {dev}, torch {torch.__version__}; device-to-device copy {copy_gbs:.0f} GB/s "
          f"(read + write); bf16, Hq {HQ}, Hk {HK}, D {D}; time = µs per call (CUDA graph)")
    cols = ["S", "batch", "context", "sparsity", "µs", "GB/s", "%copy", "×flash", "×cudnn", "×dense"]
    print(" ".join(f"{c:>8}" for c in cols))
    rows, gen = [], torch.Generator(device="cuda").manual_seed(0)
    for S in args.block:
        for B in args.batch:
            for L in args.context:
                nblk = L // S
                page_bytes = S * HK * D * 2  # one page of K (or V), all KV heads
                kv_bytes = 2 * B * nblk * page_bytes
                # sets of pages a replay rotates through: enough that the call reading least
                # (the sparsest) reads L2_BYTES a replay, within POOL_BYTES; dense calls need fewer
                least = 2 * B * min(num_blocks(nblk, sp) for sp in args.sparsity + [0]) * page_bytes
                n_sets = max(1, min(math.ceil(L2_BYTES / least), POOL_BYTES // kv_bytes))
                n_dense = min(n_sets, math.ceil(L2_BYTES / kv_bytes))
                need = (n_sets + n_dense + 0.6) * kv_bytes  # pool, SDPA's contiguous K and V, a gather's temporary
                free = torch.cuda.mem_get_info()[0]
                if need > free:
                    print(f"# skip S {S} batch {B} context {L}: needs {need / 2**30:.0f} "
                          f"GiB, {free / 2**30:.0f} free")
                    continue
                P = n_sets * B * nblk                      # each set its own pages, in a random order
                k_pages = torch.randn(P, S, HK, D, device="cuda", dtype=torch.bfloat16)
                v_pages = torch.randn_like(k_pages)
                tables = list(torch.randperm(P, generator=gen, device="cuda").int().view(n_sets, B, nblk))
                lengths = torch.full((B,), L, dtype=torch.int32, device="cuda")
                q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)

                # dense SDPA on contiguous KV [B, Hk, L, D]: the G query heads of a KV head
                # become G query rows (non-causal), so SDPA reads each KV head once
                sdpa_sets = tables[:n_dense]
                kc = [k_pages[t.long()].view(B, L, HK, D).transpose(1, 2).contiguous() for t in sdpa_sets]
                vc = [v_pages[t.long()].view(B, L, HK, D).transpose(1, 2).contiguous() for t in sdpa_sets]
                qs = q.view(B, HK, HQ // HK, D)
                base = {}
                for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                      ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def sdpa(i, backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qs, kc[i], vc[i])
                    try:
                        base[name] = bench_graph([lambda i=i: sdpa(i) for i in range(len(kc))])
                    except RuntimeError as e:
                        print(f"# SDPA {name} failed: {str(e).splitlines()[0][:100]}")
                        base[name] = float("nan")
                del kc, vc

                def call(i, blocks):
                    return kernel_decode.decode_attention(q, k_pages, v_pages, tables[i], lengths,
                                                          blocks, splits=args.splits, check=False)
                base["dense"] = bench_graph([lambda i=i: call(i, None) for i in range(n_dense)])
                for sp in [None] + args.sparsity:  # None: the kernel's dense mode
                    if sp is None:
                        us, K = base["dense"], nblk
                    else:
                        blocks = [select_blocks(B, nblk, sp, gen) for _ in range(n_sets)]
                        us = bench_graph([lambda i=i: call(i, blocks[i]) for i in range(n_sets)])
                        K = blocks[0].shape[-1]
                    # K and V of the read pages, q in and out; sparse: each row's block ids and their
                    # page-table entries, dense: the page table
                    ids = 2 * B * HK * K * 4 if sp is not None else B * K * 4
                    must = 2 * B * K * page_bytes + 2 * q.numel() * 2 + ids
                    sp = None if sp is None else 1 - K / nblk   # what was read: K whole blocks of nblk
                    row = dict(S=S, batch=B, context=L, sparsity=sp, us=us, gbs=must / us / 1e3)
                    row.update(pct=100 * row["gbs"] / copy_gbs, flash=base["flash"] / us,
                               cudnn=base["cudnn"] / us, dense=base["dense"] / us)
                    rows.append(row)
                    spt = "dense" if sp is None else f"{sp:.3f}"
                    print(f"{S:>8} {B:>8} {L:>8} {spt:>8} {us:>8.1f} {row['gbs']:>8.0f} "
                          f"{row['pct']:>8.1f} {row['flash']:>8.2f} {row['cudnn']:>8.2f} "
                          f"{row['dense']:>8.2f}", flush=True)
                del k_pages, v_pages, tables
                torch.cuda.empty_cache()
    if args.plot:
        plot(rows, args.plot, dev)


def plot(rows, path, dev):
    import matplotlib                                  # (main checked that it is installed)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["S"], r["batch"], r["context"]) for r in rows}):
        pts = [r for r in rows if (r["S"], r["batch"], r["context"]) == key and r["sparsity"] is not None]
        ax.plot([r["sparsity"] for r in pts], [r["flash"] for r in pts], marker="o",
                label=f"S {key[0]}, batch {key[1]}, {key[2] // 1024}K")
    ax.set(xlabel="sparsity", ylabel="speedup over dense SDPA (flash)", title=dev)
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"# wrote {path}")


# ---- e2e: whole-model decode ----

BLOCK = 64   # e2e's page and gate block size (the published gates')
STALL_S = 120  # an e2e row still running after this long prints every thread's stack to stderr, and again
               # each STALL_S (rows take 3-30 s on an H200; the grid stalled three times, cause unknown: README)

def random_model(shape):
    """Qwen3 of a published shape, random bf16 weights, on the GPU (no download). Seeds torch too, for
    what is drawn after it (the gates, the random caches and tokens)."""
    import model as M
    torch.manual_seed(0)
    return M.Qwen3.random(M.Qwen3Config(**M.SHAPES[shape], max_position_embeddings=131072), "cuda", torch.bfloat16)


def step_bytes(net, B, ctx, sparsity, S, gates):
    """Bytes one decode step must read: the weights except the embedding table (a tied lm_head
    reads it, so then it counts) and, with gates (seer), the gates' (Wk only when a page fills,
    so once every S steps), K and V of the tokens attended (the measured share), and the gate keys
    of every complete block."""
    cfg = net.config
    w = 0.0
    for n, p in net.named_parameters():
        if not n.startswith("embed_tokens") and (gates or ".attn_gate." not in n):
            w += p.numel() * p.element_size() / (S if "attngate_linear_k" in n else 1)
    if cfg.tie_word_embeddings:
        w += net.embed_tokens.weight.numel() * net.embed_tokens.weight.element_size()
    L, Hk, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    kv = B * L * Hk * ctx * (1 - sparsity) * 2 * D * 2
    pooled = B * L * Hk * (ctx // S) * net.layers[0].self_attn.attn_gate.dg * 2 if gates else 0
    return w + kv + pooled


# pieces of kernel names -> the part of a decode step they do (--profile's split of the step)
PARTS = {"GEMMs": ("_linear_kernel", "gemm", "nvjet", "splitKreduce"), "attention": ("decode_kernel",),
         "gate scores": ("_seer_score",), "top-k + pooling": ("_seer_pick",)}


def kernel_profile(fn, layers, step_ms, top=16):
    """One eager call of fn under torch.profiler, its Triton kernels without PDL (whose kernels
    start early and wait, so their times overlap) -> lines: kernels per layer, their total time against step_ms
    (a replayed step with PDL: the difference is launch gaps less PDL's overlap), that time
    split by PARTS, and the kernels that take the most."""
    import kernel_step
    from torch.profiler import ProfilerActivity, profile
    pdl, kernel_step.PDL = kernel_step.PDL, False
    try:
        fn()                                                 # compiles the kernels' non-PDL variants
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    finally:
        kernel_step.PDL = pdl
    per = {}  # kernel name -> (launches, µs)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            n, us = per.get(e.name, (0, 0.0))
            per[e.name] = (n + 1, us + e.device_time)
    n_all, us_all = sum(n for n, _ in per.values()), sum(us for _, us in per.values())
    parts = dict.fromkeys(list(PARTS) + ["the rest"], 0.0)
    for name, (n, us) in per.items():
        parts[next((p for p, keys in PARTS.items() if any(k in name for k in keys)), "the rest")] += us
    lines = [f"#   one eager step without PDL: {n_all / layers:.1f} kernels per layer, {us_all / 1e3:.2f} ms of kernel "
             f"time (the replayed step with PDL, {step_ms:.2f} ms, is {step_ms - us_all / 1e3:+.2f} ms from it)",
             "#   by part, ms: " + ", ".join(f"{p} {us / 1e3:.2f}" for p, us in parts.items() if us)]
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"#   {us / 1e3:7.3f} ms {n:5d}x {us / n:7.1f} µs  {name[:80]}")
    return lines


def bench_ours(net, B, ctx, attn, budget, steps, profile=False):
    """ms per decode step (CUDA graph replays), measured sparsity, and with profile=True the
    kernel_profile lines of one eager step. The cache holds random K, V and gate keys for ctx
    tokens per sequence (prefill is not what is timed)."""
    import gate as GT
    import generate as gen
    import model as M
    cache = M.PagedKVCache(net.config, B * -(-(ctx + steps + 1) // BLOCK), BLOCK, "cuda", torch.bfloat16)
    select = GT.Selector(attn, net, cache, budget)
    for t in [cache.k, cache.v] + list((cache.pooled or {}).values()):
        t.normal_()
    for b in range(B):
        cache.allocate(b, ctx + steps + 1)
    table = cache.block_table(list(range(B)))
    lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    tokens = torch.randint(0, net.config.vocab_size, (B,), device="cuda")
    run = gen.GraphRunner(net, cache, select, B, table.shape[1])
    for _ in range(3):
        run(tokens, table, lengths)
    select.read.zero_(), select.total.zero_()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for e in events[1:]:                             # queued back to back: the events only mark the steps
        tokens = run(tokens, table, lengths).argmax(-1)
        lengths += 1
        e.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))
    sparsity = select.sparsity()
    prof = kernel_profile(lambda: net.decode(tokens, table, lengths, cache, select),
                          net.config.num_hidden_layers, ms) if profile else []
    del run, cache
    torch.cuda.empty_cache()
    return ms, sparsity, prof


def bench_hf(shape, B, ctx, steps, calls=3):
    """ms per step of dense decode through transformers' generate (sdpa): per cache, one warm-up call,
    then `calls` identical timed calls; a call's time is the median interval between its consecutive
    new tokens (a logits processor syncs and notes the time at each), and the cache's is its fastest
    call's -> {"dynamic": [ms per call], "static": [...]}, the caches that ran. The fastest, because
    the dynamic cache's calls differ by up to 1.8x, in one process and between processes (40-73 ms
    at 8B batch 8 x 32K; README). The prompt but its last token is prefilled into the cache first, in
    chunks of 1,024 positions (generate's one-shot prefill of 8B batch 8 x 32K runs out of memory on
    an 80 GB H100), and each call's new tokens are cropped off again after it."""
    from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM,
                              StaticCache)
    import model as M

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    cfg = Qwen3Config(**M.SHAPES[shape], max_position_embeddings=131072, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(1, cfg.vocab_size, (B, ctx), device="cuda")   # no pad id (0): generate would mask it
    times = {}
    for impl in ("dynamic", "static"):
        cache = None
        try:
            cache = (DynamicCache(config=cfg) if impl == "dynamic" else
                     StaticCache(config=cfg, max_cache_len=ctx + steps + 1))
            with torch.no_grad():
                for start in range(0, ctx - 1, 1024):
                    pos = torch.arange(start, min(start + 1024, ctx - 1), device="cuda")
                    hf.model(input_ids=ids[:, pos], past_key_values=cache, cache_position=pos, use_cache=True)
            per_call = []
            for _ in range(1 + calls):   # the first warms up (allocations, cuBLAS, a static cache's compile)
                clock = Clock()
                hf.generate(ids, past_key_values=cache, max_new_tokens=1 + steps, min_new_tokens=1 + steps,
                            do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
                if impl == "static":     # back to the prompt (transformers 5.17's static layers have no crop)
                    for layer in cache.layers:
                        layer.cumulative_length.fill_(ctx - 1)
                else:
                    cache.crop(ctx - 1 - int(cache.get_seq_length()))   # a negative crop drops that many
                per_call.append(statistics.median(b - a for a, b in zip(clock.times, clock.times[1:])) * 1e3)
            times[impl] = per_call[1:]
        except Exception as e:  # the baseline is optional: report and go on
            print(f"# transformers {impl} cache failed at batch {B}, {ctx}: {type(e).__name__}: {str(e)[:100]}")
        del cache
        torch.cuda.empty_cache()
    del hf
    torch.cuda.empty_cache()
    return times


def bench_e2e(args):
    import generate as gen
    import gate as GT
    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth()
    print(f"# {dev}, torch {torch.__version__}; device-to-device copy {copy_gbs:.0f} GB/s; bf16, block {BLOCK}, "
          f"{args.steps} decode steps after a cache of random K/V as long as the row's context; kernel {args.kernel}")
    print("# floor = bytes that must be read / copy bandwidth; ×dense = our dense step / this step")
    cols = ["shape", "batch", "context", "attn", "budget", "ms/step", "tok/s", "sparsity", "floor ms",
            "×floor", "×dense"]
    print(" ".join(f"{c:>9}" for c in cols))
    ours = {}   # (shape, batch, context) -> [(row name, ms per step)], for the transformers lines
    for shape in args.shape:
        net = random_model(shape)
        GT.attach_gates(net, block_size=BLOCK)
        gen.use_kernel(args.kernel, "cuda", net, [BLOCK])
        cfg = net.config
        for B in args.batch:
            for ctx in args.context:
                kv = B * (ctx + args.steps + BLOCK) * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
                if kv * 1.1 + (2 << 30) > torch.cuda.mem_get_info()[0]:
                    print(f"# skip {shape} batch {B} context {ctx}: the KV cache needs {kv / 2**30:.0f} GiB")
                    continue
                dense = None
                for attn, budget in [("dense", None)] + [("seer", b) for b in args.budget]:
                    faulthandler.dump_traceback_later(STALL_S, repeat=True)
                    try:
                        ms, sp, prof = bench_ours(net, B, ctx, attn, budget, args.steps, profile=args.profile)
                    finally:
                        faulthandler.cancel_dump_traceback_later()
                    dense = dense or ms
                    floor = step_bytes(net, B, ctx + args.steps // 2, sp, BLOCK, attn == "seer") / copy_gbs / 1e6
                    ours.setdefault((shape, B, ctx), []).append((f"{attn} {budget}" if budget else attn, ms))
                    print(f"{shape:>9} {B:>9} {ctx:>9} {attn:>9} {budget or '-':>9} {ms:>9.2f} {B * 1e3 / ms:>9.0f} "
                          f"{sp:>9.3f} {floor:>9.2f} {ms / floor:>9.2f} {dense / ms:>9.2f}", flush=True)
                    for line in prof:
                        print(line, flush=True)
        del net
        torch.cuda.empty_cache()
    for spec in args.hf:
        shape, B, ctx = spec.split(":")
        B, ctx = int(B), int(ctx)
        times = bench_hf(shape, B, ctx, args.hf_steps)   # {cache: [ms per call]}; the baseline is the fastest
        head = f"# transformers {shape} batch {B} context {ctx}:"
        if not times:
            print(f"{head} both caches failed (above)", flush=True)
            continue
        ms = min(min(t) for t in times.values())
        rows = ours.get((shape, B, ctx))
        ratio = ("speedup of ours: " + ", ".join(f"{name} {ms / t:.1f}x" for name, t in rows) if rows
                 else "ours not measured here")
        caches = ", ".join(f"{c} {min(t):.1f} (calls {' / '.join(f'{x:.1f}' for x in t)})" for c, t in times.items())
        print(f"{head} {ms:.1f} ms/step (sdpa, the fastest call of: {caches} ms); {ratio}", flush=True)


def main(argv=None):
    import model as M
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=M.CLIHelp)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{kernel,e2e}")
    k = sub.add_parser("kernel", formatter_class=M.CLIHelp, help="block-sparse paged decode kernel vs dense SDPA")
    k.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32], help="batch sizes")
    k.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 65536, 131072],
                   help="context lengths in tokens (multiples of the block size)")
    k.add_argument("--sparsity", type=float, nargs="+", default=[0, 0.5, 0.8, 0.9, 0.95],
                   help="fraction of blocks not read (the block of the new token is always read), rounded "
                        "to whole blocks: the table prints the fraction not read")
    k.add_argument("--block", type=int, nargs="+", default=[64, 128], help="page/block sizes: 16, 32, 64 or 128")
    k.add_argument("--splits", type=int, default=None,
                   help="KV splits of every (sequence, KV head), up to 32 (default: the kernel's own choice)")
    k.add_argument("--plot", nargs="?", const="bench_kernel.png", default=None,
                   help="write a PNG of speedup vs sparsity to this file, bench_kernel.png if none is named "
                        "(default: no plot)")
    e = sub.add_parser("e2e", formatter_class=M.CLIHelp, help="whole-model decode: ours dense and seer vs transformers")
    e.add_argument("--shape", nargs="+", default=["qwen3-8b", "qwen3-4b"], choices=list(M.SHAPES),
                   help="model shapes (random weights)")
    e.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16], help="batch sizes")
    e.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 65536],
                   help="tokens already in the cache when timing starts")
    e.add_argument("--budget", type=int, nargs="+", default=[2048, 4096], help="seer token budgets")
    e.add_argument("--steps", type=int, default=256, help="decode steps timed")
    e.add_argument("--kernel", default="tilelang", choices=["tilelang", "torch"],
                   help="decode attention: the TileLang kernel or the PyTorch reference")
    e.add_argument("--hf", nargs="+", default=["qwen3-8b:8:8192", "qwen3-8b:1:32768", "qwen3-8b:8:32768"],
                   help="transformers baselines as shape:batch:context, timed after our rows (each takes minutes)")
    e.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    e.add_argument("--hf-steps", type=int, default=32,
                   help="decode steps timed in each of transformers' 3 timed calls per cache")
    e.add_argument("--profile", action="store_true",
                   help="after each row, the kernels of one eager decode step, the Triton ones without PDL "
                        "(torch.profiler): "
                        "kernels per layer, their time against the replayed step's (with PDL: the difference is "
                        "launch gaps less PDL's overlap), split into "
                        "GEMMs / attention / seer's kernels / the rest, and the 16 kernels that take the most "
                        "(every per-layer kernel at Qwen3 shapes)")
    args = parser.parse_args(argv)
    error = {"kernel": k, "e2e": e}[args.cmd].error                  # with the subcommand's usage

    def need(ok, msg):
        if not ok:
            error(msg)
    if args.cmd == "kernel":
        import kernel_decode
        need(min(args.batch) >= 1, f"--batch: sizes >= 1, got {args.batch}")
        for S in args.block:   # the kernel's own limits
            why = kernel_decode.unsupported(torch.bfloat16, D, S, HQ // HK)
            need(why is None, f"--block {S}: {why}")
        need(all(L > 0 and L % S == 0 for L in args.context for S in args.block),
             f"--context: positive multiples of every --block size, got {args.context}")
        need(all(0 <= x < 1 for x in args.sparsity), f"--sparsity: fractions in [0, 1), got {args.sparsity}")
        try:   # the longest list: a dense call at the longest context and smallest block
            least = kernel_decode.least_splits(max(args.context) // min(args.block))
        except ValueError as why:
            error(f"--context {max(args.context)} in blocks of {min(args.block)}: {why}")
        need(args.splits is None or least <= args.splits <= kernel_decode.MAX_SPLITS,
             f"--splits: {least} to {kernel_decode.MAX_SPLITS} here (a program walks at most "
             f"{kernel_decode.CHUNK} pages), got {args.splits}")
        if args.plot:
            need(importlib.util.find_spec("matplotlib"), "--plot needs matplotlib (pip install matplotlib)")
            need(os.path.isdir(os.path.dirname(os.path.abspath(args.plot))),
                 f"--plot {args.plot}: no such directory to write it in")
    else:
        need(min(args.batch + args.context + [args.steps, args.hf_steps]) >= 1,
             "--batch, --context, --steps and --hf-steps must be >= 1")
        need(all(b >= BLOCK and b % BLOCK == 0 for b in args.budget),
             f"--budget: positive multiples of the block size {BLOCK}, got {args.budget}")
        if args.no_hf:
            args.hf = []
        need(not args.hf or importlib.util.find_spec("transformers"),
             "the --hf baselines need transformers (pip install transformers), or pass --no-hf")
        need(args.kernel != "tilelang" or importlib.util.find_spec("tilelang"),
             "--kernel tilelang needs tilelang (pip install tilelang), or pass --kernel torch")
    for spec in args.hf if args.cmd == "e2e" else []:
        shape, *rest = spec.split(":")
        if shape not in M.SHAPES or len(rest) != 2 or not all(x.isdigit() and int(x) > 0 for x in rest):
            error(f"--hf {spec}: want shape:batch:context with a shape of {', '.join(M.SHAPES)}")
    if not torch.cuda.is_available():
        error("bench.py times GPU decode: it needs a CUDA GPU")
    t0 = time.time()
    if args.cmd == "kernel":
        bench_kernel(args)
    else:
        bench_e2e(args)
    print(f"# {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
