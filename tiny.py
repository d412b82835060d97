"""A tiny reasoning model for nanoseer: a synthetic long-lookup task, its word-level tokenizer,
and pretraining of a small Qwen3 on it, so the method can be measured on a model whose
attention is learned (no real weights or reasoning data can be downloaded here).

The task. The prompt defines N_X variables (`x17 4`: x17 is 4), then lists a program of
N_Y steps, each combining two earlier values mod 10 (`y5 := x17 - y3`). The trace the model
writes works every step out, looking each operand up far back in the context:

    y5 := x17 - y3 ; x17 4 ; y3 9 ; 4 - 9 = 5 ; y5 5

and ends with `answer = 5` (the last step's value). One token per word, and a value always
right after its name: every lookup is a clean "find an earlier `name`, copy the digit after
it" (definitions sit in the first ~900 tokens, the program line of step i after them,
earlier results anywhere in the trace), so a decode step needs a few far-away blocks plus
the local one: sparse and long-range. With `x17 = 4` instead, the model must match the pair
(name, `=`) rather than one token; in our runs that learned the x lookups more slowly and
to a worse end (after 6K steps at --seq-len 1024: held-out step accuracy 30% against 68%).
Defaults (300 variables, 120 steps): 4,147 tokens, a 1,624-token prompt and a 2,523-token trace.
Text is words joined by single spaces, with no space around newlines.

    python tiny.py data --n 200 --seed 1 --out eval.jsonl     # problems {prompt, answer, text}
    python tiny.py pretrain --out a --seq-len 1024            # one GPU, --max-minutes (default 10)
    python tiny.py pretrain --init a --out b --lr 1e-3        # then full length (5120), from a

Pretraining draws fresh problems every step, with the loss on the trace, and saves a Hugging
Face Qwen3 folder (bf16 weights, < 10 MB). Problem sizes are log-uniform from 2 variables and
2 steps up to the largest: the many small problems, where a lookup has few candidates, are
what can teach the model to find a value by its name (with sizes only from 1/8 of the
largest up, x lookups stayed at chance for 4,000 steps). Short sequences first: a step
is small, a run makes many more of them, and the lookups formed there within 2K steps
where 5K steps at 5,120 tokens had not found them (the README has the shipped runs).
"""
import argparse
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

import model as M

BASE = 10                                   # values and arithmetic are mod BASE
N_X, N_Y = 300, 120                         # default problem: 3 N_X + 27 N_Y + 7 tokens
X_NAMES = [f"x{i}" for i in range(400)]     # one token each; caps n_x at 400 and n_y at 200
Y_NAMES = [f"y{i}" for i in range(1, 201)]
EOS, PAD = "<|endoftext|>", "<pad>"
UNK = PAD                                   # every task word is in the vocabulary
SPECIALS = [EOS, PAD]
WORDS = [str(v) for v in range(BASE)] + [":=", "=", "+", "-", ";", "\n", "answer", "<prog>", "<trace>"]
VOCAB = SPECIALS + WORDS + X_NAMES + Y_NAMES
OPS = {"+": lambda a, b: (a + b) % BASE, "-": lambda a, b: (a - b) % BASE}


# ---- the task ----

def n_tokens(n_x, n_y):
    """Tokens of prompt + trace (without the final <|endoftext|>)."""
    return 3 * n_x + 2 + 6 * n_y + 2 + 21 * n_y + 3


def step_line(y, a, op, b, va, vb):
    """The trace line of one step, its operands' values given."""
    r = OPS[op](va, vb)
    return f"{y} := {a} {op} {b} ; {a} {va} ; {b} {vb} ; {va} {op} {vb} = {r} ; {y} {r}"


def make_problem(rng, n_x=N_X, n_y=N_Y, p_x=0.6, ops="+-"):
    """rng (random.Random) -> dict(prompt, trace, answer); text = prompt + trace.

    Step i's operands are each a defined x (prob p_x, always for step 1) or a uniformly
    chosen earlier y, so most lookups reach far back. Each step's operation is drawn from ops."""
    if not 1 <= n_x <= len(X_NAMES) or not 1 <= n_y <= len(Y_NAMES):
        raise ValueError(f"need 1 <= n_x <= {len(X_NAMES)} and 1 <= n_y <= {len(Y_NAMES)}, got {n_x}, {n_y}")
    xs = rng.sample(X_NAMES, n_x)
    value = {x: rng.randrange(BASE) for x in xs}
    prog, trace = [], []
    for i in range(1, n_y + 1):
        y = Y_NAMES[i - 1]
        a, b = (rng.choice(xs) if i == 1 or rng.random() < p_x else Y_NAMES[rng.randrange(i - 1)] for _ in "ab")
        op = rng.choice(ops)
        prog.append(f"{y} := {a} {op} {b}")
        trace.append(step_line(y, a, op, b, value[a], value[b]))
        value[y] = OPS[op](value[a], value[b])
    answer = str(value[Y_NAMES[n_y - 1]])
    prompt = "\n".join([f"{x} {value[x]}" for x in xs] + ["<prog>"] + prog + ["<trace>", ""])
    return dict(prompt=prompt, trace="\n".join(trace + [f"answer = {answer}"]), answer=answer)


def parse_prompt(prompt):
    """prompt -> (values of the defined variables, program steps [(y, a, op, b)]). A prompt that
    score() could not judge raises ValueError here, before any generation, not in score() after."""
    if "<prog>" not in prompt or "<trace>" not in prompt:
        raise ValueError("not a tiny-task prompt: it needs a <prog> line and a <trace> line")
    defs, _, prog = prompt.split("<trace>")[0].partition("<prog>")
    value = {}
    for line in defs.split("\n"):
        if w := line.split():
            if len(w) != 2 or not w[1].isdigit():
                raise ValueError(f"definition {line!r}: expected a name and a value, like 'x17 4'")
            value[w[0]] = int(w[1])
    steps, known = [], set(value)
    for line in prog.split("\n"):
        if not (w := line.split()):
            continue
        if len(w) != 5 or w[1] != ":=" or w[3] not in OPS:
            raise ValueError(f"program step {line!r}: expected 'y := a op b' with op one of {' '.join(OPS)}")
        y, _, a, op, b = w
        if unknown := [v for v in (a, b) if v not in known]:
            raise ValueError(f"program step {line!r}: {unknown[0]} is not defined before it")
        steps.append((y, a, op, b))
        known.add(y)
    if not steps:
        raise ValueError("not a tiny-task prompt: its program has no steps")
    return value, steps


def score(prompt, generated):
    """-> (answer correct, steps correct, steps total), recomputed from the prompt alone.

    generated: the decoded trace. Line i must be step i's line exactly. Each step is checked on
    its own: x values come from the prompt, a y value is the one the trace itself stated for it
    (so one wrong result costs one step, not every step downstream), or the true one if the
    trace never stated it. The answer must equal the true value of the last step."""
    value, steps = parse_prompt(prompt)
    lines = [line.split() for line in generated.split("\n")]
    true, stated, ok = dict(value), dict(value), 0
    for i, (y, a, op, b) in enumerate(steps):
        true[y] = OPS[op](true[a], true[b])
        want = step_line(y, a, op, b, stated[a], stated[b]).split()
        got = lines[i] if i < len(lines) else []
        ok += got == want
        claim = got[-1] if got[-2:-1] == [y] else None
        stated[y] = int(claim) if claim is not None and claim.isdigit() else true[y]
    answers = [w[2] for w in lines if len(w) == 3 and w[:2] == ["answer", "="]]
    return bool(answers) and answers[-1] == str(true[steps[-1][0]]), ok, len(steps)


def write_jsonl(path, n, seed, n_x=N_X, n_y=N_Y, ops="+-"):
    """n problems from random.Random(seed) -> JSON lines {prompt, answer, text = prompt + trace}."""
    make_problem(random.Random(0), n_x, n_y, ops=ops)   # bad sizes fail here, before path is opened
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = make_problem(rng, n_x, n_y, ops=ops)
            f.write(json.dumps(dict(prompt=p["prompt"], answer=p["answer"], text=p["prompt"] + p["trace"])) + "\n")


# ---- the tokenizer ----

def build_tokenizer():
    """Word-level, one token per word. Split on newlines (kept) and spaces (dropped); decoding
    joins words with spaces and then removes the spaces around newlines, so any task text
    round-trips."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse(),
                                     decoders.Replace(" \n", "\n"), decoders.Replace("\n ", "\n")])
    tok.add_special_tokens(SPECIALS)
    return tok


# ---- pretraining ----

def tiny_config():
    """~3.7M parameters: hidden 256, 6 layers, 4 q / 2 KV heads of 64 (G = 2), tied embeddings.
    RoPE theta 1e6 (Qwen3's): a content lookup thousands of tokens back needs head dims that
    RoPE barely rotates over that distance, and with theta 1e4 and head_dim 64 there are few."""
    return M.Qwen3Config(vocab_size=-(-len(VOCAB) // 64) * 64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         rope_theta=1e6, max_position_embeddings=8192, tie_word_embeddings=True)


def sizes_for(seq_len):
    """The largest (n_x, n_y) that fits seq_len tokens with the final <|endoftext|> (n_x = 2.5 n_y)."""
    n_y = min((seq_len - 8) * 2 // 69, len(Y_NAMES))
    if n_y < 2:
        raise ValueError(f"--seq-len {seq_len} is too short: a problem of 2 steps needs 77 tokens")
    return min(5 * n_y // 2, len(X_NAMES)), n_y


QK_GAIN = 2.5   # initial q_norm / k_norm weights (never decayed): sharp attention over thousands of keys


def encode(tok, problems):
    """Problems of one size -> ids [R, T] int64 numpy (prompt, trace, <|endoftext|>), prompt length P."""
    ids = np.array([e.ids for e in tok.encode_batch([p["prompt"] + p["trace"] + EOS for p in problems])])
    assert ids.ndim == 2 and (ids != VOCAB.index(UNK)).all()
    return ids, len(tok.encode(problems[0]["prompt"]).ids)


def make_batch(rng, tok, rows, seq_len):
    """Problems of one size, n_x and n_y each log-uniform in [2, largest], as many as fill
    rows x seq_len tokens -> ids [R, T], prompt length P (the same for all: no padding, the
    loss is on ids[:, P:])."""
    n_x, n_y = (round(math.exp(rng.uniform(math.log(2), math.log(n)))) for n in sizes_for(seq_len))
    R = max(1, rows * seq_len // (n_tokens(n_x, n_y) + 1))
    return encode(tok, [make_problem(rng, n_x, n_y) for _ in range(R)])


def _batch(job):
    """Worker side of batches(): batch i of the stream comes from its own rng, so the stream is
    the same for any number of workers."""
    seed, i, rows, seq_len = job
    return make_batch(random.Random(seed * 1_000_003 + i), build_tokenizer(), rows, seq_len)


def batches(seed, rows, seq_len, workers=8):
    """An endless, reproducible stream of make_batch, made by worker processes: one Python
    thread cannot write problems as fast as the GPU trains on them."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # one thread per worker: no oversubscription
    # workers ignore Ctrl-C (a terminal's goes to them too): the trainer stops them when it has saved
    with multiprocessing.get_context("spawn").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        yield from pool.imap(_batch, ((seed, i, rows, seq_len) for i in itertools.count()), chunksize=1)


def trace_loss(net, ids, P):
    """Next-token loss on the trace and <|endoftext|> (ids[:, P:]) -> (loss, hits [R, T-P] bool)."""
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)[None]
    h = net.hidden(ids[:, :-1], positions)                              # [R, T-1, hidden]
    logits = net.logits(h[:, P - 1:]).float()                           # [R, T-P, V]: only where the loss is
    target = ids[:, P:]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten()), logits.argmax(-1) == target


def heldout_accuracy(net, tok, device, seq_len, n=8, seed=999_999):
    """Teacher-forced on n full-size problems -> (token accuracy, step accuracy): a step counts
    when every token of its line is predicted right given the true past. Cheap, and close to
    score()'s per-step check, which also judges each step given the trace before it."""
    rng = random.Random(seed)
    n_x, n_y = sizes_for(seq_len)
    ids, P = encode(tok, [make_problem(rng, n_x, n_y) for _ in range(n)])
    net.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
        _, hit = trace_loss(net, torch.from_numpy(ids).to(device), P)
    net.train()
    steps = hit[:, :21 * n_y].reshape(n, n_y, 21).cpu()                 # [n, steps, 21 tokens incl. "\n"]
    line = torch.from_numpy(ids[:, P:P + 21 * n_y]).reshape(n, n_y, 21)
    x0 = VOCAB.index(X_NAMES[0])
    is_x = (line[..., [2, 4]] >= x0) & (line[..., [2, 4]] < x0 + len(X_NAMES))  # operand a, b a defined x?
    looked_up = steps[..., [7, 10]]                                     # their values, as the trace restates them
    return dict(token_acc=hit.float().mean().item(), step_acc=steps.all(-1).float().mean().item(),
                x_acc=looked_up[is_x].float().mean().item(), y_acc=looked_up[~is_x].float().mean().item(),
                sign_acc=steps[..., 3].float().mean().item())             # the sign, copied from the program line


def save_folder(net, tok, out, log):
    """A Hugging Face Qwen3 folder, weights in bfloat16 (the shipped folder stays small). Every file
    goes through a temp file and a rename, the weights and config.json after the tokenizer files and
    before the log: a run stopped during a periodic save keeps the previous save whole."""
    c = net.config
    ids = dict(eos_token_id=VOCAB.index(EOS), pad_token_id=VOCAB.index(PAD))
    files = {"tokenizer.json": tok.to_str(pretty=True), "generation_config.json": ids,
             "tokenizer_config.json": dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=EOS,
                                           pad_token=PAD, unk_token=UNK, clean_up_tokenization_spaces=False,
                                           model_max_length=c.max_position_embeddings)}
    os.makedirs(out, exist_ok=True)

    def write(name, d):
        path = os.path.join(out, name)
        try:
            with open(path + ".tmp", "w") as f:
                f.write(d if isinstance(d, str) else json.dumps(d, indent=2))
            M.replace_file(path + ".tmp", path)
        finally:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    for name, d in files.items():
        write(name, d)
    net.save_pretrained(out, torch.bfloat16, dict(
        ids, bos_token_id=None, use_cache=True, attention_dropout=0.0,
        initializer_range=0.02, use_sliding_window=False, sliding_window=None,
        max_window_layers=c.num_hidden_layers, rope_scaling=None))
    write("pretrain_log.json", log)                      # after the weights it describes


def pretrain(args):
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    if args.init:                                            # continue a run (fresh optimizer and schedule)
        try:
            net = M.Qwen3.from_pretrained(args.init, device=args.device, dtype=torch.float32).train()
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --init {e}")
        if net.config.vocab_size < len(VOCAB):
            raise SystemExit(f"error: --init {args.init}: vocab_size {net.config.vocab_size}, the task needs "
                             f"{len(VOCAB)} tokens")
    else:
        net = M.Qwen3(tiny_config()).to(args.device)
        for name, w in net.named_parameters():               # as Hugging Face initialises Qwen3, except:
            if w.dim() == 2:
                torch.nn.init.normal_(w, std=0.02)
            elif "q_norm" in name or "k_norm" in name:       # under QK-norm a logit is at most
                torch.nn.init.constant_(w, QK_GAIN)          # gain^2 sqrt(D): it must beat ln(4K keys)
    n_params = sum(p.numel() for p in net.parameters())
    decay = [p for p in net.parameters() if p.dim() == 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95), fused=cuda)
    log = dict(command="python tiny.py pretrain " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                             for k, v in vars(args).items()
                                                             if k != "cmd" and v is not None),   # no "--init None"
               device=torch.cuda.get_device_name() if cuda else "cpu", params=n_params, evals=[])
    data = batches(args.seed, args.batch, args.seq_len, args.workers)
    t0, tokens, done, budget = time.time(), 0, 0, 60 * args.max_minutes
    bar = tqdm(range(args.steps), desc=f"pretrain {n_params / 1e6:.2f}M params")
    stop = []
    handlers = M.note_signals(stop)                      # Ctrl-C: end the step, save, stop

    def show():
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", tok_s=f"{tokens / (time.time() - t0):.0f}")
    for step in bar:
        # progress by steps or by time, whichever is further: the cosine always finishes in time
        progress = max(step / args.steps, (time.time() - t0) / budget)
        if (progress >= 1 or stop) and step:             # one step at least: the log and save need a loss
            show()                                       # the last step's numbers (break closes the bar)
            break
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        ids, P = next(data)
        ids = torch.from_numpy(ids).to(args.device)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss, _ = trace_loss(net, ids, P)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        tokens, done = tokens + ids.numel(), done + 1
        if step % 20 == 0 or step == args.steps - 1:     # (loss.item() waits for the GPU: not every step)
            show()
        if args.eval_every and step % args.eval_every == args.eval_every - 1:
            acc = heldout_accuracy(net, tok, args.device, args.seq_len)
            log["evals"].append(dict(step=step + 1, seconds=round(time.time() - t0), loss=round(loss.item(), 4), **acc))
            tqdm.write(f"step {step + 1}: loss {loss.item():.4f}, held-out teacher-forced token acc "
                       f"{acc['token_acc']:.2%}, step acc {acc['step_acc']:.2%}, value lookups: x {acc['x_acc']:.2%} "
                       f"(definitions in the prompt), y {acc['y_acc']:.2%} (results in the trace); "
                       f"signs copied from the program {acc['sign_acc']:.2%}")
            save_folder(net, tok, args.out, log)
    for sig, h in handlers.items():
        signal.signal(sig, h)
    seconds = time.time() - t0
    if stop:                                             # no final eval: save and go
        log.update(steps=done, seconds=round(seconds), tokens=tokens, stopped_by_signal=stop[0])
        save_folder(net, tok, args.out, log)
        raise SystemExit(f"stopped by signal {stop[0]} after {done} steps; saved {args.out} (a new run can start "
                         f"from it with --init {args.out})")
    acc = heldout_accuracy(net, tok, args.device, args.seq_len)
    log.update(steps=done, seconds=round(seconds), tokens=tokens, tokens_per_s=round(tokens / seconds),
               final_loss=round(loss.item(), 4), **acc)
    save_folder(net, tok, args.out, log)
    print(f"pretrained {done} steps, {tokens:,} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s) "
          f"on {log['device']}; final loss {loss.item():.4f}; held-out teacher-forced token acc "
          f"{acc['token_acc']:.2%}, step acc {acc['step_acc']:.2%}, x lookups {acc['x_acc']:.2%}, "
          f"y lookups {acc['y_acc']:.2%}, signs {acc['sign_acc']:.2%}; saved {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=M.CLIHelp)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{data,pretrain}")
    d = sub.add_parser("data", formatter_class=M.CLIHelp, help="write problems as JSON lines {prompt, answer, text}")
    d.add_argument("--n", type=int, default=200, help="number of problems")
    d.add_argument("--seed", type=int, default=1, help="problem seed (pretraining draws from its own --seed)")
    d.add_argument("--out", required=True, help="output .jsonl")
    d.add_argument("--n-x", type=int, default=N_X, help=f"defined variables per problem (<= {len(X_NAMES)})")
    d.add_argument("--n-y", type=int, default=N_Y, help=f"program steps per problem (<= {len(Y_NAMES)})")
    d.add_argument("--ops", default="+-", choices=["+-", "+", "-"],
                   help="operations the program draws from (the shipped model was trained on +-; with one, "
                        "no step has to fetch its sign from the far program line)")
    t = sub.add_parser("pretrain", formatter_class=M.CLIHelp,
                       help="train the tiny Qwen3 from scratch and save a Hugging Face folder")
    t.add_argument("--out", required=True,
                   help="output model folder, new or empty (rewritten at every eval and at the end)")
    t.add_argument("--steps", type=int, default=40000, help="optimizer steps at most (see --max-minutes)")
    t.add_argument("--max-minutes", type=float, default=10.0,
                   help="wall-clock budget, checked between steps: the cosine schedule runs on max(step/steps, "
                        "time/budget), stops at 1 (one step at least)")
    t.add_argument("--batch", type=int, default=32, help="rows of --seq-len tokens per step (shorter problems: "
                                                         "proportionally more of them)")
    t.add_argument("--seq-len", type=int, default=5120, help="tokens of the largest training problem (5120: 370 "
                                                             "variables, 148 steps; covers generate.py's problems)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to 10%% of it)")
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    t.add_argument("--eval-every", type=int, default=250, help="held-out teacher-forced accuracy and a save every "
                                                               "this many steps (0: only at the end)")
    t.add_argument("--seed", type=int, default=1234, help="seed of the weights and of the problem stream "
                                                          "(use a new one with --init)")
    t.add_argument("--workers", type=int, default=8, help="processes writing training problems")
    t.add_argument("--init", help="start from this model folder's weights instead of from scratch")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.cmd == "data":
        if args.n < 1:
            raise SystemExit("error: --n must be >= 1")
        try:
            write_jsonl(args.out, args.n, args.seed, args.n_x, args.n_y, args.ops)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        except OSError as e:
            raise SystemExit(f"error: --out {args.out} cannot be written ({e.strerror})")
        print(f"wrote {args.n} problems of {n_tokens(args.n_x, args.n_y)} tokens to {args.out}")
    else:
        M.check_device(p, args.device)
        for flag, rule, ok in (("steps", ">= 1", args.steps >= 1), ("batch", ">= 1", args.batch >= 1),
                               ("warmup", ">= 1", args.warmup >= 1), ("workers", ">= 1", args.workers >= 1),
                               ("eval-every", ">= 0", args.eval_every >= 0),
                               ("max-minutes", "> 0", 0 < args.max_minutes < float("inf")),
                               ("lr", "> 0", 0 < args.lr < float("inf"))):
            if not ok:
                got = getattr(args, flag.replace("-", "_"))
                raise SystemExit(f"error: --{flag} must be finite and {rule}, got {got}")
        try:
            sizes_for(args.seq_len)
            if args.init and not os.path.isfile(os.path.join(args.init, "config.json")):
                raise ValueError(f"--init {args.init}: no config.json there (expected a model folder)")
            if names := M.folder_contents(args.out):
                raise ValueError(f"--out {args.out} already holds {names}: give a new or empty folder")
            M.check_writable(args.out)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        pretrain(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted")
