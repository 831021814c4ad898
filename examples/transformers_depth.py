"""Deep transformers: post-norm vs pre-norm blocks.

Two 24-block transformers learn to reverse a sequence of tokens with Adam at a fixed learning
rate and no warm-up. Post-norm blocks (the original Transformer's: LayerNorm after each residual
sum) put a LayerNorm on the only path from the loss to the early blocks; pre-norm blocks
(GPT-2's: LayerNorm inside the branch) leave the residual path an identity, so every block gets
the loss's gradient directly. Without warm-up the post-norm stack's gradient stalls and it stops
learning (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture").

Each block is one gradwatch group (``group_by`` takes a callable), so the depth profile has one
point per block.

python examples/transformers_depth.py --log-dir logs/transformers --steps 60
tensorboard --logdir logs/transformers     # or open logs/transformers/report.html
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from _lab import arguments, norms, sci, train, write_report
from torch import nn

VOCAB, WIDTH, LENGTH = 32, 64, 16


class Reverser(nn.Module):
    def __init__(self, depth: int, pre_norm: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=pre_norm
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(WIDTH) if pre_norm else nn.Identity()
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def by_block(name: str) -> str:
    """``blocks.3.self_attn.in_proj_weight`` -> ``blocks.3``; other names by module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def main(log_dir: str, steps: int, seed: int = 0, depth: int = 24) -> dict[str, dict]:
    """Train both stacks; return block 1 / block ``depth`` gradient norms (at the first and the
    last logged step) and the loss over the last fifth of the run."""
    found = {}
    for name, pre_norm in {"post_norm": False, "pre_norm": True}.items():
        torch.manual_seed(seed)
        model = Reverser(depth, pre_norm)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def loss(model=model):
            tokens = torch.randint(0, VOCAB, (32, LENGTH))
            logits = model(tokens)
            return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flip(1).flatten())

        sink, losses = train(model, loss, Path(log_dir) / name, steps, optimizer, group_by=by_block)
        blocks = [g for g in norms(sink) if g.startswith("blocks.")]
        ratios = [ratio(norms(sink, step), blocks) for step, _ in sink.scalars("grad_norm/head")]
        tail = statistics.median(losses[-max(len(losses) // 5, 1) :])
        found[name] = {"start": ratios[0], "end": ratios[-1], "loss": tail}
        print(
            f"{name:>9}: block 1 gradient is {sci(ratios[0])} of block {depth}'s at the start, "
            f"{sci(ratios[-1])} at the last logged step; loss {losses[0]:.2f} -> {tail:.2f} "
            f"(chance: {math.log(VOCAB):.2f})"
        )
    write_report(Path(log_dir))
    return found


def ratio(step_norms: dict[str, float], blocks: list[str]) -> float:
    return step_norms[blocks[0]] / step_norms[blocks[-1]]


if __name__ == "__main__":
    parser = arguments(__doc__, steps=60, log_dir="logs/transformers")
    parser.add_argument("--depth", type=int, default=24)
    main(**vars(parser.parse_args()))
