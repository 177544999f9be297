"""The linear bundle of :mod:`tests.tiny_bundle` with sound calibration counts: each count vector is
fresh Monte Carlo through its own base model at σ, so ``rrise inspect --verify`` (whose spot-check
binds σ and the counts to the base model) accepts it, and signing, which verifies first, signs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny_bundle import LINEAR_ALPHA, LINEAR_BETA, LINEAR_N_MC, linear_sources


def base_counts(base: Path, images: np.ndarray, sigma: float, n: int, seed: int) -> np.ndarray:
    """``[m, K]`` counts of the ONNX model ``base`` on ``x + σ·ε`` (numpy noise), ``n`` draws each."""
    from rrise.onnx_session import open_session

    session = open_session(base, "onnxruntime-cpu")
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    rows = []
    for x in images:
        noisy = (x + np.float32(sigma) * rng.standard_normal((n, *x.shape), dtype=np.float32)).astype(
            np.float32
        )
        logits = session.run(None, {name: noisy})[0]
        rows.append(np.bincount(logits.argmax(axis=1), minlength=logits.shape[1]))
    return np.stack(rows).astype(np.int64)


def sound_linear_sources(folder: Path, sigma: float = 0.25) -> dict:
    """:func:`tests.tiny_bundle.linear_sources` with its counts drawn through its base model at
    ``sigma`` and the calibration recomputed from them."""
    from rrise import CalibrationSpec, conformalize
    from rrise.bundle import sha256_file

    sources = linear_sources(folder)
    with np.load(sources["npz"]) as z:
        images, probs = z["images"], z["probs"]
    counts = base_counts(sources["base"], images, sigma, LINEAR_N_MC, seed=3)
    np.savez(sources["npz"], images=images, counts=counts, probs=probs)
    spec = CalibrationSpec(sigma=sigma, n_mc=LINEAR_N_MC, alpha=LINEAR_ALPHA, beta=LINEAR_BETA)
    sources["cal"] = conformalize(
        spec,
        probs,
        counts,
        base_sha256=sha256_file(sources["base"]),
        surrogate_sha256=sha256_file(sources["surrogate"]),
    )
    return sources
