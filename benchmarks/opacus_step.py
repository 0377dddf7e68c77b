"""The same GroupNorm ResNet9 step in PyTorch with Opacus 1.6, for a side-by-side comparison.

Runs in its own virtual environment (benchmarks/dp_engines.py creates it: torch 2.13.0 CPU, opacus 1.6.0;
dpmedtf's stack never imports torch):

  python benchmarks/opacus_step.py --engine opacus|opacus-ghost|torch-nondp --batch-size B --image-size H \
      --steps S --json OUT

Same network as dpmedtf's build_resnet9 (4,909,896 parameters: bias-free convolutions, GroupNorm(32),
Mish, 8 outputs), NAdam, weighted BCE with weights 1, one fixed batch per step (no Poisson sampling, as
benchmarks/dp_step.py), S timed steps after warm-up. Writes the same keys as dp_step.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ENGINES = ("opacus", "opacus-ghost", "torch-nondp")


def conv(cin, cout, k, stride):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.gn1 = conv(cin, cout, 3, stride), nn.GroupNorm(32, cout)
        self.conv2, self.gn2 = conv(cout, cout, 3, 1), nn.GroupNorm(32, cout)
        self.shortcut = (nn.Sequential(conv(cin, cout, 1, stride), nn.GroupNorm(32, cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.act1, self.act2 = nn.Mish(), nn.Mish()

    def forward(self, x):
        y = self.act1(self.gn1(self.conv1(x)))
        return self.act2(self.gn2(self.conv2(y)) + self.shortcut(x))


def resnet9(outputs=8):
    layers = [conv(3, 64, 7, 2), nn.GroupNorm(32, 64), nn.Mish(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        layers.append(BasicBlock(cin, width, stride))
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, outputs)]
    return nn.Sequential(*layers)


class MultiLabelBCE(nn.Module):
    """BCE over the 8 findings, one loss per example under reduction="none" (Opacus' ghost mode needs that)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, targets):
        per_example = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
        return per_example if self.reduction == "none" else per_example.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = resnet9()
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 4_909_896, parameters
    b, h = args.batch_size, args.image_size
    images, labels = torch.rand(b, 3, h, h), torch.randint(0, 2, (b, 8)).float()
    optimizer = torch.optim.NAdam(model.parameters(), lr=5e-4)
    criterion = MultiLabelBCE()
    if args.engine != "torch-nondp":
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=b)
        engine = PrivacyEngine(accountant="rdp")
        mode = "ghost" if args.engine == "opacus-ghost" else "hooks"
        made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                   max_grad_norm=1.5, poisson_sampling=False, grad_sample_mode=mode,
                                   **({"criterion": criterion} if mode == "ghost" else {}))
        model, optimizer = made[0], made[1]
        if mode == "ghost":
            criterion = made[2]
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    result = {"engine": args.engine, "batch_size": b, "image_size": h, "activation": "mish",
              "samples_per_s": b * args.steps / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
