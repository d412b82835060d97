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
        tokens = [int(torch.randint(0, 128, ()).item()) for _ in live]
        logits = net.decode(tokens, live, cache)
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
