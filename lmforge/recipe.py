"""Recipes: a YAML file that chains stages, each writing one artifact folder in the recipe's workspace.

```yaml
name: demo
workspace: runs/demo          # optional; default $LMFORGE_HOME/<name>
stages:
  data:                       # the stage's name is its folder name; `stage:` names its kind (default: the name)
    inputs: [data/demo]
  tokenizer:
    data: "@data"             # "@NAME" is the folder of an earlier stage: that is how stages are wired
  pretrain:
    tokenizer: "@tokenizer"
```

A stage whose folder holds a finished run with the same fingerprint (config + identities of its inputs) is skipped;
a stage whose upstream was re-run is re-run; an unfinished stage resumes from its own partial state.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict

from lmforge import storage
from lmforge.artifacts import Manifest, read_manifest
from lmforge.config import ConfigError, StageConfig, read_yaml, validate
from lmforge.progress import console
from lmforge.stages import overwrite_allowed

# stage kind -> module exposing STAGE, VERSION, Config, run(config, out_dir, force)
STAGE_MODULES = {
    "data": "lmforge.data.stage",
    "tokenizer": "lmforge.tokenizer.stage",
    "pretrain": "lmforge.train.pretrain",
    "eval": "lmforge.eval.stage",
    "serve_smoke": "lmforge.serve.stage",
    "sft": "lmforge.align.sft",
    "dpo": "lmforge.align.dpo",
    "merge": "lmforge.align.merge",
    "synth": "lmforge.align.synth",
    "rag_index": "lmforge.rag.stage",
    "pretrained": "lmforge.model.pretrained_stage",
    "crawl": "lmforge.crawl.stage",
}


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(STAGE_MODULES[kind])


class RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    workspace: str | None = None
    description: str | None = None
    stages: dict[str, dict[str, Any]]


@dataclass
class PlannedStage:
    name: str
    kind: str
    raw: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    path: Path
    name: str
    workspace: Path
    stages: list[PlannedStage]

    def folder(self, stage: str) -> Path:
        return self.workspace / stage


def _refs(value: Any) -> list[str]:
    """Stage names referenced as "@NAME" (its folder) or "@NAME/SUBPATH" (a path inside it, e.g. "@crawl/warc")."""
    if isinstance(value, str) and value.startswith("@"):
        return [value[1:].split("/", 1)[0]]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def _resolve(value: Any, folders: dict[str, Path]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        name, _, sub = value[1:].partition("/")
        return str(folders[name] / sub) if sub else str(folders[name])
    if isinstance(value, list):
        return [_resolve(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, folders) for k, v in value.items()}
    return value


def load_recipe(path: str | os.PathLike, workspace: str | os.PathLike | None = None) -> Recipe:
    from lmforge.registry import home

    path = Path(path)
    raw = read_yaml(path)
    rf = validate(RecipeFile, raw, str(path))
    ws = Path(workspace or rf.workspace or home() / rf.name)
    stages: list[PlannedStage] = []
    seen: set[str] = set()
    for name, body in rf.stages.items():
        body = dict(body or {})
        kind = body.pop("stage", name)
        if kind not in STAGE_MODULES:
            raise ConfigError(f"{path}: stages.{name}.stage: unknown stage kind {kind!r} "
                              f"(known: {', '.join(STAGE_MODULES)})")
        deps = _refs(body)
        for d in deps:
            if d not in seen:
                raise ConfigError(f"{path}: stages.{name}: '@{d}' does not name an earlier stage")
        stages.append(PlannedStage(name, kind, body, deps))
        seen.add(name)
    recipe = Recipe(path, rf.name, ws, stages)
    # validate every stage config up front, so a typo in the last stage fails before hours of work
    for st in stages:
        validate(stage_module(st.kind).Config, _resolve(st.raw, {s.name: recipe.folder(s.name) for s in stages}),
                 str(path), prefix=f"stages.{st.name}.")
    return recipe


@dataclass
class StageResult:
    name: str
    kind: str
    folder: Path
    ran: bool
    seconds: float
    manifest: Manifest


def run_recipe(recipe: Recipe, force: list[str] | None = None, only: list[str] | None = None) -> list[StageResult]:
    force = set(force or [])
    unknown = (force | set(only or [])) - {s.name for s in recipe.stages}
    if unknown:
        raise ConfigError(f"{recipe.path}: no stage named {', '.join(sorted(unknown))}")
    folders = {s.name: recipe.folder(s.name) for s in recipe.stages}
    results: list[StageResult] = []
    console.rule(f"[bold]lmforge run {recipe.path}[/] → {recipe.workspace}")
    for st in recipe.stages:
        if only and st.name not in only:
            continue
        module = stage_module(st.kind)
        config: StageConfig = validate(module.Config, _resolve(st.raw, folders), str(recipe.path),
                                       prefix=f"stages.{st.name}.")
        before = _run_id(folders[st.name])
        t0 = time.time()
        # a recipe is make-like: a finished stage whose config or inputs changed is re-run, not refused
        with overwrite_allowed():
            manifest = storage.run_stage(module.run, config, folders[st.name], force=st.name in force)
        results.append(StageResult(st.name, st.kind, folders[st.name], manifest.run_id != before,
                                   time.time() - t0, manifest))
    return results


def _run_id(folder: Path) -> str | None:
    try:
        return read_manifest(folder).run_id
    except (FileNotFoundError, ValueError):
        return None
