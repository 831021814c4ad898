"""Three real architectures on learnable synthetic tasks, trained under TorchGradWatch.

- ``"gpt2"``: ``transformers``' GPT-2 (4 pre-norm blocks with LayerNorm, width 64), randomly
  initialised, as a language model of random passages said twice: it sits at chance until it
  learns to look back and copy, as transformers do after a plateau;
- ``"resnet"``: a narrow ResNet-18 (BasicBlocks with BatchNorm) classifying 32x32 images of ten
  noisy, shifted class templates;
- ``"lstm"``: a two-layer LSTM language model of text from a fixed random Markov chain.

Each comes with its usual recipe (AdamW, or SGD with momentum for the ResNet), and
:func:`train` runs it in a plain loop, optionally breaking a gradient at one step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.integrations.torch import TorchGradWatch

VOCAB, LENGTH, BRANCHING = 64, 32, 4
CLASSES, IMAGE = 10, 32

Loss = Callable[[], torch.Tensor]
Fault = Callable[[int, nn.Module], None]  # (step, model): edits gradients after backward


class MarkovText:
    """Token sequences from a fixed random Markov chain: every token is followed by one of
    ``BRANCHING`` tokens, uniformly; a model that learns the chain reaches ``ln(BRANCHING)``."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.successors = torch.stack(
            [torch.randperm(VOCAB, generator=generator)[:BRANCHING] for _ in range(VOCAB)]
        )

    def batch(self, size: int) -> torch.Tensor:
        g = self.generator
        tokens = torch.empty(size, LENGTH + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (size,), generator=g)
        choices = torch.randint(BRANCHING, (size, LENGTH), generator=g)
        for t in range(LENGTH):
            tokens[:, t + 1] = self.successors[tokens[:, t], choices[:, t]]
        return tokens


def repeated_tokens(size: int, generator: torch.Generator) -> torch.Tensor:
    """``LENGTH`` tokens: ``LENGTH // 2`` uniformly random ones, then the same again. Nothing
    predicts the first half; the second is predicted exactly by a model that learns to look
    back (induction heads), which transformers learn after a plateau at chance."""
    passage = torch.randint(VOCAB, (size, LENGTH // 2), generator=generator)
    return torch.cat([passage, passage], dim=1)


class Templates:
    """32x32 RGB images of ten classes: a smooth random template per class, shifted by up to
    four pixels, scaled, under Gaussian noise."""

    def __init__(self, generator: torch.Generator, noise: float = 3.0) -> None:
        # noise 3 keeps the loss well above 0 over 300 steps (at 1 it is ~0.002 by step 100)
        self.generator = generator
        coarse = torch.randn(CLASSES, 3, 4, 4, generator=generator)
        self.templates = F.interpolate(coarse, size=IMAGE, mode="bilinear", align_corners=False)
        self.noise = noise

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        labels = torch.randint(CLASSES, (size,), generator=g)
        shifts = torch.randint(-4, 5, (size, 2), generator=g).tolist()
        images = torch.stack(
            [
                torch.roll(self.templates[c], s, dims=(1, 2))
                for c, s in zip(labels, shifts, strict=True)
            ]
        )
        scale = 0.5 + torch.rand(size, 1, 1, 1, generator=g)
        return images * scale + self.noise * torch.randn(images.shape, generator=g), labels


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm, and a projected shortcut when the shape
    changes."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's layout for 32x32 images (a 3x3 stem, four stages of two BasicBlocks),
    ``width`` channels in the first stage instead of 64."""

    def __init__(self, width: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, inputs = [], width
        for i, outputs in enumerate(width * 2**k for k in range(4)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1))
            )
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LSTMLanguageModel(nn.Module):
    def __init__(self, width: int = 64, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.lstm = nn.LSTM(width, hidden, layers, batch_first=True, dropout=0.1)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Loss
    chance: float  # the loss of a model that has learnt nothing


def gpt2(generator: torch.Generator) -> Setup:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(  # dropout 0.1 everywhere: GPT-2's defaults
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=64,
        n_layer=4,
        n_head=4,
        bos_token_id=VOCAB - 1,  # GPT-2's own are outside this vocabulary (never used here)
        eos_token_id=VOCAB - 1,
    )
    model = GPT2LMHeadModel(config)

    def loss() -> torch.Tensor:
        tokens = repeated_tokens(32, generator)
        return model(input_ids=tokens, labels=tokens).loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return Setup(model, optimizer, loss, math.log(VOCAB))


def resnet(generator: torch.Generator) -> Setup:
    model = ResNet18()
    images = Templates(generator)

    def loss() -> torch.Tensor:
        x, y = images.batch(32)
        return F.cross_entropy(model(x), y)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Setup(model, optimizer, loss, math.log(CLASSES))


def lstm(generator: torch.Generator) -> Setup:
    model = LSTMLanguageModel()
    text = MarkovText(generator)

    def loss() -> torch.Tensor:
        tokens = text.batch(32)
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return Setup(model, optimizer, loss, math.log(VOCAB))


ARCHITECTURES: dict[str, Callable[[torch.Generator], Setup]] = {
    "gpt2": gpt2,
    "resnet": resnet,
    "lstm": lstm,
}


@dataclass
class Run:
    events: list[dict]
    losses: list[float]
    chance: float
    groups: tuple[str, ...]


def train(
    architecture: str,
    log_dir: object,
    *,
    steps: int = 300,
    seed: int = 0,
    fault: Fault | None = None,
    **watch_options: object,
) -> Run:
    """Train ``steps`` optimizer steps under TorchGradWatch (its defaults unless
    ``watch_options``); ``fault`` may edit the gradients after each backward.

    ``steps`` should be a multiple of the logging cadence (50 by default), so that the last
    step is a logging step and every detection is on ``events`` when this returns.
    """
    torch.manual_seed(seed)
    setup = ARCHITECTURES[architecture](torch.Generator().manual_seed(seed))
    model, optimizer = setup.model, setup.optimizer
    model.train()
    losses = []
    with TorchGradWatch(model, log_dir=log_dir, **watch_options) as watch:  # type: ignore[arg-type]
        for step in range(steps):
            watch.before_forward()  # with track_signal=True
            loss = setup.loss()
            optimizer.zero_grad()
            loss.backward()
            if fault is not None:
                fault(step, model)
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
            losses.append(loss.item())
    return Run(watch.events, losses, setup.chance, watch.engine.grouping.groups)
