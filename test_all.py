"""nanoseer tests. CPU tests compare against independent references (transformers' Qwen3,
float64 attention written here); GPU tests skip without CUDA. Without a GPU the Triton
kernels (kernel_step.py, train_gate.py) run in Triton's CPU interpreter, where triton is
installed (CI installs it).

    python -m pytest -q test_all.py

Sections, in order: the model and paged cache (model.py, generate.py; the step's Triton kernels
for them, kernel_step.py); the gate, pooled keys and selectors (gate.py; seer's kernels); the
CUDA-graph decode path; the decode kernel (kernel_decode.py); gate training (train_gate.py); the
tiny task and the shipped tiny model (tiny.py, tiny/).
"""
import argparse
import faulthandler
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():   # must precede the first import of triton (by kernel_step, train_gate)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gate as GT
import generate as gen
import kernel_decode
import kernel_step as KS
import model as M
import tiny
import train_gate as TG

HERE = os.path.dirname(os.path.abspath(__file__))
DEV = "cuda" if torch.cuda.is_available() else "cpu"   # where the Triton kernels run (on a CPU: the interpreter)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda_triton = pytest.mark.skipif(not torch.cuda.is_available() or TG.triton is None, reason="needs CUDA and Triton")
needs_triton = pytest.mark.skipif(KS.triton is None, reason="needs triton (without a GPU: its CPU interpreter)")
HAS_CUDA = torch.cuda.is_available() and kernel_decode.tilelang is not None
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and tilelang")


# ---- the model and paged cache (model.py, generate.py, and their kernels in kernel_step.py) ----

def make_hf_model(path, tied=False, hq=4, hk=2, d=64, layers=2, hidden=64, vocab=128, seed=0, shard=None,
                  peaked=False):
    """A small random Qwen3 saved by transformers itself (the independent reference). Norm weights
    away from 1 (so a missed norm shows) and larger projections; or, peaked, q_norm / k_norm weights
    raised so attention is peaked (a real signal for the gate; scaling q_proj / k_proj would not,
    the norms undo it)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hq, num_key_value_heads=hk, head_dim=d, tie_word_embeddings=tied,
                      max_position_embeddings=1024, rope_theta=10000.0, eos_token_id=vocab - 1)
    hf = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if peaked:
                if "q_norm" in name or "k_norm" in name:
                    p.fill_(2.0)
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "proj" in name:
                p.mul_(3.0)
    hf.save_pretrained(path, max_shard_size=shard) if shard else hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("tied,hq,hk,d,shard", [
    (False, 4, 4, 64, None), (True, 4, 2, 64, None), (False, 8, 2, 128, None), (True, 8, 2, 64, "100KB")])
def test_prefill_logits_match_transformers(tmp_path, tied, hq, hk, d, shard):
    hf = make_hf_model(tmp_path, tied=tied, hq=hq, hk=hk, d=d, shard=shard)
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = M.Qwen3.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 128, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
        assert (got - ref).abs().max() <= 1e-4
        # prefill through the paged cache gives the same last-token logits
        cache = M.PagedKVCache(ours.config, num_pages=8, page_size=16)
        last = ours.prefill(ids[0].tolist(), "a", cache)
        assert (last - ref[0, -1]).abs().max() <= 1e-4
    if tied and not shard:   # a tied checkpoint that also stores lm_head.weight: an equal copy loads as
        from safetensors.torch import load_file, save_file   # transformers loads it; another one is an error
        w = load_file(tmp_path / "model.safetensors")
        save_file({**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()}, tmp_path / "model.safetensors",
                  metadata={"format": "pt"})
        with torch.no_grad():
            ref = type(hf).from_pretrained(str(tmp_path)).float().eval()(ids).logits
            assert (M.Qwen3.from_pretrained(str(tmp_path))(ids) - ref).abs().max() <= 1e-4
        save_file({**w, "lm_head.weight": torch.randn_like(w["model.embed_tokens.weight"])},
                  tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match="different lm_head.weight"):
            M.Qwen3.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=cuda)])
def test_paged_greedy_matches_transformers_ragged_batch(tmp_path, dev, monkeypatch):
    """On CUDA: kernel_step's Triton kernels (RMSNorms, decode's projections, q/k norms and RoPE)
    and a CUDA-graph decode (float32, the PyTorch attention)."""
    monkeypatch.setattr(M, "decode_attention", M.decode_attention_ref)
    hf = make_hf_model(tmp_path, hq=4, hk=2, d=64)
    ours = M.Qwen3.from_pretrained(str(tmp_path), device=dev)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 127, (n,)).tolist() for n in (5, 23, 40)]
    n_new = 45
    hf.generation_config.eos_token_id = None                    # run the full 45 tokens
    cache = M.PagedKVCache(ours.config, num_pages=64, page_size=16, device=dev)
    got = gen.generate(ours, cache, prompts, n_new, graphs=dev == "cuda")   # no eos: 45 tokens each, crossing pages
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False)[0, len(p):].tolist() for p in prompts]
    assert got == refs
    assert len(cache.free) == 64 and not cache.pages             # every page came back
    # an eos that the first sequence meets at its 8th token: the batch shrinks while the rest decode on
    eos = refs[0][7]
    got = gen.generate(ours, cache, prompts, n_new, eos={eos}, graphs=dev == "cuda")
    assert got == [r[:r.index(eos) + 1] if eos in r else r for r in refs] and len({len(g) for g in got}) > 1
    assert len(cache.free) == 64 and not cache.pages
    # prompts that reach max_position_embeddings (1024) stop there: 2 new tokens and 1
    long = [torch.randint(0, 127, (n,)).tolist() for n in (1022, 1024)]
    cache = M.PagedKVCache(ours.config, num_pages=129, page_size=16, device=dev)
    got = gen.generate(ours, cache, long, n_new, graphs=dev == "cuda")
    assert [len(g) for g in got] == [2, 1] and len(cache.free) == 129
    assert got == [hf.generate(torch.tensor([p]), max_new_tokens=len(g), do_sample=False)[0, len(p):].tolist()
                   for p, g in zip(long, got)]


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=cuda)])
def test_sampling_draws_from_the_tempered_nucleus(dev):
    """generate.sample at temperature 0.7, top-p 0.9: 20,000 draws from fixed logits against a float64
    softmax(logits / T) kept to the smallest set of tokens whose mass reaches p (three of six: with
    two, some wrong draws have the right odds), renormalised; and at top-p 1 against the whole softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    T, p = 0.7, 0.9
    probs = (logits[0].double() / T).softmax(-1)
    keep, mass = torch.zeros(6, dtype=torch.bool), 0.0
    for i in probs.argsort(descending=True).tolist():
        keep[i], mass = True, mass + probs[i].item()
        if mass >= p:
            break
    want = torch.where(keep, probs, 0.0) / probs[keep].sum()
    draws = gen.sample(logits.to(dev), T, p, torch.Generator(dev).manual_seed(0))
    got = torch.bincount(draws.cpu(), minlength=6).double() / 20000
    assert keep.sum() == 3 and (got[~keep] == 0).all() and (got - want).abs().max() < 0.015, (got, want)
    draws = gen.sample(logits.to(dev), T, 1.0, torch.Generator(dev).manual_seed(1))   # top-p 1: all six
    got = torch.bincount(draws.cpu(), minlength=6).double() / 20000
    assert (got - probs).abs().max() < 0.015, (got, probs)
    assert torch.equal(gen.sample(logits[:3], 0.0, p, None), torch.zeros(3, dtype=torch.long))   # 0: greedy


def test_decode_equals_full_recompute_each_step_and_pages_are_reused(tmp_path):
    hf = make_hf_model(tmp_path, hq=8, hk=2, d=64)
    net = M.Qwen3.from_pretrained(str(tmp_path))
    cache = M.PagedKVCache(net.config, num_pages=6, page_size=8)
    torch.manual_seed(2)
    seqs = {"a": torch.randint(0, 128, (3,)).tolist(), "b": torch.randint(0, 128, (17,)).tolist()}
    for sid, ids in seqs.items():
        net.prefill(ids, sid, cache)
    for step in range(11):
        live = list(seqs)
        tokens = torch.randint(0, 128, (len(live),))
        for sid in live:
            cache.allocate(sid, len(seqs[sid]) + 1)            # the next page when one fills
        lengths = torch.tensor([len(seqs[s]) for s in live], dtype=torch.int32)
        logits = net.decode(tokens, cache.block_table(live), lengths, cache)
        tokens = tokens.tolist()
        for i, sid in enumerate(live):
            seqs[sid].append(tokens[i])
            with torch.no_grad():
                full = hf(torch.tensor([seqs[sid]])).logits[0, -1]        # transformers, no cache
            assert (logits[i] - full).abs().max() <= 1e-4, (step, sid)
        if step == 5:                      # "a" finishes; its pages return and "c" takes them
            freed = set(cache.pages["a"])
            cache.release("a")
            del seqs["a"]
            assert set(cache.free) >= freed
            seqs["c"] = torch.randint(0, 128, (9,)).tolist()
            net.prefill(seqs["c"], "c", cache)
            assert set(cache.pages["c"]) & freed and not set(cache.pages["c"]) & set(cache.pages["b"])
    assert len(cache.free) + sum(map(len, cache.pages.values())) == 6
    with pytest.raises(M.CacheFull, match="out of pages"):
        net.prefill(list(range(100)), "d", cache)


def reference_decode(q, k_pages, v_pages, table, lengths, blocks, scale):
    """Float64, one sequence and KV head at a time: gather the kept tokens, softmax, sum."""
    B, Hq, D = q.shape
    S, Hk = k_pages.shape[1], k_pages.shape[2]
    G = Hq // Hk
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        nblk = -(-n // S)
        for h in range(Hk):
            keep = range(nblk) if blocks is None else [int(j) for j in blocks[b, h] if 0 <= j < nblk]
            keep = torch.tensor(sorted(keep))
            pages = table[b, keep].long()                                   # [n_keep]
            pos = (keep[:, None] * S + torch.arange(S)).reshape(-1)         # token positions
            k = k_pages[pages, :, h].reshape(-1, D)[pos < n].double()      # [T, D]
            v = v_pages[pages, :, h].reshape(-1, D)[pos < n].double()
            qg = q[b, h * G:(h + 1) * G].double()                          # [G, D]
            out[b, h * G:(h + 1) * G] = torch.softmax(qg @ k.T * scale, -1) @ v
    return out



def test_rms_norm_rounds_as_transformers_does():
    """model.rms_norm equals transformers' Qwen3RMSNorm bit for bit in bf16 (normed in float32, cast
    back, then times the weight) and float32."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    torch.manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        hf = Qwen3RMSNorm(256, eps=1e-6).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(1 + 0.3 * torch.randn(256))
        x = (3 * torch.randn(7, 256)).to(dtype)
        assert torch.equal(M.rms_norm(x, hf.weight, 1e-6), hf(x)), dtype


def run_cli(*args, fails_with=None, env=None):
    """python *args in the repo's folder, a new process as a user runs it -> CompletedProcess. It must
    exit 0; or, given fails_with (a regex), stop on bad input as the scripts promise: a non-zero exit,
    the message on stderr, no traceback."""
    r = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, env=env, timeout=600)
    if fails_with is None:
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        assert r.returncode != 0 and re.search(fails_with, r.stderr) and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def run_script(capsys, script, *args):
    """`python script args` in this process (a new one is 3 s of imports), to its end or its
    SystemExit: (exit code, stdout, stderr with SystemExit's message, as Python would print it).
    Any other exception fails the caller, as a traceback would."""
    import bench
    name, *sub = script.split()
    capsys.readouterr()
    kept, code = M.decode_attention, 0                   # generate.main points it at the kernel (use_kernel)
    try:
        {"generate.py": gen.main, "train_gate.py": TG.main, "bench.py": bench.main, "tiny.py": tiny.main}[name](
            [*sub, *args])
    except SystemExit as stop:
        code = stop.code
    finally:
        M.decode_attention = kept
    out, err = capsys.readouterr()
    return code, out, err + (code if isinstance(code, str) else "")


def test_paged_reference_matches_float64_attention_and_ignores_nan_in_unwritten_slots():
    """decode_attention_ref, dense and sparse (GQA groups of 4), equals the float64 attention over
    the written tokens only: slots past a sequence's length (the rest of its last page, and the
    pages its table row is padded with) hold whatever was there, NaN here."""
    torch.manual_seed(13)
    B, Hq, Hk, D, S, P = 3, 8, 2, 16, 4, 12
    q = torch.randn(B, Hq, D)
    kp, vp = torch.randn(P, S, Hk, D), torch.randn(P, S, Hk, D)
    lengths = torch.tensor([1, 9, 14], dtype=torch.int32)
    table = torch.tensor([[0, 11, 11, 11], [1, 2, 3, 11], [4, 5, 6, 7]], dtype=torch.int32)   # 11: padding
    for b, n in enumerate(lengths.tolist()):
        last = table[b, (n - 1) // S]
        kp[last, n % S or S:], vp[last, n % S or S:] = float("nan"), float("nan")   # the last page's tail
    kp[11], vp[11] = float("nan"), float("nan")
    blocks = torch.tensor([[[-1, 0], [0, -1]], [[0, 2], [-1, 2]], [[1, 3], [0, 3]]], dtype=torch.int32)
    for sel in (None, blocks):
        out = M.decode_attention_ref(q, kp, vp, table, lengths, sel)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), reference_decode(q, kp, vp, table, lengths, sel, D ** -0.5),
                                   atol=1e-5, rtol=0)


def test_untied_model_saved_by_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path):
    """save_pretrained of an untied model (lm_head its own weight, in Hugging Face's layout: "lm_head.weight",
    not under "model."), weights cast to the dtype asked for: transformers loads it (no weight
    missing or re-initialised), its logits equal ours, and dtype="auto" loads the dtype stored."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    cfg = M.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                        max_position_embeddings=256, tie_word_embeddings=False)
    net = M.Qwen3.random(cfg, "cpu", torch.float32, seed=3)
    with torch.no_grad():
        net.lm_head.weight.mul_(20.0)                       # logits that differ by token
    net.save_pretrained(str(tmp_path / "f32"))
    with safe_open(str(tmp_path / "f32" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys() and "model.lm_head.weight" not in f.keys()
    hf, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.float32,
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
        assert ref.std() > 0.1 and (net(ids) - ref).abs().max() <= 1e-4
    net.save_pretrained(str(tmp_path / "bf16"), torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):   # config.json names the stored dtype
        assert AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype="auto").dtype == dtype, name


def test_model_generate_and_bench_bad_inputs_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.Qwen3.from_pretrained(str(tmp_path))
    make_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["X"]}))
    with pytest.raises(ValueError, match="not qwen3"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ValueError, match="shape"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64}))
    with pytest.raises(ValueError, match="config.json: config lacks vocab_size, intermediate_size"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, found a list"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "seerattn_gate_block_size": 16}))
    with pytest.raises(ValueError, match="is a gate folder: give it as --gate"):
        M.Qwen3.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="a file, not a folder"):
        M.Qwen3.from_pretrained(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors: cannot read it"):
        M.Qwen3.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(weights)
    net = M.Qwen3.from_pretrained(str(tmp_path))
    cache = M.PagedKVCache(net.config, 100, 16)
    with pytest.raises(ValueError, match="empty prompt"):
        net.prefill([], 0, cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        net.prefill([1] * 1025, 0, cache)
    run_cli("generate.py", "--model", str(tmp_path), "--prompt", "hi", fails_with="no tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{oops")
    code, _, err = run_script(capsys, "generate.py", "--model", str(tmp_path), "--prompt", "hi")
    assert code not in (0, None) and "tokenizer.json: cannot read it" in err, err
    word_tokenizer(tmp_path)                                            # 128 tokens
    with pytest.raises(ValueError, match="128 tokens, more than the model's vocab_size 100"):
        M.load_tokenizer(str(tmp_path), 100)
    g16 = os.path.join(HERE, "tiny", "gate-16")
    (tmp_path / "latin1.txt").write_bytes("hi\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "g").mkdir()
    (tmp_path / "e.jsonl").write_text('{"prompt": "x1 4", "answer": "1"}\n{"prompt": "", "answer": "1"}\n')
    (tmp_path / "ok.jsonl").write_text('{"prompt": "x1 4", "answer": "1"}\n')
    (tmp_path / "g" / "config.json").write_text(json.dumps({"seerattn_gate_block_size": "16"}))
    # flags checked before any work, each in one line (bench.py: before it looks for a GPU)
    cases = [("generate.py", "--top-p", "0", "--top-p in"), ("generate.py", "--temperature", "-1", "--temperature >= 0"),
             ("generate.py", "--temperature", "nan", "finite --temperature"),
             ("generate.py --task boxed --eval-attn dense", "--eval", str(tmp_path / "e.jsonl"), "record 2 is empty"),
             ("generate.py", "--prompts-file", str(tmp_path / "latin1.txt"), r"latin1.txt line 2: not UTF-8 text$"),
             ("generate.py", "--gate", str(tmp_path / "g"), "seerattn_gate_block_size '16' is not a positive integer"),
             ("generate.py", "--block-size", "0", "--block-size must be"),
             ("generate.py", "--eval-budgets", "64,x", "integers, comma-separated"),
             ("generate.py --task boxed --eval " + str(tmp_path / "ok.jsonl"), "--eval-blocks", "0",
              "--eval-blocks must be >= 1"),
             ("generate.py", "--device", "tpu", "--device tpu"), ("generate.py", "--device", "cuda:64", "GPUs$"),
             ("generate.py", "--device", "cpu:0", "--device cpu:0: give cpu"),
             ("generate.py", "--kv-memory-fraction", "0", r"--kv-memory-fraction must be in \(0, 1\)"),
             ("generate.py", "--num-pages", str(10 ** 14), "does not fit in memory: lower --num-pages "),  # 4.9 EB
             ("generate.py", "--num-pages", "-3", "--num-pages must be >= 1, or 0"),
             ("generate.py --num-pages 9", "--kv-memory-fraction", "0.5", "both size the KV pool: give one"),
             ("generate.py --model " + str(tmp_path), "--attn", "seer", "--attn seer needs gates"),
             ("generate.py --eval /dev/null", "--budget", "64", "--eval takes --eval-attn"),
             ("generate.py --eval /dev/null", "--prompt", "hi", "--eval runs the prompts of its .jsonl"),
             ("generate.py --no-think", "", "", "give --chat too"),
             ("generate.py --attn dense", "--budget", "0", "choose blocks for a sparse --attn"),
             ("generate.py --attn dense", "--threshold", "0", "choose blocks for a sparse --attn"),
             ("generate.py --gate " + g16, "--gate", g16, "both for block size 16: give one"),
             ("bench.py e2e", "--hf", "qwen3-8b:8", "--hf qwen3-8b:8"),
             ("bench.py e2e", "--budget", "100", "--budget: positive multiples"),
             ("bench.py kernel", "--sparsity", "1", r"--sparsity: fractions in \[0, 1\)"),
             ("bench.py kernel", "--splits", "33", r"--splits: \d+ to 32 here"),
             ("bench.py kernel", "--context", "1048576", "at most 8192 blocks per sequence"),
             ("bench.py kernel", "--plot", "/nonexistent/x.png", "error: --plot"),
             ("bench.py kernel", "--context", "0", "--context: positive multiples"),
             ("bench.py e2e", "--context", "0", "--context, --steps and --hf-steps must be >= 1"),
             ("generate.py", "--eval", str(tmp_path), "is a directory"),   # files: a pipe or device reads as one
             ("generate.py", "--prompts-file", "/dev/null", "holds no prompt"), ("generate.py", "--eval", "/dev/null",
                                                                                 "no records")]
    if not torch.cuda.is_available():
        cases += [("generate.py", "--device", "cuda", "machine's 0 GPUs"), ("bench.py kernel", "", "", "a CUDA GPU"),
                  ("generate.py", "--kv-memory-fraction", "0.5", "--num-pages on cpu")]
    for script, flag, value, msg in cases:
        code, _, err = run_script(capsys, script, *([flag, value] if flag else []))
        assert code not in (0, None) and re.search(msg, err), (script, flag, value, err)


def test_bench_byte_floor_counts_the_published_qwen3_sizes():
    """bench.py's floor (every "x floor" it prints) from published numbers: Qwen3-8B has 8,190,735,360
    parameters, 4B 4,022,468,096 with lm_head tied to the embedding table; a gate per layer is Wq
    [Hk, G, D, Dg], Wk [Hk, 3D, Dg] and two norms [Dg]. As in bench.py, the models carry gates in
    dense rows too (not read there). Built on the meta device: no memory."""
    import bench

    def meta(shape):
        with torch.device("meta"):
            net = M.Qwen3(M.Qwen3Config(**M.SHAPES[shape])).to(torch.bfloat16)
        return GT.attach_gates(net, block_size=64)

    B, L, Hk, D, ctx, S, Dg = 8, 36, 8, 128, 32768, 64, 128
    kv = B * L * Hk * ctx * 2 * D * 2                                   # K and V of every token, bf16
    emb8 = 151_936 * 4096
    net8 = meta("qwen3-8b")
    assert bench.step_bytes(net8, B, ctx, 0.0, S, False) == 2 * (8_190_735_360 - emb8) + kv
    assert bench.step_bytes(meta("qwen3-4b"), B, ctx, 0.0, S, False) == 2 * 4_022_468_096 + kv
    gates = L * (Hk * 4 * D * Dg + Hk * 3 * D * Dg / S + 2 * Dg)        # Wk read once a page fills
    gate_keys = B * L * Hk * (ctx // S) * Dg * 2
    assert bench.step_bytes(net8, B, ctx, 0.875, S, True) == 2 * (8_190_735_360 - emb8 + gates) + kv / 8 + gate_keys


def test_eos_ids_take_every_id_of_a_list_and_fall_back_to_config_json(tmp_path):
    """Qwen3's generation_config.json lists two EOS ids (<|im_end|>, <|endoftext|>): both end a sequence."""
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert gen.eos_ids(str(tmp_path)) == {7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert gen.eos_ids(str(tmp_path)) == {151645, 151643}


def test_encode_takes_a_prompt_of_max_position_embeddings_tokens(tmp_path):
    word_tokenizer(tmp_path)
    tok = M.load_tokenizer(str(tmp_path))
    name = lambda i: f"prompt [{i}]"
    assert gen.encode(tok, ["w1 " * 16], 16, name) == [[1] * 16]
    with pytest.raises(ValueError, match=r"prompt \[1\] has 17 tokens, past the model's max_position_embeddings 16"):
        gen.encode(tok, ["w1", "w1 " * 17], 16, name)


def test_boxed_scoring_takes_the_last_boxed_answer_of_each_side():
    """--task boxed: the last \\boxed{} of the output (nested braces kept) against the record's answer,
    itself unboxed when written as \\boxed{...}; spaces ignored."""
    assert gen.boxed(r"try \boxed{3}, no: \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert gen.boxed("no box") is None and gen.boxed(r"\boxed{open") is None
    for answer in ("42", r"\boxed{42}", r"so \boxed{4 2}"):
        assert gen.score("boxed", {"answer": answer}, r"first \boxed{7} then \boxed{ 42 }") == (True, 0, 0), answer
        assert gen.score("boxed", {"answer": answer}, r"\boxed{42} then \boxed{7}") == (False, 0, 0), answer


def test_kv_pool_for_a_huge_max_new_tokens_is_what_generate_can_use():
    """The pool holds what generate lets a sequence have: its prompt and new tokens up to
    max_position_embeddings (one new token at least), not --max-new-tokens' worth."""
    assert gen.pages_needed([[1] * 10, [1] * 1000], 10 ** 9, 16, 1024) == 2 * 64
    assert gen.pages_needed([[1] * 1024], 10 ** 9, 16, 1024) == 65        # 1024 + 1 positions
    assert gen.pages_needed([[1] * 10, [1] * 20], 7, 16, 1024) == 2 + 2
    cfg = M.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    net, prompts = M.Qwen3(cfg).eval(), [[1] * 10, [2] * 40]
    with torch.no_grad():                                                 # 64 positions each: 4 + 4 pages
        out = gen.generate(net, M.PagedKVCache(cfg, 8, 16), prompts, 10 ** 9)
        assert [len(o) for o in out] == [54, 24]
        with pytest.raises(M.CacheFull):
            gen.generate(net, M.PagedKVCache(cfg, 7, 16), prompts, 10 ** 9)


def test_generate_takes_a_single_gates_block_size_and_flags_unknown_words(capsys):
    """The shipped model with one --gate and no --block-size decodes at that gate's block size; a
    word its tokenizer does not know is reported, not silently read as <pad>."""
    code, out, err = run_script(capsys, "generate.py", "--gate", os.path.join(HERE, "tiny", "gate-32"), "--prompt",
                                "x1 4 hello", "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0 and "attn seer block 32 budget 512" in out, (out, err)
    assert "1 prompt word(s) not in the tokenizer's vocabulary, read as <pad>" in err, err
    code, out, err = run_script(capsys, "generate.py", "--model", os.path.join(HERE, "tiny"), "--gate",
                                os.path.join(HERE, "tiny", "gate-32"), "--budget", "64", "--prompt", "x1 4",
                                "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0 and "attn seer block 32 budget 64" in out, (out, err)   # --gate: seer unless --attn says


def test_help_shows_each_flags_default_once(capsys, monkeypatch):
    """Every script's --help (model.CLIHelp): each flag with a default shows it once, added as
    "(default: x)" unless the help text already speaks of its default, and never for an unset one."""
    parsers, format_help = [], argparse.ArgumentParser.format_help
    monkeypatch.setattr(argparse.ArgumentParser, "format_help", lambda self: parsers.append(self) or format_help(self))
    for script in ("generate.py", "train_gate.py", "bench.py e2e", "bench.py kernel", "tiny.py pretrain",
                   "tiny.py data"):
        code, out, _ = run_script(capsys, script, "--help")
        entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", out)[1:]]   # one flag each, unwrapped
        assert code == 0 and len(entries) >= 3, out
        for a in parsers[-1]._actions:
            if a.help == argparse.SUPPRESS or not a.option_strings or a.default == argparse.SUPPRESS:
                continue
            entry, = [e for e in entries if re.match(re.escape(a.option_strings[0]) + r"(?=[\s,]|$)", e)]
            added = entry.count("(default: ") - a.help.count("(default: ")
            if a.default in (None, []) or a.default is False or "default" in a.help:   # unset, or stated
                assert added == 0, (script, entry)
            else:
                assert added == 1 and f"(default: {a.default})" in entry, (script, entry)


def word_tokenizer(path):
    """A word-level tokenizer.json in path for make_hf_model's vocab of 128: w0 .. w126, then
    <|endoftext|> (id 127, the model's EOS, and the separator train_gate.py packs between documents)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<|endoftext|>": 127}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(os.path.join(path, "tokenizer.json"))


def test_chat_and_no_think_give_qwen3s_template(tmp_path, capsys, monkeypatch):
    """--chat wraps the prompt in Qwen3's chat template (one user turn, the assistant's turn opened);
    --no-think adds the empty think block that Qwen3's template writes for enable_thinking=False.
    The strings are written out here, and checked on what generate.py hands the tokenizer."""
    turn = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    make_hf_model(tmp_path)
    word_tokenizer(tmp_path)
    seen, encode = [], gen.encode
    monkeypatch.setattr(gen, "encode", lambda tok, texts, *a: (seen.append(list(texts)), encode(tok, texts, *a))[1])
    for flags, want in ((["--chat"], turn), (["--chat", "--no-think"], turn + "<think>\n\n</think>\n\n")):
        code, _, err = run_script(capsys, "generate.py", "--model", str(tmp_path), "--prompt", "hi", *flags,
                                  "--max-new-tokens", "1", "--device", "cpu", "--dtype", "float32")
        assert code in (0, None) and seen[-1] == [want], (flags, err, seen)


def test_prompts_file_prints_each_prompts_greedy_text_under_its_header_and_stops_a_row_at_eos(tmp_path, capsys):
    """Three prompts from --prompts-file, decoded together: each printed under '--- [i] prompt' in file
    order, equal to transformers' greedy continuation; generation_config.json's EOS (not config.json's)
    ends prompt 0 early (at a token no other row meets), while the others run to --max-new-tokens."""
    hf = make_hf_model(tmp_path)
    word_tokenizer(tmp_path)
    prompts = ["w1 w2 w3", "w10 w11", "w20 w21 w22 w23 w24"]
    ids = [[int(w[1:]) for w in p.split()] for p in prompts]
    hf.generation_config.eos_token_id = None
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist() for p in ids]
    n0 = next(i for i in range(1, 7) if refs[0][i] not in refs[0][:i] + refs[1] + refs[2] + [127])
    eos = refs[0][n0]                                  # prompt 0's (n0+1)-th token, met by no other row
    gc = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": eos}))
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    code, out, err = run_script(capsys, "generate.py", "--model", str(tmp_path), "--prompts-file",
                                str(tmp_path / "prompts.txt"), "--max-new-tokens", "8", "--block-size", "4",
                                "--device", "cpu", "--dtype", "float32")
    assert code in (0, None), err
    want = [refs[0][:n0 + 1], refs[1], refs[2]]
    word = lambda t: "<|endoftext|>" if t == 127 else f"w{t}"          # word_tokenizer's vocabulary
    blocks = "".join(f"--- [{i}] {p!r}\n{' '.join(map(word, w))}\n" for i, (p, w) in enumerate(zip(prompts, want)))
    assert blocks in out, out
    assert f"generated tokens {n0 + 17} |" in out and "ended by EOS 1 of 3]" in out, out


def test_report_line_counts_prompt_and_new_tokens_and_the_decode_rate_after_the_first_tokens(tmp_path, capsys,
                                                                                           monkeypatch):
    """run() replaced: outputs of 4 (the last EOS) and 2 tokens, 2.0 s in all, first tokens at 0.5 s ->
    6 tokens generated, (6 - 2) / 1.5 = 2.7 tokens/s decoded after the first ones, 1 of 2 ended by EOS."""
    make_hf_model(tmp_path)
    word_tokenizer(tmp_path)
    monkeypatch.setattr(gen, "run", lambda *a, **k: ([[5, 6, 7, 127], [8, 9]], 0.0, 2.0, 0.5))
    code, out, err = run_script(capsys, "generate.py", "--model", str(tmp_path), "--prompt", "w1 w2", "--prompt",
                                "w3 w4 w5", "--device", "cpu")
    assert code in (0, None), err
    assert ("[prompt tokens 5 | first tokens after 0.5 s | generated tokens 6 | decode 2.7 tokens/s | attn dense | "
            "sparsity 0.0% | ended by EOS 1 of 2]") in out, out


def test_seed_reproduces_and_changes_sampled_text(tmp_path, capsys):
    make_hf_model(tmp_path)
    word_tokenizer(tmp_path)

    def sampled(seed):
        code, out, err = run_script(capsys, "generate.py", "--model", str(tmp_path), "--prompt", "w1 w2 w3",
                                    "--max-new-tokens", "24", "--temperature", "1.0", "--seed", str(seed),
                                    "--device", "cpu", "--dtype", "float32")
        assert code in (0, None), err
        return out.split("\n")[0]
    a, b, c = sampled(1), sampled(1), sampled(2)
    assert a == b and a != c, (a, c)


def test_generate_cli_streams_and_reports(tmp_path):
    make_hf_model(tmp_path, vocab=128)
    word_tokenizer(tmp_path)
    r = run_cli("generate.py", "--model", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", "12",
                "--block-size", "4", "--dtype", "float32")
    assert re.search(r"prompt tokens 3 \| first tokens after [\d.]+ s \| generated tokens 12 \| decode [\d.]+ tokens/s",
                     r.stdout), r.stdout
    # the streamed text is transformers' greedy continuation of the same folder
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=12, do_sample=False)[0, 3:].tolist()
    assert r.stdout.split("\n")[0].split() == [f"w{t}" for t in want], r.stdout
    run_cli("generate.py", "--model", str(tmp_path), "--prompt", "w1", "--prompt", "w5 w6", "--max-new-tokens", "5",
            "--temperature", "0.8", "--top-p", "0.9", "--num-pages", "1", "--block-size", "4",
            fails_with="out of pages")


def rms_norm64(x, w, eps):
    """RMS norm over the last dim with weight w, in float64."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.double()


def rel_err(out, ref):
    """The largest relative error of one output vector (a row, or a sequence's query head): one norm
    over the whole tensor would hide a wrong long sequence behind the larger outputs of short ones."""
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def rope64(x, pos, theta):
    """Rotate-half RoPE written out in float64, pair (i, i + n/2) turned by pos * theta^(-2i/n)."""
    n = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, n, 2, dtype=torch.float64, device=x.device) / n)
    c, s = ang.cos(), ang.sin()
    a, b = x[..., : n // 2], x[..., n // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


@needs_triton
@pytest.mark.parametrize("N,K", [(100, 300), (6144 + 40, 520), (16384 + 96, 130)])   # each tile shape, ragged
def test_linear_kernel_matches_float64(N, K):
    """kernel_step.linear_kernel (a few rows times a weight, one Triton kernel; also its silu(gate) * up
    form) against float64 at 1, 5 and 16 rows, N and K not multiples of the tiles. On a GPU also
    bf16 / fp16 (the CPU interpreter cannot dot them)."""
    torch.manual_seed(N)
    cuda = torch.cuda.is_available()
    w64 = torch.randn(N, K, device=DEV, dtype=torch.float64) / math.sqrt(K)
    for dtype, tol in [(torch.float32, 1e-5)] + [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)] * cuda:
        w = w64.to(dtype)
        for rows in (1, 5, 16):
            x = torch.randn(rows, K, device=DEV, dtype=torch.float64).to(dtype)
            ref = x.double() @ w.double().T
            gate, up = ref.chunk(2, -1)
            for glu, want in ((False, ref), (True, torch.nn.functional.silu(gate) * up)):   # N / 2 gate, up rows
                out = KS.linear_kernel(x, w, glu)
                assert out.dtype == dtype and out.shape == want.shape
                assert rel_err(out, want) < tol, (dtype, rows, glu)


@cuda_triton
def test_linear_hands_no_grad_calls_of_at_most_16_rows_to_the_kernel_on_a_gpu():
    """model.linear's choice on a GPU, with the real kernel: no-grad bf16 calls of <= 16 rows go to
    linear_kernel, 17 rows or autograd on to cuBLAS (the next test checks the choice on any machine)."""
    torch.manual_seed(0)
    K, N = 520, 6144 + 40
    w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).bfloat16()
    x = torch.randn(2, 8, 1, K, device="cuda").bfloat16()                 # 16 rows: the kernel
    with torch.no_grad():
        assert torch.equal(M.linear(x, w), KS.linear_kernel(x.view(16, K), w).view(2, 8, 1, N))
        x17 = torch.randn(17, K, device="cuda").bfloat16()                 # 17 rows: cuBLAS
        assert torch.equal(M.linear(x17, w), torch.nn.functional.linear(x17, w))
        assert torch.equal(M.linear(x, w, glu=True), KS.linear_kernel(x.view(16, K), w, True).view(2, 8, 1, N // 2))
    assert torch.equal(M.linear(x[0], w), torch.nn.functional.linear(x[0], w))   # autograd on: cuBLAS


def test_linear_hands_only_decode_sized_calls_to_the_kernel(monkeypatch):
    """model.linear's choice on any machine, the kernel replaced by a recorder and every tensor taken
    as the kernels': bf16 / fp16 calls of <= 16 rows (any leading shape) go to linear_kernel, the
    rest to F.linear; results keep the caller's shape. (On a GPU the test above also checks the
    real kernel's calls, and that calls with autograd on stay off it.)"""
    calls = []

    def kernel(x, w, glu=False):
        calls.append((x.shape[0], glu))
        y = torch.nn.functional.linear(x, w)
        return M.silu_mul(*y.chunk(2, -1)) if glu else y
    monkeypatch.setattr(M, "on_triton", lambda x: True)
    monkeypatch.setattr(KS, "linear_kernel", kernel)
    w = torch.randn(64, 32).bfloat16()
    for shape, dtype, glu, want in [((2, 8, 1, 32), torch.bfloat16, False, [(16, False)]),
                                    ((5, 32), torch.float16, True, [(5, True)]), ((17, 32), torch.bfloat16, False, []),
                                    ((4, 32), torch.float32, False, [])]:
        calls.clear()
        x, wt = torch.randn(shape).to(dtype), w.to(dtype)
        y = M.linear(x, wt, glu)
        assert calls == want, (shape, dtype, glu)
        assert y.shape == (*shape[:-1], 32 if glu else 64) and y.dtype == dtype


@needs_triton
@pytest.mark.parametrize("H", [256, 2600])
def test_rms_norm_kernel_matches_float64_with_and_without_the_residual_add(H):
    """kernel_step.rms_norm_kernel (one program a row) against float64: (x + residual) / rms * weight, and
    the sum it returns for the next layer's residual."""
    torch.manual_seed(H)
    cuda = torch.cuda.is_available()
    for dtype, tol in [(torch.float32, 1e-5)] + [(torch.bfloat16, 1e-2)] * cuda:
        x, res = (torch.randn(5, H, device=DEV).to(dtype) for _ in range(2))
        w = (1 + 0.3 * torch.randn(H, device=DEV)).to(dtype)
        for residual in (None, res):
            out, s = KS.rms_norm_kernel(x, residual, w, 1e-6)
            s64 = x.double() + (0 if residual is None else residual.double())
            want = rms_norm64(s64, w, 1e-6)
            assert out.dtype == dtype and rel_err(out, want) < tol, (dtype, H)
            assert s is None if residual is None else rel_err(s, s64) < tol


@needs_triton
def test_rms_norm_kernel_on_rows_near_eps():
    """kernel_step.rms_norm_kernel on rows whose mean square is about eps (with and without the
    residual add): the float64 RMS norm with eps; a zero row stays zero."""
    torch.manual_seed(15)
    x, res = 1e-3 * torch.randn(4, 256, device=DEV), 1e-3 * torch.randn(4, 256, device=DEV)
    x[3], res[3] = 0.0, 0.0
    w = 1 + 0.3 * torch.randn(256, device=DEV)
    for residual in (None, res):
        out, _ = KS.rms_norm_kernel(x, residual, w, 1e-6)
        s64 = x.double() + (0 if residual is None else residual.double())
        assert rel_err(out[:3], rms_norm64(s64[:3], w, 1e-6)) < 1e-5 and (out[3] == 0).all()


@needs_triton
@pytest.mark.parametrize("hq,hk,D", [(4, 2, 64), (6, 2, 128)])
def test_qk_norm_rope_kernel_matches_float64_and_writes_the_page_slots(hq, hk, D):
    """kernel_step.qk_norm_rope_kernel (one Triton kernel: QK RMSNorm, RoPE, K and V into their page
    slots, each query head's gate-query share) against the same steps in float64: per-head RMS
    norm times the weight, then RoPE at each token's position; K (post-RoPE) and V land in the
    given slots and nowhere else; the share is the normed query head @ its slice of the gate's
    Wq. 21 tokens: making shares, the kernel takes 16 a program (the second one's mostly masked),
    else one. Pages and Wq together (decode) give the same outputs, and leave slot 0 alone."""
    torch.manual_seed(D)
    N, P, S, theta, eps = 21, 4, 8, 1e4, 1e-6
    qkv = (3 * torch.randn(N, (hq + 2 * hk) * D, device=DEV)).bfloat16()
    q_norm, k_norm = (torch.empty(D, device=DEV).uniform_(0.5, 1.5).bfloat16() for _ in range(2))
    pos = torch.tensor([0, 3, 17, 100, 4000] + list(range(200, 216)), device=DEV)
    cos, sin = M.cos_sin(pos, D, theta, torch.bfloat16)

    def run(slots=None, wq=None):   # -> q, k, qr, kr, v, shares; given slots, into fresh pages of 7s
        if slots is None:
            return KS.qk_norm_rope_kernel(qkv, q_norm, k_norm, cos, sin, hq, hk, eps, wq=wq)
        k_pages, v_pages = (torch.full((P, S, hk, D), 7.0, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        outs = KS.qk_norm_rope_kernel(qkv, q_norm, k_norm, cos, sin, hq, hk, eps, k_pages, v_pages, slots, wq)
        k_flat, v_flat = k_pages.view(-1, hk, D), v_pages.view(-1, hk, D)
        assert torch.equal(k_flat[slots], outs[3]) and torch.equal(v_flat[slots], outs[4])   # kr, v
        others = torch.ones(P * S, dtype=torch.bool, device=DEV)
        others[slots] = False
        assert (k_flat[others] == 7).all() and (v_flat[others] == 7).all()
        return outs

    q, k, qr, kr, v, none = run(torch.randperm(P * S, device=DEV)[:N])
    x = qkv.double().view(N, hq + 2 * hk, D)
    q64, k64 = rms_norm64(x[:, :hq], q_norm, eps), rms_norm64(x[:, hq:hq + hk], k_norm, eps)
    at = pos.double()[:, None, None]
    for got, want in ((q, q64), (k, k64), (qr, rope64(q64, at, theta)), (kr, rope64(k64, at, theta))):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-2   # bf16: ~2 ulps
    assert torch.equal(v, x[:, hq + hk:].bfloat16()) and none is None                # V: qkv's last hk heads
    wq = GT.AttnGate(hk, hq // hk, D, 32, S, True, theta).to(DEV, torch.bfloat16).attngate_linear_q.weight
    want = torch.einsum("nhd,hde->nhe", q.double(), wq.double().view(hq, D, 32))   # of the bf16 normed q
    for slots in (None, 1 + torch.randperm(P * S - 1, device=DEV)[:N]):   # no cache; decode (slot 0 never given)
        *outs, shares = run(slots, wq)                                    # 16 tokens a program
        assert all(torch.equal(a, b) for a, b in zip(outs, (q, k, qr, kr, v)))
        assert shares.dtype == torch.float32 and torch.allclose(shares.double(), want, rtol=1e-5, atol=1e-5)


# ---- the gate, pooled keys and selectors (gate.py, and kernel_step.seer_pick) ----

def gate_scores64(gate, q, k):
    """SPEC §3 written out in float64 on the CPU from the gate's weights: q [T, Hq, D], k [T, Hk, D]
    pre-RoPE -> scores [T, Hk, NB] over the complete blocks before each row's own block, -inf
    elsewhere. The gate query: the group's heads through Wq, RMS-normed, RoPE at t; a block's key:
    [max | min | mean] of its keys through Wk, RMS-normed, RoPE at its first token."""
    Wq, Wk = (w.detach().double().cpu() for w in (gate.attngate_linear_q.weight, gate.attngate_linear_k.weight))
    hk, g, d, dg = Wq.shape
    T, S, theta = q.shape[0], gate.block_size, gate.rope_theta
    nb = T // S
    gq = torch.einsum("thgd,hgde->the", q.detach().double().cpu().view(T, hk, g, d), Wq)    # [T, Hk, Dg]
    blocks = k.detach().double().cpu()[:nb * S].view(nb, S, hk, d)
    gk = torch.einsum("jhc,hce->jhe", torch.cat([blocks.amax(1), blocks.amin(1), blocks.mean(1)], -1), Wk)
    if gate.qnorm_weight is not None:
        gq, gk = (rms_norm64(x, w.detach().cpu(), 1e-6) for x, w in ((gq, gate.qnorm_weight), (gk, gate.knorm_weight)))
    gq = rope64(gq, torch.arange(T, dtype=torch.float64)[:, None, None], theta)
    gk = rope64(gk, (S * torch.arange(nb, dtype=torch.float64))[:, None, None], theta)   # [NB, Hk, Dg]
    s = torch.einsum("the,jhe->thj", gq, gk) / math.sqrt(dg)
    visible = torch.arange(nb)[None, :] < (torch.arange(T) // S)[:, None]                 # [T, NB]
    return s.masked_fill(~visible[:, None, :], float("-inf"))


def test_gate_scores_match_explicit_float64_computation():
    """Training's gate scores (train_gate.gate_logits over the gate's block keys) against float64."""
    torch.manual_seed(4)
    hk, g, d, dg, S, T = 2, 3, 16, 8, 4, 19
    gate = GT.AttnGate(hk, g, d, dg, S, use_qk_norm=True, rope_theta=100.0).double()
    with torch.no_grad():
        gate.attngate_qnorm.weight.uniform_(0.5, 1.5)
        gate.attngate_knorm.weight.uniform_(0.5, 1.5)
    q, k = torch.randn(T, hk * g, d, dtype=torch.float64), torch.randn(T, hk, d, dtype=torch.float64)
    got = TG.gate_logits(gate, q, torch.arange(T), gate.block_keys(k)).detach().double()
    want = gate_scores64(gate, q, k)
    assert torch.equal(got.isinf(), want.isinf()) and got.isinf().any() and not got.isinf().all()
    assert (got - want)[~want.isinf()].abs().max() < 1e-5       # (RoPE angles are float32, as in HF)


def gated_model(path, hq=4, hk=2, d=32, seed=0):
    make_hf_model(path, hq=hq, hk=hk, d=d, seed=seed)
    net = M.Qwen3.from_pretrained(str(path))
    torch.manual_seed(seed)
    GT.attach_gates(net, dg=16, block_size=8)
    return net


DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]   # on CUDA, seer's decode runs kernel_step.py's Triton kernels


@pytest.mark.parametrize("dev", DEVICES)
def test_pooled_keys_incremental_decode_equal_prefill(tmp_path, dev, monkeypatch):
    """The pooled keys a decode builds token by token equal those a prefill of the same tokens pools at
    once, and both equal float64 stats taken straight from the keys in the pages (seer pools
    pre-RoPE keys: RoPE undone in float64; quest the post-RoPE keys as stored). The gate's own math
    is checked against float64 in test_gate_scores_match_explicit_float64_computation."""
    monkeypatch.setattr(M, "decode_attention", M.decode_attention_ref)   # float32 here: not the TileLang kernel
    net = gated_model(tmp_path).to(dev)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (29,)).tolist()
    for attn, budget in (("seer", 256), ("quest", 256)):   # full budget: decode keys equal prefill keys
        cache = M.PagedKVCache(net.config, 16, 8, dev)
        sel = GT.Selector(attn, net, cache, budget)
        net.prefill(ids, "p", cache, sel)                    # all 29 tokens at once
        net.prefill(ids[:3], "d", cache, sel)                # 3, then 26 decode steps
        cache.allocate("d", len(ids))
        for n, t in enumerate(ids[3:], start=3):
            net.decode(torch.tensor([t], device=dev), cache.block_table(["d"]),
                       torch.tensor([n], dtype=torch.int32, device=dev), cache, sel)
        for name, buf in cache.pooled.items():
            pp, pd = cache.pages["p"], cache.pages["d"]
            n = 3 if name == "gate_k" else 4                 # gate keys exist for full pages only
            assert torch.allclose(buf[:, pp[:n]], buf[:, pd[:n]], atol=1e-5 if dev == "cpu" else 1e-4), name
        k = cache.k[:, cache.pages["p"]].double().flatten(1, 2)[:, :29].cpu()     # [L, 29, Hk, D] post-RoPE
        if attn == "seer":
            k = rope64(k, -torch.arange(29.0, dtype=torch.float64)[:, None, None], net.config.rope_theta)   # back
        want = [torch.stack([f(k[:, j * 8:(j + 1) * 8], 1) for j in range(4)], 1)  # [L, 4 blocks, Hk, D]
                for f in (torch.amax, torch.amin, torch.sum)]
        names = ("kmax", "kmin", "ksum") if attn == "seer" else ("rope_kmax", "rope_kmin")
        for name, w in zip(names, want):
            got = cache.pooled[name][:, cache.pages["p"]].double().cpu()
            assert (got - w).abs().max() <= 1e-4 * (1 + w.abs().max()), (attn, name)


def greedy(net, prompts, attn, budget=None, n=40, page=8):
    cache = M.PagedKVCache(net.config, 64, page)
    sel = GT.Selector(attn, net, cache, budget)
    return gen.generate(net, cache, prompts, n, select=sel), sel


def test_seer_pooled_stats_restart_on_a_reused_page(tmp_path):
    """A sequence decoding into pages another sequence used and released: each page's running max /
    min / sum are those of its new keys only (float64, from the keys in the pages, RoPE undone)."""
    net = gated_model(tmp_path)
    torch.manual_seed(17)
    cache = M.PagedKVCache(net.config, 5, 8)                           # 5 pages: the second sequence reuses them
    sel = GT.Selector("seer", net, cache, 16)

    def run(sid, ids, n0):
        net.prefill(ids[:n0], sid, cache, sel)
        cache.allocate(sid, len(ids))
        for n in range(n0, len(ids)):
            net.decode(torch.tensor([ids[n]]), cache.block_table([sid]), torch.tensor([n], dtype=torch.int32),
                       cache, sel)
    run("a", torch.randint(0, 128, (40,)).tolist(), 3)
    cache.release("a")
    run("b", torch.randint(0, 128, (29,)).tolist(), 3)
    pages = cache.pages["b"]
    k = cache.k[:, pages].double().flatten(1, 2)[:, :29]                # [L, 29, Hk, D] post-RoPE
    k = rope64(k, -torch.arange(29.0, dtype=torch.float64)[:, None, None], net.config.rope_theta)
    for name, f in (("kmax", torch.amax), ("kmin", torch.amin), ("ksum", torch.sum)):
        want = torch.stack([f(k[:, j * 8:(j + 1) * 8], 1) for j in range(4)], 1)
        got = cache.pooled[name][:, pages].double()
        assert (got - want).abs().max() <= 1e-4 * (1 + want.abs().max()), name


def test_kv_pool_from_a_byte_budget_fills_it_without_passing_it(tmp_path):
    """generate.pages_in_memory (--kv-memory-fraction's pool size) against the bytes the cache and
    each selector's pooled keys then allocate, its scratch page included: they fit the budget, one
    more page would not."""
    net = gated_model(tmp_path)
    budget = 3 << 20
    for attn in ("dense", "seer", "quest"):
        n = gen.pages_in_memory(net, budget, 8, torch.float32, attn)
        cache = M.PagedKVCache(net.config, n, 8)
        GT.Selector(attn, net, cache, None if attn == "dense" else 16)
        held = sum(t.numel() * t.element_size() for t in [cache.k, cache.v, *(cache.pooled or {}).values()])
        per_page = held / (n + 1)                                  # (+ 1: the scratch page)
        assert held <= budget < held + per_page, attn


def test_sparse_selectors_with_full_budget_equal_dense(tmp_path):
    net = gated_model(tmp_path)
    torch.manual_seed(6)
    prompts = [torch.randint(0, 127, (n,)).tolist() for n in (6, 30)]
    dense, _ = greedy(net, prompts, "dense")
    for attn in ("seer", "quest", "oracle", "window"):
        out, sel = greedy(net, prompts, attn, budget=128)
        assert out == dense, attn
        assert sel.sparsity() == pytest.approx(0.0, abs=1e-12)
    out, sel = greedy(net, prompts, "seer", budget=8)      # a real budget reads less
    assert sel.sparsity() > 0.3


def test_oracle_picks_blocks_of_highest_true_attention_quest_bounds_qk_and_window_the_latest(tmp_path):
    net = gated_model(tmp_path, hq=8, hk=2)
    torch.manual_seed(7)
    cache = M.PagedKVCache(net.config, 32, 8)
    ids = torch.randint(0, 128, (61,)).tolist()
    net.prefill(ids, 0, cache)
    captured = {}
    for attn in ("oracle", "quest", "window"):
        sel = GT.Selector(attn, net, cache, 24)
        if attn == "quest":                                    # quest's bounds need pooled keys from a prefill
            cache.release(0)
            net.prefill(ids, 0, cache, sel)
        cache.allocate(0, 62)
        net.decode(torch.tensor([5]), cache.block_table([0]), torch.tensor([61], dtype=torch.int32), cache,
                   Spy(sel, captured))
        assert sorted(captured) == list(range(len(net.layers))), attn       # every layer asked the selector
        for layer, (qr, blocks, table, lengths) in captured.items():
            L, S, Hk, D = int(lengths[0]), 8, 2, 32
            cur = (L - 1) // S
            k = cache.k[layer][table[0].long()].reshape(-1, Hk, D)[:L].double()   # [L, Hk, D]
            for h in range(Hk):
                qh = qr[0, h * 4:(h + 1) * 4].double()                          # [G, D]
                if attn == "window":                                            # the 3 blocks before the new one's
                    assert set(blocks[0, h].tolist()) - {-1} == {cur - 3, cur - 2, cur - 1, cur}
                elif attn == "oracle":
                    p = (qh @ k[:, h].T / D ** 0.5).softmax(-1)                 # [G, L]
                    blockmax = torch.stack([p[:, j * S:(j + 1) * S].max() for j in range(cur)])
                    want = set(blockmax.topk(3).indices.tolist()) | {cur}
                    assert set(blocks[0, h].tolist()) - {-1} == want
                else:
                    bounds = []
                    for j in range(cur):                                        # Quest's bound from the block's keys
                        kj = k[j * S:(j + 1) * S, h]                            # [S, D]
                        bound = torch.maximum(qh * kj.amax(0), qh * kj.amin(0)).sum(-1)   # [G]
                        bounds.append(bound.max())                              # the group's largest bound
                    top = torch.stack(bounds).topk(4)                           # the 3 of the budget, then the next
                    assert top.values[2] - top.values[3] > 1e-4                 # no near-tie at the cut
                    assert set(blocks[0, h].tolist()) - {-1} == set(top.indices[:3].tolist()) | {cur}
        captured.clear()


def test_oracle_block_attention_is_the_float64_attention_max_per_block():
    """gate.block_attention (oracle's scores): per (sequence, KV head, block) the largest probability of
    softmax(q k / sqrt(D)) over the block's written tokens and the group's heads, written out in float64.
    Slots past each length hold large keys, so one read would show."""
    torch.manual_seed(18)
    B, Hq, Hk, D, S, P = 2, 4, 2, 16, 4, 9
    qr, kp = torch.randn(B, Hq, D), torch.randn(P, S, Hk, D)
    table = torch.tensor([[0, 1, 2, 8], [3, 4, 5, 6]], dtype=torch.int32)
    lengths = torch.tensor([10, 16], dtype=torch.int32)
    kp[2, 2:], kp[8] = 50.0, 50.0                                        # sequence 0: tokens 10.. unwritten
    got = GT.block_attention(qr, kp, table, lengths)
    want = torch.zeros(B, Hk, 4, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        k = kp[table[b].long()].reshape(-1, Hk, D)[:n].double()         # [n, Hk, D]
        for h in range(Hk):
            p = (qr[b, 2 * h:2 * h + 2].double() @ k[:, h].T / D ** 0.5).softmax(-1)   # [G, n]
            for j in range(-(-n // S)):
                want[b, h, j] = p[:, j * S:(j + 1) * S].max()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_pick_blocks_with_a_threshold_keeps_the_blocks_above_it():
    """gate.pick_blocks with a threshold (k == 0, the PyTorch path): the complete blocks before the
    new token's whose softmax weight among them exceeds it, in order, then the new token's block;
    against a float64 softmax, with the token counts. Rows: no complete block, 4, 9, and a row of
    length 1 (CUDA-graph padding: not counted)."""
    torch.manual_seed(11)
    B, Hk, NB, S, thr = 4, 2, 10, 4, 0.08
    score = 2 * torch.randn(B, Hk, NB)
    lengths = torch.tensor([3, 4 * S + 2, NB * S, 1], dtype=torch.int32)
    read, total = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    blocks = GT.pick_blocks(score, lengths, S, 0, thr, read, total)
    want_read = 0
    for b, n in enumerate(lengths.tolist()):
        cur = (n - 1) // S
        for h in range(Hk):
            p = score[b, h, :cur].double().softmax(-1)
            assert ((p - thr).abs() > 1e-4).all()                          # no near-tie with the threshold
            want = [j for j in range(cur) if p[j] > thr]
            row = blocks[b, h].tolist()
            assert [x for x in row[:-1] if x >= 0] == want and row[-1] == cur, (b, h, row)
            want_read += (len(want) * S + n - cur * S) * (n > 1)
    assert read.item() == want_read and total.item() == (lengths.sum().item() - 1) * Hk


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("threshold", [None, 0.12], ids=["top3", "threshold"])
def test_seer_decode_picks_the_top_blocks_of_the_float64_gate_scores(tmp_path, dev, threshold, monkeypatch):
    """Decode-time seer (running pooled stats, gate keys made as pages fill, one step's query)
    picks the blocks that gate_scores64, run on the same q and k all at once, ranks highest; with a
    threshold, the blocks whose softmax weight of those scores exceeds it (SPEC §4)."""
    monkeypatch.setattr(M, "decode_attention", M.decode_attention_ref)   # float32 here: not the TileLang kernel
    net = gated_model(tmp_path, hq=8, hk=2).to(dev)
    torch.manual_seed(8)
    ids = torch.randint(0, 128, (70,)).tolist()
    seen = {i: [] for i in range(len(net.layers))}           # each layer's pre-RoPE q, k as decode made them
    for layer in net.layers:
        layer.self_attn.capture = lambda i, q, k, qr, kr: seen[i].append((q.flatten(0, 1), k.flatten(0, 1)))
    cache = M.PagedKVCache(net.config, 32, 8, dev)
    sel = GT.Selector("seer", net, cache, None if threshold else 24, threshold)   # top-k: 3 blocks + the current one
    net.prefill(ids[:40], 0, cache, sel)
    cache.allocate(0, 70)
    captured = {}
    for n in range(40, 70):                                    # crosses pages: gate keys made at decode
        captured.clear()
        net.decode(torch.tensor([ids[n]], device=dev), cache.block_table([0]),
                   torch.tensor([n], dtype=torch.int32, device=dev), cache, Spy(sel, captured))
    assert sorted(captured) == list(range(len(net.layers)))             # every layer asked the selector
    kept = 0
    for i, (qr, blocks, table, lengths) in captured.items():
        q, k = (torch.cat(t) for t in zip(*seen[i]))         # [70, Hq, D], [70, Hk, D]
        score = gate_scores64(net.layers[i].self_attn.attn_gate, q, k)[69]   # [Hk, NB] at the last token
        for h in range(2):
            if threshold:
                p = score[h, :69 // 8].softmax(-1)                # the complete blocks' weights
                assert ((p - threshold).abs() > 1e-4).all()      # no near-tie with the threshold
                want = set((p > threshold).nonzero().flatten().tolist())
                kept += len(want)
            else:
                top = score[h].topk(4)
                assert top.values[2] - top.values[3] > 1e-4       # no near-tie at the cut
                want = set(top.indices[:3].tolist())
            assert set(blocks[0, h].tolist()) - {-1} == want | {69 // 8}, (i, h)
    if threshold:   # some blocks kept and some dropped, over the layers and heads (8 complete blocks each)
        assert 0 < kept < 8 * 2 * len(captured)


@needs_triton
@pytest.mark.parametrize("dg,S,NB,G", [(32, 16, 300, 2), (128, 64, 512, 4), (128, 64, 1500, 1), (64, 32, 7, 3)])
def test_seer_pick_kernel_matches_float64_topk_and_threshold(dg, S, NB, G):
    """kernel_step.seer_pick (the gate query from the group's shares, the gather, scores, top-k / threshold
    and token counts in two Triton kernels) against a float64 selection written here: ragged
    lengths (< one block, exact multiples, padding rows of length 0 and 1), pages shuffled, budgets
    past the blocks there are. First exact: integer shares, no norm and RoPE at position 0 (the
    identity) make every score exact, ties at the cut included. Then with the gate's RMS norm and
    RoPE at each row's token, up to the bf16 rounding of the gate query."""
    torch.manual_seed(dg + NB)
    B, Hk, theta = 6, 2, 1e4
    P = B * NB + 5
    gate_k = torch.randn(P, Hk, dg, device=DEV).bfloat16()
    gate_k[::3] = gate_k[::3].round()                        # some exactly equal scores
    table = torch.randperm(P, device=DEV)[:B * NB].view(B, NB).int()
    lengths = torch.tensor([0, 1, S - 3, 4 * S, NB * S, NB * S // 2 + 7], dtype=torch.int32, device=DEV)
    # the new keys, pooled into their own (current) page's stats on the way: no score here reads that page
    page = table.gather(1, ((lengths.long() - 1).clamp(min=0) // S)[:, None])[:, 0].long()
    x = torch.randn(B, Hk, 8, device=DEV).bfloat16()
    stats = [torch.zeros(P, Hk, 8, device=DEV, dtype=dt) for dt in (torch.bfloat16, torch.bfloat16, torch.float32)]
    # the norm and RoPE do not depend on the row's length: on the CPU not at 1,500 blocks, whose ten calls took 138 s
    # in Triton's interpreter on 2 cores (~1,100 scoring programs a call)
    freq = GT.inv_freq(dg, theta, torch.device(DEV))
    for norm in (False, True) if NB <= 512 or DEV == "cuda" else (False,):
        gate = GT.AttnGate(Hk, G, 8, dg, S, norm, theta).to(DEV, torch.bfloat16)
        if norm:
            gate.attngate_qnorm.weight.data.uniform_(0.5, 1.5)
            shares, pos = torch.randn(B, Hk * G, dg, device=DEV), (lengths - 1).clamp(min=0)
            gq = norm_rope64(shares.double().view(B, Hk, G, dg).sum(2), gate.qnorm_weight, pos[:, None, None], theta)
            tol, margin = 2e-2, 5e-2       # of the largest score; of the threshold
        else:
            shares, pos = torch.randint(-2, 3, (B, Hk * G, dg), device=DEV).float(), torch.zeros_like(lengths)
            gq = shares.double().view(B, Hk, G, dg).sum(2)
            tol, margin = 1e-3, 1e-4
        s64 = torch.einsum("bhe,bjhe->bhj", gq, gate_k[table.long()].double())    # [B, Hk, NB]
        for k, thr in ((1, 0.0), (3, 0.0), (min(NB, 40), 0.0), (NB, 0.0), (0, 0.01)):
            read, total = (torch.zeros(1, dtype=torch.float64, device=DEV) for _ in range(2))
            out = KS.seer_pick(shares, x, pos, page, gate, freq, *stats, gate_k, table, lengths, S, k, thr, read, total)
            out = out.cpu()
            want_read = want_total = 0
            for b, n in enumerate(lengths.tolist()):
                cur = max(n - 1, 0) // S
                for h in range(Hk):
                    row = out[b, h].tolist()                 # chosen ids, then -1s, then the new token's block
                    got = [x for x in row[:-1] if x >= 0]
                    assert row[-1] == cur and row[:-1] == got + [-1] * (len(row) - 1 - len(got)), (b, h)
                    assert len(got) == len(set(got)) and all(0 <= x < cur for x in got), (b, h)
                    s = s64[b, h, :cur].cpu()
                    if k:                                    # the k best, up to ties at the cut
                        assert len(got) == min(k, cur)
                        rest = sorted(set(range(cur)) - set(got))
                        if got and rest:
                            assert s[got].min() >= s[rest].max() - tol * s.abs().max(), (norm, k, b, h)
                    elif cur:                                # softmax weight above the threshold
                        p = (s / math.sqrt(dg)).softmax(-1)
                        sure = set(torch.nonzero(p > thr * (1 + margin)).flatten().tolist())
                        maybe = set(torch.nonzero(p > thr * (1 - margin)).flatten().tolist())
                        assert sure <= set(got) <= maybe, (norm, b, h)
                    if n > 1:
                        want_read += len(got) * S + n - cur * S
                        want_total += n
            assert read.item() == want_read and total.item() == want_total


def norm_rope64(g, norm, pos, theta):
    """float64 gate vectors g [..., dg]: RMS norm with weight norm (unless None), then RoPE at pos."""
    return rope64(rms_norm64(g, norm, GT.GATE_EPS) if norm is not None else g, pos, theta)


@needs_triton
@pytest.mark.parametrize("D,dg,S,G,norm", [(64, 32, 8, 2, True), (128, 128, 64, 4, False), (64, 64, 16, 3, True)])
def test_seer_pick_kernel_pools_keys_and_makes_gate_keys_as_float64(D, dg, S, G, norm):
    """kernel_step.seer_pick, fed one decode step at a time (three sequences, shuffled pages, stale stats
    in the pages), leaves every page's running max / min / sum of its keys and every full page's
    gate key as a float64 computation written here gives them: [max | min | mean] @ Wk, RMS
    norm, RoPE at the block start. Pages it was not given stay untouched."""
    torch.manual_seed(D + S)
    B, Hk, theta, T = 3, 2, 1e4, 2 * S + 3
    gate = GT.AttnGate(Hk, G, D, dg, S, norm, theta).to(DEV, torch.bfloat16)
    if norm:
        gate.attngate_knorm.weight.data.uniform_(0.5, 1.5)
        gate.attngate_qnorm.weight.data.uniform_(0.5, 1.5)
    P = B * 3 + 1
    stale = lambda dt: torch.randn(P, Hk, D, device=DEV).to(dt)         # pages come back with old stats
    kmax, kmin, ksum = stale(torch.bfloat16), stale(torch.bfloat16), stale(torch.float32)
    unused = kmax[P - 1].clone()
    gate_k = torch.full((P, Hk, dg), 7.0, device=DEV, dtype=torch.bfloat16)
    pages = torch.randperm(P - 1, device=DEV)[:B * 3].view(B, 3)       # page P - 1 is never used
    table = pages.int()
    keys = torch.randn(T, B, Hk, 2 * D, device=DEV).bfloat16()[..., :D]   # heads strided, as a split of qkv can be
    shares = torch.randn(B, Hk * G, dg, device=DEV)
    read, total = (torch.zeros(1, dtype=torch.float64, device=DEV) for _ in range(2))
    freq = GT.inv_freq(dg, theta, torch.device(DEV))
    for t in range(T):
        pos = torch.full((B,), t, device=DEV)
        lengths = torch.full((B,), t + 1, dtype=torch.int32, device=DEV)
        KS.seer_pick(shares, keys[t], pos, pages[:, t // S], gate, freq, kmax, kmin, ksum, gate_k, table, lengths,
                     S, 1, 0.0, read, total)
    wk = gate.attngate_linear_k.weight.double()                        # [Hk, 3D, dg]
    for b in range(B):
        for j in range(3):
            x = keys[j * S:(j + 1) * S, b].double()                        # [n, Hk, D] the block's keys
            pg = pages[b, j]
            assert torch.equal(kmax[pg].double(), x.amax(0)) and torch.equal(kmin[pg].double(), x.amin(0))
            assert torch.allclose(ksum[pg].double(), x.sum(0), rtol=1e-5, atol=1e-5)
            if x.shape[0] < S:                                             # partial block: no key yet
                assert (gate_k[pg] == 7).all()
                continue
            g = torch.einsum("hc,hce->he", torch.cat([x.amax(0), x.amin(0), x.mean(0)], -1), wk)
            g = norm_rope64(g, gate.knorm_weight, j * S, theta)
            err = (gate_k[pg].double() - g).abs().max() / g.abs().max()
            assert err < 2e-2, (b, j, err.item())
    assert (gate_k[P - 1] == 7).all() and torch.equal(kmax[P - 1], unused)


SM90_BUILD = """
import triton, kernel_step as KS, train_gate as TG
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ptr, i32, f32 = "*bf16", "i32", "fp32"
def build(kernel, args, consts, **options):
    sig = {**args, **{k: "constexpr" for k in consts}}
    triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=options)
build(KS._seer_score_kernel, dict(shares="*fp32", positions="*i64", qnorm=ptr, inv_freq="*fp32", eps=f32, gate_k=ptr,
                                  table="*i32", lengths="*i32", scores="*fp32", NB=i32, P=i32, scale=f32),
      dict(Hk=8, G=4, G_P2=4, DG=128, S=64, BLK=KS.SCORE_BLK, HAS_NORM=True, PDL=True))
for top_k, nb in ((True, 512), (False, 2048)):   # Qwen3-8B shapes: Hk 8, block 64
    build(KS._seer_pick_kernel, dict(scores="*fp32", lengths="*i32", out="*i32", read="*fp64", total="*fp64",
                                     NB=i32, threshold=f32, K=i32, W=i32, x=ptr, sx_b=i32, sx_h=i32,
                                     positions="*i64", page="*i64", kmax=ptr, kmin=ptr, ksum="*fp32", gate_k=ptr,
                                     wk=ptr, knorm=ptr, inv_freq="*fp32", eps=f32),
          dict(Hk=8, D=128, DG=128, S=64, TOP_K=top_k, NB_P2=nb, W_P2=128 if top_k else 4096, HAS_NORM=True,
               PR=KS.POOL_ROWS, PDL=True))
for glu in (False, True):
    build(KS._linear_kernel, dict(x=ptr, w=ptr, out=ptr, M=i32, N=i32, K=i32),
          dict(ROWS=KS.LINEAR_ROWS, BN=32, BK=256, PREC="tf32", GLU=glu, PDL=True))
for dg, rows in ((0, 1), (128, KS.QK_ROWS)):   # without and with the gate-query shares
    build(KS._qk_norm_rope_kernel, dict(qkv=ptr, q_norm=ptr, k_norm=ptr, cos=ptr, sin=ptr, q_out=ptr, qr_out=ptr,
                                      k_out=ptr, kr_out=ptr, k_pages=ptr, v_pages=ptr, slots="*i64", wq=ptr,
                                      shares="*fp32", N=i32, eps=f32),
          dict(Hq=32, Hk=8, D=128, R=rows, WRITE=True, DG=dg, PREC="tf32", PDL=True))
for add in (False, True):
    build(KS._rms_norm_kernel, dict(x=ptr, res=ptr, w=ptr, out=ptr, s_out=ptr, H=i32, eps=f32),
          dict(BH=4096, ADD=add, PDL=True))
build(TG._block_stats_kernel, dict(Q=ptr, K=ptr, BMAX="*fp32", BLSE="*fp32", LSE="*fp32", t0=i32, n_rows=i32,
                                   scale=f32, sq_t=i32, sq_h=i32, sk_t=i32, sk_h=i32, so_h=i32, so_j=i32),
      dict(G=4, D=128, S=64, BLOCK_M=256, WITH_BLSE=True), num_warps=4, num_stages=2)   # training's target kernel
print("built")
"""


@pytest.mark.skipif(KS.triton is None or torch.cuda.is_available(),
                    reason="needs triton, and on a GPU the kernel tests above run the real kernels")
def test_triton_kernels_compile_for_sm90():
    """The interpreter runs the kernels' Python; this checks they also lower to sm_90 code
    (Triton compiles without a GPU), in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert "built" in run_cli("-c", SM90_BUILD, env=env).stdout


class Spy:
    """Passes calls through to a selector and records what each layer's selection saw."""
    def __init__(self, sel, captured):
        self.sel, self.captured = sel, captured

    def __call__(self, layer, step, q, qr, k, kr, shares=None):
        blocks = self.sel(layer, step, q, qr, k, kr, shares)
        self.captured[layer] = (qr.clone(), blocks.clone(), step.block_table.clone(), step.lengths.clone())
        return blocks

    def __getattr__(self, name):   # prefill, share_weight, ...
        return getattr(self.sel, name)


def test_gate_folder_round_trip_and_published_layout(tmp_path):
    net = gated_model(tmp_path / "m")
    GT.save_gates(net, str(tmp_path / "g"))
    g = tmp_path / "g"
    assert sorted(os.listdir(g)) == ["config.json", "model.safetensors"]           # no temp files left
    assert (g / "model.safetensors").stat().st_mode == (g / "config.json").stat().st_mode   # not owner-only
    saved = json.loads((g / "config.json").read_text())                           # block 8, Dg 16 (gated_model)
    assert saved["seerattn_gate_block_size"] == 8 and saved["seerattn_gate_hidden_size"] == 16
    for dtype in (torch.bfloat16, torch.float32):                                 # loads into the model's dtype
        other = M.Qwen3.from_pretrained(str(tmp_path / "m"), dtype=dtype)
        GT.load_gates(other, str(tmp_path / "g"))
        assert all(l.self_attn.attn_gate.block_size == 8 and l.self_attn.attn_gate.dg == 16 for l in other.layers)
        assert GT.gate_state(net).keys() == GT.gate_state(other).keys()
        for a, b in zip(GT.gate_state(net).values(), GT.gate_state(other).values()):
            assert b.dtype == dtype and torch.equal(b, a.to(dtype))
    # a folder written by hand in the published layout: base config + seerattn_* fields, no norms
    from safetensors.torch import save_file
    pub = tmp_path / "pub"
    pub.mkdir()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(base_model="Qwen/Qwen3-tiny", seerattn_gate_block_size=8, seerattn_gate_hidden_size=16,
               seerattn_k_seq_pooling_type="Kmaxminavg", seerattn_q_head_pooling_type="Qproj",
               seerattn_use_qk_norm=False, seerattn_use_rope=True)
    (pub / "config.json").write_text(json.dumps(cfg))
    w = {f"model.layers.{i}.self_attn.attn_gate.{n}": torch.randn(*shape) for i in range(2)
         for n, shape in (("attngate_linear_q.weight", (2, 2, 32, 16)), ("attngate_linear_k.weight", (2, 96, 16)))}
    save_file(w, str(pub / "attn_gate.safetensors"))
    GT.load_gates(other, str(pub))
    assert all(l.self_attn.attn_gate.attngate_qnorm is None and l.self_attn.attn_gate.block_size == 8
               for l in other.layers)
    assert GT.gate_state(other).keys() == w.keys()
    assert all(torch.equal(v, w[k]) for k, v in GT.gate_state(other).items())


def test_attached_and_loaded_gates_rotate_with_the_models_rope_theta(tmp_path):
    """SPEC §2: RoPE inside the gate with the model's rope_theta (make_hf_model's: 10000)."""
    net = gated_model(tmp_path / "m")
    assert [l.self_attn.attn_gate.rope_theta for l in net.layers] == [10000.0, 10000.0]
    GT.save_gates(net, str(tmp_path / "g"))
    other = M.Qwen3.from_pretrained(str(tmp_path / "m"))
    GT.load_gates(other, str(tmp_path / "g"))
    assert [l.self_attn.attn_gate.rope_theta for l in other.layers] == [10000.0, 10000.0]


def test_selector_refuses_bad_budgets_and_thresholds_saying_what_would_do(tmp_path):
    """A budget of 0 would fall into the threshold path (k = 0) with threshold 0 and keep every block;
    a threshold of 0 keeps every block too, one of 1 none. Quest, oracle and window have no threshold
    mode: without a budget they are refused. A budget off the block grid gets the nearest that is on it."""
    net = gated_model(tmp_path / "m")
    cache = M.PagedKVCache(net.config, 8, 8)
    cases = [(attn, (0,), {}, "positive multiple of the block size 8") for attn in ("seer", "quest", "window")]
    cases += [("seer", (), {"threshold": t}, r"threshold must be in \(0, 1\)") for t in (0.0, 1.0, -0.1, 1.5)]
    cases += [(attn, (), {}, f"--attn {attn} needs a token budget") for attn in ("quest", "oracle", "window")]
    cases += [("seer", (22,), {}, "multiple of the block size 8; try 24"), ("quest", (3,), {}, "try 8"),
              ("seer", (16, 0.1), {}, "not both")]
    for attn, args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            GT.Selector(attn, net, cache, *args, **kw)
    with pytest.raises(ValueError, match="block size 8 != page size 16"):
        GT.Selector("seer", net, M.PagedKVCache(net.config, 8, 16), 32)
    with pytest.raises(ValueError, match="needs gates"):
        GT.Selector("seer", M.Qwen3.from_pretrained(str(tmp_path / "m")), cache, 16)


def test_gate_folders_that_do_not_fit_or_are_broken_fail_with_one_sentence(tmp_path):
    net = gated_model(tmp_path / "m")
    net.name_or_path = str(tmp_path / "m")                 # as train_gate.py names the base model
    GT.save_gates(net, str(tmp_path / "g"))
    make_hf_model(tmp_path / "big", hq=8, hk=2, d=32, layers=3)
    with pytest.raises(ValueError, match="layers 2 vs model 3, group size 2 vs model 4"):
        GT.load_gates(M.Qwen3.from_pretrained(str(tmp_path / "big")), str(tmp_path / "g"))
    make_hf_model(tmp_path / "wide", hq=4, hk=2, d=64)                  # only the head_dim differs
    with pytest.raises(ValueError, match="fit this model: head_dim 32 vs model 64$"):
        GT.load_gates(M.Qwen3.from_pretrained(str(tmp_path / "wide")), str(tmp_path / "g"))
    make_hf_model(tmp_path / "other", hq=4, hk=2, d=32, hidden=96)       # the same heads, another base model
    with pytest.raises(ValueError, match=r"\(trained for .*/m\) does not fit this model: hidden_size 64 vs model 96, "
                                         "intermediate_size 192 vs model 288$"):
        GT.load_gates(M.Qwen3.from_pretrained(str(tmp_path / "other")), str(tmp_path / "g"))
    # broken gate folders: each a one-sentence ValueError, not a traceback from deep inside
    from safetensors.torch import load_file, save_file
    good = load_file(str(tmp_path / "g" / "model.safetensors"))
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    target = M.Qwen3.from_pretrained(str(tmp_path / "m"))
    GT.load_gates(target, str(tmp_path / "g"))
    kept = {k: v.clone() for k, v in GT.gate_state(target).items()}
    for config, weights, match in (
            ("{", good, "config.json: not valid JSON"),
            ({**cfg, "seerattn_use_rope": False}, good, "RoPE in the gate"),
            (cfg, {k: v for k, v in good.items() if ".layers.0." not in k}, "no \\[Hk, G, D, Dg\\] weight"),
            (cfg, {k: v for k, v in good.items() if "layers.1.self_attn.attn_gate.attngate_linear_k" not in k},
             "layer 1's gate weights do not fit: .*attngate_linear_k"),
            (cfg, {k.removeprefix("model."): v for k, v in good.items()},
             r": layers\.\d+\.self_attn\.attn_gate\.\S+: gate weights must be named model\.layers\.N"),
            (cfg, b"not a safetensors file", "model.safetensors: cannot read it")):
        (bad / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if isinstance(weights, bytes):
            (bad / "model.safetensors").write_bytes(weights)
        else:
            save_file(weights, str(bad / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            GT.load_gates(target, str(bad))
        assert all(torch.equal(v, kept[k]) for k, v in GT.gate_state(target).items())   # its gates as they were


# ---- the CUDA-graph decode path (generate.GraphRunner) ----

@cuda
@pytest.mark.parametrize("attn", ["dense", "seer"])
def test_cuda_graph_replay_equals_eager_decode(tmp_path, attn):
    net = gated_model(tmp_path).cuda()
    torch.manual_seed(8)
    prompts = [torch.randint(0, 127, (n,)).tolist() for n in (3, 17, 30)]   # ragged, pages of 8 fill mid-run

    def run(attn, budget, graphs):
        cache = M.PagedKVCache(net.config, 64, 8, "cuda")
        sel = GT.Selector(attn, net, cache, budget)
        return gen.generate(net, cache, prompts, 64, select=sel, graphs=graphs), sel

    budget = 24 if attn == "seer" else None              # seer: 3 blocks of 8 of up to 12
    (eager, _), (replayed, sel) = run(attn, budget, False), run(attn, budget, True)
    assert eager == replayed
    if attn == "seer":
        assert sel.sparsity() > 0.3                      # the gate's picks matter
        assert run("seer", 1024, True)[0] == run("dense", None, False)[0]   # full budget: seer is dense


# ---- the decode kernel (kernel_decode.py) against reference_decode ----

def kernel_inputs(dtype, Hq, Hk, D, S, lengths, sparse, seed, extra_pages=3):
    """Random pages (NaN in unwritten slots), shuffled page tables with garbage tails, and
    duplicate-free selections padded with -1 at random places."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nblks = [-(-n // S) for n in lengths]
    B, NB = len(lengths), max(nblks) + 2
    P = sum(nblks) + extra_pages
    k_pages = torch.randn(P, S, Hk, D, generator=g).to(dtype)
    v_pages = torch.randn(P, S, Hk, D, generator=g).to(dtype)
    perm = torch.randperm(P, generator=g).tolist()
    table = torch.randint(-2**30, 2**30, (B, NB), generator=g, dtype=torch.int32)  # garbage
    for b, nb in enumerate(nblks):
        pages = [perm.pop() for _ in range(nb)]
        table[b, :nb] = torch.tensor(pages, dtype=torch.int32)
        tail = lengths[b] - (nb - 1) * S        # tokens used in the last page
        k_pages[pages[-1], tail:] = float("nan")
        v_pages[pages[-1], tail:] = float("nan")
    blocks = None
    if sparse:
        rows = [[rng.sample(range(nb), rng.randint(1, nb)) for _ in range(Hk)] for nb in nblks]
        K = max(len(r) for rs in rows for r in rs) + 2
        blocks = torch.full((B, Hk, K), -1, dtype=torch.int32)
        for b in range(B):
            for h in range(Hk):
                pos = sorted(rng.sample(range(K), len(rows[b][h])))
                blocks[b, h, pos] = torch.tensor(rows[b][h], dtype=torch.int32)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return q, k_pages, v_pages, table, torch.tensor(lengths, dtype=torch.int32), blocks


def run_kernel(q, k_pages, v_pages, table, lengths, blocks, **kw):
    dev = [t.cuda() if t is not None else None for t in (q, k_pages, v_pages, table, lengths, blocks)]
    return kernel_decode.decode_attention(*dev, **kw).cpu()


# (dtype, D, S, G): every dtype, head dim, page size and G = 1..8 appear, not the full product
CONFIGS = [
    (torch.bfloat16, 128, 64, 4), (torch.bfloat16, 128, 16, 1), (torch.bfloat16, 64, 32, 8),
    (torch.float16, 128, 128, 2), (torch.float16, 64, 64, 3), (torch.float16, 128, 32, 6),
    (torch.bfloat16, 64, 128, 5), (torch.float16, 64, 16, 7),
]


@needs_gpu
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype,D,S,G", CONFIGS, ids=lambda c: str(c).replace("torch.", ""))
def test_decode_kernel_matches_float64_reference(dtype, D, S, G, sparse):
    Hk = 2
    # ragged: a single token, under one page, exact multiples, long with a partial page
    lengths = [1, S - 3, S, 4 * S, 37 * S + 5, 9001]
    for seed in range(2):  # fresh inputs, different split counts
        inputs = kernel_inputs(dtype, G * Hk, Hk, D, S, lengths, sparse, seed=seed + 100 * S + G)
        out = run_kernel(*inputs, splits=[None, 5][seed])
        ref = reference_decode(*inputs, scale=1 / math.sqrt(D))
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= 1e-2, (seed, rel_err(out, ref))


@needs_gpu
def test_decode_kernel_writes_every_output_element(monkeypatch):
    """Every buffer the launch allocates (the output, the splits' partial outputs and LSEs) starts
    as NaN, so an element that the split kernel or the combine leaves unwritten (or a split's
    unwritten LSE that the combine reads) comes out as NaN. (Poisoning freed memory instead does
    not reach them: the caching allocator keeps allocations under 1 MiB in a pool of their own.)"""
    q, k, v, table, lengths, blocks = kernel_inputs(torch.bfloat16, 32, 8, 128, 64, [1, 65, 4000], True, 7)
    empty, empty_like, poisoned = torch.empty, torch.empty_like, []

    def poison(t):
        poisoned.append(t.shape)
        return t.fill_(float("nan") if t.is_floating_point() else -1)
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    out = run_kernel(q, k, v, table, lengths, blocks, splits=4)
    monkeypatch.undo()
    assert len(poisoned) >= 3, poisoned        # out, o_part, lse_part
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_decode(q, k, v, table, lengths, blocks, 1 / math.sqrt(128))) <= 1e-2


@needs_gpu
def test_decode_kernel_custom_scale_and_many_splits():
    inputs = kernel_inputs(torch.bfloat16, 16, 4, 128, 64, [3000, 17, 64 * 9], True, 3)
    for splits in (1, 2, kernel_decode.MAX_SPLITS):
        out = run_kernel(*inputs, scale=0.05, splits=splits)
        assert rel_err(out, reference_decode(*inputs, scale=0.05)) <= 1e-2, splits


@needs_gpu
def test_decode_kernel_batch_of_full_rows_and_padding_rows():
    """The launch that hung with two pipeline stages (H200, 2026-11-30; README): a CUDA-graph
    bucket of 200 at the tiny model's shapes, 173 rows of 4162 tokens reading 65 blocks each,
    27 padding rows of one token whose lists are 64 x -1 and block 0."""
    rng = random.Random(0)
    lengths = [4162] * 173 + [1] * 27
    q, k, v, table, lengths, _ = kernel_inputs(torch.bfloat16, 4, 2, 64, 16, lengths, False, 11)
    rows = [[rng.sample(range(260), 64) + [260] for _ in range(2)] for _ in range(173)]
    blocks = torch.tensor(rows + [[[-1] * 64 + [0]] * 2] * 27, dtype=torch.int32)  # [200, 2, 65]
    faulthandler.dump_traceback_later(300, exit=True)   # a hang ends the run with the stacks, not stalls it
    try:
        for _ in range(20):
            out = run_kernel(q, k, v, table, lengths, blocks)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert rel_err(out, reference_decode(q, k, v, table, lengths, blocks, 1 / math.sqrt(64))) <= 1e-2


@needs_gpu
def test_decode_kernel_skips_bad_block_ids_and_check_rejects_them():
    q, k, v, table, lengths, blocks = kernel_inputs(torch.bfloat16, 8, 2, 64, 32, [100, 700], True, 5)
    bad = blocks.clone()
    bad[0, 0, bad[0, 0].tolist().index(-1)] = 10       # past sequence 0's 4 blocks (NBmax 24)
    bad[1, 1, bad[1, 1].tolist().index(-1)] = 10**6    # past the block table
    out = run_kernel(q, k, v, table, lengths, bad, check=False)   # unchecked: skipped, not read
    ref = reference_decode(q, k, v, table, lengths, blocks, 1 / math.sqrt(64))
    assert rel_err(out, ref) <= 1e-2
    for s, h, bad_id in ((0, 0, 10), (1, 1, 10**6)):   # checked (the default), each bad id on its own
        one = blocks.clone()
        one[s, h, one[s, h].tolist().index(-1)] = bad_id
        with pytest.raises(ValueError, match="outside \\[-1"):
            run_kernel(q, k, v, table, lengths, one)
    dup = blocks.clone()
    row = dup[1, 0].tolist()
    dup[1, 0, row.index(-1)] = max(row)                 # a repeated id
    with pytest.raises(ValueError, match="repeats"):
        run_kernel(q, k, v, table, lengths, dup)
    run_kernel(q, k, v, table, lengths, blocks)


def test_decode_kernel_rejects_bad_inputs_before_launch():
    if kernel_decode.tilelang is None:
        pytest.skip("tilelang is not installed")
    dev = "cuda" if HAS_CUDA else "cpu"
    q = torch.randn(2, 8, 64, dtype=torch.bfloat16, device=dev)
    kv = torch.randn(10, 16, 2, 64, dtype=torch.bfloat16, device=dev)
    table = torch.zeros(2, 4, dtype=torch.int32, device=dev)
    lengths = torch.ones(2, dtype=torch.int32, device=dev)
    kv32 = kv[..., :32].contiguous()
    cases = [(dict(q=q.float()), "need q's dtype"), (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)),
                                                     "q must be a contiguous"),
             (dict(k_pages=kv32, v_pages=kv32), r"head_dim of q \(64\) and k \(32\)"),
             (dict(v_pages=kv32), "v_pages must have k_pages' shape"),
             (dict(q=q[:, :7].contiguous()), "multiple of Hk"), (dict(block_table=table.long()), "block_table must be"),
             (dict(lengths=lengths[:1]), r"lengths must be int32 \[B\]"),
             (dict(blocks=torch.zeros(2, 3, 4, dtype=torch.int32, device=dev)), r"blocks must be int32 \[B, Hk, K\]"),
             (dict(q=q.cpu()) if HAS_CUDA else {}, "q must be a CUDA tensor")]
    for case, msg in cases:
        args = dict(q=q, k_pages=kv, v_pages=kv, block_table=table, lengths=lengths) | case
        with pytest.raises(ValueError, match=msg):
            kernel_decode.decode_attention(**args)


@pytest.mark.skipif(kernel_decode.tilelang is None or shutil.which("nvcc") is None,
                    reason="compiling for sm_90 needs tilelang and nvcc")
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_decode_kernel_compiles_for_sm90_at_model_shapes(dense):
    """Qwen3-4B/8B decode shapes (bf16, Hq 32, Hk 8, D 128, page 64): lowers and builds, and neither
    kernel waits on or triggers a programmatic dependent launch (with them the 8B decode grid hung
    on H100s: kernel_decode's docstring)."""
    import tilelang
    import tvm
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:  # lowering without a GPU needs the target in scope
        art = tilelang.lower(kernel_decode.build(torch.bfloat16, 32, 8, 128, 64, dense, kernel_decode.STAGES),
                             target=target, enable_device_compile=True)
    assert "decode_kernel" in art.kernel_source
    for call in ("cudaGridDependencySynchronize", "cudaTriggerProgrammaticLaunchCompletion", "griddepcontrol"):
        assert call not in art.kernel_source, call


# ---- gate training (train_gate.py) ----

def peaked_model(path):
    """make_hf_model(peaked=True), head dim 32, with word_tokenizer's tokenizer.json."""
    make_hf_model(path, d=32, peaked=True)
    word_tokenizer(path)
    return str(path)


def word_docs(n, length, seed=0):
    """Documents with repeated structure: a few motifs of words recurring in random order."""
    g = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(0, 127, (8,), generator=g).tolist() for _ in range(6)]
    docs = []
    for _ in range(n):
        words = []
        while len(words) < length:
            words += motifs[int(torch.randint(0, 6, (1,), generator=g))]
        docs.append(" ".join(f"w{w}" for w in words[:length]))
    return docs


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def naive_target(qr, kr, S, t):
    """SPEC §5 written out in float64 for query t: [Hk, t // S] over complete blocks before t's block."""
    T, Hq, D = qr.shape
    Hk = kr.shape[1]
    G = Hq // Hk
    out = torch.zeros(Hk, t // S, dtype=torch.float64)
    for h in range(Hk):
        for g in range(G):
            p = torch.softmax(qr[t, h * G + g].double() @ kr[: t + 1, h].double().T / math.sqrt(D), -1)
            for j in range(t // S):
                out[h, j] = max(out[h, j], p[j * S:(j + 1) * S].max())
    return out / out.sum(-1, keepdim=True)


def check_target(stats_fn, dtype, device, tol):
    torch.manual_seed(0)
    T, Hq, Hk, D, S = 150, 6, 2, 32, 16
    qr = (3 * torch.randn(T, Hq, D)).to(dtype).to(device)
    kr = torch.randn(T, Hk, D).to(dtype).to(device)
    nb = T // S
    for t0, t1 in ((16, 70), (70, 150)):                 # two chunks, the second past the last full block
        rows = torch.arange(t0, t1, device=device)
        bmax, blse, lse = stats_fn(qr, kr, t0, t1, S, True)
        got = TG.target(bmax, lse, rows, nb, S).double().cpu()
        mass = (blse - lse[..., None]).exp().sum(-1).cpu()         # every row's softmax sums to one
        assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4)
        for t in range(t0, t1):
            want = naive_target(qr.cpu(), kr.cpu(), S, t)
            assert torch.allclose(got[t - t0, :, : t // S], want, atol=tol), t
            assert (got[t - t0, :, t // S:] == 0).all()


def test_fused_target_matches_float64_reference_cpu():
    check_target(TG.block_stats_torch, torch.float32, "cpu", 1e-5)


@needs_triton
def test_fused_target_matches_float64_reference_triton():
    if DEV == "cuda":
        check_target(TG.block_stats_triton, torch.bfloat16, "cuda", 1e-4)   # reference from the same bf16 inputs
    else:
        check_target(TG.block_stats_triton, torch.float32, "cpu", 1e-5)    # the interpreter cannot dot bf16


@pytest.mark.parametrize("loss_from,first", [(0.0, 8), (0.5, 36)])   # the first row counted, written out
def test_train_layer_kl_is_the_float64_kl_of_target_and_gate(loss_from, first):
    """train_layer's summed KL(target || gate), chunk by chunk, against float64 row by row: naive_target
    and a log-softmax of gate_scores64 over the same complete blocks, over rows from the first with a
    complete block before it (S) or from loss_from of the sequence; and its gradient reaches every
    gate weight."""
    torch.manual_seed(5)
    S, T, Hk, G, D = 8, 72, 2, 2, 16
    gate = GT.AttnGate(Hk, G, D, 8, S, True, 100.0)
    q, k = torch.randn(T, Hk * G, D), torch.randn(T, Hk, D)
    kl = TG.train_layer(gate, q, k, q, k, loss_from, 16, 1.0)           # (no RoPE: the same q, k both ways)
    scores = gate_scores64(gate, q, k)                                   # [T, Hk, NB]
    want = 0.0
    for t in range(first, T):
        tgt, logp = naive_target(q, k, S, t), scores[t, :, :t // S].log_softmax(-1)
        want += float((torch.xlogy(tgt, tgt) - tgt * logp).sum())
    assert want > 0 and abs(kl.item() - want) < 1e-4 * want, (kl.item(), want)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_recall_and_far_needle_counts_match_a_float64_reference():
    """recall_layer's far needles (a block >= 3 blocks back holding >= 0.5 of some head's
    attention), how many each selection's top blocks hold, and its recall, row by row against
    explicit float64 attention, a float64 Quest bound and gate_scores64's ranking.
    Rows from 80 on are made to look up block 3."""
    torch.manual_seed(3)
    S, T, Hk, G, D = 8, 120, 2, 2, 16
    gate = GT.AttnGate(Hk, G, D, 8, S, True, 100.0)
    q, k = torch.randn(T, Hk * G, D), torch.randn(T, Hk, D)
    u = torch.randn(D)
    k[3 * S:4 * S] += 2 * u
    q[80:] += 2 * u
    sums = {}
    TG.recall_layer(gate, q, k, q, k, 0.0, 32, [16, 32], sums)   # (no RoPE: the same q, k both ways)
    s = torch.einsum("thgd,uhd->thgu", q.double().view(T, Hk, G, D), k.double()) / math.sqrt(D)
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[:, None, None], float("-inf")).softmax(-1)
    blocks = p.view(T, Hk, G, T // S, S)
    head_mass = blocks.sum(-1).amax(2)                                   # [T, Hk, NB]
    kb = k.double().view(T // S, S, Hk, D).transpose(0, 2)               # [Hk, S, NB, D]
    qg = q.double().view(T, Hk, G, 1, D)
    quest = torch.maximum(qg * kb.amax(1)[None, :, None], qg * kb.amin(1)[None, :, None]).sum(-1).amax(2)
    rankings = {"oracle": blocks.amax(-1).amax(2), "quest": quest, "gate": gate_scores64(gate, q, k)}  # [T, Hk, NB]
    far, found = 0, {(name, budget): 0 for name in rankings for budget in (16, 32)}
    for t in range(S, T):
        cur = t // S
        for h in range(Hk):
            j = int(head_mass[t, h, :cur].argmax())
            if head_mass[t, h, j] >= 0.5 and j <= cur - 3:
                far += 1
                for name, budget in found:
                    top = rankings[name][t, h, :cur].topk(min(budget // S, cur)).indices.tolist()
                    found[name, budget] += j in top
    assert far >= 80 and sums["far"] == far
    assert 0 < found["gate", 16] < found["gate", 32], found
    assert [sums[name, budget, "far"] for name, budget in found] == list(found.values()), found
    # recall: the group's attention mass (per head, averaged over G) in the top blocks plus the row's own
    a, b = S, T                                                          # loss_from 0: rows from the first full block
    mass = blocks.sum(-1).sum(2) / G                                     # [T, Hk, NB]
    assert sums["n"] == (b - a) * Hk
    for name, rank in rankings.items():
        for budget in (16, 32):
            top = lambda t, h: rank[t, h, :t // S].topk(min(budget // S, t // S)).indices
            want = sum(mass[t, h, top(t, h)].sum() + mass[t, h, t // S] for t in range(a, b) for h in range(Hk))
            assert abs(sums[name, budget] - want) / sums["n"] < 1e-4, (name, budget)


def base_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--seq-len", "128", "--block-size", "16",
            "--gate-hidden", "16", "--batch", "2", "--eval-seqs", "2", "--eval-budgets", "16,32",
            "--eval-every", "0", "--log-every", "100", "--save-every", "2", "--q-chunk", "24", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    model = peaked_model(d / "m")
    data = write_jsonl(d / "train.jsonl", [{"text": t} for t in word_docs(12, 300)])
    return d, model, data


def test_loss_falls_over_30_steps_and_gate_recall_improves(setup):
    d, model, data = setup
    hist = TG.main(base_args(model, data, d / "falls", "--steps", "30", "--lr", "3e-2", "--warmup", "3",
                               "--eval-every", "30"))
    loss = hist["loss"]
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < 0.75 * loss[0], loss
    rec = hist["recall"][30]
    for name, budget in [k for k in rec if isinstance(k, tuple) and len(k) == 2]:   # (far needles: own test)
        assert 0 < rec[name, budget] <= 1 + 1e-6, (name, budget)
        assert rec["oracle", budget] >= rec["gate", budget] - 0.02         # ranking by block max is near-optimal
    assert rec["gate", 16] > hist["recall"][0]["gate", 16] + 0.02       # training helped the selection


def read_gates(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "model.safetensors"))


def assert_same_gates(a, b):
    """Within 1e-6: one float32 rounding apart, where a wrong resume moves the gates by the learning
    rate's scale. On CUDA up to 6e-8 apart (one H200, 2026-12-02): torch.compile (model.fused)
    builds a kernel for the first shape it meets and then a dynamic one, which rounds differently,
    so a process's first steps differ from the same steps run later (bit for bit with
    TORCHDYNAMO_DISABLE=1). On the CPU, MKL's float32 matmuls round by their buffers' memory
    alignment: 3 of 22 runs of this test after the bad-input one differed by 6e-8, none of 36 with
    MKL_CBWR=COMPATIBLE (2 cores, 2026-12-03)."""
    tol = 1e-6
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=lambda m: f"{k}: {m}")


def test_resume_after_interruption_gives_identical_gates(setup, monkeypatch):
    d, model, data = setup
    TG.main(base_args(model, data, d / "full", "--steps", "6", "--warmup", "2"))
    TG.main(base_args(model, data, d / "cut", "--steps", "6", "--warmup", "2", "--stop-after", "3"))
    TG.main(base_args(model, data, d / "cut", "--steps", "6", "--warmup", "2", "--resume"))
    full = read_gates(d / "full")
    assert_same_gates(full, read_gates(d / "cut"))
    # SIGTERM mid-run: the step in flight is dropped, the last whole step saved, --resume finishes it
    real = TG.lr_at
    monkeypatch.setattr(TG, "lr_at", lambda s, a: (os.kill(os.getpid(), signal.SIGTERM) if s == 4 else None,
                                                    real(s, a))[1])
    with pytest.raises(SystemExit, match="stopped by signal"):
        TG.main(base_args(model, data, d / "sig", "--steps", "6", "--warmup", "2"))
    monkeypatch.setattr(TG, "lr_at", real)
    assert torch.load(d / "sig" / "train_state.pt", weights_only=True)["step"] == 4
    TG.main(base_args(model, data, d / "sig", "--steps", "6", "--warmup", "2", "--resume"))
    assert_same_gates(full, read_gates(d / "sig"))
    # a different gate, data or optimizer setup is refused, saying what differs
    again = ["--steps", "8", "--warmup", "2", "--resume"]
    with pytest.raises(SystemExit, match="--gate-hidden 16 there vs 8 now"):
        TG.main(base_args(model, data, d / "full", *again, "--gate-hidden", "8"))
    with pytest.raises(SystemExit, match="setup: --warmup 2 there vs 20 now$"):
        TG.main(base_args(model, data, d / "full", "--steps", "8", "--resume"))
    with pytest.raises(SystemExit, match=r"setup: --lr 0.001 there vs 0.01 now; --loss-from 0.5 there vs 0.25 now$"):
        TG.main(base_args(model, data, d / "full", *again, "--lr", "0.01", "--loss-from", "0.25"))
    other = d / "reversed.jsonl"                                        # the same texts in another order
    other.write_text("".join(reversed(open(data).readlines())))
    with pytest.raises(SystemExit, match=r"data \(crc32, sequences\) \[\d+, \d+\] there vs"):
        TG.main(base_args(model, str(other), d / "full", *again))
    with pytest.raises(SystemExit, match="already holds a run"):
        TG.main(base_args(model, data, d / "full", "--steps", "8"))
    with pytest.raises(SystemExit, match="is at step 6 already, --steps 6"):   # nothing left to train
        TG.main(base_args(model, data, d / "full", "--steps", "6", "--warmup", "2", "--resume"))
    state = (d / "full" / "train_state.pt").read_bytes()
    (d / "full" / "train_state.pt").write_bytes(state[:len(state) // 2])   # truncated: one line, no traceback
    with pytest.raises(SystemExit, match="train_state.pt is not a readable checkpoint"):
        TG.main(base_args(model, data, d / "full", *again))


def test_failed_save_leaves_previous_checkpoint_intact(setup, monkeypatch):
    d, model, data = setup
    out = d / "disk"
    TG.main(base_args(model, data, out, "--steps", "4", "--stop-after", "2"))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def full_disk(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    def torch_full_disk(obj, f, *a, **k):   # what torch.save raises when the disk fills
        open(f, "wb").write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(TG.torch, "save", torch_full_disk)
    with pytest.raises(SystemExit, match="previous checkpoint there is intact"):
        TG.main(base_args(model, data, out, "--steps", "4", "--resume"))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    monkeypatch.undo()
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, f, **k: full_disk(None, f))
    with pytest.raises(SystemExit, match="No space left"):
        TG.main(base_args(model, data, out, "--steps", "4", "--resume"))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_trained_gate_folder_runs_in_generate_seer(setup, capsys):
    d, model, data = setup
    TG.main(base_args(model, data, d / "gen", "--steps", "2", "--eval-seqs", "0"))
    assert "--warmup 20 >= --steps 2: the learning rate warms up to 2/20 of --lr" in capsys.readouterr().out
    r = run_cli("generate.py", "--model", model, "--gate", str(d / "gen"), "--attn", "seer", "--budget", "32",
                "--block-size", "16", "--max-new-tokens", "8", "--prompt", " ".join(word_docs(1, 60)[0].split()))
    m = re.search(r"attn seer block 16 budget 32 \| sparsity ([\d.]+)%", r.stdout)   # ~60 tokens, 32 read a step
    assert m and float(m.group(1)) > 10, r.stdout


def test_unpacked_sequences_keep_each_documents_start_and_whole_blocks(tmp_path):
    """Without packing, a document longer than --seq-len keeps its first tokens, one of exactly two
    blocks is kept, and one a token short of two blocks is dropped (word w<i> is token id i)."""
    word_tokenizer(tmp_path)
    docs = [" ".join(f"w{i % 100}" for i in range(200)), " ".join(f"w{i}" for i in range(32)),
            " ".join(f"w{i}" for i in range(31))]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    tokens, spans = TG.load_sequences([data], str(tmp_path), 128, 16, pack=False)
    assert [tokens[a:b].tolist() for a, b in spans] == [[i % 100 for i in range(128)], list(range(32))]


def test_data_formats_skip_and_count_bad_lines_and_short_sequences(setup, capsys):
    d, model, _ = setup
    long = " ".join(f"w{i % 100}" for i in range(200))
    data = write_jsonl(d / "mixed.jsonl", [
        {"text": long}, {"prompt": long, "response": "w1 w2"}, "{not json", {"other": 1}, {"text": "w1 w2"},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "w3"}]}])
    tokens, spans = TG.load_sequences([data], model, 128, 16, pack=False)
    out = capsys.readouterr().out
    assert "skipped 2 malformed line(s), 1 sequence(s) shorter than two blocks" in out
    assert len(spans) == 3 and all(b - a == 128 for a, b in spans)
    (d / "doc.txt").write_text(long)
    tokens, spans = TG.load_sequences([str(d / "doc.txt")], model, 64, 16, pack=True)
    assert [b - a for a, b in spans] == [64, 64, 64]                   # 200 tokens: the 9-token tail dropped
    (d / "doc2.txt").write_text("w5 " * 40)                               # packed: doc, <|endoftext|>, doc2, ...
    tokens, spans = TG.load_sequences([str(d / "doc.txt"), str(d / "doc2.txt")], model, 64, 16, pack=True)
    assert len(tokens) == 242 and tokens[200] == tokens[241] == 127 and (tokens[201:241] == 5).all()
    assert spans == [(0, 64), (64, 128), (128, 192), (192, 242)]
    assert TG.render({"prompt": "a", "response": "b"}) == \
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"


def test_lr_warms_up_linearly_then_follows_a_cosine_down_to_min_lr():
    """The published schedule (SPEC §5): 20 linear warm-up steps to lr 1e-3 (the first step already
    at 1/20 of it), then a cosine over the remaining steps down to 1e-5 at --steps."""
    args = TG.parse(["--model", "m", "--data", "d", "--out", "o", "--steps", "820"])
    lr = [TG.lr_at(s, args) for s in range(821)]
    assert lr[0] == pytest.approx(1e-3 / 20) and lr[9] == pytest.approx(1e-3 / 2) and lr[19] == pytest.approx(1e-3)
    assert lr[20] == pytest.approx(1e-3) and lr[420] == pytest.approx((1e-3 + 1e-5) / 2)     # halfway down
    assert lr[220] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)   # a quarter
    assert lr[820] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lr[19:], lr[20:]))


def test_train_gate_default_recall_budgets_follow_the_sequence_length():
    """Budgets that cover the whole sequence recall everything: the default stays below it."""
    def budgets(*extra):
        return TG.parse(["--model", "m", "--data", "d", "--out", "o", *extra]).budgets
    assert budgets() == [1024, 2048, 4096]                                # --seq-len 32768, block 64
    assert budgets("--seq-len", "1024", "--block-size", "16") == [32, 64, 128]
    assert budgets("--seq-len", "4224", "--block-size", "64") == [128, 256, 512]   # whole blocks
    assert budgets("--seq-len", "32", "--block-size", "16") == [16]
    assert budgets("--seq-len", "1024", "--eval-budgets", "64,2048") == [64, 2048]   # as given


def test_train_gate_bad_inputs_fail_with_one_line_errors(setup, tmp_path, capsys):
    d, model, data = setup
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "[1, 2]", '{"txt": "x"}'])
    (tmp_path / "empty.txt").write_text("")
    cases = [(["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--data", bad], r"no usable text .*\(3 malformed"),
             (["--data", str(tmp_path / "empty.txt")], r"no usable text .*\(0 malformed"),
             (["--data", data, "--seq-len", "100"], "must be a multiple of --block-size"),
             (["--data", data, "--batch", "3", "--micro-batch", "2"], "multiple of --micro-batch"),
             (["--data", data, "--eval-budgets", "24"], "positive multiple of 16"),
             (["--data", data, "--eval-seqs", "40"], "leave none for training"),
             (["--data", data, "--micro-batch", "0"], "--micro-batch must be >= 1"),
             (["--data", data, "--eval-data", data, "--eval-seqs", "0"], "would evaluate nothing"),
             (["--data", data, "--save-every", "-1"], "--save-every must be >= 0"),
             (["--data", data, "--eval-budgets", "16,x"], "integers, comma-separated"),
             (["--data", data, "--seq-len", "2048"], "past .* max_position_embeddings 1024"),
             (["--data", data, "--block-size", "0"], "--block-size must be >= 1"),
             (["--data", data, "--min-lr", "-0.01"], "need 0 <= --min-lr <= --lr"),
             (["--data", data, "--loss-scale", "-10"], "--loss-scale must be a finite number > 0"),
             (["--data", data, "--resume"], "--resume: no train_state.pt in")]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            TG.main(["--model", model, "--out", str(tmp_path / "o"), "--block-size", "16", "--seq-len", "128", *extra])
        assert re.search(msg, f"{e.value} {capsys.readouterr().err}"), msg
    # --out: new or empty, and writable, both found before any training
    (tmp_path / "file").write_text("")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("")                         # any file: the folder is not empty
    for out, msg in [(model, "already holds config.json"), (tmp_path / "w", "already holds notes.txt"),
                     (tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "o", "cannot be written")]:
        with pytest.raises(SystemExit, match=msg):
            TG.main(["--model", model, "--out", str(out), "--data", data, "--block-size", "16", "--seq-len", "128"])
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, msg in [(tmp_path / "list.json", "expected a JSON object, found a list"), ("qwen3-5b", "not one of qwen3-4b")]:
        with pytest.raises(SystemExit, match=msg):                          # --random-init: a shape or a config.json
            TG.main(["--random-init", str(name), "--out", str(tmp_path / "o"), "--seq-len", "128"])
    run_cli("train_gate.py", "--model", model, "--out", str(tmp_path / "o"), "--data", bad, "--seq-len", "128",
            fails_with="^error: no usable text")                                  # as a script: one line, no trace
    assert not (tmp_path / "o").exists()                                  # failed runs leave no --out behind


def test_random_init_trains_on_a_config_json_with_seeded_random_weights(setup, tmp_path):
    """--random-init (speed runs): Qwen3.random's weights, the same for every rank (seeded), and random tokens."""
    _, model, _ = setup
    config = os.path.join(model, "config.json")
    cfg = M.Qwen3Config.from_dict(M.read_json(config))
    one, two, other = (M.Qwen3.random(cfg, "cpu", torch.float32, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(one[k], two[k]) for k in one) and not torch.equal(one["embed_tokens.weight"],
                                                                              other["embed_tokens.weight"])
    assert all((t == 1).all() if "norm" in k else abs(t.std().item() - 0.02) < 0.004 for k, t in one.items())
    hist = TG.main(["--random-init", config, "--out", str(tmp_path / "r"), "--seq-len", "128",
                    "--block-size", "16", "--gate-hidden", "16", "--batch", "2", "--eval-seqs", "0", "--steps", "2",
                    "--log-every", "100", "--q-chunk", "24"])
    assert len(hist["loss"]) == 2 and all(0 < x < float("inf") for x in hist["loss"])
    assert (tmp_path / "r" / "config.json").is_file()


@cuda
def test_train_gate_under_torchrun_refuses_a_named_gpu(setup, tmp_path, capsys, monkeypatch):
    """Under torchrun every rank takes its LOCAL_RANK's GPU, not one named by --device (a CPU machine
    refuses --device cuda:0 before this check)."""
    _, model, data = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        TG.parse(["--model", model, "--out", str(tmp_path / "o"), "--data", data, "--device", "cuda:0"])
    assert "each rank takes cuda:LOCAL_RANK" in capsys.readouterr().err


def test_recall_table_averages_recall_over_rows_and_far_shares_over_far_cases(setup, capsys, monkeypatch):
    """recall_layer replaced by fixed sums (each call: 10 rows, 4 far needles): evaluate() divides
    recall sums by the rows and far-needle hits by the far cases, over 2 held-out sequences x 2 layers."""
    d, model, data = setup
    per = {("gate", 16): (7, 1), ("quest", 16): (6, 0), ("oracle", 16): (9, 3),
           ("gate", 32): (8, 2), ("quest", 32): (6.5, 1), ("oracle", 32): (9.5, 4)}

    def fixed(gate, q, k, qr, kr, loss_from, chunk, budgets, sums):
        for (name, b), (r, f) in per.items():
            sums[name, b] = sums.get((name, b), 0.0) + r
            sums[name, b, "far"] = sums.get((name, b, "far"), 0.0) + f
        sums["n"] = sums.get("n", 0.0) + 10
        sums["far"] = sums.get("far", 0.0) + 4
    monkeypatch.setattr(TG, "recall_layer", fixed)
    capsys.readouterr()
    hist = TG.main(base_args(model, data, d / "table", "--steps", "1", "--eval-every", "1"))
    out = capsys.readouterr().out
    rec = hist["recall"][1]
    assert rec["far cases"] == 16
    for (name, b), (r, f) in per.items():
        assert rec[name, b] == pytest.approx(r / 10) and rec[name, b, "far"] == pytest.approx(f / 4), (name, b)
    assert "share of 16 far needles" in out, out
    assert "      16  0.7000  0.6000  0.9000        0.2500  0.0000  0.7500" in out, out
    assert "      32  0.8000  0.6500  0.9500        0.5000  0.2500  1.0000" in out, out


def test_stop_after_counts_the_steps_of_this_run(setup, capsys):
    """--stop-after N stops N steps after where this run started: 2, then 2 more from a resume, then the rest."""
    d, model, data = setup
    out = d / "stop"
    for extra, want in ((["--stop-after", "2"], 2), (["--resume", "--stop-after", "2"], 4), (["--resume"], 6)):
        TG.main(base_args(model, data, out, "--steps", "6", "--warmup", "2", *extra))
        assert torch.load(out / "train_state.pt", weights_only=True)["step"] == want, extra
        assert f"saved step {want} to" in capsys.readouterr().out


def test_held_out_sequences_are_not_trained_on(setup, monkeypatch):
    """12 documents of 300 words + a separator each, packed: 3612 tokens -> 28 sequences of 128 (the
    28-token tail is dropped); --eval-seqs 2 holds out the last two, training sees the first 26."""
    d, model, data = setup
    seen = []

    class Recording(TG.Order):
        def __init__(self, tokens, spans, seed):
            seen.append(list(spans))
            super().__init__(tokens, spans, seed)
    monkeypatch.setattr(TG, "Order", Recording)
    TG.main(base_args(model, data, d / "held", "--steps", "1"))
    assert seen == [[(128 * i, 128 * (i + 1)) for i in range(26)]]


def test_order_visits_every_sequence_once_an_epoch_in_a_new_order_and_resumes_from_an_index():
    tokens, spans = torch.arange(10), [(i, i + 1) for i in range(10)]
    data = TG.Order(tokens, spans, seed=3)
    epochs = [[int(data[e * 10 + r]) for r in range(10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3                     # a fresh permutation each epoch
    fresh = TG.Order(tokens, spans, seed=3)                         # a resumed run: from the index alone
    assert [int(fresh[i]) for i in range(15, 30)] == [x for e in epochs for x in e][15:30]


def test_seq_len_may_equal_max_position_embeddings(setup, monkeypatch):
    """Positions 0 .. 1023 all exist in a model of max_position_embeddings 1024: --seq-len 1024 passes the
    check (the run is stopped right after it, at the data loading)."""
    d, model, data = setup

    class Reached(Exception):
        pass
    monkeypatch.setattr(TG, "load_sequences", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        TG.main(["--model", model, "--data", data, "--out", str(d / "maxpos"), "--seq-len", "1024",
                 "--block-size", "16", "--gate-hidden", "16"])


def test_two_ranks_over_gloo_match_one_process(setup, capsys):
    """The gates, and the KL and recall table that rank 0 prints (all-reduced over the ranks), of two
    gloo ranks equal one process's over the same batch."""
    d, model, data = setup
    cpu = ["--steps", "3", "--batch", "4", "--device", "cpu", "--log-every", "3"]   # gloo on any machine
    capsys.readouterr()
    TG.main(base_args(model, data, d / "one", *cpu))
    printed = capsys.readouterr().out
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train_gate.py",
                *base_args(model, data, d / "two", *cpu), env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, two = read_gates(d / "one"), read_gates(d / "two")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    moments = [torch.load(d / run / "train_state.pt", weights_only=True)["optimizer"]["state"]
               for run in ("one", "two")]
    for i, m in moments[0].items():          # the gradients' scale, which Adam's steps do not show
        assert torch.allclose(m["exp_avg"], moments[1][i]["exp_avg"], rtol=1e-3, atol=1e-9), i

    def report(text):   # the step's KL, the far-needle count, the recall table's rows
        kl = float(re.search(r"step 3/3 \| KL ([\d.]+)", text).group(1))
        far = int(re.search(r"the share of (\d+) far needles", text).group(1))
        rows = [[float(x) for x in line.split()] for line in
                re.findall(r"^\s+\d+(?:\s+[\d.]+){6}$", text, re.M)]
        return kl, far, rows
    (kl1, far1, rows1), (kl2, far2, rows2) = report(printed), report(r.stdout)
    assert kl2 == pytest.approx(kl1, abs=2e-4) and far1 == far2 > 0 and len(rows1) == len(rows2) == 2
    assert all(a == pytest.approx(b, abs=2e-4) for a, b in zip(rows1, rows2)), (rows1, rows2)


# ---- the tiny task and the shipped tiny model (tiny.py, tiny/) ----

LINE = re.compile(r"(y\d+) := (\w+) ([+-]) (\w+) ; (\w+) (\d+) ; (\w+) (\d+) ; (\d+) ([+-]) (\d+) = (\d+) ; (y\d+) (\d+)")


def reference_solution(prompt):
    """An independent reading of a prompt: regexes over the whole text, values by recursion
    from the definitions (not a forward pass), subtraction as adding the complement mod 10.
    -> (values of every name, the program as [(y, a, op, b)])."""
    defs = dict(re.findall(r"^(x\d+) (\d+)$", prompt, re.M))
    prog = re.findall(r"^(y\d+) := (\w+) ([+-]) (\w+)$", prompt, re.M)
    rule = {y: (a, op, b) for y, a, op, b in prog}

    @functools.lru_cache(None)
    def val(name):
        if name in defs:
            return int(defs[name])
        a, op, b = rule[name]
        return (val(a) + (val(b) if op == "+" else 10 - val(b))) % 10
    return {n: val(n) for n in list(defs) + list(rule)}, prog


@pytest.mark.parametrize("seed,n_x,n_y,ops", [(0, 300, 120, "+-"), (1, 5, 40, "+-"), (2, 50, 3, "+-"),
                                              (3, 400, 200, "+-"), (4, 300, 120, "+"), (5, 30, 60, "-")])
def test_generated_trace_agrees_with_an_independent_evaluator(seed, n_x, n_y, ops):
    p = tiny.make_problem(random.Random(seed), n_x, n_y, ops=ops)
    value, prog = reference_solution(p["prompt"])
    assert len(prog) == n_y and len([k for k in value if k.startswith("x")]) == n_x
    assert {s[2] for s in prog} == set(ops)
    lines = p["trace"].split("\n")
    assert len(lines) == n_y + 1 and lines[-1] == f"answer = {value[prog[-1][0]]}" and p["answer"] == lines[-1][9:]
    for i, ((y, a, op, b), line) in enumerate(zip(prog, lines)):
        m = LINE.fullmatch(line)
        assert m, f"step {i + 1} malformed: {line!r}"
        g = m.groups()
        assert g[:4] == (y, a, op, b) and g[4] == a and g[6] == b and g[12] == y and g[9] == op
        assert int(g[5]) == int(g[8]) == value[a] and int(g[7]) == int(g[10]) == value[b]
        assert int(g[11]) == int(g[13]) == value[y]
        # every operand was stated before the step that reads it: a definition or an earlier step
        for o in (a, b):
            assert o in value and (o.startswith("x") or [s[0] for s in prog].index(o) < i)
    assert [s[0] for s in prog] == [f"y{i}" for i in range(1, n_y + 1)]    # y names in program order


def test_score_accepts_the_reference_trace_and_recomputes_from_the_prompt():
    p = tiny.make_problem(random.Random(5), 40, 30)
    assert tiny.score(p["prompt"], p["trace"]) == (True, 30, 30)
    other = tiny.make_problem(random.Random(6), 40, 30)             # a trace of another problem scores ~0
    ok, steps, _ = tiny.score(p["prompt"], other["trace"])
    assert steps == 0
    assert tiny.score(p["prompt"], "") == (False, 0, 30)


def corrupt(trace, i, token_index):
    """Change one token (a value) of trace line i to another value."""
    lines = [line.split() for line in trace.split("\n")]
    w = lines[i][token_index]
    lines[i][token_index] = str((int(w) + 3) % 10)
    return "\n".join(" ".join(line) for line in lines)


def test_score_marks_a_corrupted_step_wrong_at_that_step():
    p = tiny.make_problem(random.Random(7), 60, 50)
    value, prog = reference_solution(p["prompt"])
    k = next(i for i, (y, a, op, b) in enumerate(prog) if i > 10 and any(y in (s[1], s[3]) for s in prog[i + 1:]))
    y = prog[k][0]
    users = [j for j, s in enumerate(prog) if j > k and y in (s[1], s[3])]
    # a wrong looked-up value: that step only, answer unaffected
    bad = corrupt(p["trace"], k, 7)
    assert tiny.score(p["prompt"], bad) == (True, 49, 50)
    lines = bad.split("\n")
    for j in range(50):                                             # every prefix: all right but step k
        assert tiny.score(p["prompt"], "\n".join(lines[:j + 1]))[1] == (j + 1 if j < k else j)
    # a wrong result at step k, carried on consistently by every later step (the trace rebuilt here):
    # step by step only k is wrong, though every step it changed differs from the true trace
    carried, wrong = dict(value), []
    for i, (yi, a, op, b) in enumerate(prog):
        va, vb = carried[a], carried[b]
        r = (va + vb) % 10 if op == "+" else (va - vb) % 10
        carried[yi] = (r + 3) % 10 if i == k else r
        wrong.append(f"{yi} := {a} {op} {b} ; {a} {va} ; {b} {vb} ; {va} {op} {vb} = {carried[yi]} "
                     f"; {yi} {carried[yi]}")
    same = sum(w == t for w, t in zip(wrong, p["trace"].split("\n")))
    assert users and same < 49
    bad = "\n".join(wrong + [f"answer = {carried[prog[-1][0]]}"])
    assert tiny.score(p["prompt"], bad)[1:] == (49, 50)
    # a wrong final answer, a missing answer, and a dropped line (everything after it misaligned)
    wrong_answer = p["trace"].rsplit("=", 1)[0] + f"= {(value[prog[-1][0]] + 1) % 10}"
    assert tiny.score(p["prompt"], wrong_answer) == (False, 50, 50)
    assert tiny.score(p["prompt"], p["trace"].rsplit("\n", 1)[0]) == (False, 50, 50)
    dropped = p["trace"].split("\n")
    del dropped[k]
    assert tiny.score(p["prompt"], "\n".join(dropped))[1] <= k + 1


def test_tokenizer_round_trips_task_text_one_token_per_word(tmp_path):
    tok = tiny.build_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    unk = tiny.VOCAB.index(tiny.UNK)
    for seed in range(3):
        p = tiny.make_problem(random.Random(seed), 100, 60)
        text = p["prompt"] + p["trace"]
        for t in (tok, loaded):
            enc = t.encode(text + tiny.EOS)
            assert unk not in enc.ids
            assert len(enc.ids) == len(re.findall(r"\n|[^ \n]+", text)) + 1 == tiny.n_tokens(100, 60) + 1
            assert enc.ids[-1] == tiny.VOCAB.index(tiny.EOS)
            assert t.decode(enc.ids) == text                          # <|endoftext|> skipped
            assert t.decode(enc.ids, skip_special_tokens=False) == text + " " + tiny.EOS
            # the prompt and the generated trace decode on their own, as generate.py does
            assert t.decode(t.encode(p["prompt"]).ids) == p["prompt"]
            assert t.decode(t.encode(p["trace"]).ids) == p["trace"]
    # streaming: decoding a growing prefix only ever appends
    ids = tok.encode(p["trace"]).ids[:80]
    prev = ""
    for n in range(1, len(ids) + 1):
        now = tok.decode(ids[:n])
        assert now.startswith(prev)
        prev = now


def test_problems_are_reproducible_from_the_seed(tmp_path):
    assert tiny.make_problem(random.Random(11)) == tiny.make_problem(random.Random(11))
    assert tiny.make_problem(random.Random(11)) != tiny.make_problem(random.Random(12))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    tiny.write_jsonl(str(a), 3, seed=4, n_x=20, n_y=10)
    tiny.write_jsonl(str(b), 3, seed=4, n_x=20, n_y=10)
    assert a.read_bytes() == b.read_bytes()
    rng = random.Random(4)
    for line in a.read_text().splitlines():
        rec, p = json.loads(line), tiny.make_problem(rng, 20, 10)
        assert rec == dict(prompt=p["prompt"], answer=p["answer"], text=p["prompt"] + p["trace"])


def test_default_problem_is_at_least_4k_tokens_and_lookups_reach_far_back():
    p = tiny.make_problem(random.Random(0))
    text = p["prompt"] + p["trace"]
    assert len(tiny.build_tokenizer().encode(text).ids) >= 4096
    words = re.findall(r"\n|[^ \n]+", text)
    start = len(re.findall(r"\n|[^ \n]+", p["prompt"]))
    last, dist, ys = {}, [], []                                    # where each fact was last stated
    for i in range(len(words) - 1):
        if words[i + 1].isdigit() and words[i][0] in "xy":             # a name and its value
            if i >= start and words[i - 1] == ";" and words[i + 2] == ";":   # a lookup, not a result
                dist.append(i - last[words[i]])
                ys += [dist[-1]] * (words[i][0] == "y")
            last[words[i]] = i
    assert len(dist) == 2 * tiny.N_Y
    assert sorted(dist)[len(dist) // 2] > 512                      # even to the latest restatement
    assert len(ys) > 40 and sorted(ys)[len(ys) // 2] > 100         # earlier results too, not just the last one


def test_training_batches_fit_the_sequence_length_and_mask_only_the_prompt():
    tok, rng = tiny.build_tokenizer(), random.Random(0)
    n_x, n_y = tiny.sizes_for(5120)
    sizes = set()
    for _ in range(40):
        ids, P = tiny.make_batch(rng, tok, 2, 5120)
        T = ids.shape[1]
        assert T <= 5120 and ids.shape[0] * T <= 2 * 5120 and ids.shape[0] >= 1
        assert (ids[:, -1] == tiny.VOCAB.index(tiny.EOS)).all() and (ids[:, P - 1] == tiny.VOCAB.index("\n")).all()
        assert (ids[:, P - 2] == tiny.VOCAB.index("<trace>")).all()    # the loss starts right after <trace>
        sizes.add(T)
    largest = tiny.n_tokens(n_x, n_y) + 1
    assert len(sizes) > 20 and max(sizes) <= largest and min(sizes) < largest / 8   # many sizes, small ones too


def test_training_stream_is_the_same_for_any_number_of_workers():
    one, two = tiny.batches(5, 2, 512, workers=1), tiny.batches(5, 2, 512, workers=2)
    for _ in range(4):
        (a, p), (b, q) = next(one), next(two)
        assert p == q and np.array_equal(a, b)
    one.close(), two.close()


def test_data_cli_writes_problems(tmp_path):
    out = tmp_path / "d.jsonl"
    run_cli("tiny.py", "data", "--n", "2", "--seed", "1", "--out", str(out))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all(tiny.score(r["prompt"], r["text"][len(r["prompt"]):])[0] for r in recs)
    run_cli("tiny.py", "data", "--n", "1", "--n-y", "999", "--out", str(out), fails_with="n_y")


def ours_equals_transformers(path, problem):
    """A tiny.py model folder loaded by ours and by transformers (float32, <= 5M parameters): our
    logits for the problem's prompt and trace equal transformers'. -> (ours, ids [1, T], logits)."""
    import transformers
    from tokenizers import Tokenizer
    ours = M.Qwen3.from_pretrained(path, dtype=torch.float32)
    assert sum(p.numel() for p in ours.parameters()) <= 5e6
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = problem["prompt"] + problem["trace"]
    ids = torch.tensor([Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(text).ids])
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    return ours, ids, logits


def test_pretrain_smoke_folder_loads_in_ours_and_transformers_with_equal_logits(tmp_path):
    out = tmp_path / "tiny"
    run_cli("tiny.py", "pretrain", "--out", str(out), "--steps", "3", "--batch", "2", "--seq-len", "256", "--warmup",
            "1", "--eval-every", "2", "--device", "cpu", "--workers", "2")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "pretrain_log.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] >= 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tiny.VOCAB.index(tiny.EOS)
    assert (out / "model.safetensors").stat().st_size < 10e6
    _, ids, logits = ours_equals_transformers(str(out), tiny.make_problem(random.Random(3), 10, 4))
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    # a run continues from the saved folder
    run_cli("tiny.py", "pretrain", "--out", str(tmp_path / "more"), "--init", str(out), "--steps", "1", "--batch", "1",
            "--seq-len", "256", "--device", "cpu")
    assert (tmp_path / "more" / "model.safetensors").is_file()
    # and never over a model folder
    before = (out / "model.safetensors").read_bytes()
    run_cli("tiny.py", "pretrain", "--out", str(out), "--steps", "1", "--device", "cpu",
            fails_with="already holds config.json")
    assert (out / "model.safetensors").read_bytes() == before


def test_shipped_tiny_model_equals_transformers_does_its_lookups_and_its_gates_load():
    path = os.path.join(HERE, "tiny")
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) < 10e6
    p = tiny.make_problem(random.Random(3), 30, 8)
    ours, ids, logits = ours_equals_transformers(path, p)
    # it learned the task's lookups: after "; name" in the trace, the next token is that name's value
    words = re.findall(r"\n|[^ \n]+", p["prompt"] + p["trace"])      # one token per word
    assert len(words) == ids.shape[1]
    start = words.index("<trace>")
    lookups = [i for i in range(start, len(words) - 2) if words[i - 1] == words[i + 2] == ";"]
    hits = [logits[0, i].argmax().item() == ids[0, i + 1].item() for i in lookups]
    assert len(hits) == 16 and sum(hits) >= 15, hits
    for S in (16, 32, 64):                                  # one gate folder per block size, checked against the model
        GT.load_gates(ours, os.path.join(path, f"gate-{S}"))
        assert ours.layers[0].self_attn.attn_gate.block_size == S


def test_default_generate_runs_end_to_end_on_the_shipped_model():
    r = run_cli("generate.py", "--seed", "3", "--max-new-tokens", "120")
    out = r.stdout
    assert "[tiny task, problem seed 3]" in out
    assert re.search(r"\[answer (correct|WRONG) \(expected \d\) \| steps correct \d+/120\]", out)
    m = re.search(r"generated tokens (\d+) \| decode [\d.]+ tokens/s \| attn seer block 16 budget 512 "
                  r"\| sparsity ([\d.]+)% \| ended by EOS 0 of 1\]", out)
    assert m and int(m.group(1)) == 120 and float(m.group(2)) > 50   # a 1.6K-token prompt, 512 tokens read per step
    # a short problem the model finishes: its answer line, then EOS ends it before --max-new-tokens
    prompt = tiny.make_problem(random.Random(0), n_x=20, n_y=5)["prompt"]
    out = run_cli("generate.py", "--prompt", prompt, "--attn", "dense", "--max-new-tokens", "300").stdout
    assert re.search(r"\nanswer = \d\n\[prompt tokens \d+ \|.*\| ended by EOS 1 of 1\]", out), out[-400:]


def test_eval_mode_scores_problems_and_prints_every_row(tmp_path):
    data = tmp_path / "p.jsonl"
    tiny.write_jsonl(str(data), 3, seed=5, n_x=40, n_y=6)
    r = run_cli("generate.py", "--eval", str(data), "--task", "tiny", "--eval-budgets", "32,64", "--max-new-tokens",
                "160", "--eval-blocks", "16,32")
    rows = re.findall(r"^\s*(\w+)\s+block\s+(\S+) budget\s+(\S+): answer ([\d.]+)% steps ([\d.]+)% sparsity ([\d.]+)%",
                      r.stdout, re.M)
    want = {("dense", "-", "-")} | {(a, str(S), str(b)) for a in ("seer", "quest", "oracle", "window")
                                    for S in (16, 32) for b in (32, 64)}
    assert {row[:3] for row in rows} == want, r.stdout
    for a, S, b, ans, steps, sp in rows:
        assert 0 <= float(ans) <= 100 and 0 <= float(steps) <= 100
        assert (float(sp) == 0) == (a == "dense")
    # the shipped model decodes these small problems well dense: a scoring that lost its outputs reads 0
    dense = next(row for row in rows if row[0] == "dense")
    assert float(dense[4]) >= 50, r.stdout
    # block and budget pairs that are not whole blocks are left out, and said to be
    r = run_cli("generate.py", "--eval", str(data), "--task", "tiny", "--eval-attn", "window", "--eval-budgets",
                "16,48", "--eval-blocks", "16,32", "--max-new-tokens", "2")
    assert "[left out, as a budget is whole blocks: block 32 with budget 16, 48]" in r.stderr, r.stderr
    assert re.findall(r"^\s*window\s+block\s+(\d+) budget\s+(\d+):", r.stdout, re.M) == [("16", "16"), ("16", "48")]
    # a record that is not a tiny-task problem stops the run before any decoding, in one line
    data.write_text(data.read_text() + json.dumps({"prompt": "what is 2 + 2?", "answer": "4"}) + "\n")
    run_cli("generate.py", "--eval", str(data), "--task", "tiny", fails_with="record 4: not a tiny-task prompt")



def test_eval_table_averages_answers_steps_sparsity_and_length(tmp_path, capsys, monkeypatch):
    """The --eval table from fixed outputs (generate.run replaced): problem 1 gets its reference trace
    (answer right, every step right), problem 2 the same trace without its answer line (answer
    wrong, every step right), so each row reads answer 50.0%, steps 100.0%, the sparsity run gave,
    and the two outputs' mean length."""
    data = tmp_path / "p.jsonl"
    tiny.write_jsonl(str(data), 2, seed=5, n_x=10, n_y=6)
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    tok = tiny.build_tokenizer()
    traces = [r["text"][len(r["prompt"]):] for r in recs]
    outs = [tok.encode(traces[0]).ids, tok.encode(traces[1].rsplit("\n", 1)[0]).ids]
    monkeypatch.setattr(gen, "run", lambda net, ids, eos, args, attn, budget, block, graphs, on_token=None:
                        (outs, 0.0 if attn == "dense" else 0.25, 1.0, 0.1))
    code, out, err = run_script(capsys, "generate.py", "--eval", str(data), "--task", "tiny", "--eval-attn",
                                "dense,window", "--eval-budgets", "32", "--eval-blocks", "16", "--device", "cpu")
    assert code in (0, None), err
    n = round((len(outs[0]) + len(outs[1])) / 2)
    assert f"| dense | - | - | 50.0% | 100.0% | 0.0% | {n} |" in out, out
    assert f"| window | 16 | 32 | 50.0% | 100.0% | 25.0% | {n} |" in out, out


def test_default_run_scores_the_generated_trace(capsys, monkeypatch):
    """The shipped model's default run (run() replaced by the problem's own reference trace, then by
    that trace with one looked-up value changed): the answer line and 'steps correct' of that text."""
    p = tiny.make_problem(random.Random(3))
    tok = tiny.build_tokenizer()
    eos = tiny.VOCAB.index(tiny.EOS)
    for trace, steps in ((p["trace"], 120), (corrupt(p["trace"], 4, 7), 119)):   # the answer right either way
        out_ids = tok.encode(trace).ids + [eos]
        monkeypatch.setattr(gen, "run", lambda *a, **k: ([out_ids], 0.5, 2.0, 0.5))
        code, out, err = run_script(capsys, "generate.py", "--seed", "3", "--device", "cpu")
        assert code in (0, None), err
        assert f"[answer correct (expected {p['answer']}) | steps correct {steps}/120]" in out, out
        assert "[prompt tokens 1624 |" in out and "ended by EOS 1 of 1]" in out, out


def test_trace_loss_is_the_next_token_cross_entropy_over_the_trace_only():
    """trace_loss against a float64 cross-entropy from the full forward's logits, counting only the
    positions whose next token is in the trace (ids[:, P:]); hits: argmax == next token there."""
    net = M.Qwen3.from_pretrained(os.path.join(HERE, "tiny"), dtype=torch.float32)
    tok = tiny.build_tokenizer()
    ids, P = tiny.make_batch(random.Random(2), tok, 2, 256)
    ids = torch.from_numpy(ids)
    g = torch.Generator().manual_seed(0)                                 # every 7th trace token a random digit:
    ids[:, P::7] = torch.randint(2, 12, ids[:, P::7].shape, generator=g)   # a loss of O(1), not ~1e-5
    with torch.no_grad():
        loss, hits = tiny.trace_loss(net, ids, P)
        full = net(ids).double()                                        # [R, T, V]
    T = ids.shape[1]
    lp = full.log_softmax(-1)[:, P - 1:T - 1]                            # predictions of tokens P .. T-1
    want = -lp.gather(-1, ids[:, P:, None]).mean()
    assert abs(loss.item() - want.item()) < 1e-4 * want.item(), (loss.item(), want.item())
    assert hits.shape == (ids.shape[0], T - P)
    top2 = full[:, P - 1:T - 1].topk(2, -1).values                       # [R, T-P, 2]
    clear = top2[..., 0] - top2[..., 1] > 1e-3                          # not a near-tie either pass may break
    assert clear.float().mean() > 0.9
    assert (hits == (full[:, P - 1:T - 1].argmax(-1) == ids[:, P:]))[clear].all()


def test_heldout_accuracy_counts_lookups_steps_and_signs(monkeypatch):
    """tiny.heldout_accuracy with the model's hits given (trace_loss replaced): hits everywhere but the
    looked-up values (tokens 7 and 10 of each 21-token step line); then everywhere but the operand
    names (6 and 9) and the program line's sign (3). Values hand-computed from the line layout
    `y := a op b ; a va ; b vb ; va op vb = r ; y r \\n`."""
    n_x, n_y = tiny.sizes_for(256)
    for wrong, want in (([7, 10], dict(x_acc=0.0, y_acc=0.0, step_acc=0.0, sign_acc=1.0)),
                        ([3, 6, 9], dict(x_acc=1.0, y_acc=1.0, step_acc=0.0, sign_acc=0.0)),
                        ([], dict(x_acc=1.0, y_acc=1.0, step_acc=1.0, sign_acc=1.0))):
        def fake(net, ids, P):
            hit = torch.ones(ids.shape[0], ids.shape[1] - P, dtype=torch.bool)
            for i in wrong:
                hit[:, i:21 * n_y:21] = False
            return torch.tensor(0.0), hit
        monkeypatch.setattr(tiny, "trace_loss", fake)
        got = tiny.heldout_accuracy(torch.nn.Linear(1, 1), tiny.build_tokenizer(), "cpu", 256, n=2)
        T = 21 * n_y + 4                                               # the steps, "answer = v", <|endoftext|>
        assert got == dict(token_acc=pytest.approx((T - len(wrong) * n_y) / T), **want), (wrong, got)


def test_tiny_tokenizer_reads_an_unknown_word_as_pad():
    ids = tiny.build_tokenizer().encode("x1 hello\n2").ids
    assert ids == [tiny.VOCAB.index(w) for w in ("x1", "<pad>", "\n", "2")]


def test_parse_prompt_rejects_a_program_score_could_not_judge():
    """Each of these used to pass parse_prompt and then raise KeyError / IndexError in score()."""
    head = "x1 3\nx2 4\n<prog>\n"
    cases = [("y1 := x1 + x9", r"'y1 := x1 \+ x9': x9 is not defined before it"),
             ("y1 := x1 + y1", "y1 is not defined before it"),                  # a step cannot use itself
             ("y1 := x1 + x2\ny2 := y1 - y3", "'y2 := y1 - y3': y3 is not defined"),
             ("y1 := x1 +", "'y1 := x1 \\+': expected 'y := a op b'"),
             ("y1 := x1 * x2", r"expected 'y := a op b' with op one of \+ -"),
             ("y1 = x1 + x2", "expected 'y := a op b'"),
             ("", "its program has no steps")]
    for prog, msg in cases:
        prompt = head + prog + "\n<trace>\n"
        with pytest.raises(ValueError, match=msg):
            tiny.parse_prompt(prompt)
        with pytest.raises(ValueError, match=msg):
            tiny.score(prompt, "")
    with pytest.raises(ValueError, match="definition 'x1': expected a name and a value"):
        tiny.parse_prompt("x1\n<prog>\ny1 := x1 + x1\n<trace>\n")
    # well-formed: operands from the definitions and from earlier steps
    assert tiny.parse_prompt(head + "y1 := x1 + x2\ny2 := y1 - x1\n<trace>\n") == (
        {"x1": 3, "x2": 4}, [("y1", "x1", "+", "x2"), ("y2", "y1", "-", "x1")])


def test_tiny_cli_bad_inputs_fail_before_training_with_one_line_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "noweights").mkdir()                                      # a config.json but no weights
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(tiny.tiny_config().to_hf_dict(torch.bfloat16)))
    small = ["--steps", "1", "--batch", "1", "--seq-len", "256", "--device", "cpu", "--workers", "1"]
    out = str(tmp_path / "o")
    cases = [(["pretrain", "--out", str(tmp_path / "file"), *small], r"--out \S+file is a file, not a folder"),
             (["pretrain", "--out", str(tmp_path / "file" / "o"), *small], "cannot be written"),
             (["pretrain", "--out", out, "--warmup", "0", *small], "--warmup must be finite and >= 1, got 0"),
             (["pretrain", "--out", out, "--lr", "-1", *small], "--lr must be finite and > 0, got -1.0"),
             (["pretrain", "--out", out, "--init", str(tmp_path / "noweights"), *small], "no model.safetensors"),
             (["data", "--n", "1", "--out", str(tmp_path / "missing" / "d.jsonl")], "cannot be written"),
             (["data", "--n", "1", "--out", str(tmp_path)], "cannot be written")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            tiny.main(argv)
        assert re.search(msg, f"{e.value} {capsys.readouterr().err}"), (argv, msg)
    assert not os.path.exists(out)                                         # failed runs leave no --out behind
    (tmp_path / "keep.jsonl").write_text("keep\n")
    with pytest.raises(SystemExit, match="n_y <= 200"):
        tiny.main(["data", "--n", "1", "--n-y", "999", "--out", str(tmp_path / "keep.jsonl")])
    assert (tmp_path / "keep.jsonl").read_text() == "keep\n"                  # a bad size does not empty --out
    run_cli("tiny.py", "pretrain", "--out", str(tmp_path / "file"), *small,
            fails_with="^error: --out")                                           # as a script: one line, no trace


def test_pretrain_past_its_time_budget_still_makes_one_step_and_logs_a_rerunnable_command(tmp_path):
    args = ["--max-minutes", "1e-9", "--steps", "5", "--batch", "1", "--seq-len", "256", "--eval-every", "0",
            "--device", "cpu", "--workers", "1"]
    run_cli("tiny.py", "pretrain", "--out", str(tmp_path / "a"), *args)
    log = json.loads((tmp_path / "a" / "pretrain_log.json").read_text())
    assert log["steps"] == 1 and "None" not in log["command"], log
    argv = log["command"].split()[1:]                                      # tiny.py pretrain --out ... (no --init)
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    run_cli(*argv)
    again = json.loads((tmp_path / "b" / "pretrain_log.json").read_text())["command"]
    assert again == log["command"].replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_note_signals_notes_the_first_ctrl_c_and_lets_the_second_through():
    stop, before = [], signal.getsignal(signal.SIGINT)
    replaced = M.note_signals(stop)
    try:
        os.kill(os.getpid(), signal.SIGINT)                                # noted, not raised
        assert stop == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)                            # the second: Python's own handler
    finally:
        for sig, h in replaced.items():
            signal.signal(sig, h)
    assert signal.getsignal(signal.SIGINT) is before


def test_pretrain_stopped_by_ctrl_c_ends_its_step_and_saves(tmp_path, monkeypatch):
    real, before = tiny.trace_loss, signal.getsignal(signal.SIGINT)

    def ctrl_c_during_a_step(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)
    monkeypatch.setattr(tiny, "trace_loss", ctrl_c_during_a_step)
    with pytest.raises(SystemExit, match=f"stopped by signal {int(signal.SIGINT)} after 1 steps; saved"):
        tiny.main(["pretrain", "--out", str(tmp_path / "a"), "--steps", "5", "--batch", "1", "--seq-len", "256",
                   "--eval-every", "0", "--device", "cpu", "--workers", "1"])
    assert signal.getsignal(signal.SIGINT) is before
    log = json.loads((tmp_path / "a" / "pretrain_log.json").read_text())
    assert log["steps"] == 1 and log["stopped_by_signal"] == signal.SIGINT
    M.Qwen3.from_pretrained(str(tmp_path / "a"))                          # a whole model folder


@pytest.mark.parametrize("where", ["weights", "small_files"])
def test_save_stopped_midway_leaves_the_previous_save_whole(tmp_path, monkeypatch, where):
    import safetensors.torch
    net, tok, out = M.Qwen3(tiny.tiny_config()), tiny.build_tokenizer(), str(tmp_path)
    tiny.save_folder(net, tok, out, dict(step=1))
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(out)}

    def interrupted(tensors, filename, *args, **kwargs):
        open(filename, "wb").write(b"partial")                             # Ctrl-C while the weights are written
        raise KeyboardInterrupt
    def open_then_interrupted(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:                                                    # Ctrl-C right after a file is opened
            f.close()                                                      # (and so truncated) for writing
            raise KeyboardInterrupt
        return f
    if where == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    else:
        monkeypatch.setattr(tiny, "open", open_then_interrupted, raising=False)
    with torch.no_grad():
        net.embed_tokens.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        tiny.save_folder(net, tok, out, dict(step=2))
    assert sorted(os.listdir(out)) == sorted(before)                       # no temp file left behind
    for f in before:
        assert (tmp_path / f).read_bytes() == before[f], f
    monkeypatch.undo()
    M.Qwen3.from_pretrained(out)                                           # still a loadable folder
