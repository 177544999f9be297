"""A torch classifier imported into the canonical form: an ``nn.Module`` (in Python), a factory
(``package.module:attribute``, imported with the current folder on ``sys.path``) or a
``torch.export`` archive (``.pt2``, scanned by :mod:`rrise.calibrate.safety_scan` before it is
loaded); the normalization as a :class:`~rrise.calibrate.models.Normalize` layer in front, the
chosen output selected, and its ONNX export checked against the module."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rrise.fileio import sha256_file

from .canonical_model import (
    PROBE_BATCH,
    ModelOptions,
    UserModel,
    UserModelError,
    check_finite_probe,
    choose_output,
    detect_output_kind,
    gpu_message,
    probe_inputs,
    resolve_shape,
    run_fixed,
    session_or_error,
)
from .models import Normalize
from .safety_scan import check_pt2_has_no_code
from .weights import load_weights, weights_source

# --------------------------------------------------------------------------------------------------
# torch: modules, factories, torch.export archives


class _Select(nn.Module):
    """Picks one element (an index or a key) of a model's tuple/dict/object output."""

    def __init__(self, model: nn.Module, key: int | str):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x):
        out = self.model(x)
        if isinstance(self.key, int):
            return out[self.key]
        return out[self.key] if isinstance(out, dict) else getattr(out, self.key)


class _Exported(nn.Module):
    """A ``torch.export`` program's module as a plain module: ``train()``/``eval()`` only set the flag
    (an exported graph is frozen in the mode it was exported in and refuses ``train()``)."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph = graph_module

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self


class _FixedBatch(nn.Module):
    """Runs a module that only takes batches of ``size`` on any batch, in padded chunks."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model = model
        self.size = int(size)

    def forward(self, x):
        outs = []
        for start in range(0, x.shape[0], self.size):
            part = x[start : start + self.size]
            pad = self.size - part.shape[0]
            if pad:
                part = torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])
            outs.append(self.model(part)[: self.size - pad])
        return torch.cat(outs)

    def train(self, mode: bool = True):
        self.training = bool(mode)
        self.model.train(mode)
        return self


def _first_conv_channels(module: nn.Module) -> int | None:
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels)
    return None


def _torch_outputs(out, batch: int) -> list[tuple[str, Any]]:
    """``(name, value)`` of a module's output: a tensor → [("0"...)] style listing for tuples/dicts."""
    if isinstance(out, torch.Tensor):
        return [("", out)]
    if isinstance(out, dict):
        return [(str(k), v) for k, v in out.items()]
    if isinstance(out, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(out)]
    if hasattr(out, "logits"):
        return [("logits", out.logits)]
    return [("", out)]


def from_module(
    module: nn.Module,
    source: dict,
    opts: ModelOptions,
    *,
    what: str,
    static: tuple[int | None, int | None, int | None, int | None] | None = None,
    export_twin=None,
) -> UserModel:
    """The canonical form of a torch module (``static``: (batch, C, H, W) an export fixes;
    ``export_twin``: a function ``(C, H, W) → module`` computing the same as ``module``, tried for the
    ONNX export when ``module`` itself does not export)."""
    b0, c0, h0, w0 = static or (None, _first_conv_channels(module), None, None)
    conv_note = "its first convolution" if static is None else "its exported input shape"
    c, h, w, channels = resolve_shape(what, c0, h0, w0, opts, conv_note)
    norm = opts.per_channel(c)
    net = module if norm is None else _with_normalize(module, norm, c)
    net.eval()
    nb = b0 or PROBE_BATCH
    x = probe_inputs((c, h, w), nb)
    raw = _probe_forward(net, x, what, channels)
    listing = _torch_outputs(raw, nb)
    names = [n or "output" for n, _ in listing]
    values = [v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v for _, v in listing]
    requested = opts.output
    if requested is not None and len(listing) == 1 and listing[0][0] == "":
        if requested not in ("output", "0"):
            raise UserModelError(f"--output {requested!r}: {what} returns a single tensor")
        requested = "output"
    chosen, notes = choose_output(names, values, nb, requested, what)
    key = listing[names.index(chosen)][0]
    select = None if key == "" else (int(key) if isinstance(raw, (tuple, list)) else key)
    if select is not None:
        net = _Select(net, select).eval()
    ref = np.asarray(values[names.index(chosen)], dtype=np.float32)
    check_finite_probe(ref.astype(np.float64), what)
    kind, more = detect_output_kind(ref.astype(np.float64), opts.output_kind, f"{what} output")
    notes += more
    data, more = _export_module(net, (c, h, w), b0, ref, x, what, kind)
    if data is None and export_twin is not None:
        twin = _twin_of(export_twin, (c, h, w), norm, select)
        if twin is not None:
            data, twin_notes = _export_module(twin, (c, h, w), b0, ref, x, what, kind)
            if data is not None:
                more = []
    notes += more
    return UserModel(
        onnx=data,
        module=net,
        input_shape=(c, h, w),
        channels=channels,
        num_classes=int(ref.shape[1]),
        output_kind=kind,
        output_name=chosen if key != "" else "output",
        mean=None if norm is None else norm[0],
        std=None if norm is None else norm[1],
        fixed_batch=b0 if data is not None else None,
        source=source,
        notes=tuple(notes),
    )


def _probe_forward(net: nn.Module, x: np.ndarray, what: str, channels: str):
    """The module's raw output on the probe batch ``x``; a failure is a :class:`UserModelError`."""
    try:
        with torch.inference_mode():
            return net(torch.from_numpy(x).to(_device_of(net)))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward
        gpu = gpu_message(what, exc)
        shape = ", ".join(map(str, x.shape))
        raise UserModelError(
            gpu or f"{what} fails on a [{shape}] float32 input ({channels}): {type(exc).__name__}: {exc}"
        ) from None


def _twin_of(export_twin, chw, norm, select) -> nn.Module | None:
    """The export twin for ``chw`` wrapped like the module (normalization, output selection), or None."""
    try:
        twin = export_twin(chw)
    except Exception:  # noqa: BLE001 - no twin either: keep the first failure's note
        return None
    if twin is None:
        return None
    twin = twin if norm is None else _with_normalize(twin, norm, chw[0])
    return (twin if select is None else _Select(twin, select)).eval()


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def _with_normalize(module: nn.Module, norm, c: int) -> nn.Module:
    layer = Normalize(list(norm[0]), list(norm[1]), c).to(_device_of(module))
    return nn.Sequential(layer, module)


def _export_module(net, chw, fixed, ref, x, what, kind) -> tuple[bytes | None, list[str]]:
    """The module's ONNX twin (dynamic batch unless ``fixed``), checked against the module's outputs."""
    sample = torch.from_numpy(x[: fixed or 1]).to(_device_of(net))
    buf = io.BytesIO()
    dynamic = None if fixed else {"input": {0: "batch"}, kind: {0: "batch"}}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (sample,),
                buf,
                dynamo=False,
                input_names=["input"],
                output_names=[kind],
                dynamic_axes=dynamic,
            )
        session = session_or_error(buf.getvalue(), what)
        got = run_fixed(session, np.ascontiguousarray(x), fixed)
    except Exception as exc:  # noqa: BLE001 - exporters fail in many ways
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return None, [
            f"{what} does not export to ONNX ({first}): Monte Carlo runs it on torch, and the bundle "
            f"cannot carry it as its base model for audits"
        ]
    if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-4):
        diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
        return None, [
            f"{what}'s ONNX export differs from the module (max |Δ| {diff:.3g} on probe inputs): Monte "
            f"Carlo runs it on torch, and the bundle cannot carry it as its base model"
        ]
    return buf.getvalue(), []


@contextlib.contextmanager
def cwd_on_path():
    """The current folder on ``sys.path`` while importing (a console script does not put it there)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def import_attribute(
    module_name: str,
    attr: str,
    what: str,
    *,
    error: type[Exception] = UserModelError,
    prefix: str = "rrise_user",
) -> tuple[Any, Any]:
    """``(object, module)`` for ``attr`` (dotted) of ``module_name`` (an importable name, or a
    ``.py`` file loaded as ``<prefix>_<stem>``), the current folder on ``sys.path``. Every failure is
    an ``error`` that names ``what``."""
    try:
        with cwd_on_path():
            if module_name.endswith(".py"):
                file = Path(module_name)
                if not file.is_file():
                    raise error(f"{what}: {file} does not exist")
                spec = importlib.util.spec_from_file_location(f"{prefix}_{file.stem}", file)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            else:
                mod = importlib.import_module(module_name)
    except error:
        raise
    except ModuleNotFoundError as exc:
        raise error(
            f"{what}: cannot import {module_name} ({exc}); is it installed, or in the current folder?"
        ) from None
    except Exception as exc:  # noqa: BLE001 - anything the user's module raises on import
        raise error(f"{what}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj, mod


def from_factory(text: str, module_name: str, attr: str, weights, opts: ModelOptions) -> UserModel:
    what = f"MODEL {text}"
    obj, mod = import_attribute(module_name, attr, what, prefix="rrise_user_model")
    if isinstance(obj, nn.Module):
        module = obj
    elif callable(obj):
        try:
            module = obj()
        except Exception as exc:  # noqa: BLE001
            raise UserModelError(f"{what}: calling {attr}() raised {type(exc).__name__}: {exc}") from None
        if not isinstance(module, nn.Module):
            raise UserModelError(
                f"{what}: {attr}() returned a {type(module).__name__}, not a torch nn.Module"
            )
    else:
        raise UserModelError(
            f"{what}: {attr} is a {type(obj).__name__}, not an nn.Module or a function returning one"
        )
    notes = []
    if weights is not None:
        notes += load_weights(module, weights)
    source = {"form": "factory", "factory": text, **weights_source(weights)}
    file = getattr(mod, "__file__", None)
    if file and Path(file).is_file():
        source["factory_file"] = str(Path(file).resolve())
        source["factory_file_sha256"] = sha256_file(file)
    um = from_module(module.eval(), source, opts, what=what)
    if weights is None:
        notes.append(f"{what}: no --weights given; using the weights the factory gives")
    um.notes = tuple(notes) + um.notes
    return um


def from_pt2(path: Path, opts: ModelOptions) -> UserModel:
    what = f"MODEL {path}"
    check_pt2_has_no_code(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        gpu = gpu_message(what, exc)
        raise UserModelError(gpu or f"{what} is not a readable torch.export archive: {exc}") from None
    user_inputs = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != 1:
        raise UserModelError(
            f"{what} takes {len(user_inputs)} inputs ({', '.join(map(str, user_inputs))}); the SDK needs one"
        )
    val = nodes[user_inputs[0]].meta.get("val") if user_inputs[0] in nodes else None
    if val is None or not hasattr(val, "shape") or len(val.shape) != 4:
        raise UserModelError(f"{what}: its input is not a 4-dimensional NCHW tensor")
    dims = [int(d) if isinstance(d, int) else None for d in val.shape]
    if val.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise UserModelError(f"{what}: its input is {val.dtype}; the SDK feeds float32 pixels in [0, 1]")
    if val.dtype != torch.float32:
        raise UserModelError(f"{what}: its input is {val.dtype}; export it with a float32 input")
    source = {"form": "pt2", "path": str(path.resolve()), "sha256": sha256_file(path)}
    try:
        graph_module = ep.module(check_guards=False)
    except TypeError:  # older torch
        graph_module = ep.module()
    batch, c, h, w = dims
    notes = []
    module: nn.Module = _Exported(graph_module)
    if batch is not None:
        module, batch, note = _lift_batch(graph_module, module, batch, dims, what)
        notes += note

    def static_twin(chw):  # the graph re-exported at a static batch of 1 (no SymInts: it traces)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = torch.export.export(ep.module(), (torch.zeros(1, *chw, dtype=torch.float32),))
        return _Exported(again.module())

    um = from_module(module, source, opts, what=what, static=(batch, c, h, w), export_twin=static_twin)
    um.notes = tuple(notes) + um.notes
    return um


def _lift_batch(graph_module, module, batch: int, dims, what) -> tuple[nn.Module, int | None, list[str]]:
    """A module exported at a static batch size: drop the input-shape check when the graph gives the
    same per-input outputs on a batch of 3 as one input at a time (else run it in fixed chunks)."""
    hooks = graph_module._forward_pre_hooks
    saved = dict(hooks)
    for k, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del hooks[k]
    x = torch.from_numpy(probe_inputs(tuple(dims[1:]), PROBE_BATCH))
    try:
        with torch.inference_mode():
            together = module(x)
            if batch == 1:
                alone = torch.cat([module(x[i : i + 1]) for i in range(len(x))])
            else:
                alone = _FixedBatch(module, batch)(x)
        same = isinstance(together, torch.Tensor) and together.shape == alone.shape
        if same and torch.allclose(together, alone, rtol=1e-4, atol=1e-5):
            return (
                module,
                None,
                [f"{what} was exported with batch size {batch}; it runs on any batch size"],
            )
    except Exception:  # noqa: BLE001, S110 - the graph is specialized to its batch size
        pass
    hooks.clear()
    hooks.update(saved)
    return (
        _FixedBatch(module, batch),
        batch,
        [
            f"{what} only runs batches of {batch} (exported with a static batch): Monte Carlo runs it "
            f"{batch} draw(s) per forward pass; export with a dynamic batch "
            f"(dynamic_shapes={{'x': {{0: Dim.DYNAMIC}}}}) to run much faster"
        ],
    )
