"""Export an lmforge task as an lm-evaluation-harness task YAML, so both tools score the same items offline.

The exported task reads our JSONL through ``dataset_path: json`` + ``data_files`` (no hub), uses the same Jinja2
prompt, target delimiter and choices; run it with ``lm_eval --model hf --model_args pretrained=MODEL_DIR
--include_path DIR --tasks NAME`` (``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``).  Zero-shot multiple-choice tasks give
the same accuracy in both tools (a test checks it), and so do few-shot tasks whose ``fewshot_sampler`` is ``lm_eval``
(lm-eval's default sampler, replayed; run lm-eval with its default ``--seed`` or one whose fewshot seed equals the
task's ``fewshot_seed``) or ``first_n``.  With our default ``per_item`` sampler the two tools pick different examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmforge.eval.tasks import Task


def export_task(task: Task, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``<name>.yaml`` + ``<name>.jsonl`` (the task's loaded items, so a ``limit`` carries over) into
    ``out_dir``: an lm-eval task over our items; returns the YAML's path."""
    spec = task.spec
    if spec.type != "multiple_choice":
        raise ValueError(f"{task.path}: only multiple_choice tasks are exported to lm-eval (got {spec.type})")
    name = name or f"lmforge_{spec.name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in task.items), encoding="utf-8")
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": spec.prompt,
        "doc_to_choice": f"{{{{{spec.choices_field}}}}}",
        "doc_to_target": spec.answer_field,
        "target_delimiter": spec.target_delimiter,
        "fewshot_delimiter": spec.fewshot_delimiter,
        "num_fewshot": spec.num_fewshot,
        # the few-shot pool is the evaluated items themselves, the item itself left out (as lmforge does)
        "fewshot_split": "test",
        "fewshot_config": {"sampler": "first_n" if spec.fewshot_sampler == "first_n" else "default"},
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
