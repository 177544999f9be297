"""What ``rrise-export`` takes, declared once as typed options (no torch, no onnx: ``--help`` stays light).

The ``rrise-export`` command line is bound to these classes: each field is one flag (field
``calibration_record`` ↔ flag ``--calibration-record``, the same name in config files and
``key=value`` overrides), its help text sits beside it, and ``__post_init__`` refuses bad values
with a one-line ``ValueError`` naming the flag (the CLI prints it and exits 2).

- :class:`BundleInputs` — ``rrise-export bundle``: a calibrated surrogate → an fp32 bundle
  (:func:`rrise.export.from_surrogate.bundle_from_surrogate`).
- :class:`VariantOptions` — ``rrise-export add-variant``: an int8/fp16 variant and/or a TensorRT
  engine, each with its own quantile (:func:`rrise.export.variants.add_to_bundle`).
- :class:`ExportOptions` — the flat form ``rrise-export [...]``: the two groups above, plus
  ``--bundle`` (add to that bundle instead of making one) and ``--sign``; :attr:`ExportOptions.action`
  says which of ``bundle``, ``add-variant`` or ``sign`` it asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rrise.numerics import MICRO_BATCH_LIMIT

from .precision import DEFAULT_QUANT_SAMPLES, ENGINES, Precision

__all__ = ["BUNDLE_FLAGS", "BundleInputs", "Engine", "ExportOptions", "VariantOptions"]

# The --engine choices, made from the engine registry (rrise.export.precision.ENGINES).
Engine = Enum("Engine", {e: e for e in ENGINES}, type=str, module=__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class BundleInputs:
    """The inputs of a new bundle: a surrogate, its calibration and the base model (``rrise-export bundle``).

    The five files are required to make a bundle; they are optional here so that the flat form can
    take ``--bundle`` instead (:class:`ExportOptions` checks which). :meth:`missing` names the absent
    ones.

    >>> BundleInputs(surrogate=Path("s.pt")).missing()
    ['--base', '--calibration', '--calibration-record', '--out']
    >>> BundleInputs(labels="cat, dog").label_names
    ['cat', 'dog']
    """

    surrogate: Path | None = field(
        default=None,
        metadata={
            "help": (
                "Surrogate model file (.pt, written by rrise.calibrate.model_files.save_model), or its .onnx."
            )
        },
    )
    base: Path | None = field(
        default=None, metadata={"help": "Base classifier as ONNX (base.onnx), kept for audits."}
    )
    calibration: Path | None = field(
        default=None,
        metadata={"help": "calibration.npz: `images` [m,C,H,W] float32 and full MC `counts` [m,K]."},
    )
    calibration_record: Path | None = field(
        default=None,
        metadata={
            "help": "calibration.json: the Calibration record (sigma, quantile, alpha, beta, n_mc, m, score, "
            "base_sha256, surrogate_sha256). Its sigma must be the surrogate's."
        },
    )
    out: Path | None = field(default=None, metadata={"help": "Bundle folder to create."})
    labels: str | None = field(
        default=None,
        metadata={"help": "Class names, comma-separated (default: the surrogate's own labels)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Name of the calibration data (default: from the calibration record or the surrogate)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing bundle at --out."})

    def __post_init__(self) -> None:
        if self.labels is not None and not all(self.label_names):
            raise ValueError(f"--labels must be comma-separated names, none empty, got {self.labels!r}")
        if self.dataset is not None and not self.dataset.strip():
            raise ValueError("--dataset must name the calibration data, got an empty name")

    def given(self) -> list[str]:
        """The flags of the five input files that were given."""
        return [_flag(f) for f in BUNDLE_FLAGS if getattr(self, f) is not None]

    def missing(self) -> list[str]:
        """The flags of the five input files that were not given."""
        return [_flag(f) for f in BUNDLE_FLAGS if getattr(self, f) is None]

    @property
    def label_names(self) -> list[str] | None:
        """``labels`` split at commas (None: use the surrogate's)."""
        return None if self.labels is None else [s.strip() for s in self.labels.split(",")]


# The files a new bundle is made from (the rest of BundleInputs has defaults).
BUNDLE_FLAGS = ("surrogate", "base", "calibration", "calibration_record", "out")


@dataclass(frozen=True, kw_only=True)
class VariantOptions:
    """Which variant to add to a bundle, and how (``rrise-export add-variant``).

    >>> VariantOptions(precision=Precision.int8, quant_data=Path("selection.npz")).precision.value
    'int8'
    >>> VariantOptions(quant_data=Path("selection.npz"))
    Traceback (most recent call last):
    ...
    ValueError: --quant-data is only for --precision int8
    """

    precision: Precision = field(
        default=Precision.fp32,
        metadata={
            "help": "Numerics of the variant to add (fp32 is always in the bundle). int8: onnxruntime static "
            "quantization (QDQ), needs --quant-data. fp16: a strongly typed FP16 ONNX (float32 I/O), the "
            "source of fp16 TensorRT engines. Each variant gets its own quantile from its own outputs on "
            "the calibration inputs; with --engine, the engine's precision."
        },
    )
    engine: Engine | None = field(
        default=None,
        metadata={
            "help": "Also build a TensorRT engine on this machine from the bundle's ONNX of --precision, "
            "with a quantile from its own outputs at the runtime's batch sizes; records trt_version, "
            "compute_capability and max_batch (the largest micro-batch with exact numerics). Also builds "
            "an fp32 engine of the base model (base_model.engines), which `rrise run --backend tensorrt "
            "--mc-budget N` runs its Monte Carlo draws on."
        },
    )
    quant_data: Path | None = field(
        default=None,
        metadata={
            "help": "int8 only: an .npz with `images` [n,C,H,W] in [0,1] from a selection split (e.g. the "
            "surrogate's training or selection inputs) for the activation ranges. calibration.npz is "
            "refused, and so is any calibration image: a choice made from the conformal calibration split "
            "voids the guarantee."
        },
    )
    quant_samples: int = field(
        default=DEFAULT_QUANT_SAMPLES,
        metadata={"help": "int8 only: at most this many --quant-data images are used."},
    )
    timing_cache: Path | None = field(
        default=None, metadata={"help": "--engine: TensorRT timing cache file (read, then updated)."}
    )
    max_batch: int = field(
        default=MICRO_BATCH_LIMIT,
        metadata={
            "help": "--engine: largest batch the engine's optimization profile accepts (the runtime hands it "
            f"at most {MICRO_BATCH_LIMIT} frames at once)."
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.engine is not None:
            object.__setattr__(self, "engine", Engine(self.engine))
        if self.quant_samples < 1:
            raise ValueError(f"--quant-samples must be >= 1, got {self.quant_samples}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.precision is not Precision.int8 and self.quant_data is not None:
            raise ValueError("--quant-data is only for --precision int8")

    @property
    def adds_something(self) -> bool:
        """Whether these options ask for a variant beyond the fp32 one every bundle has."""
        return self.precision is not Precision.fp32 or self.engine is not None

    def check_for(self, *, new_bundle: bool) -> None:
        """Refuse (ValueError naming the flag) what cannot be added: int8 without ``--quant-data``
        (unless an engine reuses a bundle's int8 ONNX), or nothing beyond fp32 on an existing bundle."""
        if (
            self.precision is Precision.int8
            and self.quant_data is None
            and (new_bundle or self.engine is None)
        ):
            raise ValueError(
                "--precision int8 needs --quant-data (images from a selection split, not the "
                "calibration split)"
            )
        if not new_bundle and not self.adds_something:
            raise ValueError(
                "--precision: every bundle has its fp32 variant already: choose --precision int8|fp16, "
                "or add --engine tensorrt"
            )


RELEASE_HELP = (
    "With --sign: this bundle's release number, signed with it; raise it with each bundle published, "
    "so a device run with --min-release N refuses older ones."
)
EXPIRES_HELP = (
    "With --sign: when the signature stops vouching for the bundle, UTC ISO 8601 (e.g. 2027-01-31T00:00:00Z)."
)


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Everything ``rrise-export`` takes (the flat form): make a bundle from :class:`BundleInputs`,
    or add the :class:`VariantOptions` variant to ``bundle``; either way sign it with ``sign``.

    >>> opts = ExportOptions(bundle=Path("b"), variant=VariantOptions(precision=Precision.fp16))
    >>> opts.action
    'add-variant'
    >>> ExportOptions(bundle=Path("b"), sign=Path("k.key")).action
    'sign'
    >>> ExportOptions(inputs=BundleInputs(out=Path("x")))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: building a bundle needs --surrogate, --base, --calibration, --calibration-record (or ...
    """

    inputs: BundleInputs = field(
        default_factory=BundleInputs,
        metadata={"help": "The files a new bundle is made from.", "group": "bundle"},
    )
    variant: VariantOptions = field(
        default_factory=VariantOptions,
        metadata={"help": "The variant to add (a new bundle always has fp32).", "group": "variant"},
    )
    bundle: Path | None = field(
        default=None,
        metadata={
            "help": "An existing bundle to add a precision variant or an engine to (instead of "
            "--surrogate/--base/--calibration/--calibration-record/--out); rewritten atomically."
        },
    )
    sign: Path | None = field(
        default=None,
        metadata={
            "help": "Ed25519 private key (KEY.key from `rrise keys KEY --kind signing`, PEM or raw): sign "
            "the bundle's manifest into manifest.sig, which `rrise run/inspect --trust KEY.pub` check. "
            "The bundle is verified first (`rrise inspect --verify`); one that fails is not signed."
        },
    )
    release: int | None = field(default=None, metadata={"help": RELEASE_HELP})
    expires: str | None = field(default=None, metadata={"help": EXPIRES_HELP})

    def __post_init__(self) -> None:
        given = self.inputs.given()
        if self.bundle is not None:
            if given:
                raise ValueError(f"--bundle adds to an existing bundle; it does not take {', '.join(given)}")
            if self.action == "add-variant":
                self.variant.check_for(new_bundle=False)
            return
        missing = self.inputs.missing()
        if missing:
            raise ValueError(
                f"building a bundle needs {', '.join(missing)} (or pass --bundle DIR to add to one)"
            )
        self.variant.check_for(new_bundle=True)

    @property
    def action(self) -> str:
        """``bundle`` (make one, then add any variant asked for), ``add-variant`` or ``sign``."""
        if self.bundle is None:
            return "bundle"
        only_sign = (
            self.sign is not None and not self.variant.adds_something and self.variant.quant_data is None
        )
        return "sign" if only_sign else "add-variant"
