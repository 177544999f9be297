"""Write Fashion-MNIST as colour camera-style images, to try `rrise build` before your own data is ready.

Each 28×28 grey image becomes a 3-channel ``size``×``size`` image (bicubic resize, a warm colour
cast whose per-channel gains vary a little from image to image, as white balance does), written as a
PNG into the ImageFolder layout that ``rrise build --data`` and ``train_own_classifier.py`` read:

- ``OUT/train/<class>/<n>.png``: the first ``--train`` images of the training split (for your
  classifier);
- ``OUT/deploy/<class>/<n>.png``: the first ``--deploy`` images of the test split, which the
  classifier never sees (for ``rrise build --data``);
- ``OUT/deploy.npz`` (``--npz``): the same deploy images as ``images`` [N, H, W, 3] uint8 RGB,
  ``labels`` and ``classes``, the other data form ``rrise build`` takes;
- ``OUT/video.avi`` (``--video K``): K further test images as an MJPG video, one image per frame,
  for ``rrise run --source``.

    python examples/make_colour_folder.py --out colour_fashion/ --train 20000 --deploy 8000 --video 60 --npz

Class folders are named after the classes ("T-shirt/top" → "T-shirt_top"); a class index is the
position of its folder name in sorted order, the ImageFolder convention.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from rrise.datasets import load_dataset

TINT_BGR = np.array([0.70, 0.88, 1.00])  # a warm cast: blue weakest, red strongest


def colourize(gray01: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [H, W] grey image in [0, 1] as a ``size``×``size`` BGR uint8 image with a colour cast."""
    g = cv2.resize(gray01.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    gains = TINT_BGR * rng.uniform(0.9, 1.1, size=3)
    return np.clip(np.rint(np.clip(g, 0, 1)[..., None] * gains * 255), 0, 255).astype(np.uint8)


def folder_names(labels: list[str]) -> list[str]:
    """Class names as folder names (no path separators)."""
    return [name.replace("/", "_").replace("\\", "_") for name in labels]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str], size: int, seed: int):
    """Write ``images`` ([N, 1, H, W] in [0, 1]) as BGR PNGs in ``root/<class>/``; return [N, S, S, 3]."""
    rng = np.random.default_rng(seed)
    frames = np.empty((len(images), size, size, 3), np.uint8)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        frames[i] = colourize(img[0], size, rng)
        cls = root / names[int(label)]
        cls.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(cls / f"{i:06d}.png"), frames[i])
    return frames


def write_video(path: Path, frames: np.ndarray, fps: float = 10.0) -> None:
    """``frames`` ([K, S, S, 3] BGR) as an MJPG ``.avi``."""
    size = (frames.shape[2], frames.shape[1])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for frame in frames:
        writer.write(frame)
    writer.release()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=20_000, help="training images for your classifier")
    ap.add_argument("--deploy", type=int, default=8_000, help="held-out images for rrise build --data")
    ap.add_argument("--video", type=int, default=0, help="further held-out images as a video")
    ap.add_argument("--npz", action="store_true", help="also write the deploy images as an .npz")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package)")
    args = ap.parse_args(argv)

    train = load_dataset("fashion-mnist", "train", args.data_dir)
    test = load_dataset("fashion-mnist", "test", args.data_dir)
    if args.deploy + args.video > len(test):
        raise SystemExit(f"--deploy + --video is {args.deploy + args.video}; the test split has {len(test)}")
    names = folder_names(list(train.classes))
    write_folder(
        args.out / "train", train.images[: args.train], train.labels[: args.train], names, args.size, 1
    )
    deploy = write_folder(
        args.out / "deploy", test.images[: args.deploy], test.labels[: args.deploy], names, args.size, 2
    )
    info = {"classes": sorted(names), "train": args.train, "deploy": args.deploy, "size": args.size}
    if args.npz:
        order = sorted(names)
        labels = np.array([order.index(names[int(y)]) for y in test.labels[: args.deploy]], np.int64)
        np.savez(args.out / "deploy.npz", images=deploy[..., ::-1], labels=labels, classes=np.array(order))
    if args.video:
        rest = slice(args.deploy, args.deploy + args.video)
        rng = np.random.default_rng(3)
        write_video(
            args.out / "video.avi", np.stack([colourize(x[0], args.size, rng) for x in test.images[rest]])
        )
        info["video_labels"] = [names[int(y)] for y in test.labels[rest]]
    (args.out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":
    main()
