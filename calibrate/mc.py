"""Monte Carlo for randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is ``g(x) = argmax_c P(f(x+ε) = c)``, ``ε ~ N(0, σ²I)``, with noise in the
model's input space (float32 pixels in [0, 1]). :func:`sample_counts` estimates the class
distribution by counting ``f``'s votes on fresh noise; :func:`certify` and :func:`predict` are
Cohen's CERTIFY and PREDICT on top of it.

Backends: a torch ``nn.Module`` (noise drawn on the model's device, votes counted there), an
``onnxruntime.InferenceSession`` or a path to an ``.onnx`` file (noise drawn in numpy float32).

Reproducibility: the noise of input ``i`` (``index_offset + i`` when a data set is processed in
pieces) comes from its own streams ``SeedSequence([seed, stream, i, chunk])``, one per fixed-size
chunk of its draws. Its counts therefore depend only on ``(seed, i, n)`` and the input itself, not on
``batch_size`` nor on how inputs are grouped into calls or forward batches. Cohen's selection and
estimation draws use different streams, so they are independent.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrise.progress import progress_bar
from rrise.stats import binom_test_two_sided, clopper_pearson_lower, norm_ppf

__all__ = ["CohenResult", "certify", "predict", "sample_counts"]

# Noise streams: sample_counts, Cohen's selection, Cohen's estimation, Cohen's PREDICT.
_STREAM_COUNTS, _STREAM_SELECT, _STREAM_ESTIMATE, _STREAM_PREDICT = 0, 1, 2, 3
_MAX_CHUNK_ROWS = 1024  # draws per noise chunk ...
_MAX_CHUNK_ELEMS = 1 << 24  # ... capped at 64 MiB of float32 noise for large inputs


def _chunk_rows(input_elems: int) -> int:
    """Draws per noise chunk: fixed by the input size alone, so the draws never depend on batching."""
    return max(1, min(_MAX_CHUNK_ROWS, _MAX_CHUNK_ELEMS // max(input_elems, 1)))


@dataclass(frozen=True)
class CohenResult:
    """Cohen CERTIFY for a batch. ``pred`` is -1 and ``radius`` 0.0 where it abstains.

    ``p_lower`` is the one-sided Clopper–Pearson lower bound on ``p_Â`` from the estimation counts;
    ``counts_selection`` ``[B, K]`` (n0 draws) chose ``Â``; ``counts_estimation`` ``[B, K]`` (n fresh
    draws) gave ``p_lower``.
    """

    pred: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    counts_selection: np.ndarray
    counts_estimation: np.ndarray

    @property
    def abstain(self) -> np.ndarray:
        return self.pred < 0

    def __len__(self) -> int:
        return len(self.pred)


# --------------------------------------------------------------------------------------------------
# Input handling, seeding and the draw plan (shared by both backends)


def _as_batch(x) -> tuple[np.ndarray | torch.Tensor, bool]:
    """``x`` as a ``[B, C, H, W]`` array or tensor, and whether it was a single ``[C, H, W]`` input."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"x must be one input [C, H, W] or a batch [B, C, H, W], got shape {tuple(x.shape)}")


def _check_finite(bad_per_input: np.ndarray) -> None:
    bad = np.flatnonzero(bad_per_input)
    if bad.size:
        raise ValueError(f"input index {int(bad[0])} contains NaN or inf ({bad.size} bad input(s))")


def _resolve_seed(seed: int | None, generator) -> int:
    """An explicit ``seed``; else one drawn from ``generator`` (torch or numpy); else fresh entropy."""
    if seed is not None:
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        return int(seed)
    if generator is None:
        return secrets.randbits(63)
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if hasattr(generator, "integers"):
        return int(generator.integers(0, 2**62))
    raise TypeError(f"generator must be a torch.Generator or numpy Generator, got {type(generator)}")


def _stream(seed: int, stream: int, index: int, chunk: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, stream, index, chunk])


def _plan(num_inputs: int, n: int, chunk: int, batch_size: int) -> Iterator[list[tuple]]:
    """Forward batches as lists of segments ``(i, c, lo, hi)``: rows ``lo:hi`` of chunk ``c`` of input ``i``.

    Every batch holds ``batch_size`` draws (the last one fewer), spanning inputs where needed.
    """
    segments, room = [], batch_size
    for i in range(num_inputs):
        for c, start in enumerate(range(0, n, chunk)):
            rows, lo = min(chunk, n - start), 0
            while lo < rows:
                take = min(room, rows - lo)
                segments.append((i, c, lo, lo + take))
                lo += take
                room -= take
                if room == 0:
                    yield segments
                    segments, room = [], batch_size
    if segments:
        yield segments


def _check_width(width: int, num_classes: int | None) -> int:
    if num_classes is not None and width != num_classes:
        raise ValueError(f"model outputs {width} classes but num_classes={num_classes}")
    if width < 2:
        raise ValueError(f"model output has {width} column(s); need one score per class (>= 2)")
    return width


# --------------------------------------------------------------------------------------------------
# torch backend: noise on the model's device, votes counted there with bincount


class _TorchBackend:
    def __init__(self, model: nn.Module, x, num_classes: int | None):
        self.model = model
        tensors = [*model.parameters(), *model.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        xb, self.single = _as_batch(x)
        self.x = torch.as_tensor(xb, dtype=torch.float32, device=self.device).detach()
        _check_finite((~torch.isfinite(self.x)).flatten(1).any(1).cpu().numpy())
        self.num_inputs, self.input_elems = len(self.x), int(self.x[0].numel()) if len(self.x) else 0
        self.num_classes = self._probe(num_classes)

    def _probe(self, num_classes: int | None) -> int:
        """One clean forward: checks the input shape and infers/checks the number of classes."""
        if self.num_inputs == 0:
            if num_classes is None:
                raise ValueError("x is an empty batch; pass num_classes to get [0, K] counts")
            return num_classes
        try:
            out = self._forward(self.x[:1])
        except RuntimeError as exc:
            raise ValueError(f"model rejected input of shape {tuple(self.x.shape[1:])}: {exc}") from exc
        if out.ndim != 2:
            raise ValueError(f"model output must be [B, K], got shape {tuple(out.shape)}")
        return _check_width(out.shape[1], num_classes)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self.model(batch)
        finally:
            self.model.train(was_training)

    def noisy_chunk(self, i: int, seq: np.random.SeedSequence, rows: int, sigma: float):
        hi, lo = seq.generate_state(2, np.uint32)
        gen = torch.Generator(device=self.device).manual_seed(((int(hi) << 32) | int(lo)) >> 1)
        with torch.inference_mode():
            eps = torch.randn((rows, *self.x.shape[1:]), generator=gen, device=self.device)
            return eps.mul_(sigma).add_(self.x[i])

    def new_counts(self) -> torch.Tensor:
        return torch.zeros((self.num_inputs, self.num_classes), dtype=torch.int64, device=self.device)

    def vote(self, counts: torch.Tensor, parts: list, owners: list[int], lens: list[int]) -> None:
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = self._forward(batch)
        if out.shape[1] != self.num_classes:
            _check_width(out.shape[1], self.num_classes)
        first, span = owners[0], owners[-1] - owners[0] + 1
        rel = torch.as_tensor(np.repeat(np.asarray(owners) - first, lens), device=self.device)
        flat = rel * self.num_classes + out.argmax(dim=1)
        votes = torch.bincount(flat, minlength=span * self.num_classes).view(span, -1)
        counts[first : first + span] += votes

    @staticmethod
    def to_numpy(counts: torch.Tensor) -> np.ndarray:
        return counts.cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------------
# onnxruntime backend: noise in numpy float32, votes counted with np.bincount


def _open_session(path: str | os.PathLike):
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    opts = ort.SessionOptions()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    opts.intra_op_num_threads = max(1, cores or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=providers)


class _OrtBackend:
    def __init__(self, session, x, num_classes: int | None):
        self.session = session
        spec = session.get_inputs()[0]
        self.input_name = spec.name
        self.dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        self.fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) else None
        xb, self.single = _as_batch(x)
        if isinstance(xb, torch.Tensor):
            xb = xb.detach().cpu().numpy()
        self.x = np.ascontiguousarray(xb, dtype=np.float32)
        _check_finite(~np.isfinite(self.x.reshape(len(self.x), -1)).all(axis=1))
        expected = tuple(spec.shape[1:])
        got = self.x.shape[1:]
        if len(expected) != len(got) or any(
            isinstance(e, int) and e != g for e, g in zip(expected, got, strict=True)
        ):
            raise ValueError(f"ONNX model expects input [B, {', '.join(map(str, expected))}], got {got}")
        self.num_inputs, self.input_elems = len(self.x), int(np.prod(got))
        if self.num_inputs == 0:
            if num_classes is None:
                raise ValueError("x is an empty batch; pass num_classes to get [0, K] counts")
            self.num_classes = num_classes
        else:
            out = self._forward(self.x[:1])
            if out.ndim != 2:
                raise ValueError(f"model output must be [B, K], got shape {out.shape}")
            self.num_classes = _check_width(out.shape[1], num_classes)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        batch = batch.astype(self.dtype, copy=False)
        if self.fixed_batch is None or len(batch) == self.fixed_batch:
            return self.session.run(None, {self.input_name: batch})[0]
        outs = []
        for start in range(0, len(batch), self.fixed_batch):  # a static batch dimension: pad the tail
            part = batch[start : start + self.fixed_batch]
            pad = self.fixed_batch - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            outs.append(self.session.run(None, {self.input_name: part})[0][: self.fixed_batch - pad])
        return np.concatenate(outs)

    def noisy_chunk(self, i: int, seq: np.random.SeedSequence, rows: int, sigma: float):
        eps = np.random.default_rng(seq).standard_normal((rows, *self.x.shape[1:]), dtype=np.float32)
        eps *= np.float32(sigma)
        eps += self.x[i]
        return eps

    def new_counts(self) -> np.ndarray:
        return np.zeros((self.num_inputs, self.num_classes), dtype=np.int64)

    def vote(self, counts: np.ndarray, parts: list, owners: list[int], lens: list[int]) -> None:
        out = self._forward(parts[0] if len(parts) == 1 else np.concatenate(parts))
        if out.shape[1] != self.num_classes:
            _check_width(out.shape[1], self.num_classes)
        first, span = owners[0], owners[-1] - owners[0] + 1
        flat = np.repeat(np.asarray(owners) - first, lens) * self.num_classes + out.argmax(axis=1)
        counts[first : first + span] += np.bincount(flat, minlength=span * self.num_classes).reshape(span, -1)

    @staticmethod
    def to_numpy(counts: np.ndarray) -> np.ndarray:
        return counts


def _backend(model, x, num_classes: int | None):
    if isinstance(model, nn.Module):
        return _TorchBackend(model, x, num_classes)
    if isinstance(model, (str, os.PathLike)):
        return _OrtBackend(_open_session(model), x, num_classes)
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return _OrtBackend(model, x, num_classes)
    raise TypeError(
        f"model must be a torch nn.Module, an onnxruntime.InferenceSession or an .onnx path, "
        f"got {type(model)}"
    )


def _draw_counts(
    backend,
    n: int,
    sigma: float,
    seed: int,
    stream: int,
    batch_size: int,
    index_offset: int,
    desc: str,
    show_progress: bool,
) -> np.ndarray:
    """``[B, K]`` vote counts of ``n`` noisy draws per input (the shared driver of both backends)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    counts = backend.new_counts()
    chunk = _chunk_rows(backend.input_elems)
    key, block = None, None
    total = backend.num_inputs * n
    with progress_bar(total, desc, "draws", enabled=show_progress) as bar:
        for segments in _plan(backend.num_inputs, n, chunk, batch_size):
            parts, owners, lens = [], [], []
            for i, c, lo, hi in segments:
                if key != (i, c):  # chunks are consumed in order: only the last one can straddle
                    rows = min(chunk, n - c * chunk)
                    seq = _stream(seed, stream, index_offset + i, c)
                    key, block = (i, c), backend.noisy_chunk(i, seq, rows, float(sigma))
                parts.append(block[lo:hi])
                owners.append(i)
                lens.append(hi - lo)
            backend.vote(counts, parts, owners, lens)
            bar.advance(sum(lens))
    return backend.to_numpy(counts)


# --------------------------------------------------------------------------------------------------
# Public API


def sample_counts(
    model,
    x,
    n: int,
    sigma: float,
    batch_size: int = 1000,
    generator=None,
    num_classes: int | None = None,
    seed: int | None = None,
    show_progress: bool = False,
    *,
    index_offset: int = 0,
) -> np.ndarray:
    """Vote counts ``k_c = #{j ≤ n : argmax f(x + ε_j) = c}`` with fresh ``ε_j ~ N(0, σ²I)``.

    ``x``: one input ``[C, H, W]`` (→ ``[K]``) or a batch ``[B, C, H, W]`` (→ ``[B, K]``), float32
    pixels as numpy or torch. ``model``: torch ``nn.Module`` (run in eval mode under
    ``inference_mode``), ``onnxruntime.InferenceSession`` or ``.onnx`` path. Forward batches hold up to
    ``batch_size`` draws, spanning several inputs.

    Seeding: the draws of input ``i`` depend only on ``(seed, index_offset + i)``; without ``seed`` it
    is drawn from ``generator`` (torch or numpy), and without either from fresh entropy. Each count
    vector is then exactly Multinomial(n, p(x)) with ``p_c(x) = P(f(x+ε) = c)``.
    """
    backend = _backend(model, x, num_classes)
    counts = _draw_counts(
        backend,
        int(n),
        sigma,
        _resolve_seed(seed, generator),
        _STREAM_COUNTS,
        int(batch_size),
        int(index_offset),
        "Monte Carlo",
        show_progress,
    )
    return counts[0] if backend.single else counts


def certify(
    model,
    x,
    n0: int,
    n: int,
    sigma: float,
    alpha: float,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
    *,
    index_offset: int = 0,
) -> CohenResult:
    """Cohen's CERTIFY for one input or a batch (arrays are ``[B]``; ``B = 1`` for one input).

    ``Â`` = argmax of ``n0`` selection draws; ``k`` = votes for ``Â`` among ``n`` fresh, independent
    estimation draws; ``p̲ = clopper_pearson_lower(k, n, α)``; abstain if ``p̲ < 1/2``, else predict
    ``Â`` with radius ``σ·Φ⁻¹(p̲)``.

    Guarantee (Cohen et al. 2019, Thm. 1 + Prop. 2), per input: with probability at least ``1 − α``
    over the estimation noise, if it does not abstain then ``p_Â(x) ≥ p̲ > 1/2``, so the smoothed
    classifier ``g`` predicts ``Â`` at every point of the ℓ2 ball of radius ``σ·Φ⁻¹(p̲)`` around x.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive to certify, got {sigma}")
    backend = _backend(model, x, num_classes)
    seed = _resolve_seed(seed, None)
    args = (int(batch_size), int(index_offset))
    sel = _draw_counts(backend, int(n0), sigma, seed, _STREAM_SELECT, *args, "selection", show_progress)
    est = _draw_counts(backend, int(n), sigma, seed, _STREAM_ESTIMATE, *args, "estimation", show_progress)
    top = sel.argmax(axis=1)
    k = est[np.arange(len(est)), top]
    p_lower = np.atleast_1d(np.asarray(clopper_pearson_lower(k, int(n), alpha), dtype=np.float64))
    abstain = p_lower < 0.5
    with np.errstate(invalid="ignore"):
        radius = np.where(abstain, 0.0, sigma * np.asarray(norm_ppf(p_lower), dtype=np.float64))
    return CohenResult(
        pred=np.where(abstain, -1, top).astype(np.int64),
        radius=radius.astype(np.float64),
        p_lower=p_lower,
        counts_selection=sel,
        counts_estimation=est,
    )


def predict(
    model,
    x,
    n: int,
    sigma: float,
    alpha: float,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int = 0,
    *,
    index_offset: int = 0,
) -> np.ndarray:
    """Cohen's PREDICT: int64 ``[B]`` predicted classes, -1 where it abstains.

    Takes the top two counts ``nA ≥ nB`` of ``n`` draws and abstains unless the two-sided binomial
    test of ``nA`` in ``nA + nB`` trials at p = 1/2 gives a p-value ≤ α.

    Guarantee (Cohen et al. 2019, Prop. 1; Hung et al. 2019): per input, the probability of returning
    a class other than ``g(x)`` is at most ``α``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    backend = _backend(model, x, num_classes)
    counts = _draw_counts(
        backend,
        int(n),
        sigma,
        _resolve_seed(seed, None),
        _STREAM_PREDICT,
        int(batch_size),
        int(index_offset),
        "predict",
        False,
    )
    order = np.argsort(-counts, axis=1, kind="stable")
    rows = np.arange(len(counts))
    n_a, n_b = counts[rows, order[:, 0]], counts[rows, order[:, 1]]
    pvalue = np.atleast_1d(binom_test_two_sided(n_a, n_a + n_b, 0.5))
    return np.where(pvalue <= alpha, order[:, 0], -1).astype(np.int64)
