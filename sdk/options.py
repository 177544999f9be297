"""Typed options, declared once: one frozen dataclass per intent becomes a command's flags, a
``--config FILE.yaml`` and ``key=value`` overrides.

The convention (every option class follows it):

- ``@dataclass(frozen=True, kw_only=True)``; field names are the flag names with ``-`` → ``_``
  (field ``hard_fraction`` ↔ flag ``--hard-fraction``; the same name in config files and overrides).
- ``dataclasses.field(default=..., metadata={"help": ..., "flag": "--alias", "group": ...})``:
  ``flag`` only where a published flag name differs from the field's, ``group`` the help panel.
  ``"argument": True`` makes a field a positional argument; ``"short": "-w"`` adds a short flag,
  ``"metavar"`` names the value in ``--help``.
- Types: ``bool``, ``int``, ``float``, ``str``, ``Path``, ``X | None``, ``tuple[float, ...]``,
  ``tuple[int, int]`` or a str-valued ``enum.Enum`` built from the registry it names. A field typed
  with another option dataclass is a nested group: its flags are flattened into the command, its
  keys are dotted (``watch.monitor_window``).
- Validation in ``__post_init__``, raising ``ValueError`` with one line naming the flag.

A ``bool`` field becomes ``--x/--no-x`` (a field named ``no_x``: the flag ``--no-x`` alone). A
variadic tuple takes repeated flags or one comma-separated value.

Precedence: the dataclass's defaults < the config file < ``key=value`` overrides < flags given on
the command line. Unknown keys and bad values are refused in one line naming the key
(:class:`OptionError`; a bound command prints it and exits 2).

Example:

>>> from dataclasses import dataclass, field
>>> @dataclass(frozen=True, kw_only=True)
... class Draws:
...     n: int = field(default=100, metadata={"help": "Draws per input."})
...     alpha: float = field(default=0.001, metadata={"help": "Miscoverage."})
>>> make_options(Draws, n="2000")
Draws(n=2000, alpha=0.001)
>>> resolve(Draws, overrides=["alpha=0.01"]).options
Draws(n=100, alpha=0.01)
>>> try:
...     resolve(Draws, overrides=["draws=3"])
... except OptionError as exc:
...     print(exc)
unknown option 'draws' (known: n, alpha)

Importing this module loads neither typer nor yaml (:func:`bind` and :func:`load_config` do).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OptionError",
    "OptionField",
    "Resolved",
    "bind",
    "convert",
    "fields_of",
    "load_config",
    "make_options",
    "resolve",
]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none", "null", "~")
EXIT_BAD_OPTION = 2


class OptionError(ValueError):
    """A bad option value or an unknown key; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class OptionField:
    """One leaf option of an option class, its nested groups flattened.

    ``key``: the dotted path (``watch.monitor_window``); ``flag``: the long flag
    (``--monitor-window``); ``param``: the parameter name a bound command uses; ``type``: the
    resolved type hint; ``default``: the default (:data:`dataclasses.MISSING` when required).
    """

    key: str
    flag: str
    param: str
    type: Any
    default: Any
    help: str
    group: str | None
    argument: bool = False
    short: str | None = None
    metavar: str | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` gives: the option object and the values of extra key groups
    (e.g. ``{"profile": {"m": 500}}``)."""

    options: Any
    extras: dict[str, dict[str, Any]]


# --- the fields of an option class ---------------------------------------------------------------


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@functools.cache
def fields_of(cls: type) -> tuple[OptionField, ...]:
    """Every leaf option of ``cls`` (nested groups flattened, in declaration order).

    Raises TypeError for a class that is not a dataclass, or when two leaves share a flag."""
    if not _is_group(cls):
        raise TypeError(f"{cls!r} is not an option dataclass")
    found = list(_leaves(cls, "", None))
    seen: dict[str, str] = {}
    for f in found:
        if f.flag in seen:
            raise TypeError(f"{cls.__name__}: {f.key} and {seen[f.flag]} both use {f.flag}")
        seen[f.flag] = f.key
    return tuple(found)


def _leaves(cls: type, prefix: str, panel: str | None) -> Iterable[OptionField]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, meta = hints[f.name], f.metadata
        if _is_group(tp):
            yield from _leaves(
                tp, f"{prefix}{f.name}.", meta.get("group") or f.name.replace("_", " ").title()
            )
            continue
        yield OptionField(
            key=prefix + f.name,
            flag=meta.get("flag") or "--" + f.name.replace("_", "-"),
            param=(prefix + f.name).replace(".", "__"),
            type=tp,
            default=_default(f),
            help=meta.get("help", ""),
            group=meta.get("group", panel),
            argument=bool(meta.get("argument", False)),
            short=meta.get("short"),
            metavar=meta.get("metavar"),
        )


def _by_key(cls: type) -> dict[str, OptionField]:
    return {f.key: f for f in fields_of(cls)}


# --- values ------------------------------------------------------------------------------------


def convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` (a string from an override, a YAML value or a Python value) as type ``tp``;
    OptionError naming ``where`` when it does not fit.

    >>> convert("0.4,0.5", tuple[float, ...], "--mean")
    (0.4, 0.5)
    >>> convert("yes", bool, "--loop")
    True
    """
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise OptionError(f"{where} needs a value")
    try:
        return _convert(value, base, where)
    except OptionError:
        raise
    except (TypeError, ValueError):
        raise OptionError(f"{where} takes {_describe(base)}, got {value!r}") from None


def _convert(value: Any, base: Any, where: str) -> Any:
    if base is bool:
        return _to_bool(value, where)
    if base in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    if base is int:
        return int(value) if isinstance(value, (int, str)) else _whole(value)
    if base is float:
        return float(value)
    if base is str:
        if not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)
    if base is Path:
        return Path(value) if isinstance(value, (str, Path)) else _fail_type(value)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return _to_enum(value, base, where)
    if typing.get_origin(base) is tuple:
        return _to_tuple(value, base, where)
    return value


def _fail_type(value: Any) -> Any:
    raise TypeError(value)


def _whole(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(value)


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise OptionError(f"{where} takes true or false, got {value!r}")


def _to_enum(value: Any, base: type[enum.Enum], where: str) -> enum.Enum:
    if isinstance(value, base):
        return value
    text = value.value if isinstance(value, enum.Enum) else str(value)
    for member in base:
        if text in (member.value, member.name):
            return member
    choices = ", ".join(str(m.value) for m in base)
    raise OptionError(f"{where} takes one of {choices}, got {text!r}")


def _to_tuple(value: Any, base: Any, where: str) -> tuple[Any, ...]:
    args = typing.get_args(base)
    if isinstance(value, str):
        items: list[Any] = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        items = [p for v in value for p in (v.replace(",", " ").split() if isinstance(v, str) else [v])]
    else:
        items = [value]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(v, args[0], where) for v in items)
    if len(items) != len(args):
        raise OptionError(f"{where} takes {len(args)} values, got {len(items)}")
    return tuple(convert(v, t, where) for v, t in zip(items, args))


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "numbers"
    return {int: "an integer", float: "a number", str: "text", Path: "a path"}.get(
        tp, getattr(tp, "__name__", "?")
    )


# --- config files and overrides --------------------------------------------------------------------


def load_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a flat ``{dotted key: value}`` map (nested mappings become dotted
    keys); OptionError naming the file when it cannot be read or is not a mapping."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"--config: {path} is not YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f"--config: {path} must hold a mapping of option names to values")
    return _flatten(data, "")


def _flatten(data: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise OptionError(f"expected key=value, got {text!r}")
    return key.strip().replace("-", "_"), value.strip()


class _Values:
    """The dotted-key values of one resolution, with the extra key groups beside them."""

    def __init__(self, cls: type, extras: Mapping[str, type]) -> None:
        self.known = _by_key(cls)
        self.extras = dict(extras)
        self.values: dict[str, Any] = {}
        self.extra_values: dict[str, dict[str, Any]] = {name: {} for name in extras}

    def set(self, key: str, value: Any, origin: str) -> None:
        where = f"{origin}{key}"
        if key in self.known:
            self.values[key] = convert(value, self.known[key].type, where)
            return
        group, _, name = key.partition(".")
        if group in self.extras and name:
            hints = {f.name: f for f in dataclasses.fields(self.extras[group])}
            if name in hints:
                tp = typing.get_type_hints(self.extras[group])[name]
                self.extra_values[group][name] = convert(value, tp, where)
                return
            raise OptionError(f"unknown option '{where}' (known {group} keys: {', '.join(hints)})")
        raise OptionError(f"unknown option '{where}' (known: {', '.join(self.known)})")


def resolve(
    cls: type,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    extras: Mapping[str, type] | None = None,
) -> Resolved:
    """The options of ``cls`` from its defaults, a ``config`` file (or an already loaded mapping),
    ``key=value`` ``overrides`` and ``flags`` given on the command line (dotted key → value), in
    that order of precedence. ``extras``: further key groups by prefix (e.g. ``{"profile":
    Profile}`` accepts ``profile.m=500``), returned beside the options. Raises OptionError."""
    values = _Values(cls, extras or {})
    if config is not None:
        data = _flatten(config, "") if isinstance(config, Mapping) else load_config(config)
        origin = "" if isinstance(config, Mapping) else f"{config}: "
        for key, value in data.items():
            values.set(str(key).replace("-", "_"), value, origin)
    for text in overrides:
        values.set(*_split_override(text), "")
    for key, value in (flags or {}).items():
        field = values.known[key]
        values.values[key] = convert(value, field.type, field.flag)
    return Resolved(_construct(cls, values.values, ""), values.extra_values)


def _construct(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        if _is_group(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
        elif _default(f) is dataclasses.MISSING:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            raise OptionError(f"missing {flag} (a flag, a --config key or {key}=VALUE)")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise OptionError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def make_options(cls: type, **values: Any) -> Any:
    """An option object from Python values by dotted key or by leaf name (unique in ``cls``), each
    converted as a config value is: ``make_options(RunOptions, bundle="b", source="0", batch=4)``.
    Raises OptionError."""
    leaves: dict[str, list[str]] = {}
    for f in fields_of(cls):
        leaves.setdefault(f.key.rpartition(".")[2], []).append(f.key)
    mapped = {}
    for name, value in values.items():
        keys = [name] if name in _by_key(cls) else leaves.get(name, [])
        if len(keys) != 1:
            reason = "ambiguous" if keys else "unknown"
            raise OptionError(f"{reason} option '{name}' for {cls.__name__}")
        mapped[keys[0]] = value
    return resolve(cls, config=mapped).options


# --- binding a command ------------------------------------------------------------------------------


def _annotation(f: OptionField) -> Any:
    import typer

    base, _ = _unwrap_optional(f.type)
    shown = f.help + (" [required]" if f.required else "")
    if f.argument:
        info = typer.Argument(metavar=f.key.upper(), help=shown, show_default=not f.required)
        return typing.Annotated[base | None, info]
    decls = [f.flag, *([f.short] if f.short else [])]
    if base is bool:
        flag = f.flag.removeprefix("--")
        decls = [f.flag] if flag.startswith("no-") else [f"--{flag}/--no-{flag}"]
    metavar = f.metavar
    if typing.get_origin(base) is tuple and typing.get_args(base)[-1] is Ellipsis:
        metavar = metavar or f"{typing.get_args(base)[0].__name__.upper()}..."
        base = list[str]
    info = typer.Option(
        *decls, help=shown, rich_help_panel=f.group, show_default=not f.required, metavar=metavar
    )
    return typing.Annotated[base | None, info]


def _typer_default(f: OptionField) -> Any:
    if f.required:
        return None
    default = f.default
    if isinstance(default, tuple) and typing.get_args(_unwrap_optional(f.type)[0])[-1:] == (Ellipsis,):
        return [str(v) for v in default] or None
    return default


def bind(
    cls: type, *, extras: Mapping[str, type] | None = None, group: bool = False
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate ``fn(options)`` (``fn(options, extras)`` when ``extras`` are given) into a typer
    command taking every leaf of ``cls`` as a flag, ``--config FILE.yaml`` and trailing
    ``KEY=VALUE`` overrides; help comes from ``fn``'s docstring. A bad option prints one line and
    exits 2.

    ``group=True``: the callback of a command group (a flat form beside sub-commands). It takes no
    ``KEY=VALUE`` (they would read as a sub-command's name); when a sub-command is invoked, ``fn``
    is not called and the group's own flags are refused (they go after the sub-command)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        leaves = fields_of(cls)

        def command(**kwargs: Any) -> Any:
            if group and kwargs["ctx"].invoked_subcommand is not None:
                _refuse_before_subcommand(kwargs["ctx"], leaves)
                return None
            resolved = _resolve_from_cli(cls, leaves, kwargs, extras)
            return fn(resolved.options, resolved.extras) if extras else fn(resolved.options)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        signature, annotations = _signature(leaves, extras, overrides=not group)
        command.__signature__, command.__annotations__ = signature, annotations  # type: ignore[attr-defined]
        return command

    return decorate


def _refuse_before_subcommand(ctx: Any, leaves: Sequence[OptionField]) -> None:
    import typer

    given = [f.flag for f in leaves if _given(ctx, f.param)] + (["--config"] if _given(ctx, "config") else [])
    if given:
        raise typer.BadParameter(
            f"options go after the command: {ctx.command_path} {ctx.invoked_subcommand} … "
            f"(got {', '.join(given)} before it)"
        )


def _signature(
    leaves: Sequence[OptionField], extras: Mapping[str, type] | None, *, overrides: bool = True
) -> tuple[inspect.Signature, dict[str, Any]]:
    import typer

    keys = "dotted for groups" + (f"; {', '.join(f'{e}.FIELD' for e in extras)} too" if extras else "")
    special = {
        "ctx": typer.Context,
        "config": typing.Annotated[
            Path | None,
            typer.Option("--config", metavar="FILE.yaml", help="Options from a YAML file (flags win)."),
        ],
        "overrides": typing.Annotated[
            list[str] | None,
            typer.Argument(metavar="KEY=VALUE", help=f"Options by field name ({keys}), over --config."),
        ],
    }
    kind = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("ctx", kind, annotation=special["ctx"])]
    annotations = {"ctx": special["ctx"]}
    for f in sorted(leaves, key=lambda f: (not f.argument, not f.required)):  # arguments, then required
        annotations[f.param] = _annotation(f)
        params.append(
            inspect.Parameter(f.param, kind, annotation=annotations[f.param], default=_typer_default(f))
        )
    for name in ("config", "overrides") if overrides else ("config",):
        annotations[name] = special[name]
        params.append(inspect.Parameter(name, kind, annotation=special[name], default=None))
    annotations["return"] = None
    return inspect.Signature(params), annotations


def _given(ctx: Any, param: str) -> bool:
    """Whether ``param`` was given on the command line (or by its environment variable)."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def _resolve_from_cli(
    cls: type, leaves: Sequence[OptionField], kwargs: dict[str, Any], extras: Mapping[str, type] | None
) -> Resolved:
    import typer

    ctx: typer.Context = kwargs["ctx"]
    flags = {f.key: kwargs[f.param] for f in leaves if _given(ctx, f.param)}
    try:
        return resolve(
            cls, config=kwargs["config"], overrides=kwargs.get("overrides") or (), flags=flags, extras=extras
        )
    except OptionError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_OPTION) from None
