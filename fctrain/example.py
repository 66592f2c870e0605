"""The Example: one function-calling task (a conversation, its tools, the right calls), shared by every module.

    ex = Example.from_json(line)           # validated: roles, tool schemas, ground truth shape
    line = ex.to_json()

A leaf module (no fctrain import), so the loaders (fctrain.data), the reward and the prompts all import it
without importing each other. No torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    id: str
    category: str                 # BFCL category name; decides how `reward.check` matches calls
    messages: list[dict]          # [{"role": "user"|"assistant"|"system", "content": str}]
    tools: list[dict]             # BFCL function schemas {"name", "description", "parameters": {"type": "dict", ...}}
    ground_truth: list[dict] = field(default_factory=list)  # [{name: {param: [allowed values]}}]; "" = may omit
    think: str | None = None      # optional reasoning before the answer (SFT with --sft_think data), e.g. the
                                  # model's own (benchmarks/bench_self_think.py); never shown in the prompt

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["think"] is None:  # rows without one keep the format they always had
            del d["think"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Any) -> "Example":
        if not isinstance(obj, dict):
            raise ValueError(f"example must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("id", "category", "messages", "tools") if k not in obj]
        if missing:
            raise ValueError(f"example lacks {missing}")
        extra = set(obj) - {"id", "category", "messages", "tools", "ground_truth", "think"}
        if extra:
            raise ValueError(f"unknown example keys {sorted(extra)}")
        ex = cls(str(obj["id"]), obj["category"], obj["messages"], obj["tools"], obj.get("ground_truth", []),
                 obj.get("think"))
        if not isinstance(ex.category, str):
            raise ValueError("category must be a string")
        if ex.think is not None and (not isinstance(ex.think, str) or "<think>" in ex.think or "</think>" in ex.think):
            raise ValueError("think must be a string without <think> / </think> tags")
        if not isinstance(ex.messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in ex.messages):
            raise ValueError(f"messages must be a list of {{role in {ROLES}, content: str}}")
        if not isinstance(ex.tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                     for t in ex.tools):
            raise ValueError("tools must be a list of objects with a string 'name'")
        for t in ex.tools:  # the prompt, target and reward read these: a broken schema is a broken row
            params = t.get("parameters")
            if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
                raise ValueError(f"tool {t['name'][:60]!r}: parameters must be an object with object 'properties'")
            if _depth(params) > MAX_SCHEMA_DEPTH:
                raise ValueError(f"tool {t['name'][:60]!r}: schema nested deeper than {MAX_SCHEMA_DEPTH}")
        if not isinstance(ex.ground_truth, list) or not all(
                isinstance(c, dict) and len(c) == 1 and isinstance(next(iter(c.values())), dict)
                for c in ex.ground_truth):
            raise ValueError("ground_truth must be a list of {name: {param: [allowed values]}}")
        return ex

    @classmethod
    def from_json(cls, obj: str | dict) -> "Example":
        return cls.from_dict(json.loads(obj) if isinstance(obj, str) else obj)


MAX_SCHEMA_DEPTH = 32  # JSON levels in a tool's parameters; deeper ones are refused (other modules walk them recursively)


def _depth(value, limit: int = MAX_SCHEMA_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted no further than `limit` (iteratively: no recursion limit)."""
    depth, level = 0, [value]
    while level and depth < limit:
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        depth += 1
    return depth

