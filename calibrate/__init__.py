"""Calibrate stage: base model, Monte Carlo targets, surrogate, conformal calibration, evaluation (torch)."""

__all__ = ["build"]


def __getattr__(name: str):
    # `rrise.calibrate.build` without importing torch until it is called for
    if name == "build":
        from .building import build

        return build
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
