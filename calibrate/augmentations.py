"""The names of the surrogate's training augmentations (:func:`rrise.calibrate.train.augment_batch`
implements them). Plain Python, so ``rrise --help`` lists them without importing torch."""

__all__ = ["AUGMENTATIONS"]

AUGMENTATIONS = ("none", "shift", "flip", "shift+flip")
