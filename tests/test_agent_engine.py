"""The agent loop on lmforge's in-process Engine with a tiny *random* model: the tool-call grammar makes every call
the model makes parse and validate against its tool's schema, so the loop always runs to a final answer or to the
step limit, never to a crash; plus the search_knowledge_base built-in over a real `lmforge rag` index."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from test_serve import _build_serve_model

from lmforge.agent import Agent, EngineBackend, FunctionTool, calculator, knowledge_base_tool, run_calls, Call

pytest.importorskip("xgrammar")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


def lookup(order_id: int, verbose: bool = False) -> dict:
    """Look an order up.

    Args:
        order_id: The order number.
        verbose: Include the items.
    """
    return {"order_id": order_id, "status": "shipped"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent") / "tiny"
    _build_serve_model(folder, ctx=2048)
    return folder


def test_engine_agent_runs_to_an_answer_or_the_step_limit_with_valid_calls(tiny_model):
    from lmforge.serve.engine import Engine

    engine = Engine.from_folder(tiny_model, max_num_seqs=2, max_model_len=2048)
    try:
        tools = [FunctionTool.from_function(calculator), FunctionTool.from_function(lookup)]
        schemas = {t.name: t.parameters for t in tools}
        seen_calls = valid = 0
        for seed, choice in [(0, "auto"), (1, "auto"), (2, "required"), (3, "required")]:
            backend = EngineBackend(engine, temperature=1.0, max_tokens=80, seed=seed)
            result = Agent(backend, tools=tools, max_steps=3, tool_choice=choice).run("Where is order 12?")
            assert result.stop_reason in ("answer", "max_steps"), result.error
            if choice == "required":
                assert result.stop_reason == "max_steps" and result.steps == 3
            for rec in result.trace:
                if rec["type"] == "model":
                    assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] > 0
                if rec["type"] != "tool":
                    continue
                seen_calls += 1
                assert rec["name"] in schemas
                if "cut off" in (rec["error"] or ""):
                    continue  # max_tokens ended the call: reported to the model, not parsed
                jsonschema.validate(json.loads(rec["arguments"]), schemas[rec["name"]])
                valid += 1
                assert rec["error"] is None or "raised" in rec["error"], rec["error"]  # never a validation error
        assert seen_calls >= 6 and valid > 0
    finally:
        engine.shutdown()


class HashEmbedder:
    """Bag-of-words hashing embedder: deterministic, offline, no model weights."""

    name = "hash-test"
    batch_size = 64

    def embed(self, texts: list[str]) -> np.ndarray:
        from lmforge.rag.index import bm25_tokens

        out = np.zeros((len(texts), 256), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in bm25_tokens(t):
                out[i, hash(tok) % 256] += 1.0
        out += 1e-6
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_search_knowledge_base_returns_cited_chunks(tmp_path):
    from lmforge.rag.index import KnowledgeBase
    from lmforge.rag.stage import Config, build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "returns.md").write_text("# Policies\n\n## Returns\n\nItems can be returned within 30 days of delivery "
                                     "for a full refund.\n")
    (docs / "shipping.md").write_text("# Policies\n\n## Shipping\n\nOrders ship from Lyon within two working days.\n")
    emb = HashEmbedder()
    build_index(Config(docs=str(docs), chunk_tokens=64, overlap_tokens=8), tmp_path / "idx", embedder=emb)
    kb = KnowledgeBase.load(tmp_path / "idx", embedder=emb)
    t = knowledge_base_tool(kb, k=1)
    assert t.parameters["properties"]["k"]["default"] == 1
    [res] = run_calls([Call("1", "search_knowledge_base", json.dumps({"query": "returned refund days"}))],
                      {t.name: t})
    [hit] = json.loads(res.content)
    assert hit["path"] == "returns.md" and hit["heading"].endswith("Returns") and "30 days" in hit["text"]
    assert hit["source"] == 1 and 0 <= hit["start"] < hit["end"]
    # what the model reads: every parameter described, the query as the question itself (SmolLM2 copied the old
    # "What to look for." into the query verbatim)
    props = t.parameters["properties"]
    assert "question" in props["query"]["description"] and "What to look for" not in props["query"]["description"]
    assert props["k"]["description"] and "question" in t.description


def test_cli_with_an_in_process_model(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    res = CliRunner().invoke(app, ["agent", "What is 2+2?", "--model", str(tiny_model), "--tools", "calculator",
                                   "--max-steps", "2", "--max-tokens", "24", "--max-model-len", "2048",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "[step 1]" in res.output
    assert "[answer: " in res.output or "[max_steps: 2 step(s)" in res.output
    recs = [json.loads(x) for x in (tmp_path / "run" / "trace.jsonl").read_text().splitlines()]
    assert recs[0]["type"] == "model" and recs[0]["prompt_tokens"] > 0 and recs[-1]["type"] in ("answer", "stop")
    # a recorded run: its manifest holds the outcome and the registry links it to the model it used
    from lmforge import registry

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["steps"] in (1, 2)
    tree = registry.lineage(tmp_path / "run")
    assert tree["stage"] == "agent" and tree["inputs"]["model"]["path"] == str(tiny_model.resolve())
    shown = CliRunner().invoke(app, ["agent-trace", str(tmp_path / "run")])
    assert shown.exit_code == 0 and shown.output.startswith("step 1  model ")


def test_openai_backend_against_our_own_server(tiny_model):
    """The agent's OpenAI path against a real `lmforge serve` (tools through the HTTP API): the server's grammar makes
    every call validate, the loop runs to an answer or the step limit."""
    from lmforge.agent import OpenAIBackend
    from lmforge.serve.engine import Engine
    from lmforge.serve.smoke import running_server

    engine = Engine.from_folder(tiny_model, max_num_seqs=2, max_model_len=2048)
    try:
        with running_server(engine, "tiny") as url:
            tools = [FunctionTool.from_function(calculator), FunctionTool.from_function(lookup)]
            schemas = {t.name: t.parameters for t in tools}
            backend = OpenAIBackend("tiny", base_url=url, temperature=1.0, max_tokens=80)
            result = Agent(backend, tools=tools, max_steps=2, tool_choice="required").run("Where is order 12?")
            assert result.stop_reason == "max_steps", result.error
            calls = [r for r in result.trace if r["type"] == "tool"]
            assert calls
            for rec in calls:
                try:
                    args = json.loads(rec["arguments"])
                except ValueError:  # a call cut off by max_tokens: reported back to the model, never run
                    assert rec["error"], rec
                    continue
                jsonschema.validate(args, schemas[rec["name"]])  # the server's grammar: never an invalid call
    finally:
        engine.shutdown()
