"""Built-in tools: ``calculator`` (arithmetic through ``ast``, no eval), ``read_file_tool(folder)`` (files inside one
folder only) and ``knowledge_base_tool(index)`` (search a ``lmforge rag`` index, cited chunks).  Nothing here runs
shell commands or code."""

from __future__ import annotations

import ast
import math
import operator
import os
from pathlib import Path
from typing import Any

from lmforge.agent.tools import FunctionTool

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
          "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
          "floor": math.floor, "ceil": math.ceil}
_NAMES = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000
MAX_LENGTH = 500


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords):
        return _FUNCS[node.func.id](*[_eval(a) for a in node.args])
    raise ValueError(f"unsupported expression element: {ast.unparse(node)!r} (numbers, + - * / // % **, "
                     f"parentheses, {', '.join(_NAMES)} and {', '.join(_FUNCS)}() only)")


def calculator(expression: str) -> float | int:
    """Compute the value of an arithmetic expression built from the numbers in the question.

    Args:
        expression: The arithmetic to compute, written with the question's own numbers and only + - * / // % **,
            parentheses, pi, e and the functions sqrt abs round min max log log10 exp sin cos tan floor ceil.
    """
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    value = _eval(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return value


def read_file_tool(allowed_dir: str | os.PathLike, max_chars: int = 20_000, timeout: float = 10.0) -> FunctionTool:
    """A ``read_file(path)`` tool that reads text files inside ``allowed_dir`` only: absolute paths, ``..`` and
    symlinks that lead outside are refused."""
    root = Path(allowed_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"--allow-dir {allowed_dir}: not a folder")

    def read_file(path: str) -> str:
        """Read a text file from the allowed folder.

        Args:
            path: The file's path, relative to the allowed folder.
        """
        target = (root / path).resolve()
        if target != root and root not in target.parents:
            raise PermissionError(f"path {path!r} is outside the allowed folder")
        if not target.is_file():
            raise FileNotFoundError(f"no file {path!r} in the allowed folder")
        try:
            text = target.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path!r} is not a UTF-8 text file") from None
        if len(text) > max_chars:
            text = text[:max_chars] + f"\n[... truncated: {len(text) - max_chars} more characters]"
        return text

    return FunctionTool.from_function(read_file, timeout=timeout)


def knowledge_base_tool(index: Any, k: int = 4, timeout: float = 30.0) -> FunctionTool:
    """A ``search_knowledge_base(query)`` tool over a ``lmforge rag`` index (a folder, or a loaded
    ``KnowledgeBase``): the best chunks, each with its source path, heading path and character offsets."""
    from lmforge.rag.index import KnowledgeBase

    kb = index if isinstance(index, KnowledgeBase) else KnowledgeBase.load(index)
    default_k = k

    def search_knowledge_base(query: str, k: int = default_k) -> list[dict]:
        """Search the knowledge base for passages that answer a question; each passage comes with its source
        number, file and text.

        Args:
            query: The question to answer, in the user's own words.
            k: Number of passages to return, 1 to 10.
        """
        hits = kb.search(query, k=max(1, min(int(k), 10)))
        return [{"source": i + 1, "path": h.chunk.path, "heading": " > ".join(h.chunk.heading_path),
                 "start": h.chunk.start, "end": h.chunk.end, "score": round(float(h.dense_score), 4),
                 "text": h.chunk.text} for i, h in enumerate(hits)]

    return FunctionTool.from_function(search_knowledge_base, timeout=timeout)
