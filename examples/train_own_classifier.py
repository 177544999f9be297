"""Train a small image classifier with plain PyTorch and export it, as a team would before using rrise.

Nothing here imports ``rrise``: this is "your own model". It trains a small residual network (or,
with ``--arch mobilenet``, a MobileNet-style depthwise network) on an ImageFolder of colour images
(``root/<class>/<image>``; class index = position of the folder name in sorted order, torchvision's
convention) with Gaussian-noise augmentation at σ (randomized smoothing certifies a classifier that
is accurate under that noise), then writes

- ``OUT/model.onnx``: the classifier with a dynamic batch axis, taking *normalized* NCHW RGB input
  (as most training code does: ``(x - mean) / std`` outside the model);
- ``OUT/model.pt2`` (``--pt2``): the same as a ``torch.export`` archive;
- ``OUT/model_state.pt`` (``--state-dict``): its ``state_dict``, for the factory form
  ``train_own_classifier:build_model``;
- ``OUT/training.json``: classes, mean, std, input size, σ, accuracy.

    python examples/train_own_classifier.py --data my_images/ --out my_model/ --epochs 20 --sigma 0.25 \\
        --pt2 --state-dict

Then (the normalization goes inside the certified model, so σ and radii stay in [0, 1]-pixel units):

    rrise build --model my_model/model.onnx --data my_images/ --workdir runs/mine \\
        --mean 0.5 0.5 0.5 --std 0.25 0.25 0.25 --sigma 0.25

Images are decoded with Pillow as RGB and resized to ``--size`` (no torchvision needed).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class Block(nn.Module):
    """A residual basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """Stem + three stages of one residual block (16/32/64 wide), global average pool, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layers = nn.Sequential(
            Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """A MobileNet block: 3×3 depthwise conv-BN-Hardswish, then 1×1 pointwise conv-BN-ReLU6."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Hardswish(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    )  # fmt: skip


class SmallMobileNet(nn.Module):
    """A MobileNet-style network: strided stem, five depthwise-separable blocks, pooled linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        stem = nn.Conv2d(in_channels, w, 3, 2, 1, bias=False)
        self.stem = nn.Sequential(stem, nn.BatchNorm2d(w), nn.ReLU6())
        self.blocks = nn.Sequential(
            separable(w, 2 * w, 1), separable(2 * w, 2 * w, 2), separable(2 * w, 4 * w, 1),
            separable(4 * w, 4 * w, 2), separable(4 * w, 8 * w, 1),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8 * w, num_classes))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ARCHITECTURES = {"resnet": SmallResNet, "mobilenet": SmallMobileNet}


def build_model(num_classes: int = 10, width: int = 16, arch: str = "resnet") -> nn.Module:
    """The factory ``train_own_classifier:build_model`` (weights: ``--weights OUT/model_state.pt``)."""
    return ARCHITECTURES[arch](num_classes, width=width)


def build_mobilenet(num_classes: int = 10, width: int = 16) -> nn.Module:
    """The factory ``train_own_classifier:build_mobilenet`` for a ``--arch mobilenet`` model."""
    return build_model(num_classes, width, "mobilenet")


def load_folder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``[N, 3, size, size]`` float32 RGB in [0, 1], int64 labels and class names of an ImageFolder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise SystemExit(f"{root}: need at least two class folders (root/<class>/<image>)")
    images, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() not in EXTENSIONS:
                continue
            with Image.open(f) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
            labels.append(index)
    # NCHW in memory too: a transposed (channels-last) array makes CPU training many times slower
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    return x, np.asarray(labels, dtype=np.int64), classes


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """SGD with a one-cycle schedule, horizontal flips and Gaussian noise at σ in [0, 1]-pixel space."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = max(1, args.epochs * -(-len(y) // args.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y))
        total = 0.0
        for idx in perm.split(args.batch_size):
            xb = x[idx]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)  # horizontal flip
            xb = xb + args.sigma * torch.randn_like(xb)  # noise in [0, 1]-pixel space, as smoothing adds it
            loss = F.cross_entropy(model(normalize(xb)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / max(len(y), 1):.3f}")
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float) -> tuple[float, float]:
    """Accuracy on ``x`` clean and under Gaussian noise at ``sigma`` (NaN when ``x`` is empty)."""
    if not len(y):
        return float("nan"), float("nan")
    clean = float((model(normalize(x)).argmax(1) == y).float().mean())
    noisy = float((model(normalize(x + sigma * torch.randn_like(x))).argmax(1) == y).float().mean())
    return clean, noisy


def export(model: nn.Module, out: Path, size: int, pt2: bool, state_dict: bool) -> list[str]:
    """Write ``model.onnx`` (dynamic batch), and ``model.pt2`` / ``model_state.pt`` when asked."""
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(1, 3, size, size),), str(out / "model.onnx"), dynamo=False,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    written = ["model.onnx"]
    if pt2:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(model, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(out / "model.pt2"))
        written.append("model.pt2")
    if state_dict:
        torch.save(model.state_dict(), out / "model_state.pt")
        written.append("model_state.pt")
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="ImageFolder of training images")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--sigma", type=float, default=0.25, help="Gaussian noise σ in [0, 1]-pixel units")
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--width", type=int, default=16, help="channels of the first stage (16, 32, 64 wide)")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet", help="network family")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--pt2", action="store_true", help="also write a torch.export archive")
    ap.add_argument("--state-dict", action="store_true", help="also write the state_dict")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    x, y, classes = load_folder(args.data, args.size)
    order = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(y)))
    n_val = int(len(y) * args.val_fraction)
    val, tr = order[:n_val], order[n_val:]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = build_model(len(classes), args.width, args.arch)
    t0 = time.perf_counter()
    train(model, xt[tr], yt[tr], args)
    seconds = round(time.perf_counter() - t0, 1)
    clean, noisy = accuracy(model, xt[val], yt[val], args.sigma)
    print(f"validation accuracy: clean {clean:.3f}, under noise σ={args.sigma} {noisy:.3f}")
    written = export(model, args.out, args.size, args.pt2, args.state_dict)
    info = {
        "classes": classes, "mean": list(MEAN), "std": list(STD), "input_size": [args.size, args.size],
        "channels": "rgb", "sigma": args.sigma, "epochs": args.epochs, "width": args.width,
        "arch": args.arch,
        "train_images": len(tr), "val_accuracy_clean": clean, "val_accuracy_noisy": noisy,
        "seconds": seconds, "files": written,
    }  # fmt: skip
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {', '.join(written)} to {args.out}")
    return info


if __name__ == "__main__":
    main()
