"""The surrogate network for any base classifier (``rrise build --surrogate-arch ARCH``).

:func:`build_surrogate` gives the network that is trained on counts/N, calibrated and shipped. Like
every model of the SDK it takes float32 NCHW pixels in [0, 1] and returns logits ``[B, K]``, with
any mean/std normalization inside it (docs/CERTIFICATE.md). ``arch``:

- ``auto`` (the default): ``base`` when the base classifier is a torch module whose copy can be
  trained and exported, or an ONNX graph that :func:`rrise.calibrate.onnx_to_torch.onnx_to_torch`
  imports as one (its weights become trainable parameters); otherwise ``edge``. For an ONNX base
  the spec's ``onnx_start`` says which start was taken: ``imported`` or ``fresh`` (``why`` names
  the operator the importer lacks).
- ``base``: a deep copy of the base classifier (its weights are the starting point; training the
  surrogate never changes the base). A base whose output is probabilities gets a ``log`` layer on
  top, so the surrogate's logits are ``log p`` and ``softmax(log p) = p`` at the start.
- ``edge``: a built-in network sized to the input: ``cnn-small`` (:func:`rrise.calibrate.models.
  build_model`) for square inputs under 32 px, else ``edge-resnet`` (:class:`EdgeResNet`).
- ``edge-resnet``, ``cnn``, ``cnn-small``: that built-in network.
- ``package.module:function`` or ``path/file.py:function``: the user's own factory, called as
  ``function(input_shape, num_classes)`` (``input_shape`` = ``(C, H, W)``) or with no arguments, or
  a module instance (deep-copied). With ``mean``/``std`` a
  :class:`~rrise.calibrate.models.Normalize` layer is put in front of it.

Files: :func:`rrise.calibrate.model_files.save_surrogate` records the spec (:func:`surrogate_spec`)
beside the weights; :func:`rebuild_surrogate` makes the network again from it (the weights are
then loaded by :func:`rrise.calibrate.model_files.load_surrogate`).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rrise.fileio import sha256_file

from .canonical_model import UserModel, UserModelError
from .models import ARCHS, Normalize, build_model
from .onnx_to_torch import UnsupportedOperator, onnx_to_torch
from .torch_import import import_attribute
from .user_model import load_user_model

__all__ = [
    "EDGE_RESNET",
    "SMALL_INPUT",
    "SURROGATE_ARCHS",
    "EdgeResNet",
    "ProbsToLogits",
    "SurrogateError",
    "build_surrogate",
    "edge_layout",
    "model_cost",
    "rebuild_surrogate",
    "surrogate_spec",
]

EDGE_RESNET = "edge-resnet"
SURROGATE_ARCHS = ("auto", "base", "edge", EDGE_RESNET, *ARCHS)  # and package.module:function
SMALL_INPUT = 32  # ``edge`` below this side (px, square inputs): cnn-small; from it on: edge-resnet
SPEC_KEY = "surrogate"  # the metadata key of save_surrogate files
_SPEC_ATTR = "_rrise_surrogate_spec"
_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")
_PROBE_BATCH = 2
_PROB_FLOOR = 1e-7  # log(p) floor of ProbsToLogits: far below any certifiable probability


class SurrogateError(UserModelError):
    """The surrogate architecture cannot be built or rebuilt; the message names the option or file."""


# --------------------------------------------------------------------------------------------------
# Built-in edge residual network


class ProbsToLogits(nn.Module):
    """``log(max(p, 1e-7))``: logits whose softmax is ``p`` (on top of a base that outputs
    probabilities, so the surrogate trains on logits; exports to ONNX ``Clip`` + ``Log``)."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.clamp(p, min=_PROB_FLOOR))


class _BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus the shortcut (1×1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.bn2.weight)  # each block starts as its shortcut (Goyal et al. 2017)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def edge_layout(height: int, width: int, base_width: int = 32, blocks: int = 1) -> dict[str, Any]:
    """The ``edge-resnet`` layout for an ``height × width`` input (``s`` = the smaller side).

    Before the residual stages the input is halved ``r = ⌊log2(s/32)⌋`` times (none under 64 px): a
    stride-2 stem convolution, then 3×3 stride-2 max-pools, so the first stage sees 32–63 px
    (56 px at 224). Then up to four stages of ``blocks`` basic blocks, widths ``base_width·2^i``,
    each after the first halving the side, as many as keep the last stage at ≥ 4 px; a global
    average pool and one linear layer. At 3×224×224 with the defaults: about 1.2M parameters and
    0.2 GMAC (multiply-accumulates) per image.
    """
    if min(height, width) < 1 or base_width < 1 or blocks < 1:
        raise ValueError(
            f"need positive sizes, got {height}×{width}, base_width {base_width}, blocks {blocks}"
        )
    side = min(int(height), int(width))
    halvings = 0 if side < 64 else int(math.floor(math.log2(side / 32)))
    reduced = side // 2**halvings
    stages = 1 if reduced < 8 else min(4, 1 + int(math.floor(math.log2(reduced / 4))))
    return {
        "stem_stride": 2 if halvings else 1,
        "stem_pools": max(0, halvings - 1),
        "widths": [int(base_width) * 2**i for i in range(stages)],
        "blocks": int(blocks),
    }


class EdgeResNet(nn.Module):
    """The built-in edge residual network (layout: :func:`edge_layout`), normalization inside.

    Only Conv2d, BatchNorm2d (folded into the convolutions by the ONNX export in eval mode), ReLU,
    MaxPool2d, Add, a global average pool and Linear: plain ONNX operators that onnxruntime int8
    and TensorRT take; any H×W runs (no flatten of a fixed spatial size).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        layout: dict[str, Any],
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
    ):
        super().__init__()
        widths = [int(w) for w in layout["widths"]]
        stem: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, int(layout["stem_stride"]), 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        stem += [nn.MaxPool2d(3, 2, 1) for _ in range(int(layout["stem_pools"]))]
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            for j in range(int(layout["blocks"])):
                stages.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.normalize = Normalize(mean, std, in_channels)
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)  # ONNX GlobalAveragePool
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------------
# build_surrogate


def build_surrogate(
    base: UserModel | nn.Module | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    arch: str = "auto",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    seed: int = 0,
) -> nn.Module:
    """The surrogate network for ``base`` (see the module docstring for ``arch``), in train mode.

    ``base``: a :class:`~rrise.calibrate.user_model.UserModel` (its input shape, class count and
    normalization are the defaults), an ``nn.Module`` (canonical: [0, 1] pixels in, ``[B, K]`` out;
    with ``mean``/``std`` a Normalize layer is put in front of its copy, as ``load_user_model``
    does), or None (built-in and factory archs only). ``input_shape``: ``(C, H, W)``.
    ``mean``/``std``: the normalization put inside a built-in or factory network (default: the
    UserModel's, else 0.5/0.5 for built-ins and none for factories); a UserModel's own copy keeps
    the normalization already inside it. ``seed``: the initial
    weights of built-in and factory networks depend only on it (torch's global RNG is left as it
    was). The returned module carries its spec (:func:`surrogate_spec`), which
    :func:`save_surrogate` records. Raises :class:`SurrogateError` (a ``ValueError``).
    """
    user = base if isinstance(base, UserModel) else None
    template = user.module if user is not None else base
    if template is not None and not isinstance(template, nn.Module):
        raise SurrogateError(f"the base model must be a UserModel or an nn.Module, got {type(base).__name__}")
    shape, k = _shape_and_classes(base, user, template, input_shape, num_classes)
    mean, std = _normalization(user, mean, std, shape[0])
    arch = str(arch).strip()
    clone: list[nn.Module] = []  # the base's copy, when _choose made one
    choice, why = _choose(arch, user, template, shape, k, clone)
    spec: dict[str, Any] = {
        "arch": choice,
        "requested": arch,
        "input_shape": list(shape),
        "num_classes": k,
        "seed": int(seed),
        "why": why,
    }
    if user is not None and user.module is None and user.onnx is not None:
        spec["onnx_start"] = "imported" if choice == "base" else "fresh"
    if choice == "base":
        model = _copy_base(user, template, clone[0], shape, k, mean, std, spec)
    elif choice == "factory":
        model = _from_factory_string(arch, shape, k, mean, std, seed, spec)
    else:
        model = _builtin(choice, shape, k, mean, std, seed, spec)
    setattr(model, _SPEC_ATTR, spec)
    return model.train()


def surrogate_spec(model: nn.Module) -> dict[str, Any]:
    """How :func:`build_surrogate` (or :func:`load_surrogate`) made ``model`` (a JSON-ready dict:
    ``arch``, ``requested``, ``input_shape``, ``num_classes``, ``why``, and what rebuilds it)."""
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} was not made by build_surrogate or load_surrogate; save it with "
            f"rrise.calibrate.model_files.save_model"
        )
    return copy.deepcopy(spec)


def _shape_and_classes(base, user, template, input_shape, num_classes) -> tuple[tuple[int, int, int], int]:
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    if user is not None:
        if shape is not None and shape != tuple(user.input_shape):
            raise SurrogateError(
                f"input_shape {list(shape)} differs from MODEL {user.name}'s {user.input_shape}"
            )
        if num_classes is not None and int(num_classes) != user.num_classes:
            raise SurrogateError(
                f"num_classes {num_classes} differs from MODEL {user.name}'s {user.num_classes} classes"
            )
        shape, num_classes = tuple(user.input_shape), user.num_classes
    if shape is None or len(shape) != 3 or min(shape) < 1:
        raise SurrogateError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    if num_classes is None and template is not None:  # a bare module: its probe output says K
        out = _probe(template, shape)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise SurrogateError(
                f"num_classes not given, and the base model's output on a {list(shape)} input is "
                f"{_describe(out)}, not [B, K]"
            )
        num_classes = int(out.shape[1])
    if num_classes is None or int(num_classes) < 2:
        raise SurrogateError(f"num_classes must be at least 2, got {num_classes!r}")
    return shape, int(num_classes)  # type: ignore[return-value]


def _normalization(user, mean, std, channels: int):
    """Per-channel ``(mean, std)`` lists (the UserModel's when not given), or ``(None, None)``."""
    if (mean is None) != (std is None):
        raise SurrogateError("mean and std go together: pass both or neither")
    if mean is None and user is not None and user.mean is not None:
        return list(user.mean), list(user.std)
    if mean is None:
        return None, None
    out = []
    for name, value in (("mean", mean), ("std", std)):
        arr = np.atleast_1d(np.asarray(value, np.float64))
        if arr.ndim != 1 or arr.size not in (1, channels) or not np.all(np.isfinite(arr)):
            raise SurrogateError(f"{name} must be 1 or {channels} finite floats, got {value!r}")
        out.append(np.broadcast_to(arr, (channels,)).tolist())
    if min(out[1]) <= 0:
        raise SurrogateError(f"std must be positive, got {std!r}")
    return out[0], out[1]


def _choose(arch: str, user, template, shape, k, clone: list) -> tuple[str, str]:
    """``(arch to build, why in words)``; for ``base`` the checked copy of the base is put in ``clone``."""
    c, h, w = shape
    if _FACTORY.match(arch):
        return "factory", f"the user's factory {arch}"
    if arch not in SURROGATE_ARCHS:
        raise SurrogateError(
            f"--surrogate-arch {arch!r} is unknown: expected one of {', '.join(SURROGATE_ARCHS)} or "
            f"package.module:function"
        )
    if arch in ("auto", "base"):
        problem = _base_problem(user, template, shape, k, clone)
        if problem is None:
            n = sum(p.numel() for p in clone[0].parameters())
            imported = " (imported from its ONNX graph)" if user is not None and user.module is None else ""
            return "base", (
                f"initialised from the base model's weights{imported} ({n / 1e6:.2g}M parameters; a copy: "
                f"the base is not changed)"
            )
        if arch == "base":
            raise SurrogateError(f"--surrogate-arch base: {problem}; use --surrogate-arch edge")
        edge, why = _choose("edge", user, template, shape, k, clone)
        return edge, f"{problem}, so {why}"
    if arch == "edge":
        if h == w and h < SMALL_INPUT:
            return "cnn-small", f"the built-in cnn-small for the small {c}×{h}×{w} input"
        return EDGE_RESNET, f"the built-in edge-resnet for the {c}×{h}×{w} input"
    return arch, f"the built-in {arch}"


def _base_problem(user, template, shape, k, clone: list) -> str | None:
    """Why the base cannot be the surrogate's starting point (None when it can: then its deep copy,
    checked to map the input shape to ``[B, K]``, is appended to ``clone``)."""
    if template is None and user is not None and user.onnx is not None:
        if user.fixed_batch is not None:
            return f"MODEL {user.name} only runs batches of {user.fixed_batch}"
        try:
            template = onnx_to_torch(user.onnx)
        except UnsupportedOperator as exc:
            return f"MODEL {user.name} is ONNX and {exc}"
    if template is None:
        return "no base model was given"
    if user is not None and user.onnx is None:
        return (
            f"MODEL {user.name} does not export to ONNX, so a surrogate copied from it could not be bundled"
        )
    if user is not None and user.fixed_batch is not None:
        return f"MODEL {user.name} only runs batches of {user.fixed_batch}"
    try:
        copied = _deepcopy(template)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module does on deepcopy
        return f"the base model cannot be deep-copied ({type(exc).__name__}: {exc})"
    out = _probe(copied, shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (_PROBE_BATCH, k):
        return f"the base model's output is {_describe(out)}, not [B, {k}]"
    if not out.is_floating_point() or not any(p.is_floating_point() for p in copied.parameters()):
        return "the base model has no float parameters to train"
    clone.append(copied)
    return None


def _probe(module: nn.Module, shape) -> Any:
    """``module``'s output on a seeded uniform batch (eval mode, no grad; the mode is restored);
    the exception itself when the forward raises."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(_PROBE_BATCH, *shape, generator=gen)
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            return module(x.to(device))
    except Exception as exc:  # noqa: BLE001
        return exc
    finally:
        module.train(was_training)


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    if isinstance(out, Exception):
        return f"an error ({type(out).__name__}: {out})"
    return f"a {type(out).__name__}"


def _deepcopy(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.export graphs warn about pytree internals on copy
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


def _copy_base(user, template, model, shape, k, mean, std, spec) -> nn.Module:
    """The surrogate around ``model`` (a deep copy of ``template``, the base's module)."""
    normalize = user is None and mean is not None  # a UserModel's module has its normalization inside
    if normalize:
        model = nn.Sequential(Normalize(mean, std, shape[0]), model)
    probs = user is not None and user.output_kind == "probs"
    if probs:
        model = nn.Sequential(model, ProbsToLogits())
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    if user is not None:  # its normalization is inside its module: record that one
        mean, std = _normalization(user, None, None, shape[0])
    spec.update(normalize=normalize, probs_to_logits=probs, mean=mean, std=std)
    sdk_arch = None if normalize or probs else _sdk_arch(model, shape, k)
    if sdk_arch is not None:
        spec["base_arch"] = sdk_arch
        norm = model[0]
        spec.update(mean=norm.mean.flatten().tolist(), std=norm.std.flatten().tolist())
    if user is not None:
        spec["base"] = _base_record(user)
    else:
        cls = type(template)
        spec["base"] = {"form": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}
    return model


def _sdk_arch(model: nn.Module, shape, k) -> str | None:
    """The SDK arch (``cnn``, ``cnn-small``) whose build_model network ``model`` is, else None."""
    c, h, w = shape
    if h != w or h < 4 or not isinstance(model, nn.Sequential) or not isinstance(model[0], Normalize):
        return None
    state = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for arch in ARCHS:
        ref = build_model(arch, c, k, h, seed=0)
        if repr(ref) == repr(model) and state == {n: tuple(t.shape) for n, t in ref.state_dict().items()}:
            return arch
    return None


def _base_record(user: UserModel) -> dict[str, Any]:
    """What re-loads a UserModel's module (for factory and .pt2 forms) and names it."""
    src = user.source
    record: dict[str, Any] = {"form": user.form, "name": user.name}
    model = None
    if user.form in ("pt2", "onnx"):
        model = src.get("path")
        record["sha256"] = src.get("sha256")
    elif user.form == "factory":
        model = src.get("factory")
        module_part, _, attr = str(model).rpartition(":")
        if module_part.endswith(".py") and src.get("factory_file"):
            model = f"{src['factory_file']}:{attr}"
    else:
        record["class"] = src.get("class")
    if model is not None:
        record["model"] = model
        record["options"] = {
            "output": None if user.output_name == "output" else user.output_name,
            "output_kind": user.output_kind,
            "input_size": list(user.input_shape[1:]),
            "channels": user.channels,
            "mean": None if user.mean is None else list(user.mean),
            "std": None if user.std is None else list(user.std),
        }
    return record


def _builtin(choice: str, shape, k, mean, std, seed, spec) -> nn.Module:
    c, h, w = shape
    m = 0.5 if mean is None else mean
    s = 0.5 if std is None else std
    spec.update(mean=_per_channel_list(m, c), std=_per_channel_list(s, c))
    if choice in ARCHS:
        if h != w:
            raise SurrogateError(f"--surrogate-arch {choice} needs a square input, got {c}×{h}×{w}")
        try:
            return build_model(choice, c, k, h, m, s, seed=seed)
        except ValueError as exc:
            raise SurrogateError(f"--surrogate-arch {choice}: {exc}") from None
    layout = edge_layout(h, w)
    spec["layout"] = layout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return EdgeResNet(c, k, layout, m, s)


def _per_channel_list(value, channels: int) -> list[float]:
    return np.broadcast_to(np.atleast_1d(np.asarray(value, np.float64)), (channels,)).tolist()


# --------------------------------------------------------------------------------------------------
# The user's factory


def _import_factory(text: str) -> tuple[Any, str, dict[str, Any]]:
    """``(object, factory string to record, provenance)`` for ``package.module:attr`` or
    ``path/file.py:attr`` (a ``.py`` path is recorded resolved, so it re-imports from anywhere)."""
    what = f"--surrogate-arch {text}"
    match = _FACTORY.match(text)
    if match is None:
        raise SurrogateError(f"{what} is not package.module:function or path/file.py:function")
    module_name, attr = match["module"], match["attr"]
    obj, mod = import_attribute(module_name, attr, what, error=SurrogateError, prefix="rrise_user_surrogate")
    if module_name.endswith(".py"):
        text = f"{Path(module_name).resolve()}:{attr}"
    record: dict[str, Any] = {}
    file = getattr(mod, "__file__", None)
    if file and Path(file).is_file():
        record = {"file": str(Path(file).resolve()), "file_sha256": sha256_file(file)}
    return obj, text, record


def _call_convention(obj) -> str:
    """``instance`` (a module), ``shape`` (``f(input_shape, num_classes)``) or ``none`` (``f()``)."""
    if isinstance(obj, nn.Module):
        return "instance"
    if not callable(obj):
        return "invalid"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: try the documented form
        return "shape"
    for call, args in (("shape", ((1, 1, 1), 2)), ("none", ())):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return call
    return "invalid"


def _make_from_factory(obj, call: str, shape, k: int, seed: int, what: str) -> nn.Module:
    if call == "instance":
        return _deepcopy(obj)
    if call == "invalid":
        raise SurrogateError(
            f"{what} is a {type(obj).__name__}; expected an nn.Module or a function taking "
            f"(input_shape, num_classes) or no arguments"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            module = obj(tuple(shape), int(k)) if call == "shape" else obj()
    except Exception as exc:  # noqa: BLE001
        args = f"({tuple(shape)}, {k})" if call == "shape" else "()"
        raise SurrogateError(f"{what}: calling it with {args} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise SurrogateError(f"{what} returned a {type(module).__name__}, not a torch nn.Module")
    return module


def _from_factory_string(text: str, shape, k, mean, std, seed, spec) -> nn.Module:
    what = f"--surrogate-arch {text}"
    obj, recorded, record = _import_factory(text)
    call = _call_convention(obj)
    model = _make_from_factory(obj, call, shape, k, seed, what)
    normalize = mean is not None
    if normalize:
        model = nn.Sequential(Normalize(mean, std, shape[0]), model)
    out = _probe(model, shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (_PROBE_BATCH, k):
        c, h, w = shape
        raise SurrogateError(
            f"{what}: on a [{_PROBE_BATCH}, {c}, {h}, {w}] float32 input its output is {_describe(out)}; "
            f"a surrogate must output logits [B, {k}]"
        )
    if not out.is_floating_point() or not any(p.is_floating_point() for p in model.parameters()):
        raise SurrogateError(f"{what}: a surrogate needs float outputs and trainable float parameters")
    spec.update(factory=recorded, call=call, normalize=normalize, mean=mean, std=std, **record)
    return model


# --------------------------------------------------------------------------------------------------
# Rebuilding a saved surrogate's network


def rebuild_surrogate(
    config: dict, meta: dict, base: UserModel | nn.Module | None = None, *, trust_code: bool = False
) -> nn.Module:
    """The untrained network of a saved surrogate, from its metadata's spec (``load_model`` calls
    this for archs other than ``cnn``/``cnn-small``); its weights are loaded by the caller.
    Torch's global RNG is left as it was. Specs that import Python code (a factory, or a copy of a
    factory or ``.pt2`` base rebuilt without ``base``) need ``trust_code=True``."""
    spec = meta.get(SPEC_KEY) if isinstance(meta, dict) else None
    if isinstance(spec, dict) and not trust_code:
        form = (spec.get("base") or {}).get("form") if isinstance(spec.get("base"), dict) else None
        from_model = spec.get("arch") == "base" and base is None and form in ("factory", "pt2")
        if (spec.get("arch") == "factory" or from_model) and spec.get("base_arch") not in ARCHS:
            raise SurrogateError(
                "this model file names Python code to rebuild its network "
                f"({spec.get('factory') or 'a base'}); "
                "a model file never imports code on its own: pass trust_code=True (or the base) when you "
                "made the file yourself"
            )
    with torch.random.fork_rng(devices=[]):
        return _rebuild(config, meta, base)


def _rebuild(config: dict, meta: dict, base) -> nn.Module:
    spec = meta.get(SPEC_KEY)
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(
            f"unknown model arch {config.get('arch')!r} and no surrogate spec to rebuild it from"
        )
    c, h, w = (int(d) for d in spec["input_shape"])
    k = int(spec["num_classes"])
    arch = spec["arch"]
    if arch in ARCHS or spec.get("base_arch") in ARCHS:
        model = build_model(spec.get("base_arch") or arch, c, k, h, spec["mean"], spec["std"])
    elif arch == EDGE_RESNET:
        model = EdgeResNet(c, k, spec["layout"], spec["mean"], spec["std"])
    elif arch == "factory":
        what = f"the surrogate's factory {spec['factory']}"
        obj, _, _ = _import_factory(spec["factory"])
        model = _make_from_factory(obj, spec["call"], (c, h, w), k, int(spec.get("seed", 0)), what)
        if spec.get("normalize"):
            model = nn.Sequential(Normalize(0.0, 1.0, c), model)
    elif arch == "base":
        model = _rebuild_base(spec, base, (c, h, w))
    else:
        raise ValueError(f"unknown surrogate arch {arch!r} in the surrogate spec")
    setattr(model, _SPEC_ATTR, copy.deepcopy(spec))
    return model


def _rebuild_base(spec: dict, base, shape) -> nn.Module:
    record = spec.get("base", {})
    if base is not None:
        template = base.module if isinstance(base, UserModel) else base
        if template is None and isinstance(base, UserModel) and base.onnx is not None:
            template = onnx_to_torch(base.onnx)
        if template is None:
            raise SurrogateError("the base model given has no torch module to rebuild the surrogate from")
    elif record.get("model"):
        if record["form"] in ("pt2", "onnx"):
            path = Path(record["model"])
            if not path.is_file():
                raise SurrogateError(f"the surrogate was copied from MODEL {path}, which no longer exists")
            if record.get("sha256") and sha256_file(path) != record["sha256"]:
                raise SurrogateError(
                    f"the surrogate was copied from MODEL {path}, which has changed since (sha256 differs)"
                )
        opts = dict(record.get("options", {}))
        opts["input_size"] = tuple(opts.get("input_size") or shape[1:])
        loaded = load_user_model(record["model"], **opts)
        template = loaded.module if loaded.module is not None else onnx_to_torch(loaded.onnx)
    else:
        raise SurrogateError(
            f"the surrogate was copied from an nn.Module passed in Python ({record.get('class')}); load it "
            f"with rrise.calibrate.model_files.load_surrogate(path, base=that_module)"
        )
    model = _deepcopy(template)
    if spec.get("normalize"):
        model = nn.Sequential(Normalize(0.0, 1.0, shape[0]), model)
    if spec.get("probs_to_logits"):
        model = nn.Sequential(model, ProbsToLogits())
    return model


# --------------------------------------------------------------------------------------------------
# Size


def model_cost(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """``{"params": trainable-or-not parameter count, "macs": multiply-accumulates of Conv2d and
    Linear layers for one input}`` (a FLOP estimate: ≈ 2·macs), measured on one zero input."""
    macs = 0

    def count(module, _inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            macs += output[0].numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *(int(d) for d in input_shape), device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "macs": int(macs)}
