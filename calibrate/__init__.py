"""Calibrate stage: base model, Monte Carlo targets, surrogate, conformal calibration, evaluation (torch)."""
