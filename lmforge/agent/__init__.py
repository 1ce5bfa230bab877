"""Tool-using agents: typed Python functions as tools, a step-limited loop over the in-process engine or any
OpenAI-compatible endpoint, built-in calculator / read_file / knowledge-base search, traces.

    from lmforge.agent import Agent, EngineBackend, OpenAIBackend, calculator

    agent = Agent(OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1"), tools=[calculator], max_steps=5)
    for ev in agent.stream("What is 17 * 23?"):
        ...                                   # step / delta / tool_call / tool_result / final
    result = agent.run("What is 17 * 23?")  # AgentResult: answer, stop_reason, messages, trace
"""

from lmforge.agent.backends import EngineBackend, ModelBackend, ModelError, ModelTurn, OpenAIBackend, ScriptedModel
from lmforge.agent.builtin import calculator, knowledge_base_tool, read_file_tool
from lmforge.agent.loop import Agent, AgentEvent, AgentResult
from lmforge.agent.mcp_client import MCPError, MCPTools
from lmforge.agent.tools import Call, CallResult, FunctionTool, run_calls, tool

__all__ = ["Agent", "AgentEvent", "AgentResult", "Call", "CallResult", "EngineBackend", "FunctionTool",
           "MCPError", "MCPTools", "ModelBackend", "ModelError", "ModelTurn", "OpenAIBackend", "ScriptedModel",
           "calculator",
           "knowledge_base_tool", "read_file_tool", "run_calls", "tool"]
