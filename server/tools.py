"""Tool calls: the tools rendered for the model, its calls parsed from the output, and
`tool_choice` `required` / a named function enforced by the grammar (engine/grammar.py).

Two formats, chosen by the chat template:
- Hermes, for templates that render `tools` (Qwen2.5, Qwen3): the model writes
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, as those models are trained to.
- JSON fallback, for templates without tools (such as the default SmolLM2): a system message
  lists the tools and asks for a reply that is only `{"tool_calls": [{"name": ..., "arguments":
  {...}}]}`; an assistant's earlier calls are written back in that same shape.
A reply that does not parse as calls of the given tools is plain content.
"""

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from scheduler import InvalidRequest, StructuredOutput

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(slots=True)
class ToolPlan:
    """How one request uses its tools."""

    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}} entries
    hermes: bool  # the template renders tools (else the JSON fallback)
    choice: str  # "auto", "required", or the name of the function that must be called
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def call_opener(self) -> str:
        """How a reply that calls tools starts: until the text rules it out, streaming holds it."""
        return "<tool_call>" if self.hermes else "{"


def tool_plan(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None,
              template: str) -> ToolPlan | None:
    """Validate `tools` / `tool_choice` (400s naming them); None when no tool may be called."""
    if tool_choice not in (None, "none", "auto", "required") and not isinstance(tool_choice, dict):
        raise InvalidRequest("tool_choice must be none, auto, required or a named function", "tool_choice")
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", "tool_choice")
        return None
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                                 "tools")
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    if tool_choice == "none":
        return None
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or name not in [t["function"]["name"] for t in tools]:
            raise InvalidRequest("tool_choice must name one of the tools", "tool_choice")
        choice = name
    return ToolPlan(tools, "tools" in template, choice, parallel is not False)


def render(plan: ToolPlan, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template variables that show the model its tools."""
    if plan.hermes:
        return messages, {"tools": plan.tools}
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in plan.tools)
    instruction = (f"Tools:\n{listing}\nTo call tools, reply only with "
                   '{"tool_calls": [{"name": ..., "arguments": {...}}]}.')
    if messages and messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}"}, *messages[1:]], {}
    return [{"role": "system", "content": instruction}, *messages], {}


def history_calls(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant's earlier calls, written in the JSON fallback's shape."""
    calls = []
    for c in tool_calls:
        fn = c.get("function") or {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            pass  # kept as the string the client sent
        calls.append({"name": fn.get("name"), "arguments": args})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def constraint(plan: ToolPlan) -> StructuredOutput | None:
    """`required` or a named function: the grammar admits only calls of those tools with
    arguments that follow their schemas."""
    if plan.choice == "auto":
        return None
    tools = [t for t in plan.tools if plan.choice == "required" or t["function"]["name"] == plan.choice]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t["function"]["name"]},
                             "arguments": t["function"].get("parameters") or {"type": "object"}}}
             for t in tools]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    one = plan.choice != "required" or not plan.parallel
    if plan.hermes:
        block = f'"<tool_call>\\n" %json {json.dumps({**call, "x-guidance": JSON_LAYOUT})} "\\n</tool_call>"'
        lark = f"start: {block}" if one else f'start: call ("\\n" call)*\ncall: {block}'
        return StructuredOutput("lark", lark, "tool_choice")
    schema = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
              "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                            **({"maxItems": 1} if one else {})}}}
    return StructuredOutput("json_schema", json.dumps(schema), "tool_choice")


def parse(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) of a reply; a reply without valid calls is all content."""
    raw: list[Any] = []
    rest = text
    if plan.hermes:
        blocks = HERMES_CALL.findall(text)
        try:
            raw = [json.loads(b) for b in blocks]
        except json.JSONDecodeError:
            return text, []
        rest = HERMES_CALL.sub("", text).strip()
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        raw = value.get("tool_calls") if isinstance(value, dict) else None
        if not isinstance(raw, list):
            return text, []
        rest = ""
    calls = []
    for c in raw:
        if not isinstance(c, dict) or c.get("name") not in plan.names or not isinstance(c.get("arguments", {}), dict):
            return text, []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}),
                                                                              ensure_ascii=False)}})
    return (rest or None), calls if plan.parallel else calls[:1]
