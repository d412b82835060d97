"""Benchmarks. `python bench.py kernel`: the paged block-sparse decode kernel (kernel_decode.py)
against dense SDPA and against its own dense mode, on random bf16 data, Qwen3-4B/8B attention
shapes (Hq 32, Hk 8, D 128). Times are medians of CUDA-graph replays (launch cost excluded, as
in a graph-captured decode step), each replay running the call on several page tables so that
the bytes of one call are not served from L2 by the previous one.
"""
import argparse
import math
import time

import torch

HQ, HK, D = 32, 8, 128
L2_BYTES = 200 << 20  # rotate inputs until one replay touches about 4x the 50 MB L2


def bench_graph(calls, warmup=25, rep=100):
    """Median µs of one call: capture all `calls` in one CUDA graph and time its replays."""
    import triton
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in calls:  # compile / autotune / allocate outside the capture
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    return ms * 1e3 / len(calls)


def copy_bandwidth():
    """GB/s of a 2 GB device-to-device copy, bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = bench_graph([lambda: dst.copy_(src)])
    return 2 * src.numel() * src.element_size() / us / 1e3


def select_blocks(B, nblk, sparsity, gen):
    """[B, HK, K] logical ids: the last block always, then the top of a random ranking."""
    k = max(1, round((1 - sparsity) * nblk))
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
                free = torch.cuda.mem_get_info()[0]
                if 2.3 * kv_bytes > free:  # pool + contiguous SDPA copy + slack
                    print(f"# skip S {S} batch {B} context {L}: needs {2.3 * kv_bytes / 2**30:.0f} "
                          f"GiB, {free / 2**30:.0f} free")
                    continue
                n_sets = max(1, min(16, math.ceil(L2_BYTES / kv_bytes)))
                P = max(B * nblk, math.ceil(L2_BYTES / page_bytes / 2))
                k_pages = torch.randn(P, S, HK, D, device="cuda", dtype=torch.bfloat16)
                v_pages = torch.randn_like(k_pages)
                tables = [torch.randperm(P, generator=gen, device="cuda")[:B * nblk]
                          .view(B, nblk).int() for _ in range(n_sets)]
                lengths = torch.full((B,), L, dtype=torch.int32, device="cuda")
                q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)

                # dense SDPA on contiguous KV [B, Hk, L, D]: the G query heads of a KV head
                # become G query rows (non-causal), so SDPA reads each KV head once
                sdpa_sets = tables[:max(1, min(n_sets, 4))]
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
                                                          blocks, splits=args.splits)
                base["dense"] = bench_graph([lambda i=i: call(i, None) for i in range(n_sets)])
                for sp in [None] + args.sparsity:  # None: the kernel's dense mode
                    if sp is None:
                        us, K = base["dense"], nblk
                    else:
                        blocks = [select_blocks(B, nblk, sp, gen) for _ in range(n_sets)]
                        us = bench_graph([lambda i=i: call(i, blocks[i]) for i in range(n_sets)])
                        K = blocks[0].shape[-1]
                    # K and V of the read pages, q in and out, block ids and page-table entries
                    must = 2 * B * K * page_bytes + 2 * q.numel() * 2 + 2 * B * HK * K * 4
                    row = dict(S=S, batch=B, context=L, sparsity=sp, us=us, gbs=must / us / 1e3)
                    row.update(pct=100 * row["gbs"] / copy_gbs, flash=base["flash"] / us,
                               cudnn=base["cudnn"] / us, dense=base["dense"] / us)
                    rows.append(row)
                    spt = "dense" if sp is None else f"{sp:.2f}"
                    print(f"{S:>8} {B:>8} {L:>8} {spt:>8} {us:>8.1f} {row['gbs']:>8.0f} "
                          f"{row['pct']:>8.1f} {row['flash']:>8.2f} {row['cudnn']:>8.2f} "
                          f"{row['dense']:>8.2f}", flush=True)
                del k_pages, v_pages, tables
                torch.cuda.empty_cache()
    if args.plot:
        plot(rows, args.plot, dev)
    return rows


def plot(rows, path, dev):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# --plot: matplotlib is not installed, no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["S"], r["batch"], r["context"]) for r in rows}):
        pts = [r for r in rows if (r["S"], r["batch"], r["context"]) == key and r["sparsity"] is not None]
        ax.plot([r["sparsity"] for r in pts], [r["flash"] for r in pts], marker="o",
                label=f"S {key[0]}, batch {key[1]}, {key[2] // 1024}K")
    ax.set(xlabel="sparsity", ylabel="speedup over dense SDPA (flash)", title=dev)
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"# wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernel", help="block-sparse paged decode kernel vs dense SDPA")
    k.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32], help="batch sizes")
    k.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 65536, 131072],
                   help="context lengths in tokens (multiples of the block size)")
    k.add_argument("--sparsity", type=float, nargs="+", default=[0, 0.5, 0.8, 0.9, 0.95],
                   help="fraction of blocks not read (the block of the new token is always read)")
    k.add_argument("--block", type=int, nargs="+", default=[64, 128], help="page/block sizes")
    k.add_argument("--splits", type=int, default=None, help="force the number of KV splits")
    k.add_argument("--plot", nargs="?", const="bench_kernel.png", default=None,
                   help="write a PNG of speedup vs sparsity (default bench_kernel.png)")
    args = parser.parse_args()
    t0 = time.time()
    if args.cmd == "kernel":
        bench_kernel(args)
    print(f"# {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
