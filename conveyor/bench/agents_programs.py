"""The programs of `conveyor bench agents`: multi-turn client-tool conversations, each model
turn fixed in advance (the server forces its tokens, `agents_server.py`), each tool result
recorded once here so that every system under test sees the same conversation.

- BFCL v4 `multi_turn_base` (the `bfcl-eval` package's data): each user turn's ground-truth
  calls are made one per model turn (a call needs the previous one's result, as `cd` then
  `mkdir`), then a short answer; the results come from BFCL's simulated APIs (its
  `func_source_code` classes, loaded with the entry's initial state), run once at load.
- A synthetic coding-agent trace: one task, `num_turns` calls (read, search, edit, test) whose
  results add about `growth_tokens` tokens each to the conversation, then an answer.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

BFCL_SYSTEM = "You are an assistant that completes the user's requests by calling the functions offered."
CODING_SYSTEM = (
    "You are a coding agent working in a Python repository. Use the tools to read, search, edit "
    "and test the code; call one tool at a time and answer when the task is done."
)


@dataclass(frozen=True, slots=True)
class ModelTurn:
    """One request's answer: the text the model is forced to write and the calls in it, with
    the results the client sends back (one per call)."""

    text: str
    calls: tuple[tuple[str, str], ...] = ()  # (name, arguments as JSON)
    results: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Episode:
    """A user message and the model turns that serve it (calls, then an answer)."""

    user: str
    turns: tuple[ModelTurn, ...]


@dataclass(frozen=True, slots=True)
class AgentProgram:
    program_id: str
    kind: str  # "bfcl" or "coding"
    system: str
    tools: tuple[dict, ...]
    episodes: tuple[Episode, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(e.turns) for e in self.episodes)

    def script(self) -> list[str]:
        """The model's texts in request order: what the replay server forces."""
        return [t.text for e in self.episodes for t in e.turns]


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call as Qwen2.5 / Hermes models write it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# ---- BFCL ------------------------------------------------------------------------------------
def bfcl_programs(num: int, only_called_tools: bool = False, first: int = 0) -> list[AgentProgram]:
    """`num` programs of BFCL v4 multi_turn_base from entry `first` on. `only_called_tools`
    offers only the functions the ground truth calls (a shorter prompt, for --quick)."""
    data = resources.files("bfcl_eval") / "data"
    entries = _jsonl((data / "BFCL_v4_multi_turn_base.json").read_text())[first : first + num]
    answers = {
        a["id"]: a["ground_truth"]
        for a in _jsonl((data / "possible_answer" / "BFCL_v4_multi_turn_base.json").read_text())
    }
    return [_bfcl_program(e, answers[e["id"]], only_called_tools) for e in entries]


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _bfcl_program(entry: dict, truth: list[list[str]], only_called: bool) -> AgentProgram:
    instances = _bfcl_instances(entry)
    methods = {name: m for inst in instances.values() for name, m in _public_methods(inst)}
    episodes = []
    for question, calls in zip(entry["question"], truth, strict=True):
        turns = []
        for source in calls:
            name, arguments = _parse_call(source, methods)
            turns.append(
                ModelTurn(
                    call_text(name, arguments),
                    ((name, json.dumps(arguments)),),
                    (_run(methods[name], arguments),),
                )
            )
        names = ", ".join(dict.fromkeys(_parse_call(c, methods)[0] for c in calls)) or "nothing"
        turns.append(ModelTurn(f"Done: I called {names}."))
        episodes.append(
            Episode(" ".join(m["content"] for m in question if m["role"] == "user"), tuple(turns))
        )
    called = {name for e in episodes for t in e.turns for name, _ in t.calls}
    tools = tuple(
        spec
        for cls in entry["involved_classes"]
        for spec in _bfcl_specs(cls)
        if not only_called or spec["function"]["name"] in called
    )
    return AgentProgram(entry["id"], "bfcl", BFCL_SYSTEM, tools, tuple(episodes))


def _bfcl_instances(entry: dict) -> dict[str, Any]:
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES

    instances = {}
    for cls in entry["involved_classes"]:
        instance = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[cls]), cls)()
        if cls not in STATELESS_CLASSES:
            instance._load_scenario(copy.deepcopy(entry["initial_config"].get(cls, {})), long_context=False)
        instances[cls] = instance
    return instances


def _public_methods(instance: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in inspect.getmembers(instance, inspect.ismethod) if not n.startswith("_")]


def _parse_call(source: str, methods: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ground-truth call `f(a, b=1)` as (name, keyword arguments): literals only, positional
    arguments named by the simulated API's signature."""
    call = ast.parse(source.strip(), mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ValueError(f"not a plain call: {source!r}")
    name = call.func.id
    params = list(inspect.signature(methods[name]).parameters)
    arguments = {params[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
    arguments.update({k.arg: ast.literal_eval(k.value) for k in call.keywords})
    return name, arguments


def _run(method: Any, arguments: dict[str, Any]) -> str:
    try:
        result = method(**arguments)
    except Exception as e:  # noqa: BLE001 - the simulated API's own error is the tool result, as in BFCL
        return f"Error during execution: {e}"
    return json.dumps(result, default=str) if isinstance(result, (dict, list)) else str(result)


def _bfcl_specs(cls: str) -> list[dict]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    path = (
        resources.files("bfcl_eval") / "data" / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]
    )
    specs = []
    for doc in _jsonl(path.read_text()):
        parameters = _json_schema(doc["parameters"])
        specs.append(
            {
                "type": "function",
                "function": {
                    "name": doc["name"],
                    "description": doc["description"],
                    "parameters": parameters,
                },
            }
        )
    return specs


_TYPES = {
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "int": "integer",
    "str": "string",
    "bool": "boolean",
}


def _json_schema(schema: Any) -> Any:
    """BFCL's Python-flavoured parameter types as JSON schema types."""
    if isinstance(schema, list):
        return [_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _json_schema(v) for k, v in schema.items() if k != "type"}
    kind = schema.get("type")
    if isinstance(kind, str) and kind != "any":
        out["type"] = _TYPES.get(kind, kind)
    return out


# ---- the synthetic coding agent --------------------------------------------------------------
CODING_TOOLS = tuple(
    {
        "type": "function",
        "function": {
            "name": name,
            "description": text,
            "parameters": {"type": "object", "properties": props, "required": list(props)},
        },
    }
    for name, text, props in (
        ("read_file", "Read a file of the repository.", {"path": {"type": "string"}}),
        ("search", "Search the repository for a pattern.", {"pattern": {"type": "string"}}),
        (
            "edit_file",
            "Replace one line of a file.",
            {"path": {"type": "string"}, "line": {"type": "integer"}, "text": {"type": "string"}},
        ),
        ("run_tests", "Run the test suite, or one test file.", {"path": {"type": "string"}}),
    )
)


def coding_program(
    program_id: str, num_turns: int = 32, growth_tokens: int = 200, seed: int = 0
) -> AgentProgram:
    """One coding task of `num_turns` tool calls; each result is synthetic code or test
    output of about `growth_tokens` tokens (about 3.5 characters a token), seeded."""
    rng = random.Random(seed)
    turns = []
    for i in range(num_turns):
        name = ("read_file", "search", "edit_file", "run_tests")[i % 4]
        path = f"src/module_{rng.randrange(40)}.py"
        arguments = {
            "read_file": {"path": path},
            "search": {"pattern": f"def handler_{rng.randrange(100)}"},
            "edit_file": {
                "path": path,
                "line": rng.randrange(1, 200),
                "text": f"    return value * {rng.randrange(9)}",
            },
            "run_tests": {"path": f"tests/test_module_{rng.randrange(40)}.py"},
        }[name]
        result = _code_lines(rng, int(growth_tokens * 3.5))
        turns.append(ModelTurn(call_text(name, arguments), ((name, json.dumps(arguments)),), (result,)))
    turns.append(ModelTurn("The failing test passes now: the handler returned the wrong scale."))
    task = "The test tests/test_module_7.py fails after the last refactoring. Find the cause and fix it."
    return AgentProgram(program_id, "coding", CODING_SYSTEM, CODING_TOOLS, (Episode(task, tuple(turns)),))


def _code_lines(rng: random.Random, num_chars: int) -> str:
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < num_chars:
        n = rng.randrange(1000)
        lines += [
            f"def handler_{n}(value, scale={rng.randrange(9)}):",
            f"    return value * scale + {rng.randrange(100)}",
        ]
    return "\n".join(lines)
