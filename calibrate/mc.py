"""Monte Carlo for randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is ``g(x) = argmax_c P(f(x+ε) = c)``, ``ε ~ N(0, σ²I)``, with noise in the
model's input space (float32 pixels in [0, 1]). :func:`sample_counts` estimates the class
distribution by counting ``f``'s votes on fresh noise; :func:`certify` and :func:`predict` are
Cohen's CERTIFY and PREDICT on top of it.

Backends: a torch ``nn.Module`` (noise drawn on the model's device, votes counted there with
``bincount``, no host round-trip per batch; ``channels_last`` and ``autocast`` options for GPUs), an
``onnxruntime.InferenceSession``, a path to an ``.onnx`` file, a :class:`PreparedModel` from
:func:`prepare_model`, or a user model from :func:`rrise.calibrate.user_model.load_user_model`. On
the CPU both backends draw the very same noise (torch's CPU generator), so they differ only where
float rounding flips an argmax. ``backend="auto"`` with a CPU module exports it to ONNX in memory,
times a short probe of each backend and keeps the faster; the progress line names the backend in use.

A CPU module passed to :func:`sample_counts` again and again (as users call it, batch after batch)
is exported and probed once, not per call: the choice and the ONNX twin are remembered per module
(weakly: forgetting the module frees them) together with a SHA-256 of its parameters and buffers,
checked on every call (about 1 ms per MB of weights), so a module whose weights changed is exported
again and a stale twin is never run. Only parameters, buffers and the module tree are watched: after
changing anything else a forward pass depends on, call :func:`forget`. Calls too small to pay for a
probe run on torch until the module has spent ``AUTO_PROBE_CUMULATIVE_DRAWS`` draws there.

Reproducibility: the noise of input ``i`` (``index_offset + i`` when a data set is processed in
pieces) comes from its own streams ``SeedSequence([seed, stream, i, chunk])``, one per fixed-size
chunk of its draws. Its counts therefore depend only on ``(seed, i, n)``, the input itself and the
device type (CPU or CUDA noise generator), not on ``batch_size``, order, sharding, resumption, nor on
how inputs are grouped into calls or forward batches. Cohen's selection and
estimation draws use different streams, so they are independent.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from rrise.onnx_session import FASTEST, open_session
from rrise.progress import Bar, progress_bar
from rrise.stats import binom_test_two_sided, clopper_pearson_lower, norm_ppf

__all__ = [
    "BACKENDS",
    "CohenResult",
    "PreparedModel",
    "Sampling",
    "certify",
    "forget",
    "module_device",
    "open_onnx_session",
    "predict",
    "prepare_model",
    "sample_counts",
    "weights_digest",
]

BACKENDS = ("auto", "torch", "onnxruntime")
AUTOCAST_DTYPES = ("float16", "bfloat16")
# backend="auto" on a CPU module probes both backends only for jobs this large (draws); smaller jobs
# run on torch directly: the probe (an ONNX export and a few timed batches) would cost more than it saves.
AUTO_PROBE_MIN_DRAWS = 200_000
PROBE_ROUNDS = 5  # alternating timed passes per backend in the auto probe
# ... unless the same module has already spent this many draws on torch in such small calls (a user's
# loop over batches): then it is probed once, and the choice is remembered for the module.
AUTO_PROBE_CUMULATIVE_DRAWS = 10_000

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


def _generator(seq: np.random.SeedSequence, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded (63 bits) from one chunk's seed sequence."""
    hi, lo = seq.generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(((int(hi) << 32) | int(lo)) >> 1)


_CPU = torch.device("cpu")


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


def _check_output(shape: tuple, num_classes: int | None) -> int:
    """Checks a forward pass's output shape: ``[B, K]`` with ``K`` = num_classes (when given) and >= 2."""
    if len(shape) != 2:
        raise ValueError(f"model output must be [B, K], got shape {shape}")
    return _check_width(int(shape[1]), num_classes)


def _check_width(width: int, num_classes: int | None) -> int:
    if num_classes is not None and width != num_classes:
        raise ValueError(f"model outputs {width} classes but num_classes={num_classes}")
    if width < 2:
        raise ValueError(f"model output has {width} column(s); need one score per class (>= 2)")
    return width


# --------------------------------------------------------------------------------------------------
# torch backend: noise on the model's device, votes counted there with bincount


def module_device(model: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for one with neither)."""
    tensors = [*model.parameters(), *model.buffers()]
    return tensors[0].device if tensors else _CPU


class _TorchBackend:
    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        x,
        num_classes: int | None,
        channels_last: bool = False,
        autocast: str | None = None,
    ):
        self.model = model
        self.device = module_device(model)
        self.channels_last = bool(channels_last)
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {AUTOCAST_DTYPES}, got {autocast!r}")
        self.autocast = autocast
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.label = f"torch:{self.device.type}" + (" channels_last" if channels_last else "")
        self.label += f" autocast {autocast}" if autocast else ""
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
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                if self.autocast is None:
                    return self.model(batch)
                with torch.autocast(self.device.type, dtype=getattr(torch, self.autocast)):
                    return self.model(batch)
        finally:
            self.model.train(was_training)

    def noisy_chunk(self, i: int, seq: np.random.SeedSequence, rows: int, sigma: float):
        gen = _generator(seq, self.device)
        with torch.inference_mode():
            eps = torch.randn((rows, *self.x.shape[1:]), generator=gen, device=self.device)
            return eps.mul_(sigma).add_(self.x[i])

    def new_counts(self) -> torch.Tensor:
        # one extra column counts the draws whose output had a NaN or inf (checked once, at the end)
        return torch.zeros((self.num_inputs, self.num_classes + 1), dtype=torch.int64, device=self.device)

    def vote(self, counts: torch.Tensor, parts: list, owners: list[int], lens: list[int]) -> None:
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = self._forward(batch)
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            _check_output(tuple(out.shape), self.num_classes)
        first, span = owners[0], owners[-1] - owners[0] + 1
        width = self.num_classes + 1
        rel = torch.as_tensor(np.repeat(np.asarray(owners) - first, lens), device=self.device)
        vote = torch.where(torch.isfinite(out).all(dim=1), out.argmax(dim=1), self.num_classes)
        votes = torch.bincount(rel * width + vote, minlength=span * width).view(span, -1)
        counts[first : first + span] += votes

    @staticmethod
    def to_numpy(counts: torch.Tensor) -> np.ndarray:
        return counts.cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------------
# onnxruntime backend: noise in numpy float32, votes counted with np.bincount


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def open_onnx_session(model: str | os.PathLike | bytes):
    """The SDK's onnxruntime session (rrise.onnx_session) on an ``.onnx`` path or serialized bytes:
    the fastest providers here (CUDA first), one intra-op thread per usable core."""
    return open_session(model if isinstance(model, bytes) else os.fspath(model), FASTEST, threads=_cores())


class _OrtBackend:
    name = "onnxruntime"
    label = "onnxruntime"

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
        # torch's CPU generator: the same noise as the torch backend on the CPU (and faster than numpy)
        eps = torch.randn((rows, *self.x.shape[1:]), generator=_generator(seq, _CPU)).numpy()
        eps *= np.float32(sigma)
        eps += self.x[i]
        return eps

    def new_counts(self) -> np.ndarray:
        # one extra column counts the draws whose output had a NaN or inf (checked once, at the end)
        return np.zeros((self.num_inputs, self.num_classes + 1), dtype=np.int64)

    def vote(self, counts: np.ndarray, parts: list, owners: list[int], lens: list[int]) -> None:
        out = self._forward(parts[0] if len(parts) == 1 else np.concatenate(parts))
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            _check_output(tuple(out.shape), self.num_classes)
        first, span = owners[0], owners[-1] - owners[0] + 1
        width = self.num_classes + 1
        vote = out.argmax(axis=1)
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            vote[~finite] = self.num_classes
        flat = np.repeat(np.asarray(owners) - first, lens) * width + vote
        counts[first : first + span] += np.bincount(flat, minlength=span * width).reshape(span, -1)

    @staticmethod
    def to_numpy(counts: np.ndarray) -> np.ndarray:
        return counts


@dataclass
class PreparedModel:
    """A model bound to one backend, ready for many :func:`sample_counts` calls (e.g. shard by shard).

    ``backend`` is ``"torch"`` or ``"onnxruntime"``; ``target`` the ``nn.Module`` or the
    ``InferenceSession``; ``probe`` the probe's seconds per draw of each backend when ``auto`` chose.
    """

    backend: str
    target: object
    channels_last: bool = False
    autocast: str | None = None
    probe: dict[str, float] = field(default_factory=dict)

    @property
    def device_type(self) -> str:
        return module_device(self.target).type if self.backend == "torch" else "cpu"

    @property
    def label(self) -> str:
        """What the progress line shows, e.g. ``onnxruntime (auto: 2.1x torch)``."""
        text = f"torch:{self.device_type}" if self.backend == "torch" else "onnxruntime"
        if len(self.probe) == 2:
            other = "torch" if self.backend == "onnxruntime" else "onnxruntime"
            text += f" (auto: {self.probe[other] / self.probe[self.backend]:.1f}x {other})"
        return text


def _export_onnx_bytes(model: nn.Module, sample: torch.Tensor) -> bytes:
    """The module as an in-memory ONNX model with a dynamic batch (input ``input``, output ``logits``)."""
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample,),
                buf,
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return buf.getvalue()


def _seconds_per_draw(backend, sample: np.ndarray, rows: int, repeats: int = 2) -> float:
    """Median seconds per draw of ``repeats`` timed forward passes of ``rows`` noisy copies (one warm-up)."""
    batch = np.repeat(sample[None], rows, axis=0)
    batch += np.random.default_rng(0).standard_normal(batch.shape, dtype=np.float32) * np.float32(0.1)
    if backend.name == "torch":
        batch = torch.from_numpy(batch).to(backend.device)
    times = []
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        backend._forward(batch)
        if k:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) / rows


def _probe_speeds(
    backends: dict, sample: np.ndarray, rows: int, rounds: int = PROBE_ROUNDS
) -> dict[str, float]:
    """Median seconds per draw of each backend over ``rounds`` rounds that time them in turn, so that
    a burst of other load on a shared CPU slows both alike instead of deciding the choice (a single
    pass each once kept torch for a 5.6M-draw store that onnxruntime runs 3.5x faster)."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, backend in backends.items():
            times[name].append(_seconds_per_draw(backend, sample, rows, repeats=1))
    return {name: float(np.median(t)) for name, t in times.items()}


def prepare_model(
    model,
    backend: str = "auto",
    *,
    sample=None,
    onnx: str | os.PathLike | bytes | None = None,
    batch_size: int = 1000,
    channels_last: bool = False,
    autocast: str | None = None,
) -> PreparedModel:
    """Bind ``model`` to a backend once, for many :func:`sample_counts` calls.

    ``model``: an ``nn.Module``, an ``.onnx`` path, an ``InferenceSession``, a ``PreparedModel`` or a
    user model (anything with a ``prepare_for_mc(backend, sample=..., batch_size=...)`` method, as
    :class:`rrise.calibrate.user_model.UserModel`).
    ``backend``: ``"torch"`` (modules only), ``"onnxruntime"`` (a module is exported to ONNX in memory,
    or ``onnx`` — the same model already exported, as a path or serialized bytes — is opened), or
    ``"auto"``: a module on a GPU stays on torch; a module on the CPU is timed against its ONNX twin on
    ``sample`` (one input ``[C, H, W]`` or a batch; needed for ``auto``), with forward batches of up to
    ``batch_size`` rows, and the faster is kept. A module whose ONNX export fails stays on torch.
    The choice and the in-memory export are remembered for the module (see :func:`sample_counts`);
    an explicit call always probes afresh.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(model, PreparedModel):
        if backend not in ("auto", model.backend):
            raise ValueError(f"model is prepared for {model.backend}, not {backend}")
        return model
    if not isinstance(model, nn.Module):
        return _prepare_other(model, backend, sample, batch_size)
    opts = {"channels_last": channels_last, "autocast": autocast}
    on_cpu = module_device(model).type == "cpu"
    if backend == "torch" or (backend == "auto" and not on_cpu):
        return PreparedModel("torch", model, **opts)
    if not on_cpu:
        raise ValueError(f"backend='onnxruntime' needs a CPU module, this one is on {module_device(model)}")
    if sample is None and onnx is None:
        raise ValueError("prepare_model needs sample=[C, H, W] input(s) to export or probe a module")
    first = None
    if sample is not None:
        xb, _ = _as_batch(sample)
        first = torch.as_tensor(xb[:1], dtype=torch.float32)
    if onnx is not None:
        session, memo = open_onnx_session(onnx), None
    else:
        memo = _memo(model, tuple(first.shape[1:]), channels_last, autocast)
        try:
            session = _twin(model, first, memo)
        except Exception as exc:  # noqa: BLE001 - an unexportable module simply stays on torch
            if backend == "onnxruntime":
                raise ValueError(f"cannot export the module to ONNX: {exc}") from exc
            if memo is not None:
                memo.choice, memo.probe = "torch", {}
            return PreparedModel("torch", model, **opts)
    if backend == "onnxruntime":
        return PreparedModel("onnxruntime", session)
    if first is None:
        raise ValueError("backend='auto' needs sample=[C, H, W] input(s) to time both backends on")
    return _faster_of(model, session, first, memo, batch_size, opts)


def _prepare_other(model, backend: str, sample, batch_size: int) -> PreparedModel:
    """A user model (``prepare_for_mc``), an ``.onnx`` path or an onnxruntime session, prepared."""
    if hasattr(model, "prepare_for_mc"):
        return model.prepare_for_mc(backend, sample=sample, batch_size=batch_size)
    if backend == "torch":
        raise ValueError("backend='torch' needs a torch nn.Module, got an ONNX model")
    if isinstance(model, (str, os.PathLike)):
        return PreparedModel("onnxruntime", open_onnx_session(model))
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return PreparedModel("onnxruntime", model)
    raise TypeError(
        f"model must be a torch nn.Module, an onnxruntime.InferenceSession or an .onnx path, "
        f"got {type(model)}"
    )


def _faster_of(model: nn.Module, session, first, memo, batch_size: int, opts: dict) -> PreparedModel:
    """Time the module against its ONNX twin on ``first`` and keep the faster (remembered in ``memo``)."""
    rows = max(1, min(int(batch_size), 256))
    backends = {
        "torch": _TorchBackend(model, first, None, **opts),
        "onnxruntime": _OrtBackend(session, first, None),
    }
    probe = _probe_speeds(backends, first[0].numpy(), rows)
    choice = "onnxruntime" if probe["onnxruntime"] < probe["torch"] else "torch"
    if memo is not None:
        memo.choice, memo.probe = choice, probe
    if choice == "onnxruntime":
        return PreparedModel("onnxruntime", session, probe=probe)
    return PreparedModel("torch", model, probe=probe, **opts)


# --------------------------------------------------------------------------------------------------
# What is remembered per module: the backend choice and the ONNX twin of its current weights


@dataclass
class _Memo:
    """Per (module, input shape, options): the probe's choice, and the ONNX twin of weights ``digest``."""

    choice: str | None = None
    probe: dict[str, float] = field(default_factory=dict)
    digest: bytes | None = None
    session: object = None
    torch_draws: int = 0  # draws run on torch by ``auto`` while no choice was made


_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module → {key: _Memo}
_MEMO_LOCK = threading.Lock()
_MEMO_KEYS_PER_MODULE = 4


def _memo(model: nn.Module, shape: tuple, channels_last: bool, autocast: str | None) -> _Memo | None:
    """The memo of ``model`` for inputs of ``shape`` (made on first use); None if the module cannot be
    a weak dictionary key (e.g. a subclass defining ``__eq__`` without ``__hash__``)."""
    key = (tuple(int(d) for d in shape), bool(channels_last), autocast)
    with _MEMO_LOCK:
        try:
            memos = _MEMOS.setdefault(model, {})
        except TypeError:
            return None
        if key not in memos:
            while len(memos) >= _MEMO_KEYS_PER_MODULE:
                memos.pop(next(iter(memos)))
            memos[key] = _Memo()
        return memos[key]


def forget(model: nn.Module | None = None) -> None:
    """Drop what :func:`sample_counts` remembers about ``model`` (every module when None): its backend
    choice and ONNX twin. Needed only after changing something other than its parameters, buffers or
    module tree that its forward pass depends on (a plain attribute, a hook, a patched method)."""
    with _MEMO_LOCK:
        if model is None:
            _MEMOS.clear()
        else:
            _MEMOS.pop(model, None)


def weights_digest(model: nn.Module) -> bytes:
    """SHA-256 of a module's tree (names and types of its submodules), parameters and buffers (names,
    shapes, dtypes and bytes). Equal digests: the same weights. About 1 ms per MB on a CPU."""
    h = hashlib.sha256()
    for name, sub in model.named_modules():
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__};".encode())
    tensors = [*model.named_parameters(prefix="p"), *model.named_buffers(prefix="b")]
    for name, t in tensors:
        data = t.detach()
        h.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        if data.device.type != "cpu":
            data = data.cpu()
        if data.numel():
            h.update(memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.digest()


def _twin(model: nn.Module, first: torch.Tensor, memo: _Memo | None):
    """An onnxruntime session on the module's in-memory ONNX export: the remembered one when the
    module's weights still have the digest it was made from, else a fresh export (remembered)."""
    if memo is None:
        return open_onnx_session(_export_onnx_bytes(model, first))
    digest = weights_digest(model)
    if memo.session is None or memo.digest != digest:
        memo.session, memo.digest = None, None
        memo.session, memo.digest = open_onnx_session(_export_onnx_bytes(model, first)), digest
    return memo.session


def _remembered(model: nn.Module, backend: str, xb, draws: int, opts: dict) -> PreparedModel:
    """A CPU module bound to ``backend`` (``auto`` or ``onnxruntime``) for a ``sample_counts`` call of
    ``draws`` draws on inputs ``xb``, using and updating what is remembered about it."""
    first = torch.as_tensor(xb[:1], dtype=torch.float32)
    topts = {k: opts[k] for k in ("channels_last", "autocast")}
    memo = _memo(model, tuple(first.shape[1:]), **topts)
    if memo is None:  # not weakly referenceable: no memory, the old per-call behaviour
        if backend == "auto" and draws < AUTO_PROBE_MIN_DRAWS:
            return PreparedModel("torch", model, **topts)
        return prepare_model(model, backend, sample=first, **opts)
    if backend == "auto" and memo.choice is None:
        if draws < AUTO_PROBE_MIN_DRAWS and memo.torch_draws + draws < AUTO_PROBE_CUMULATIVE_DRAWS:
            memo.torch_draws += draws  # too small a job to pay for a probe (yet)
            return PreparedModel("torch", model, **topts)
        return prepare_model(model, "auto", sample=first, **opts)  # probes once, remembers
    if backend == "auto" and memo.choice == "torch":
        return PreparedModel("torch", model, probe=memo.probe, **topts)
    try:
        session = _twin(model, first, memo)
    except Exception as exc:  # noqa: BLE001
        if backend == "onnxruntime":
            raise ValueError(f"cannot export the module to ONNX: {exc}") from exc
        memo.choice, memo.probe = "torch", {}
        return PreparedModel("torch", model, **topts)
    return PreparedModel("onnxruntime", session, probe=memo.probe if backend == "auto" else {})


def _backend(
    model,
    x,
    num_classes: int | None,
    backend: str = "auto",
    n: int = 0,
    batch_size: int = 1000,
    channels_last: bool = False,
    autocast: str | None = None,
):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    opts = {"batch_size": batch_size, "channels_last": channels_last, "autocast": autocast}
    if isinstance(model, nn.Module):
        xb, _ = _as_batch(x)  # a wrong shape or a NaN is reported before any export or probe
        _check_finite_any(xb)
        on_cpu = module_device(model).type == "cpu"
        if backend != "torch" and on_cpu and len(xb):
            prepared = _remembered(model, backend, xb, len(xb) * max(n, 0), opts)
        else:
            prepared = prepare_model(model, backend, sample=xb[:1] if len(xb) else None, **opts)
    elif hasattr(model, "prepare_for_mc"):
        xb, _ = _as_batch(x)
        _check_finite_any(xb)
        prepared = model.prepare_for_mc(
            backend, sample=xb[:1] if len(xb) else None, batch_size=batch_size, draws=len(xb) * max(n, 0)
        )
    else:
        prepared = prepare_model(model, backend, **opts)
    if prepared.backend == "torch":
        be = _TorchBackend(prepared.target, x, num_classes, prepared.channels_last, prepared.autocast)
    else:
        be = _OrtBackend(prepared.target, x, num_classes)
    if prepared.probe:
        be.label = prepared.label
    return be


def _check_finite_any(xb) -> None:
    """NaN/inf check before a probe or an export touches the inputs (names the first bad index)."""
    if isinstance(xb, torch.Tensor):
        _check_finite((~torch.isfinite(xb)).flatten(1).any(1).cpu().numpy())
    else:
        _check_finite(~np.isfinite(np.asarray(xb, dtype=np.float32).reshape(len(xb), -1)).all(axis=1))


def _draw_counts(
    backend, n: int, sigma: float, seed: int, stream: int, batch_size: int, how: Sampling, desc: str
) -> np.ndarray:
    """``[B, K]`` vote counts of ``n`` noisy draws per input (the shared driver of both backends);
    ``how``: the input streams (``index_offset``) and the progress bar (``bar``, ``show_progress``)."""
    index_offset = how.index_offset
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    counts = backend.new_counts()  # [B, K + 1]: the last column counts non-finite outputs
    chunk = _chunk_rows(backend.input_elems)
    key, block = None, None
    total = backend.num_inputs * n
    with _bar_or_new(how.bar, total, desc, how.show_progress) as bar:
        bar.note(f"backend {backend.label}")
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
    counts = backend.to_numpy(counts)
    bad = np.flatnonzero(counts[:, -1])
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"model output has NaN or inf on {int(counts[i, -1])} of {n} noisy draws of input index "
            f"{index_offset + i} ({bad.size} input(s) affected): its votes would be meaningless"
        )
    return np.ascontiguousarray(counts[:, :-1])


@contextmanager
def _bar_or_new(bar: Bar | None, total: int, desc: str, show_progress: bool) -> Iterator[Bar]:
    if bar is not None:
        yield bar
        return
    with progress_bar(total, desc, "draws", enabled=show_progress) as new:
        yield new


# --------------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How Monte Carlo draws are seeded and run (:func:`sample_counts`, :func:`certify`,
    :func:`predict` take one, or its fields as keywords).

    ``num_classes``: K where the model's output does not say; ``seed`` and ``index_offset``: input
    ``i``'s draws depend only on ``(seed, index_offset + i)``; ``backend``, ``channels_last``,
    ``autocast``: see :func:`prepare_model`; ``show_progress``/``bar``: a progress bar (``bar``: an
    open one to advance instead of a new one).
    """

    num_classes: int | None = None
    seed: int | None = None
    index_offset: int = 0
    backend: str = "auto"
    channels_last: bool = False
    autocast: str | None = None
    show_progress: bool = False
    bar: Bar | None = None


def _sampling(sampling: Sampling | None, given: dict, **defaults) -> Sampling:
    """``sampling`` (or the defaults) with the keywords ``given`` over it; a TypeError names an
    unknown keyword."""
    base = sampling if sampling is not None else Sampling(**defaults)
    return replace(base, **given) if given else base


def _prepared(model, x, n: int, batch_size: int, how: Sampling):
    return _backend(model, x, how.num_classes, how.backend, n, batch_size, how.channels_last, how.autocast)


def sample_counts(
    model,
    x,
    n: int,
    sigma: float,
    batch_size: int = 1000,
    generator=None,
    sampling: Sampling | None = None,
    **settings,
) -> np.ndarray:
    """Vote counts ``k_c = #{j ≤ n : argmax f(x + ε_j) = c}`` with fresh ``ε_j ~ N(0, σ²I)``.

    ``x``: one input ``[C, H, W]`` (→ ``[K]``) or a batch ``[B, C, H, W]`` (→ ``[B, K]``), float32
    pixels as numpy or torch. ``model``: torch ``nn.Module`` (run in eval mode under
    ``inference_mode``), ``onnxruntime.InferenceSession``, ``.onnx`` path, :class:`PreparedModel` or
    a user model (:func:`rrise.calibrate.user_model.load_user_model`: its canonical ONNX).
    Forward batches hold up to ``batch_size`` draws, spanning several inputs. A CPU module's backend
    choice and ONNX twin are remembered between calls (see the module docstring). A NaN or inf in
    the model's output on any draw raises ValueError naming the input index (its votes would mean
    nothing).

    ``sampling`` (:class:`Sampling`), or its fields as keywords: ``num_classes``, ``seed``,
    ``index_offset``, ``show_progress``, and ``backend``: ``"auto"`` (default; a CPU module is timed
    against its in-memory ONNX export on jobs of at least ``AUTO_PROBE_MIN_DRAWS`` draws and the
    faster is used), ``"torch"`` or
    ``"onnxruntime"``; see :func:`prepare_model`. ``channels_last`` (converts the module's weights in
    place) and ``autocast`` (``"float16"`` or ``"bfloat16"``) apply to the torch backend and are meant
    for GPUs; counts are those of the model as run, with these numerics. ``bar``: an open progress
    bar to advance instead of a new one.

    Seeding: the draws of input ``i`` depend only on ``(seed, index_offset + i)``; without ``seed`` it
    is drawn from ``generator`` (torch or numpy), and without either from fresh entropy. Each count
    vector is then exactly Multinomial(n, p(x)) with ``p_c(x) = P(f(x+ε) = c)``.
    """
    how = _sampling(sampling, settings)
    be = _prepared(model, x, int(n), int(batch_size), how)
    seed = _resolve_seed(how.seed, generator)
    counts = _draw_counts(be, int(n), sigma, seed, _STREAM_COUNTS, int(batch_size), how, "Monte Carlo")
    return counts[0] if be.single else counts


def certify(
    model,
    x,
    n0: int,
    n: int,
    sigma: float,
    alpha: float,
    batch_size: int = 1000,
    sampling: Sampling | None = None,
    **settings,
) -> CohenResult:
    """Cohen's CERTIFY for one input or a batch (arrays are ``[B]``; ``B = 1`` for one input).

    ``Â`` = argmax of ``n0`` selection draws; ``k`` = votes for ``Â`` among ``n`` fresh, independent
    estimation draws; ``p̲ = clopper_pearson_lower(k, n, α)``; abstain if ``p̲ ≤ 1/2``, else predict
    ``Â`` with radius ``σ·Φ⁻¹(p̲)``. All inputs share forward batches; input ``i``'s draws depend only
    on ``(seed, index_offset + i)`` as in :func:`sample_counts`, so a data set may be certified in
    pieces with the same result.

    ``sampling`` or its fields as keywords, as in :func:`sample_counts` (``seed`` defaults to 0).

    Guarantee (Cohen et al. 2019, Thm. 1 + Prop. 2), per input: with probability at least ``1 − α``
    over the estimation noise, if it does not abstain then ``p_Â(x) ≥ p̲ > 1/2``, so the smoothed
    classifier ``g`` predicts ``Â`` at every point of the ℓ2 ball of radius ``σ·Φ⁻¹(p̲)`` around x.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive to certify, got {sigma}")
    how = _sampling(sampling, settings, seed=0)
    be = _prepared(model, x, int(n0) + int(n), int(batch_size), how)
    seed = _resolve_seed(how.seed, None)
    bs = int(batch_size)
    sel = _draw_counts(be, int(n0), sigma, seed, _STREAM_SELECT, bs, how, "selection")
    est = _draw_counts(be, int(n), sigma, seed, _STREAM_ESTIMATE, bs, how, "estimation")
    top = sel.argmax(axis=1)
    k = est[np.arange(len(est)), top]
    p_lower = np.atleast_1d(np.asarray(clopper_pearson_lower(k, int(n), alpha), dtype=np.float64))
    abstain = p_lower <= 0.5  # at exactly 1/2 no class is certified (Cohen: abstain unless p̲ > 1/2)
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
    sampling: Sampling | None = None,
    **settings,
) -> np.ndarray:
    """Cohen's PREDICT: int64 ``[B]`` predicted classes, -1 where it abstains (``sampling`` or its
    fields as keywords, as in :func:`sample_counts`; ``seed`` defaults to 0).

    Takes the top two counts ``nA ≥ nB`` of ``n`` draws and abstains unless the two-sided binomial
    test of ``nA`` in ``nA + nB`` trials at p = 1/2 gives a p-value ≤ α.

    Guarantee (Cohen et al. 2019, Prop. 1; Hung et al. 2019): per input, the probability of returning
    a class other than ``g(x)`` is at most ``α``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    how = replace(_sampling(sampling, settings, seed=0), show_progress=False, bar=None)
    be = _prepared(model, x, int(n), int(batch_size), how)
    seed = _resolve_seed(how.seed, None)
    counts = _draw_counts(be, int(n), sigma, seed, _STREAM_PREDICT, int(batch_size), how, "predict")
    order = np.argsort(-counts, axis=1, kind="stable")
    rows = np.arange(len(counts))
    n_a, n_b = counts[rows, order[:, 0]], counts[rows, order[:, 1]]
    pvalue = np.atleast_1d(binom_test_two_sided(n_a, n_a + n_b, 0.5))
    return np.where(pvalue <= alpha, order[:, 0], -1).astype(np.int64)
