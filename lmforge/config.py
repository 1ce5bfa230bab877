"""Stage configs: pydantic models whose fields map 1:1 to YAML keys and CLI flags.

* ``StageConfig`` forbids unknown keys; ``load_config`` turns a validation error into one line that names the file and
  the key (``recipes/demo.yaml: stages.pretrain.lr: Input should be a valid number``).
* ``command_from_config`` builds a typer command whose options are exactly the config's fields (``max_steps`` →
  ``--max-steps``), plus ``--config FILE`` to start from a YAML file; flags given on the command line override it.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import typer
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


C = TypeVar("C", bound=StageConfig)


class ConfigError(ValueError):
    """A config that does not validate; the message names the file and key."""


def format_validation_error(err: ValidationError, where: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        sep = "" if msg.startswith("[") else ": "  # a message about a list entry continues the key: pipeline[3].x
        lines.append(f"{where}: {key}{sep}{msg}")
    return "\n".join(lines)


def validate(cls: type[C], data: dict[str, Any], where: str, prefix: str = "") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where, prefix)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    data: dict[str, Any] = read_yaml(path) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate(cls, data, str(path) if path else "command line")


# ----------------------------------------------------------------------------------------------------------------------
# CLI generation


def _cli_type(annotation: Any) -> Any:
    """The type typer should parse for a field annotation (Literal → str, Optional[X] → X, list[X] → list[X])."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _cli_type(rest[0]) if len(rest) == 1 else str
    if origin is Literal:  # typer offers the values as choices (shown in --help, checked when parsed)
        return annotation if all(isinstance(a, str) for a in args) else type(args[0])
    if origin in (list, tuple):
        inner = _cli_type(args[0]) if args else str
        return None if inner is None else list[inner]  # a list of mappings: YAML only
    if origin is dict or annotation is Any:
        return None  # only settable from YAML
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return str
    return annotation


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return ()


def _escape(help_text: str) -> str:
    """Help text as typer shows it: with rich on (the default), "[...]" must be escaped or rich takes it for markup."""
    from typer.core import HAS_RICH

    return escape(help_text) if HAS_RICH else help_text


def _default_text(field: FieldInfo) -> str | None:
    """A field's default as ``--help`` shows it (``None`` when it has none worth showing)."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def spread_list_values(params: list[Any], args: list[str]) -> list[str]:
    """``--inputs a b c`` → ``--inputs a --inputs b --inputs c`` for options that take several values, so a list
    field accepts the words after its flag (an unquoted shell glob expands to such words).  Words are taken up to the
    next flag (anything starting with ``-`` but a negative number) or ``--``.  Commands with positional arguments are
    left alone: there a word after a list option could be either."""
    if any(getattr(p, "param_type_name", "") == "argument" for p in params):
        return args
    multi = {o for p in params if getattr(p, "multiple", False) and not getattr(p, "is_flag", False)
             for o in p.opts}
    out: list[str] = []
    current: str | None = None  # the list option whose values are being read
    pending = False  # True right after the flag: its first value is still to come
    for a in args:
        if a == "--":
            current = None
            out.append(a)
            continue
        is_flag = a.startswith("-") and not _NUMBER.match(a)
        if is_flag:
            flag = a.split("=", 1)[0]
            current = flag if flag in multi else None
            pending = current is not None and "=" not in a
            out.append(a)
        elif current is not None and not pending:
            out += [current, a]
        else:
            pending = False
            out.append(a)
    return out


_NUMBER = re.compile(r"^-\d|^-\.\d")


def command_from_config(cls: type[C], run: Callable[..., Any], help_text: str | None = None,
                        default_out: str | None = None) -> Callable[..., Any]:
    """A typer-ready function with one option per config field plus ``--config``; calls ``run(config)``.

    With ``default_out`` (a folder name under ``$LMFORGE_HOME``) the command also takes ``--out DIR`` and ``--force``
    and calls ``run(config, out, force=force)``: the shape of every artifact-writing stage.
    """
    params = [
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="YAML file with the config; flags override it."),
            annotation=typing.Optional[Path],
        )
    ]
    if default_out is not None:
        params += [
            inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[str],
                              default=typer.Option(
                                  None, "--out", "-o", show_default=False,
                                  help=_escape(f"Artifact folder.  [default: $LMFORGE_HOME/{default_out}]"))),
            inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                              default=typer.Option(False, "--force", help="Re-run even if the folder is up to date.")),
        ]
    cli_fields: list[str] = []
    for name, field in cls.model_fields.items():
        ann = _cli_type(field.annotation)
        if ann is None:
            continue
        cli_fields.append(name)
        help_ = field.description or ""
        choices = _literal_choices(field.annotation)
        if choices and typing.get_origin(ann) is not Literal:  # str choices are typer's own (metavar, checked)
            help_ += f"  [one of: {', '.join(map(str, choices))}]"
        if field.is_required():
            help_ += "  [required: here or in --config]"
        elif _default_text(field) is not None:
            help_ += f"  [default: {_default_text(field)}]"
        is_bool = ann is bool
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if is_bool else [flag]
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                # the option's own default stays None (= "not given": --config or the field default applies); the
                # help text says what the field's default is, escaped so that rich markup does not eat "[default: 4]"
                default=typer.Option(None, *decls, help=_escape(help_), show_default=False),
                annotation=typing.Optional[ann],
            )
        )

    def command(**kwargs: Any) -> Any:
        config_file = kwargs.pop("config_file", None)
        out = kwargs.pop("out", None) if default_out is not None else None
        force = kwargs.pop("force", False) if default_out is not None else False
        overrides = {k: v for k, v in kwargs.items() if v is not None and v != []}
        try:
            config = load_config(cls, config_file, overrides)
        except ConfigError as err:
            typer.secho(str(err), fg="red", err=True)
            raise typer.Exit(2) from None
        if default_out is None:
            return run(config)
        from lmforge import storage
        from lmforge.registry import home

        if storage.uses_remote(config, out):  # URL inputs copied locally, a URL --out staged then published
            return storage.run_stage(run, config, out or home() / default_out, force=force)
        return run(config, Path(out) if out else home() / default_out, force=force)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = help_text or cls.__doc__
    return command
