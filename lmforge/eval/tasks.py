"""Evaluation tasks as files: a YAML spec next to a JSONL of items.

```yaml
name: cloze_henry_v
type: multiple_choice          # multiple_choice | generation | perplexity
data: cloze_henry_v.jsonl      # relative to this YAML file
prompt: "{{context}}"          # Jinja2 over the item's fields (the same syntax lm-evaluation-harness uses)
choices_field: choices         # multiple_choice: a list of strings
answer_field: answer           # multiple_choice: index of the right choice; generation: a string or list of strings
metric: acc                    # acc | acc_norm | exact_match | f1 | contains | reward | bpb
reward: numeric_match          # generation with metric reward: a reward spec (lmforge.rl.rewards) over the item's fields
num_fewshot: 0
fewshot_seed: 1234
fewshot_sampler: per_item      # per_item | lm_eval | first_n (see Task.fewshot)
stop: ["\\n"]                  # generation: stop sequences
chat: false                    # render prompts through the model's chat template
```

``load_task`` validates the YAML (unknown keys are errors naming the file and the key) and every JSONL line (errors name
``file:line`` and the field).  ``find_tasks`` expands task files and suite folders into a sorted list of YAML paths.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import Field, model_validator

from lmforge.config import ConfigError, StageConfig, read_yaml, validate

TaskType = Literal["multiple_choice", "generation", "perplexity"]
METRICS_BY_TYPE = {
    "multiple_choice": ("acc", "acc_norm"),
    "generation": ("exact_match", "f1", "contains", "reward"),
    "perplexity": ("bpb",),
}
_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class TaskSpec(StageConfig):
    """One evaluation task (the YAML file)."""

    name: str = Field(description="Task name, used as the column in results and leaderboards.")
    type: TaskType
    data: str = Field(description="JSONL file of items, relative to the YAML file.")
    description: str = ""
    source: str = Field("", description="Where the items come from.")
    license: str = ""
    prompt: str = Field("{{context}}", description="Jinja2 template rendering an item into the model's context.")
    choices_field: str = "choices"
    answer_field: str = "answer"
    text_field: str = Field("text", description="perplexity: the field holding the text.")
    target_delimiter: str = Field(" ", description="Between the context and a choice / answer.")
    fewshot_delimiter: str = Field("\n\n", description="Between few-shot examples.")
    num_fewshot: int = Field(0, ge=0)
    fewshot_seed: int = 1234
    fewshot_sampler: Literal["per_item", "lm_eval", "first_n"] = Field(
        "per_item", description="How few-shot examples are drawn from the other items: per_item (a seeded draw per "
                                "item, independent of the others), lm_eval (lm-evaluation-harness's default sampler: "
                                "one seeded stream over the items in order), first_n (the first N other items).")
    metric: str = Field("", description="Primary metric; default acc / exact_match / bpb by type.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="generation: stop sequences.")
    max_new_tokens: int = Field(32, ge=1)
    chat: bool = Field(False, description="Render prompts (and few-shot turns) through the model's chat template.")
    limit: int | None = Field(None, ge=1, description="Score only the first N items.")
    reward: str = Field("", description="generation, metric reward: the reward spec scoring each answer against the "
                                        "item's fields (lmforge.rl.rewards: the same verifiers GRPO trains on).")

    @model_validator(mode="after")
    def _check_metric(self) -> "TaskSpec":
        allowed = METRICS_BY_TYPE[self.type]
        if not self.metric:
            self.metric = allowed[0]
        if self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} is not one of {list(allowed)} for type {self.type}")
        if (self.metric == "reward") != bool(self.reward):
            raise ValueError("metric reward needs a reward spec (reward: NAME), and a reward spec needs metric reward")
        if self.reward and self.num_fewshot:
            raise ValueError("metric reward scores verifiable answers: num_fewshot must be 0 (items have no answer "
                             "text to show)")
        return self


@dataclass
class Task:
    spec: TaskSpec
    path: Path  # the YAML file
    items: list[dict[str, Any]]
    _lm_eval_shots: tuple[int, list[list[int]]] | None = field(default=None, repr=False)  # (id(items), draws)

    @property
    def name(self) -> str:
        return self.spec.name

    def render(self, item: dict[str, Any]) -> str:
        return _JINJA.from_string(self.spec.prompt).render(**item)

    def choices(self, item: dict[str, Any]) -> list[str]:
        return list(item[self.spec.choices_field])

    def answers(self, item: dict[str, Any]) -> list[str]:
        a = item[self.spec.answer_field]
        if self.spec.type == "multiple_choice":
            return [self.choices(item)[a]]
        return [a] if isinstance(a, str) else list(a)

    def fewshot(self, index: int) -> list[dict[str, Any]]:
        """``num_fewshot`` other items as examples for item ``index`` (the same for every model).

        * ``per_item``: a draw seeded with ``(fewshot_seed, index)``, so an item's examples do not depend on which
          other items are scored (``limit`` keeps them);
        * ``lm_eval``: lm-evaluation-harness's ``ContextSampler`` when the few-shot pool is the evaluated split: one
          ``random.Random(fewshot_seed)`` stream, for each item in order draw ``k + 1`` items, drop those equal to the
          item itself, keep ``k`` (lm-eval's ``--seed`` sets ``fewshot_seed``; its default is 1234, as ours);
        * ``first_n``: the first ``k`` items not equal to this one (lm-eval's ``first_n`` sampler).
        """
        k = self.spec.num_fewshot
        if k == 0:
            return []
        item = self.items[index]
        if self.spec.fewshot_sampler == "first_n":
            return [x for x in self.items if x != item][:k]
        if self.spec.fewshot_sampler == "lm_eval":
            if self._lm_eval_shots is None or self._lm_eval_shots[0] != id(self.items):  # items replaced (a limit)
                self._lm_eval_shots = (id(self.items), _lm_eval_draws(self.items, k, self.spec.fewshot_seed))
            return [self.items[i] for i in self._lm_eval_shots[1][index]]
        rng = random.Random(f"{self.spec.fewshot_seed}-{index}")
        pool = [i for i in range(len(self.items)) if i != index]
        return [self.items[i] for i in rng.sample(pool, min(k, len(pool)))]


def _lm_eval_draws(items: list[dict[str, Any]], k: int, seed: int) -> list[list[int]]:
    """The indices lm-eval's default sampler picks for every item, in item order (one shared random stream)."""
    if len(items) <= k:
        raise ValueError(f"{k}-shot needs more than {k} items, the task has {len(items)}")
    rng = random.Random(seed)
    out = []
    for item in items:
        picked = [i for i in rng.sample(range(len(items)), k + 1) if items[i] != item][:k]
        if len(picked) < k:  # duplicates of the item were drawn: lm-eval draws again from the rest
            picked = rng.sample([i for i in range(len(items)) if items[i] != item], k)
        out.append(picked)
    return out


def _check_item(spec: TaskSpec, item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if spec.type == "perplexity":
        if not isinstance(item.get(spec.text_field), str) or not item[spec.text_field]:
            raise ConfigError(f"{where}: field {spec.text_field!r}: expected a non-empty string")
        return
    answer = item.get(spec.answer_field)
    if spec.type == "multiple_choice":
        choices = item.get(spec.choices_field)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: field {spec.choices_field!r}: expected a list of at least 2 strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ConfigError(f"{where}: field {spec.answer_field!r}: expected an index into {spec.choices_field} "
                              f"(0..{len(choices) - 1}), got {answer!r}")
    elif spec.reward:
        from lmforge.rl.rewards import parse_spec, required_fields

        for name, who in required_fields(parse_spec(spec.reward)).items():
            if name not in item:
                raise ConfigError(f"{where}: field {name!r}: missing (the reward {who} reads it)")
    elif not (isinstance(answer, str) or (isinstance(answer, list) and answer and
                                          all(isinstance(a, str) for a in answer))):
        raise ConfigError(f"{where}: field {spec.answer_field!r}: expected a string or a list of strings")
    try:
        _JINJA.from_string(spec.prompt).render(**item)
    except jinja2.exceptions.UndefinedError as err:
        raise ConfigError(f"{where}: prompt template: {err.message}") from None


def load_task(path: str | Path) -> Task:
    """Read and validate a task YAML and its JSONL items."""
    path = Path(path)
    spec = validate(TaskSpec, read_yaml(path), str(path))
    data = (path.parent / spec.data).resolve()
    if not data.is_file():
        raise ConfigError(f"{path}: data: file {data} not found")
    items = []
    with open(data, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{data}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: invalid JSON: {err.msg}") from None
            _check_item(spec, item, where)
            items.append(item)
    if not items:
        raise ConfigError(f"{data}: no items")
    if spec.limit:
        items = items[:spec.limit]
    return Task(spec, path, items)


def find_tasks(specs: list[str | Path]) -> list[Path]:
    """Task YAML files from a list of YAML paths and/or suite folders (every ``*.yaml`` inside, sorted)."""
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
            if not found:
                raise ConfigError(f"{p}: a task folder with no *.yaml task files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such task file or folder")
    return out
