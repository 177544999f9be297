"""Monte Carlo engine throughput: ``sample_counts`` vs raw forward passes, vs a naive reference, and
peak memory of a count store for 1k vs 10k inputs.

    python -m benchmarks mc            # the real run (minutes on a 2-core CPU)
    python -m benchmarks mc --quick    # a smoke run

Models: the Fashion-MNIST ``cnn`` base model of a demo work folder (``--workdir``, default
runs/demo; a random-weight ``cnn`` when it is missing) and a CIFAR-shaped (3×32×32) ResNet-style model
with random weights (throughput does not depend on the weights). For each backend:

- ``raw``: samples/s of forward passes on pre-made batches of ``batch_size`` noisy inputs (argmax
  included, nothing else) — the ceiling;
- ``sample_counts``: samples/s of the full engine (noise, forward, counting) on the same model;
  ``ratio_to_raw`` = sample_counts / raw (goal ≥ 0.85);
- ``naive``: the original research code's way (one input at a time, ``x.repeat``, ``randn_like``,
  torch eager, counting in a numpy loop) at ``n`` draws per input; ``speedup_vs_naive`` = the
  engine (backend picked by ``backend="auto"``) / naive (goal ≥ 5×).

Every number is the median of ``--rounds`` interleaved rounds. Peak RSS (VmHWM) is measured in fresh
subprocesses filling a count store of 1k and 10k Fashion-MNIST test inputs read through a memory map.

User models (``user_models``; ``--only user`` runs just this part), on a user-style residual network
at 3×32×32 (normalization outside the model, as training code usually has it, so ``--mean/--std``
wrap it inside):

- ``onnx``: the user's ONNX file through ``load_user_model`` → ``sample_counts(user_model, ...)``
  against the raw onnxruntime forward of the same canonical ONNX (goal ≥ 0.9), and of the user's
  original file;
- ``torch_module_per_batch``: ``sample_counts(module, batch_of_inputs, n, σ, batch_size)`` called
  batch after batch with a plain ``nn.Module`` (no ``prepare_model``), in steady state, against the
  raw onnxruntime forward of its ONNX twin (goal ≥ 0.85); ``first_call_s`` and
  ``calls_before_switch`` say what the first calls cost (torch until the module has spent
  ``AUTO_PROBE_CUMULATIVE_DRAWS`` draws, then one export and probe);
- ``torch_module_bs4000_calls``: the same module called as in issue 11's measurement,
  ``sample_counts(module, x, n, σ, 4000)`` again and again (0.15× the raw forward before the
  module's prepared form was remembered: every call exported and probed it);
- ``weights_digest_ms``: the cost of checking the module's weights on every call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _resnet_cifar(num_classes: int = 10):
    """A small ResNet-style network for 3×32×32 inputs (3 stages of 2 basic blocks, 16/32/64 wide)."""
    from torch import nn

    from rrise.calibrate.models import Normalize

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x):
            out = self.bn1(self.conv1(x)).relu()
            return (self.bn2(self.conv2(out)) + self.short(x)).relu()

    layers = [Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], 3), nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    layers += [nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers).eval()


def _fashion_cnn(workdir: Path):
    from rrise.calibrate.model_files import load_model
    from rrise.calibrate.models import build_model

    if (workdir / "base.pt").is_file():
        model, _ = load_model(workdir / "base.pt")
        return model.eval(), f"{workdir.name}/base.pt (trained)"
    return build_model("cnn", 1, 10, 28).eval(), "cnn with random weights (no demo work folder)"


def _inputs(shape: tuple[int, ...], count: int) -> np.ndarray:
    from rrise.datasets import DEBIAN_FASHION_DIR, load_dataset

    if shape == (1, 28, 28) and (DEBIAN_FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        return load_dataset("fashion-mnist", "test").images[:count]
    return np.random.default_rng(0).random((count, *shape), dtype=np.float32)


def _median_rate(samples: list[float]) -> float:
    return float(np.median(samples))


def _naive_counts(model, x: np.ndarray, n: int, sigma: float, batch: int, num_classes: int) -> np.ndarray:
    """Cohen et al.'s reference ``_sample_noise``: one input at a time, as the research code does it."""
    import torch

    out = np.zeros((len(x), num_classes), dtype=np.int64)
    with torch.no_grad():
        for i, xi in enumerate(torch.from_numpy(x)):
            remaining = n
            while remaining > 0:
                this = min(batch, remaining)
                remaining -= this
                b = xi.repeat((this, 1, 1, 1))
                noise = torch.randn_like(b) * sigma
                predictions = model(b + noise).argmax(1)
                for idx in predictions.cpu().numpy():  # Cohen's _count_arr
                    out[i, idx] += 1
    return out


def bench_model(name: str, model, shape, args) -> dict:
    import torch

    from rrise.calibrate.mc import prepare_model, sample_counts

    torch.manual_seed(0)
    bs, sigma = args.batch_size, 0.25
    x = _inputs(shape, args.inputs)
    per_input = max(1, args.draws // args.inputs)
    draws = per_input * len(x)
    prepared = {
        "torch": prepare_model(model, "torch"),
        "onnxruntime": prepare_model(model, "onnxruntime", sample=x[:1]),
    }
    auto = prepare_model(model, "auto", sample=x[:1], batch_size=bs)
    batch = np.repeat(x[:1], bs, axis=0) + np.float32(sigma) * np.random.default_rng(1).standard_normal(
        (bs, *shape), dtype=np.float32
    )
    tbatch = torch.from_numpy(batch)
    sess = prepared["onnxruntime"].target
    raw_fns = {
        "torch": lambda: model(tbatch).argmax(1),
        "onnxruntime": lambda: sess.run(None, {"input": batch})[0].argmax(1),
    }
    raw_batches = max(1, draws // bs)
    rates: dict[str, dict[str, list[float]]] = {b: {"raw": [], "sample_counts": []} for b in prepared}
    naive_inputs = x[: max(1, args.naive_inputs)]
    naive_rates, fast_rates = [], []
    with torch.inference_mode():
        for fn in raw_fns.values():
            fn()  # warm-up
    for _ in range(args.rounds):
        for b, pm in prepared.items():
            with torch.inference_mode():
                t0 = time.perf_counter()
                for _ in range(raw_batches):
                    raw_fns[b]()
                rates[b]["raw"].append(raw_batches * bs / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            counts = sample_counts(pm, x, per_input, sigma, batch_size=bs, seed=0)
            rates[b]["sample_counts"].append(draws / (time.perf_counter() - t0))
            assert (counts.sum(1) == per_input).all()
        t0 = time.perf_counter()
        _naive_counts(model, naive_inputs, args.naive_n, sigma, args.naive_batch, counts.shape[1])
        naive_rates.append(len(naive_inputs) * args.naive_n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        sample_counts(auto, naive_inputs, args.naive_n, sigma, batch_size=bs, seed=0)
        fast_rates.append(len(naive_inputs) * args.naive_n / (time.perf_counter() - t0))
    backends = {}
    for b, r in rates.items():
        raw, sc = _median_rate(r["raw"]), _median_rate(r["sample_counts"])
        backends[b] = {
            "raw_samples_per_s": round(raw, 1),
            "sample_counts_samples_per_s": round(sc, 1),
            "ratio_to_raw": round(sc / raw, 3),
        }
    naive, fast = _median_rate(naive_rates), _median_rate(fast_rates)
    return {
        "model": name,
        "input_shape": list(shape),
        "batch_size": bs,
        "inputs": len(x),
        "draws_per_input": per_input,
        "backends": backends,
        "auto_choice": auto.label,
        "naive": {
            "inputs": len(naive_inputs),
            "n_per_input": args.naive_n,
            "naive_batch": args.naive_batch,
            "naive_samples_per_s": round(naive, 1),
            "engine_auto_samples_per_s": round(fast, 1),
            "speedup_vs_naive": round(fast / naive, 2),
        },
        "rounds": args.rounds,
    }


RSS_CHILD = """
import json, sys, numpy as np
from rrise.calibrate.mc import prepare_model
from rrise.calibrate.store import CountStore, fill_store
images = np.load(sys.argv[1], mmap_mode="r", allow_pickle=False)
count, n, onnx_path, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
store = CountStore.open(out, np.arange(count), n=n, sigma=0.25, seed=0, num_classes=10, shard_size=500,
                        base_sha256="bench", dataset="fashion-mnist", split="test", backend="onnxruntime")
fill_store(store, images[:count], prepare_model(onnx_path, "onnxruntime"), batch_size=1000,
           show_progress=False)
store.finalize()
status = open("/proc/self/status").read()
hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
print(json.dumps({"vmhwm_kib": hwm}))
"""


def bench_rss(model, counts: list[int], n: int) -> dict:
    """Peak RSS of filling a count store, in fresh subprocesses (inputs read through a memory map)."""
    from rrise.export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = _inputs((1, 28, 28), max(counts))
        if len(images) < max(counts):  # fewer real images than asked: tile them
            images = np.resize(images, (max(counts), 1, 28, 28))
        np.save(tmp / "images.npy", np.ascontiguousarray(images, dtype=np.float32))
        onnx_path = export_onnx(model, tmp / "model.onnx", (1, 28, 28))
        (tmp / "child.py").write_text(RSS_CHILD)
        out = {}
        for c in counts:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(tmp / "child.py"), str(tmp / "images.npy"), str(c), str(n)]
                + [str(onnx_path), str(tmp / f"store{c}")],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            hwm = json.loads(proc.stdout.strip().splitlines()[-1])["vmhwm_kib"]
            out[str(c)] = {
                "peak_rss_mib": round(hwm / 1024, 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
    lo, hi = out[str(min(counts))]["peak_rss_mib"], out[str(max(counts))]["peak_rss_mib"]
    return {"draws_per_input": n, "by_inputs": out, "ratio_largest_to_smallest": round(hi / lo, 3)}


def _user_resnet(num_classes: int = 10):
    """A user's residual network: like ``_resnet_cifar`` but without the normalization layer."""
    model = _resnet_cifar(num_classes)
    return type(model)(*list(model)[1:]).eval()


def bench_user(args) -> dict:
    """MC throughput on user models (see the module docstring)."""
    import torch

    from rrise.calibrate import mc

    torch.manual_seed(0)
    shape, sigma, bs = (3, 32, 32), 0.25, args.batch_size
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    rng = np.random.default_rng(0)
    out: dict = {
        "model": "user residual net (3 stages × 2 blocks, 16/32/64 wide)",
        "input_shape": list(shape),
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = _user_models(Path(tmp), _user_resnet(), shape, mean, std)
        out["load_user_model_s"] = models["load_s"]
        module = models["module"]
        x = rng.random((args.inputs, *shape), dtype=np.float32)
        noisy = np.clip(x[:1], 0, 1) + np.float32(sigma) * rng.standard_normal((bs, *shape), dtype=np.float32)
        m, s = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (mean, std))
        batches = [rng.random((args.call_inputs, *shape), dtype=np.float32) for _ in range(64)]
        out["torch_module_per_batch_warmup"] = _warmup(module, batches, args.call_n, sigma, bs, shape)
        med = _user_rounds(args, models, x, noisy, (noisy - m) / s, batches, sigma)
        t = time.perf_counter()
        for _ in range(10):
            mc.weights_digest(module)
        digest_ms = (time.perf_counter() - t) / 10 * 1e3
    out.update(_user_summary(args, med))
    out["weights_digest_ms"] = round(digest_ms, 2)
    out["weights_mb"] = round(sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6, 2)
    return out


def _user_models(tmp: Path, user_net, shape, mean, std) -> dict:
    """The user's ONNX (normalized input) loaded as users do, its canonical session, the original
    session, the module form (normalization inside) and its ONNX twin."""
    import warnings

    import torch

    from rrise.calibrate import mc
    from rrise.calibrate.user_model import load_user_model

    path = tmp / "user.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            user_net, (torch.zeros(1, *shape),), str(path), dynamo=False, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    t0 = time.perf_counter()
    um = load_user_model(path, mean=mean, std=std)
    load_s = round(time.perf_counter() - t0, 2)
    module = load_user_model(user_net, input_size=32, mean=mean, std=std).module  # Normalize + net
    return {
        "um": um,
        "load_s": load_s,
        "original": mc.open_onnx_session(str(path)),
        "canonical": um.session(),
        "module": module,
        "twin": mc.open_onnx_session(mc._export_onnx_bytes(module, torch.zeros(1, *shape))),
    }


def _warmup(module, batches, call_n: int, sigma: float, bs: int, shape) -> dict:
    """Per-batch calls of a plain module: the first calls (torch, then one export + probe) until the
    remembered choice is made."""
    from rrise.calibrate import mc

    mc.forget(module)
    t0 = time.perf_counter()
    mc.sample_counts(module, batches[0], call_n, sigma, bs, seed=0)
    first_call = time.perf_counter() - t0
    calls = 1
    while mc._memo(module, shape, False, None).choice is None and calls < 60:
        mc.sample_counts(module, batches[calls % 64], call_n, sigma, bs, seed=calls)
        calls += 1
    switch_s = time.perf_counter() - t0
    memo = mc._memo(module, shape, False, None)
    return {
        "inputs_per_call": len(batches[0]),
        "draws_per_input": call_n,
        "first_call_s": round(first_call, 2),
        "calls_before_switch": calls,
        "seconds_to_switch": round(switch_s, 2),
        "choice": memo.choice,
        "probe_s_per_draw": {k: float(f"{v:.3g}") for k, v in memo.probe.items()},
    }


def _user_rounds(args, models: dict, x, noisy, norm_noisy, batches, sigma: float) -> dict[str, float]:
    """Interleaved rounds of every rate (samples/s); their medians."""
    from rrise.calibrate import mc

    bs, per_input = args.batch_size, max(1, args.draws // args.inputs)
    raw_batches = max(1, per_input * args.inputs // bs)

    def raw(session, batch):
        name = session.get_inputs()[0].name
        t = time.perf_counter()
        for _ in range(raw_batches):
            session.run(None, {name: batch})[0].argmax(1)
        return raw_batches * bs / (time.perf_counter() - t)

    def timed(samples, fn, *a, **kw):
        t = time.perf_counter()
        fn(*a, **kw)
        return samples / (time.perf_counter() - t)

    module, k = models["module"], args.calls_per_round

    def per_batch_calls(r):
        for j in range(k):
            mc.sample_counts(module, batches[(r * k + j) % 64], args.call_n, sigma, bs, seed=j)

    rates: dict[str, list[float]] = {}
    for r in range(args.rounds):
        got = {
            "raw_canonical": raw(models["canonical"], noisy),
            "sc_user_onnx": timed(
                per_input * args.inputs, mc.sample_counts, models["um"], x, per_input, sigma, bs, seed=r
            ),
            "raw_original": raw(models["original"], norm_noisy),
            "raw_twin": raw(models["twin"], noisy),
            "sc_per_batch": timed(k * args.call_inputs * args.call_n, per_batch_calls, r),
            "sc_large": timed(
                args.big_n * args.inputs, mc.sample_counts, module, x, args.big_n, sigma, 4000, seed=r
            ),
        }
        for name, rate in got.items():
            rates.setdefault(name, []).append(rate)
    med = {name: float(np.median(v)) for name, v in rates.items()}
    med["per_input"], med["raw_samples"] = per_input, raw_batches * bs
    return med


def _user_summary(args, med: dict[str, float]) -> dict:
    """The user-model benchmark's JSON: medians, ratios and goals."""
    return {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "onnx": {
            "inputs": args.inputs,
            "draws_per_input": int(med["per_input"]),
            "raw_canonical_samples_per_s": round(med["raw_canonical"], 1),
            "raw_original_samples_per_s": round(med["raw_original"], 1),
            "sample_counts_samples_per_s": round(med["sc_user_onnx"], 1),
            "ratio_to_raw": round(med["sc_user_onnx"] / med["raw_canonical"], 3),
            "ratio_to_raw_original": round(med["sc_user_onnx"] / med["raw_original"], 3),
            "goal": 0.9,
        },
        "torch_module_per_batch": {
            "inputs_per_call": args.call_inputs,
            "draws_per_input": args.call_n,
            "calls_per_round": args.calls_per_round,
            "raw_onnx_twin_samples_per_s": round(med["raw_twin"], 1),
            "sample_counts_samples_per_s": round(med["sc_per_batch"], 1),
            "ratio_to_raw_twin": round(med["sc_per_batch"] / med["raw_twin"], 3),
            "goal": 0.85,
        },
        "torch_module_bs4000_calls": {
            "draws_per_call": args.big_n * args.inputs,
            "sample_counts_samples_per_s": round(med["sc_large"], 1),
            "ratio_to_raw_twin": round(med["sc_large"] / med["raw_twin"], 3),
        },
        "samples_per_round_raw": int(med["raw_samples"]),
    }


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks mc", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (seconds)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", choices=("all", "engine", "user"), default="all", help="which part to run")
    args = ap.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    user = None
    if args.only in ("all", "user"):
        uargs = argparse.Namespace(
            quick=args.quick,
            batch_size=500 if not args.quick else 250,
            inputs=8,
            draws=4000 if not args.quick else 500,
            rounds=args.rounds or (5 if not args.quick else 1),
            call_inputs=8,
            call_n=500 if not args.quick else 50,
            calls_per_round=2,
            big_n=2000 if not args.quick else 100,
        )
        user = bench_user(uargs)
    if args.only == "user":
        return {"cpu_threads_torch": threads, "user_models": user}
    cnn, cnn_source = _fashion_cnn(args.workdir)
    resnet = _resnet_cifar()
    results = {"cpu_threads_torch": threads, "gpu": "none: no GPU on this machine; CPU numbers only"}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    configs = [
        ("fashion-mnist cnn", cnn, (1, 28, 28), 8000 if not args.quick else 1000),
        ("cifar-shaped resnet", resnet, (3, 32, 32), 2000 if not args.quick else 500),
    ]
    results["models"] = []
    for name, model, shape, draws in configs:
        bargs = argparse.Namespace(
            batch_size=500 if not args.quick else 250,
            inputs=8,
            draws=draws,
            rounds=args.rounds or (3 if not args.quick else 1),
            naive_inputs=8 if not args.quick else 2,
            naive_n=256 if not args.quick else 64,
            naive_batch=256 if not args.quick else 64,
        )
        results["models"].append(bench_model(name, model, shape, bargs))
    results["models"][0]["source"] = cnn_source
    sizes = [1000, 10000] if not args.quick else [200, 1000]
    results["peak_rss"] = bench_rss(cnn, sizes, n=2 if not args.quick else 1)
    if user is not None:
        results["user_models"] = user
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
