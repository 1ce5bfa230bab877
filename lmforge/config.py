"""Stage configs: pydantic models whose fields map 1:1 to YAML keys and CLI flags.

* ``StageConfig`` forbids unknown keys; ``load_config`` turns a validation error into one line that names the file and
  the key (``recipes/demo.yaml: stages.pretrain.lr: Input should be a valid number``).
* ``command_from_config`` builds a typer command whose options are exactly the config's fields (``max_steps`` →
  ``--max-steps``), plus ``--config FILE`` to start from a YAML file; flags given on the command line override it.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import typer
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


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
        lines.append(f"{where}: {key}: {msg}")
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
    if origin is Literal:
        return type(args[0])
    if origin in (list, tuple):
        return list[_cli_type(args[0]) if args else str]
    if origin is dict or annotation is Any:
        return None  # only settable from YAML
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return str
    return annotation


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
            inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
                              default=typer.Option(None, "--out", "-o",
                                                   help=f"Artifact folder  [default: $LMFORGE_HOME/{default_out}]")),
            inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                              default=typer.Option(False, "--force", help="Re-run even if the folder is up to date.")),
        ]
    cli_fields: list[str] = []
    for name, field in cls.model_fields.items():
        ann = _cli_type(field.annotation)
        if ann is None:
            continue
        cli_fields.append(name)
        default_repr = field.get_default(call_default_factory=True)
        help_ = (field.description or "") + (f"  [default: {default_repr}]" if default_repr not in (None, [], "") else "")
        is_bool = ann is bool
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if is_bool else [flag]
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_, show_default=False),
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
        from lmforge.registry import home

        return run(config, out or home() / default_out, force=force)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = help_text or cls.__doc__
    return command
