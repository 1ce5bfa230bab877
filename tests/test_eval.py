"""Evaluation: metrics on hand-computed examples, task files, MC / generation / perplexity scoring with models whose
preferences we control, the eval stage with tasks, the leaderboard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydoc_data.topics import topics

from lmforge.config import ConfigError
from lmforge.eval import metrics as M
from lmforge.eval.harness import LM, aggregate, run_task
from lmforge.eval.tasks import TaskSpec, find_tasks, load_task
from lmforge.model.llama import LlamaConfig
from lmforge.tokenizer.bpe import train_bpe


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def test_generation_metrics_hand_computed():
    assert M.normalize("The  Cat, sat!") == "cat sat"
    assert M.exact_match("the Paris.", ["Paris"]) == 1.0
    assert M.exact_match("Paris France", ["Paris"]) == 0.0
    # pred {paris, is, capital}, gold {paris, capital, of, france}: common 2, p=2/3, r=2/4 -> f1 = 4/7
    assert M.f1("Paris is the capital", ["the capital of France, Paris"]) == pytest.approx(4 / 7)
    assert M.f1("nothing here", ["Paris"]) == 0.0
    assert M.f1("x", ["nope", "x"]) == 1.0  # best reference wins
    assert M.contains("I think it is Paris, yes", ["paris"]) == 1.0
    assert M.contains("Parisian", ["paris"]) == 0.0  # whole words only


def test_mc_metrics_ties_count_as_wrong():
    assert M.mc_correct([-1.0, -2.0], 0) == 1.0
    assert M.mc_correct([-1.0, -2.0], 1) == 0.0
    assert M.mc_correct([-1.0, -1.0, -3.0], 0) == 0.0  # tie for the top
    raw, norm = M.mc_scores([-4.0, -3.0], ["abcd", "a"])  # per byte: -1.0 vs -3.0
    assert raw == [-4.0, -3.0] and norm == [-1.0, -3.0]
    assert M.mc_correct(raw, 0) == 0.0 and M.mc_correct(norm, 0) == 1.0


def test_bits_per_byte_centered_and_bootstrap():
    assert M.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    assert M.centered(0.25, 0.25) == 0.0
    assert M.centered(1.0, 0.25) == 1.0
    assert M.centered(0.625, 0.25) == pytest.approx(0.5)
    lo, hi = M.bootstrap_ci([0, 1] * 50, seed=0)
    assert lo < 0.5 < hi and 0.35 < lo and hi < 0.65
    assert M.bootstrap_ci([0, 1] * 50, seed=0) == (lo, hi)  # fixed seed: reproducible
    assert M.bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    lo, hi = M.bootstrap_ratio_ci([1, 2, 3, 4], [1, 1, 1, 1])
    assert lo >= 1.0 and lo <= 2.5 <= hi <= 4.0


def test_paired_bootstrap_difference():
    ones = [1.0] * 6
    # b is a everywhere plus 0.5: every resample differs by exactly 0.5, however spread out the items are
    a = [0.1, 0.9, 0.3, 0.7, 0.0, 1.0]
    b = [x + 0.5 for x in a]
    assert M.paired_bootstrap_diff_ci(a, ones, b, ones) == pytest.approx((0.5, 0.5))
    # whereas the separate CIs overlap heavily
    assert M.bootstrap_ci(b)[0] < M.bootstrap_ci(a)[1]
    # ratios (bits / bytes): b spends 2 more bits on each 4-byte item -> +0.5 bit per byte
    assert M.paired_bootstrap_diff_ci([4, 8, 2], [4, 4, 4], [6, 10, 4], [4, 4, 4]) == pytest.approx((0.5, 0.5))
    lo, hi = M.paired_bootstrap_diff_ci([0, 1] * 20, [1] * 40, [1, 1] * 20, [1] * 40)
    assert 0.3 < lo < 0.5 < hi < 0.7
    with pytest.raises(ValueError, match="same items"):
        M.paired_bootstrap_diff_ci([1, 2], [1, 1], [1], [1])


# ----------------------------------------------------------------------------------------------------------------------
# models whose preferences we set


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE trained on real text (Python's pydoc topics)."""
    folder = tmp_path_factory.mktemp("tok")
    tok = train_bpe(list(topics.values()), 600, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    return tok, cfg


class TableModel(torch.nn.Module):
    """Next-token logits from a table indexed by the current token: a bigram model we write by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256)
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids, positions=None, cache=None, rows=None, last_only=False, segment_ids=None):
        logits = self.table[input_ids]
        return logits[:, -1:] if last_only else logits


def lm_with(tokenizer, table_fn=None, **kw) -> LM:
    tok, cfg = tokenizer
    model = TableModel(tok.get_vocab_size())
    if table_fn:
        with torch.no_grad():
            table_fn(model.table, tok)
    return LM(model, tok, cfg, **kw)


def write_task(folder, name, spec: dict, items: list[dict]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    import yaml
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "data": f"{name}.jsonl", **spec}))
    return folder / f"{name}.yaml"


CAPITALS = [
    {"question": "The capital of France is", "choices": ["London", "Paris", "Rome"], "answer": 1},
    {"question": "The capital of Italy is", "choices": ["London", "Paris", "Rome"], "answer": 2},
]


def prefer(word: str):
    """Every token strongly predicts the tokens of `word` (with a leading space)."""
    def fn(table, tok):
        table[:, tok.encode(" " + word).ids] = 20.0
    return fn


def test_mc_scoring_picks_the_answer_the_model_prefers(tokenizer, tmp_path):
    path = write_task(tmp_path, "capitals", {"type": "multiple_choice", "prompt": "{{question}}"}, CAPITALS)
    task = load_task(path)
    res = run_task(lm_with(tokenizer, prefer("Paris")), task)
    assert [r["acc"] for r in res["items"]] == [1.0, 0.0]
    assert res["score"] == 0.5 and res["chance"] == pytest.approx(1 / 3)
    assert res["centered"] == pytest.approx((0.5 - 1 / 3) / (1 - 1 / 3))
    res = run_task(lm_with(tokenizer, prefer("Rome")), task)
    assert [r["acc"] for r in res["items"]] == [0.0, 1.0]


def test_loglikelihood_hand_computed_and_ties(tokenizer, tmp_path):
    tok, _ = tokenizer
    V = tok.get_vocab_size()
    lm = lm_with(tokenizer)  # all-zero logits: every token has probability 1/V
    n = len(tok.encode(" the for statement").ids)
    [ll] = lm.loglikelihood([("Consider", " the for statement")])
    assert ll == pytest.approx(-n * math.log(V), rel=1e-5)
    # single-token choices under a uniform model tie: counted wrong, so accuracy is 0
    singles = [c for c in ("a", "b", "c") if len(tok.encode(" " + c).ids) == 1]
    path = write_task(tmp_path, "ties", {"type": "multiple_choice", "prompt": "{{q}}"},
                      [{"q": "Pick one:", "choices": singles, "answer": 0}])
    assert run_task(lm, load_task(path))["score"] == 0.0
    # context longer than the model: the last tokens are kept, nothing crashes
    [ll] = lm.loglikelihood([("word " * 400, "end")])
    assert ll == pytest.approx(-len(tok.encode(" end").ids) * math.log(V), rel=1e-5)


def test_generation_with_stop_sequences_and_fewshot(tokenizer, tmp_path):
    tok, _ = tokenizer

    def script(table, tok_):
        chain = tok_.encode(" Paris is").ids + tok_.encode("\n").ids
        table[:, chain[0]] = 10.0  # after anything: the first token of " Paris"
        for prev, nxt in zip(chain, chain[1:]):
            table[prev, nxt] = 30.0  # then the rest of " Paris is", then a newline (the stop)

    items = [{"q": "Capital of France?", "a": "Paris is"}, {"q": "Capital of Italy?", "a": ["Rome"]}]
    path = write_task(tmp_path, "gen", {"type": "generation", "prompt": "Q: {{q}}\nA:", "answer_field": "a",
                                        "metric": "f1", "stop": ["\n"], "num_fewshot": 1, "max_new_tokens": 8},
                      items)
    task = load_task(path)
    res = run_task(lm_with(tokenizer, script), task)
    assert [r["prediction"] for r in res["items"]] == ["Paris is", "Paris is"]
    assert [r["exact_match"] for r in res["items"]] == [1.0, 0.0]
    assert res["score"] == pytest.approx(0.5) and res["centered"] == pytest.approx(0.5)
    # few-shot: the other item (only one exists) precedes the prompt, with its answer; same every time
    from lmforge.eval.harness import _context
    ctx = _context(lm_with(tokenizer), task, 0)
    assert ctx == "Q: Capital of Italy?\nA: Rome\n\nQ: Capital of France?\nA:"
    assert _context(lm_with(tokenizer), task, 0) == ctx


def test_chat_tasks_render_through_the_chat_template(tokenizer, tmp_path):
    path = write_task(tmp_path, "chat", {"type": "generation", "prompt": "{{q}}", "answer_field": "a", "chat": True,
                                         "num_fewshot": 1}, [{"q": "Hi", "a": "Hello"}, {"q": "Bye", "a": "Ciao"}])
    from lmforge.eval.harness import _context
    ctx = _context(lm_with(tokenizer), load_task(path), 0)
    assert ctx == ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_perplexity_task_bits_per_byte(tokenizer, tmp_path):
    tok, _ = tokenizer
    V = tok.get_vocab_size()
    texts = [topics["for"][:600], topics["while"][:300]]
    path = write_task(tmp_path, "ppl", {"type": "perplexity"}, [{"text": t} for t in texts])
    res = run_task(lm_with(tokenizer, max_len=64), load_task(path))  # uniform model, several windows per text
    n_tokens = sum(len(tok.encode(t).ids) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert res["tokens"] == n_tokens
    assert res["score"] == pytest.approx(n_tokens * math.log2(V) / n_bytes, rel=1e-5)
    assert res["ci"][0] <= res["score"] <= res["ci"][1]
    assert "centered" not in res and aggregate([res]) is None


def test_task_file_errors_name_file_line_and_field(tmp_path):
    bad_answer = write_task(tmp_path, "bad", {"type": "multiple_choice", "prompt": "{{question}}"},
                            [CAPITALS[0], {"question": "x", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: field 'answer'"):
        load_task(bad_answer)
    missing = write_task(tmp_path, "tmpl", {"type": "multiple_choice", "prompt": "{{nope}}"}, CAPITALS)
    with pytest.raises(ConfigError, match=r"tmpl\.jsonl:1: prompt template: 'nope' is undefined"):
        load_task(missing)
    unknown = write_task(tmp_path, "unk", {"type": "generation", "colour": "red"}, [{"context": "a", "answer": "b"}])
    with pytest.raises(ConfigError, match=r"unk\.yaml: colour: unknown key"):
        load_task(unknown)
    wrong_metric = write_task(tmp_path, "wm", {"type": "generation", "metric": "acc"}, [{"context": "a", "answer": "b"}])
    with pytest.raises(ConfigError, match="metric 'acc' is not one of"):
        load_task(wrong_metric)
    (tmp_path / "broken.jsonl").write_text('{"context": "a", "answer": "b"}\n{oops\n')
    (tmp_path / "broken.yaml").write_text("name: broken\ntype: generation\ndata: broken.jsonl\n")
    with pytest.raises(ConfigError, match=r"broken\.jsonl:2: invalid JSON"):
        load_task(tmp_path / "broken.yaml")
    assert set(p.name for p in find_tasks([tmp_path])) >= {"bad.yaml", "unk.yaml"}
    with pytest.raises(ConfigError, match="no such task file"):
        find_tasks([tmp_path / "missing.yaml"])


def test_aggregate_is_the_mean_centred_score():
    assert aggregate([{"centered": 0.5}, {"centered": 0.0}, {"score": 1.2}]) == 0.25
    spec = TaskSpec(name="x", type="multiple_choice", data="x.jsonl")
    assert spec.metric == "acc"
