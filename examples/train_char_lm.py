"""Train a small character-level causal Reformer on a text file, save it, and sample from it.

    python examples/train_char_lm.py                      # the Declaration of Independence, 250 steps
    python examples/train_char_lm.py --text my.txt --steps 1000 --output-dir runs/my_lm

Bytes are the tokens (``ReformerByteTokenizer``: id = byte + 2, so any UTF-8 text works). The model
alternates local and LSH attention layers over windows of ``--seq-len`` bytes drawn at random from the
text (90% for training, the last 10% held out). At the end the model and tokenizer are written with
``save_pretrained``, loaded back with ``from_pretrained`` and continued from ``--prompt`` with
``generate`` (cached decoding). Runs on CPU in a few minutes with the defaults.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

# run from a checkout without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reformer import ReformerByteTokenizer, ReformerConfig, ReformerModelWithLMHead  # noqa: E402

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "declaration_of_independence.txt")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="UTF-8 text file to train on")
    parser.add_argument("--output-dir", default="char_lm_checkpoint", help="where save_pretrained writes the model")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--seq-len",
        type=int,
        default=256,
        help="training window (any length; padded to a multiple of --chunk-length inside the model)",
    )
    parser.add_argument("--chunk-length", type=int, default=32, help="local and LSH chunk length")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4, help="alternating local / LSH layers")
    parser.add_argument("--num-hashes", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (0: only at the end)")
    parser.add_argument("--prompt", default="When in the Course of human events, ")
    parser.add_argument("--sample-tokens", type=int, default=150, help="bytes to generate after training")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def axial_shape(seq_len: int) -> list[int]:
    """Two axial factors multiplying to ``seq_len``, as close to square as possible."""
    first = 2 ** (int(math.log2(seq_len)) // 2)
    while seq_len % first:
        first //= 2
    return [first, seq_len // first]


def build_config(args, vocab_size: int) -> ReformerConfig:
    if args.seq_len < 1 or args.chunk_length < 1:
        raise ValueError(f"--seq-len and --chunk-length must be positive; got {args.seq_len}, {args.chunk_length}")
    if args.hidden_size % 4:
        raise ValueError(f"--hidden-size must be a multiple of 4; got {args.hidden_size}")
    heads = 2
    # the position grid covers the window rounded up to whole chunks (the model pads to whole chunks inside)
    positions = -(-args.seq_len // args.chunk_length) * args.chunk_length
    # about 2 * L / chunk buckets (the Reformer paper's rule), even, at least 2
    num_buckets = max(2, 2 * (positions // args.chunk_length))
    return ReformerConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_attention_heads=heads,
        attention_head_size=args.hidden_size // heads,
        feed_forward_size=2 * args.hidden_size,
        attn_layers=["local", "lsh"] * (args.num_layers // 2) + ["local"] * (args.num_layers % 2),
        local_attn_chunk_length=args.chunk_length,
        lsh_attn_chunk_length=args.chunk_length,
        local_num_chunks_before=1,
        lsh_num_chunks_before=1,
        num_buckets=num_buckets,
        num_hashes=args.num_hashes,
        # fixed rotations: training and cached decoding hash alike
        hash_seed=args.seed,
        axial_pos_embds=True,
        # transformers' default std 1.0 makes the position rows ~50x the word rows at init; a small model then
        # sits at the unigram loss for hundreds of steps
        axial_norm_std=0.02,
        axial_pos_shape=axial_shape(positions),
        axial_pos_embds_dim=[args.hidden_size // 4, args.hidden_size - args.hidden_size // 4],
        max_position_embeddings=positions,
        is_decoder=True,
        hidden_dropout_prob=0.05,
        local_attention_probs_dropout_prob=0.05,
        lsh_attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])  # [B, L]


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, seq_len: int, max_windows: int = 8) -> float:
    """Mean loss over up to ``max_windows`` consecutive windows of the held-out bytes."""
    count = min(max_windows, data.numel() // seq_len)
    if count == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    windows = data[: count * seq_len].view(count, seq_len)
    loss = model(windows, labels=windows).loss.item()
    model.train(was_training)
    return loss


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = ReformerByteTokenizer()
    with open(args.text, encoding="utf-8") as handle:
        text = handle.read()
    data = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    if train_data.numel() < args.seq_len:
        raise ValueError(f"--text has {train_data.numel()} training bytes, fewer than --seq-len {args.seq_len}")

    config = build_config(args, tokenizer.vocab_size)
    model = ReformerModelWithLMHead(config)
    print(f"text: {args.text} ({data.numel()} bytes: {train_data.numel()} train, {val_data.numel()} held out)")
    print(
        f"model: {model.num_parameters():,} parameters, layers {config.attn_layers}, chunk {args.chunk_length}, "
        f"{config.num_buckets} buckets x {config.num_hashes} hashes, window {args.seq_len}"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"held-out loss before training: {held_out_loss(model, val_data, args.seq_len):.3f} (uniform: "
        f"{math.log(tokenizer.vocab_size):.3f})"
    )

    steps = range(args.steps)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(steps, desc="training", unit="step", dynamic_ncols=True)
        steps = progress
    model.train()
    start, first_loss, smoothed = time.time(), None, None
    for step in steps:
        batch = random_windows(train_data, args.batch_size, args.seq_len, generator)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if progress is not None:
            progress.set_postfix(loss=f"{smoothed:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            held_out = held_out_loss(model, val_data, args.seq_len)
            message = f"step {step + 1}: train loss {smoothed:.3f}, held-out loss {held_out:.3f}"
            (progress.write if progress is not None else print)(message)
    if progress is not None:
        progress.close()
    elapsed = time.time() - start
    if args.steps:
        print(f"trained {args.steps} steps in {elapsed:.0f}s: loss {first_loss:.3f} -> {smoothed:.3f} (smoothed)")
    print(f"held-out loss after training: {held_out_loss(model, val_data, args.seq_len):.3f}")

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved model and tokenizer to {args.output_dir}")

    # sample from the checkpoint as a user would
    model = ReformerModelWithLMHead.from_pretrained(args.output_dir).eval()
    tokenizer = ReformerByteTokenizer.from_pretrained(args.output_dir)
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt, add_special_tokens=False)], dtype=torch.long)
    capacity = config.max_position_embeddings - prompt_ids.shape[1]
    if capacity <= 0:
        raise ValueError(
            f"--prompt is {prompt_ids.shape[1]} bytes, the model embeds {config.max_position_embeddings} positions"
        )
    sample_tokens = min(args.sample_tokens, capacity)
    output = model.generate(
        prompt_ids,
        max_new_tokens=sample_tokens,
        do_sample=True,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print("sample:")
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
