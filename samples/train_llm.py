"""Train the dense decoder language-model sample (issue 34) from scratch on CPU: a Llama-architecture model with
grouped-query attention on the Python standard library's sources (samples/make_corpus.py), with its own byte-level
BPE tokenizer, saved as an ordinary Hugging Face folder (save_pretrained: config, safetensors, tokenizer).

    python samples/make_corpus.py --out data/pycorpus
    python samples/train_llm.py --corpus data/pycorpus --out samples/llama-pystdlib

A plain PyTorch loop on transformers' LlamaForCausalLM, like samples/train_scenes_yolo.py uses Ultralytics' trainer
for the dense YOLO: the dense model is the benchmark's starting point, not something compressor produces.
Resumable: the state (model, optimizer, step, data order) is saved beside --out every --save-every steps as
*.train-state.pt; rerun the same command after an interruption and it continues. Each --eval-every steps the
held-out perplexity over the whole val/ split is printed (token-weighted: exp of the mean NLL of every predicted token
of every val block).

Model (defaults): 8 layers, hidden 480, 8 query heads of 64 and 4 key/value heads (GQA, 2 query heads per KV head),
SwiGLU MLP of 1408, RoPE, tied embeddings, vocabulary 8192: about 26 M parameters. Why 480 with heads of 64 (an
explicit head_dim): transformers' LlamaConfig requires hidden_size to be a multiple of the query heads, so with 512
a model keeping 3 of its 4 key/value groups (6 query heads) would not reload with from_pretrained, and ONNX Runtime's
GroupQueryAttention kernel needs heads in multiples of 16; 480 is a multiple of 8 and of 6. Training: blocks of 256 tokens
packed from the train files joined with the end-of-text token, batch 16, 600 steps (about 2.5 M tokens, 0.7
of a pass; about 5.3 s per step on 2 AVX2 EPYC cores, so under an hour), AdamW (lr 1e-3, wd 0.1, betas
0.9/0.95), linear warm-up over 60 steps, cosine to 10% of the peak, gradient clipping at 1.0, a fixed seed.
The weights are saved in float16 (52 MB instead of 104 MB in the repository; compressor loads causal LMs in float32
whatever they were saved in, and the benchmark measures the dense model from this file, rounding included). The
held-out perplexity every --eval-every steps (of the float32 weights) goes to --out/training_log.json at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

EOT = "<|endoftext|>"


def corpus_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if p.is_file())


def train_tokenizer(files: list[Path], vocab: int, out: Path):
    """A byte-level BPE tokenizer trained on the training files (tokenizers), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT)
    fast.save_pretrained(str(out))
    return fast


def encode(tokenizer, files: list[Path]) -> torch.Tensor:
    """Every file's token ids, each followed by the end-of-text id, as one 1-D tensor."""
    ids: list[int] = []
    texts = [f.read_text(encoding="utf-8") for f in files]
    for start in range(0, len(texts), 64):
        for row in tokenizer(texts[start:start + 64], add_special_tokens=False)["input_ids"]:
            ids += row + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int32)


def blocks(ids: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping blocks of `size` tokens (the ragged tail is dropped)."""
    n = len(ids) // size
    return ids[: n * size].view(n, size).long()


@torch.no_grad()
def perplexity(model, val: torch.Tensor, batch: int) -> tuple[float, float]:
    """exp(mean NLL over every predicted token of every block) and that mean NLL."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), batch):
        x = val[start:start + batch]
        logits = model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                              reduction="sum")
        total, count = total + float(nll), count + x[:, 1:].numel()
    model.train()
    return math.exp(total / count), total / count


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/pycorpus"))
    parser.add_argument("--out", type=Path, default=Path("samples/llama-pystdlib"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=480)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_files, val_files = corpus_files(args.corpus / "train"), corpus_files(args.corpus / "val")
    if not train_files or not val_files:
        raise SystemExit(f"no .py files under {args.corpus}/train and /val: run samples/make_corpus.py first")
    tokenizer = (AutoTokenizer.from_pretrained(str(args.out)) if (args.out / "tokenizer.json").exists()
                 else train_tokenizer(train_files, args.vocab, args.out))
    train_ids, val_ids = encode(tokenizer, train_files), encode(tokenizer, val_files)
    train, val = blocks(train_ids, args.block), blocks(val_ids, args.block)
    print(f"corpus: {len(train_ids)} train tokens ({len(train)} blocks of {args.block}), {len(val_ids)} val tokens "
          f"({len(val)} blocks)", flush=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    state_path = args.out.with_suffix(".train-state.pt")
    per_pass = len(train) // args.batch  # batches per pass over the blocks; each pass has its own seeded order
    orders: dict[int, torch.Tensor] = {}
    step, log = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
        print(f"resumed at step {step}", flush=True)
    model.train()
    started, seen = time.time(), 0
    while step < args.steps:
        epoch, index = divmod(step, per_pass)
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + epoch))
        x = train[orders[epoch][index * args.batch:(index + 1) * args.batch]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, seen = step + 1, seen + x.numel()
        if step % 10 == 0:
            rate = seen / (time.time() - started)
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{rate:.0f} tokens/s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            ppl, nll = perplexity(model, val, args.batch)
            log.append({"step": step, "train_loss": round(loss.item(), 4), "val_perplexity": round(ppl, 3),
                        "val_nll": round(nll, 4)})
            print(f"step {step}: val perplexity {ppl:.3f} (NLL {nll:.4f})", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log},
                       state_path)
    model.to(torch.float16).save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    (args.out / "training_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "log": log}, indent=1))
    print(f"saved {args.out}: val perplexity {log[-1]['val_perplexity']} after {step} steps", flush=True)


if __name__ == "__main__":
    main()
