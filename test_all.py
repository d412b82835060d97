"""nanoseer tests. CPU tests compare against independent references (transformers' Qwen3,
float64 attention written here); GPU tests skip without CUDA.

    python -m pytest -q test_all.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import generate as gen
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_hf_model(path, tied=False, hq=4, hk=2, d=64, layers=2, hidden=64, vocab=128, seed=0, shard=None):
    """A small random Qwen3 saved by transformers itself (the independent reference)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hq, num_key_value_heads=hk, head_dim=d, tie_word_embeddings=tied,
                      max_position_embeddings=1024, rope_theta=10000.0, eos_token_id=vocab - 1)
    hf = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():   # default init gives near-uniform attention; make it peaky and norms non-trivial
        for name, p in hf.named_parameters():
            if "norm" in name:
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


def test_paged_greedy_matches_transformers_ragged_batch(tmp_path):
    hf = make_hf_model(tmp_path, hq=4, hk=2, d=64)
    ours = M.Qwen3.from_pretrained(str(tmp_path))
    torch.manual_seed(1)
    prompts = [torch.randint(0, 127, (n,)).tolist() for n in (5, 23, 40)]
    n_new = 45
    hf.generation_config.eos_token_id = None                    # run the full 45 tokens
    cache = M.PagedKVCache(ours.config, num_pages=64, page_size=16)
    got = gen.generate(ours, cache, prompts, n_new)             # no eos: 45 tokens each, crossing pages
    for p, g in zip(prompts, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False)[0, len(p):].tolist()
        assert g == ref
    assert len(cache.free) == 64 and not cache.pages             # every page came back


def test_decode_equals_full_recompute_each_step_and_pages_are_reused(tmp_path):
    make_hf_model(tmp_path, hq=8, hk=2, d=64)
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
                full = net(torch.tensor([seqs[sid]]))[0, -1]
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


def test_paged_reference_matches_float64_attention():
    torch.manual_seed(3)
    B, Hq, Hk, D, S, P = 3, 8, 2, 16, 4, 20
    q = torch.randn(B, Hq, D)
    kp, vp = torch.randn(P, S, Hk, D), torch.randn(P, S, Hk, D)
    lengths = torch.tensor([1, 9, 16], dtype=torch.int32)
    table = torch.stack([torch.randperm(P)[:4] for _ in range(B)]).int()
    blocks = torch.tensor([[[0, -1], [-1, 0]], [[2, 0], [1, -1]], [[3, 1], [-1, 2]]], dtype=torch.int32)
    for sel in (None, blocks):
        out = M.decode_attention_ref(q, kp, vp, table, lengths, sel)
        for b in range(B):
            for h in range(Hq):
                kv = h // (Hq // Hk)
                js = range(-(-int(lengths[b]) // S)) if sel is None else [j for j in sel[b, kv].tolist() if j >= 0]
                toks = [(j, t) for j in js for t in range(S) if j * S + t < lengths[b]]
                k = torch.stack([kp[table[b, j], t, kv] for j, t in toks]).double()
                v = torch.stack([vp[table[b, j], t, kv] for j, t in toks]).double()
                w = (k @ q[b, h].double() / D ** 0.5).softmax(0)
                assert torch.allclose(out[b, h].double(), w @ v, atol=1e-5)


def test_bad_inputs_give_one_line_errors(tmp_path):
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
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    net = M.Qwen3.from_pretrained(str(tmp_path))
    cache = M.PagedKVCache(net.config, 100, 16)
    with pytest.raises(ValueError, match="empty prompt"):
        net.prefill([], 0, cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        net.prefill([1] * 1025, 0, cache)
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path), "--prompt", "hi"],
                       cwd=HERE, capture_output=True, text=True)
    assert r.returncode != 0 and "no tokenizer.json" in r.stderr and "Traceback" not in r.stderr


def test_generate_cli_streams_and_reports(tmp_path):
    make_hf_model(tmp_path, vocab=128)
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(127)} | {"<eos>": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path), "--prompt", "w1 w2 w3",
                        "--max-new-tokens", "12", "--block-size", "4"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "prompt tokens 3 | generated tokens" in r.stdout and "tokens/s" in r.stdout
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path), "--prompt", "w1", "--prompt", "w5 w6",
                        "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9", "--num-pages", "1",
                        "--block-size", "4"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode != 0 and "out of pages" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- gate and selectors

import gate as GT


def rope64(x, pos, theta):
    """Rotate-half RoPE written out in float64, pair (i, i + n/2) turned by pos * theta^(-2i/n)."""
    n = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)
    c, s = ang.cos(), ang.sin()
    a, b = x[..., : n // 2], x[..., n // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def test_gate_scores_match_explicit_float64_computation():
    torch.manual_seed(4)
    hk, g, d, dg, S, T = 2, 3, 16, 8, 4, 19
    gate = GT.AttnGate(hk, g, d, dg, S, use_qk_norm=True, rope_theta=100.0).double()
    with torch.no_grad():
        gate.attngate_qnorm.weight.uniform_(0.5, 1.5)
        gate.attngate_knorm.weight.uniform_(0.5, 1.5)
    q, k = torch.randn(T, hk * g, d, dtype=torch.float64), torch.randn(T, hk, d, dtype=torch.float64)
    got = gate.scores(q, k).detach()
    Wq, Wk = gate.attngate_linear_q.weight.detach(), gate.attngate_linear_k.weight.detach()
    nq, nk = gate.attngate_qnorm.weight.detach(), gate.attngate_knorm.weight.detach()
    rms = lambda x, w: x / torch.sqrt((x * x).mean() + 1e-6) * w
    for t in range(T):
        for h in range(hk):
            gq = sum(q[t, h * g + i] @ Wq[h, i] for i in range(g))
            gq = rope64(rms(gq, nq), t, 100.0)
            for j in range(T // S):
                blk = k[j * S:(j + 1) * S, h]
                pooled = torch.cat([blk.max(0).values, blk.min(0).values, blk.mean(0)])
                gk = rope64(rms(pooled @ Wk[h], nk), j * S, 100.0)
                want = gq @ gk / dg ** 0.5 if j < t // S else float("-inf")
                assert got[t, h, j] == want if want == float("-inf") else abs(got[t, h, j] - want) < 1e-5  # RoPE angles are float32, as in HF


def gated_model(path, hq=4, hk=2, d=32, seed=0):
    make_hf_model(path, hq=hq, hk=hk, d=d, seed=seed)
    net = M.Qwen3.from_pretrained(str(path))
    torch.manual_seed(seed)
    GT.attach_gates(net, dg=16, block_size=8)
    return net


def test_pooled_keys_incremental_decode_equal_prefill(tmp_path):
    net = gated_model(tmp_path)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (29,)).tolist()
    for attn, budget in (("seer", 256), ("quest", 256)):   # full budget: decode keys equal prefill keys
        cache = M.PagedKVCache(net.config, 16, 8)
        sel = GT.Selector(attn, net, cache, budget)
        net.prefill(ids, "p", cache, sel)                    # all 29 tokens at once
        net.prefill(ids[:3], "d", cache, sel)                # 3, then 26 decode steps
        cache.allocate("d", len(ids))
        for n, t in enumerate(ids[3:], start=3):
            net.decode(torch.tensor([t]), cache.block_table(["d"]), torch.tensor([n], dtype=torch.int32), cache, sel)
        for name, buf in cache.pooled.items():
            pp, pd = cache.pages["p"], cache.pages["d"]
            n = 3 if name == "gate_k" else 4                 # gate keys exist for full pages only
            assert torch.allclose(buf[:, pp[:n]], buf[:, pd[:n]], atol=1e-5), name


def greedy(net, prompts, attn, budget=None, n=40, page=8):
    cache = M.PagedKVCache(net.config, 64, page)
    sel = GT.Selector(attn, net, cache, budget)
    return gen.generate(net, cache, prompts, n, select=sel), sel


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


def test_oracle_picks_blocks_of_highest_true_attention_and_quest_bounds_qk(tmp_path):
    net = gated_model(tmp_path, hq=8, hk=2)
    torch.manual_seed(7)
    cache = M.PagedKVCache(net.config, 32, 8)
    ids = torch.randint(0, 128, (61,)).tolist()
    net.prefill(ids, 0, cache)
    captured = {}
    for attn in ("oracle", "quest"):
        sel = GT.Selector(attn, net, cache, 24)
        if attn == "quest":                                    # quest's bounds need pooled keys from a prefill
            cache.release(0)
            net.prefill(ids, 0, cache, sel)
        cache.allocate(0, 62)
        net.decode(torch.tensor([5]), cache.block_table([0]), torch.tensor([61], dtype=torch.int32), cache,
                   Spy(sel, captured))
        for layer, (qr, blocks, table, lengths) in captured.items():
            L, S, Hk, D = int(lengths[0]), 8, 2, 32
            cur = (L - 1) // S
            k = cache.k[layer][table[0].long()].reshape(-1, Hk, D)[:L].double()   # [L, Hk, D]
            for h in range(Hk):
                qh = qr[0, h * 4:(h + 1) * 4].double()                          # [G, D]
                if attn == "oracle":
                    p = (qh @ k[:, h].T / D ** 0.5).softmax(-1)                 # [G, L]
                    blockmax = torch.stack([p[:, j * S:(j + 1) * S].max() for j in range(cur)])
                    want = set(blockmax.topk(3).indices.tolist()) | {cur}
                    assert set(blocks[0, h].tolist()) - {-1} == want
                else:
                    for j in range(cur + 1):
                        page = int(table[0, j])
                        kmax, kmin = cache.pooled["qmax"][layer, page, h].double(), cache.pooled["qmin"][layer, page, h].double()
                        bound = torch.maximum(qh * kmax, qh * kmin).sum(-1)    # [G]
                        true = qh @ k[j * S:min(L, (j + 1) * S), h].T           # [G, tokens]
                        assert (bound[:, None] >= true - 1e-4).all()
        captured.clear()


class Spy:
    """Passes calls through to a selector and records what each layer's selection saw."""
    def __init__(self, sel, captured):
        self.sel, self.captured = sel, captured

    def __call__(self, layer, step, q, qr):
        blocks = self.sel(layer, step, q, qr)
        self.captured[layer] = (qr.clone(), blocks.clone(), step.block_table.clone(), step.lengths.clone())
        return blocks

    def on_write(self, *a):
        return self.sel.on_write(*a)


def test_gate_folder_round_trip_and_published_layout(tmp_path):
    net = gated_model(tmp_path / "m")
    GT.save_gates(net, str(tmp_path / "g"))
    other = M.Qwen3.from_pretrained(str(tmp_path / "m"))
    GT.load_gates(other, str(tmp_path / "g"))
    for a, b in zip(GT.gate_state(net).values(), GT.gate_state(other).values()):
        assert torch.equal(a, b)
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
    g1 = other.layers[1].self_attn.attn_gate
    assert g1.attngate_qnorm is None and g1.block_size == 8
    assert torch.equal(g1.attngate_linear_k.weight, w["model.layers.1.self_attn.attn_gate.attngate_linear_k.weight"])


def test_gate_and_budget_bad_inputs(tmp_path):
    net = gated_model(tmp_path / "m")
    GT.save_gates(net, str(tmp_path / "g"))
    make_hf_model(tmp_path / "big", hq=8, hk=2, d=32, layers=3)
    with pytest.raises(ValueError, match="layers 2 vs model 3, group size 2 vs model 4"):
        GT.load_gates(M.Qwen3.from_pretrained(str(tmp_path / "big")), str(tmp_path / "g"))
    cache = M.PagedKVCache(net.config, 8, 16)
    with pytest.raises(ValueError, match="block size 8 != page size 16"):
        GT.Selector("seer", net, cache, 32)
    cache = M.PagedKVCache(net.config, 8, 8)
    with pytest.raises(ValueError, match="multiple of the block size 8; try 24"):
        GT.Selector("seer", net, cache, 22)
    with pytest.raises(ValueError, match="try 8"):
        GT.Selector("quest", net, cache, 3)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        GT.Selector("seer", net, cache, threshold=1.5)
    with pytest.raises(ValueError, match="not both"):
        GT.Selector("seer", net, cache, 16, 0.1)
    plain = M.Qwen3.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="needs gates"):
        GT.Selector("seer", plain, cache, 16)


# ---------------------------------------------------------------- GPU decode path

@cuda
@pytest.mark.parametrize("attn", ["dense", "seer"])
def test_cuda_graph_replay_equals_eager_decode(tmp_path, attn):
    net = gated_model(tmp_path).cuda()
    torch.manual_seed(8)
    prompts = [torch.randint(0, 127, (n,)).tolist() for n in (3, 17, 30)]   # ragged, pages of 8 fill mid-run
    outs = []
    for graphs in (False, True):
        cache = M.PagedKVCache(net.config, 64, 8, "cuda")
        sel = GT.Selector(attn, net, cache, 1024 if attn == "seer" else None)
        outs.append(gen.generate(net, cache, prompts, 64, select=sel, graphs=graphs))
    assert outs[0] == outs[1]
    if attn == "seer":                                   # full budget: seer equals dense
        cache = M.PagedKVCache(net.config, 64, 8, "cuda")
        assert gen.generate(net, cache, prompts, 64, select=GT.Selector("dense", net, cache)) == outs[0]
