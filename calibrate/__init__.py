"""Calibrate stage: base model, Monte Carlo targets, surrogate, conformal calibration, evaluation (torch).

``rrise.calibrate.build`` (:func:`rrise.calibrate.building.build`) and its options
``rrise.calibrate.BuildOptions`` (:class:`rrise.calibrate.options.BuildOptions`) load on first use:
importing this package loads no torch.
"""

__all__ = ["BuildOptions", "build"]


def __getattr__(name: str):
    # `rrise.calibrate.build` without importing torch until it is called for
    if name == "build":
        from .building import build

        return build
    if name == "BuildOptions":
        from .options import BuildOptions

        return BuildOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
