"""The RL tasks in `lmforge eval` (metric: reward) and best-of-n sampling (`lmforge sample`) as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.eval.harness import run_task
from lmforge.eval.tasks import find_tasks, load_task
from lmforge.rl import tasks as T

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


class _EchoLM:
    """Answers each prompt with a given function of the rendered context (no model)."""

    truncated = 0

    def __init__(self, answer):
        self.answer = answer

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def generate(self, prompt, max_new_tokens, stop):
        return self.answer(prompt)


def test_bundled_rl_eval_tasks_are_the_grpo_held_out_split_and_score_with_the_reward():
    paths = find_tasks([ROOT / "tasks" / "rl"])
    assert [p.stem for p in paths] == ["arithmetic", "countdown", "json_format"]
    task = load_task(ROOT / "tasks" / "rl" / "json_format.yaml")
    held_out = T.generate("json_format", 2000, 100, seed=0).test
    assert [it["prompt"] for it in task.items] == [it.prompt for it in held_out]
    by_prompt = {it.prompt: it.fields["expected"] for it in held_out}
    perfect = run_task(_EchoLM(lambda p: json.dumps(by_prompt[p])), task)
    assert perfect["metric"] == "reward" and perfect["score"] == pytest.approx(1.5)
    wrong = run_task(_EchoLM(lambda p: "{\"name\": 1}"), task)
    assert wrong["score"] == 0.0
    arith = load_task(ROOT / "tasks" / "rl" / "arithmetic.yaml")
    answers = {it["prompt"]: it["answer"] for it in arith.items}
    assert run_task(_EchoLM(lambda p: f"Answer: {answers[p]}"), arith)["score"] == 1.0


def test_reward_task_file_missing_field_names_file_line_field(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?"}\n')
    (tmp_path / "t.yaml").write_text("name: t\ntype: generation\ndata: t.jsonl\nprompt: '{{prompt}}'\n"
                                     "metric: reward\nreward: numeric_match\n")
    with pytest.raises(ConfigError, match=r"t\.jsonl:2: field 'answer': missing \(the reward numeric_match"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ntype: generation\ndata: t.jsonl\nmetric: reward\n")
    with pytest.raises(ConfigError, match="metric reward needs a reward spec"):
        load_task(tmp_path / "t.yaml")


def _run_sample(model, prompts, out, *extra):
    cmd = [sys.executable, "-m", "lmforge.cli", "sample", "--model", str(model), "--prompts", str(prompts),
           "--n", "6", "--max-tokens", "8", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_sample_writes_best_answers_and_pairs_that_sft_and_dpo_read(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}.", "token": "e"}) + "\n"
                               for i in range(5)))
    out = tmp_path / "bon"
    r = _run_sample(tiny_model_dir, prompts, out, "--reward", "token_fraction")
    assert r.returncode == 0, r.stderr[-2000:]
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 30
    best = [json.loads(l) for l in (out / "best.jsonl").read_text().splitlines()]
    pairs = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(best) == 5 and pairs
    for i, rec in enumerate(best):
        mine = [s for s in samples if s["prompt_index"] == i]
        top = max(s["reward"] for s in mine)
        assert rec["messages"][-1]["role"] == "assistant"
        assert [s["reward"] for s in mine if s["completion"] == rec["messages"][-1]["content"]][0] == top
    for p in pairs:
        i = int(p["prompt"].split()[-1].rstrip("."))
        rewards = {s["completion"]: s["reward"] for s in samples if s["prompt_index"] == i}
        assert rewards[p["chosen"]] > rewards[p["rejected"]]
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["samples"] == 30 and m["completion_tokens"] == sum(s["completion_tokens"] for s in samples)
    assert m["prefix_cache_hit_tokens"] > 0  # the 6 copies of a prompt reuse its cached keys/values
    assert m["prompt_tokens_computed"] < m["prompt_tokens"]
    assert m["reward_best_mean"] >= m["reward_mean"]
    # the outputs are what sft and dpo read
    from lmforge.align.chat_data import ChatTokenizer, encode_file
    from lmforge.align.dpo import encode_pairs

    tok = ChatTokenizer.from_folder(tiny_model_dir)
    assert len(encode_file(tok, out / "best.jsonl", 256, "assistant")) == 5
    assert len(encode_pairs(tok, out / "pairs.jsonl", 256)) == len(pairs)


def test_sample_bad_input(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "answer": 1}\n{"prompt": "yo"}\n')
    r = _run_sample(tiny_model_dir, prompts, tmp_path / "o1", "--reward", "numeric_match")
    assert r.returncode != 0 and "p.jsonl:2: answer: missing (the reward numeric_match reads it)" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run_sample(tiny_model_dir, prompts, tmp_path / "o2", "--reward", "no_such_reward")
    assert r.returncode != 0 and "unknown reward 'no_such_reward'" in r.stderr and "Traceback" not in r.stderr


def test_sample_scores_with_a_reward_model_folder(tiny_model_dir, tmp_path):
    import torch

    from lmforge.align.reward import RewardModel, load_reward_model, save_reward_model
    from lmforge.model.hf import load_model

    torch.manual_seed(0)
    llama = load_model(tiny_model_dir)
    rm = RewardModel(llama, llama.config.hidden_size, llama.config.pad_token_id)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    save_reward_model(rm, tmp_path / "rm", tiny_model_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "bon"
    r = _run_sample(tiny_model_dir, prompts, out, "--reward", str(tmp_path / "rm"))
    assert r.returncode == 0, r.stderr[-2000:]
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    scorer = load_reward_model(tmp_path / "rm")
    want = scorer.score_completions([f"Question {s['prompt_index']}?" for s in samples],
                                    [s["completion"] for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx(want, abs=1e-5)
    assert len({round(s["reward"], 6) for s in samples}) > 1  # a real score, not a constant
