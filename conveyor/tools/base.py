"""The tool interface, side-effect classes, schemas from typed signatures, and the registry.

A tool sees one call through hooks, in this order: `start` (its name is known), then
`on_field` / `on_line` as pieces of the call complete in the stream (partial mode; in lazy
mode they all arrive at the call's end), then `finish(args)` with the whole parsed
arguments, or `cancel()` when the request is aborted or the call is cut off. Hooks run in a
worker process (`workers.py`), on a fresh copy of the registered tool per call
(`Tool.for_call`), so they may keep per-call state in attributes.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

SideEffects = Literal["none", "idempotent", "external"]
SIDE_EFFECTS: tuple[str, ...] = ("none", "idempotent", "external")


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a tool knows about the call it serves."""

    call_id: str
    name: str
    request_id: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of one call, as it goes back to the model (`content`) plus timings.

    Times are `time.perf_counter()` values (CLOCK_MONOTONIC, comparable across processes on
    Linux): `started_at` when the worker ran `start`, `done_at` when the result was ready.
    `hook_delays_s`: for each field/line hook, the time from the parser event to the hook
    running; `hook_queued_s`: of that, the time its worker was still busy with the call's
    earlier hooks (e.g. the previous statement of a program), so the delay less this is the
    dispatch latency. `rejected`: an `on_field`/`on_line` hook cut the call off.
    """

    call_id: str
    name: str
    content: str
    is_error: bool = False
    rejected: bool = False
    started_at: float = 0.0
    done_at: float = 0.0
    hook_delays_s: tuple[float, ...] = ()
    hook_queued_s: tuple[float, ...] = ()


@dataclass(slots=True)
class Call:
    """One call of a turn: where it stands and what it produced."""

    index: int
    call_id: str
    name: str
    tool: Tool | None
    held: list[tuple[str, Any, Any, float]] = field(default_factory=list)  # events not yet sent
    args: dict | None = None
    dispatched: bool = False
    ended: bool = False
    result: ToolResult | None = None
    ended_at: float = 0.0


class ToolRejected(Exception):
    """Raised by `on_field` / `on_line` to cut the call off at once; the message becomes the
    call's result, so the model can correct itself."""


class Tool:
    """Base class of tools with partial execution. Subclasses set the class attributes and
    override the hooks they need; `finish` is the only one that must do something.

    `side_effects`: "none" (pure, or effects confined to its worker and temp dir),
    "idempotent" (repeating it is harmless) or "external" (the default: it changes the world,
    so it never starts before the call is complete and the model's turn ended cleanly).
    `body_field`: for tools whose call arrives as a body of lines (a ```python fence, a plan),
    the argument that holds the whole body.
    `cpu_bound`: its hooks mostly compute (the default) rather than wait on the network; on
    CPU the forward pass leaves a core to a worker that just began one of its hooks, until
    the worker's CPU time shows what it does.
    Sandbox (`sandbox.py`): `network`: its workers share the host's network (others have none);
    `read_paths`: files or directories it reads beyond Python's and its module's;
    `requires_isolation`: it runs code the model wrote, so it refuses to start where the
    sandbox lacks a required layer (unless --unsafe-tools).
    """

    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    side_effects: SideEffects = "external"
    body_field: str | None = None
    cpu_bound: bool = True
    network: bool = False
    read_paths: tuple[str, ...] = ()
    requires_isolation: bool = False

    def for_call(self) -> Tool:
        """The instance that serves one call (a shallow copy: shared setup stays shared)."""
        return copy.copy(self)

    def start(self, call: CallInfo) -> None:
        """The call's tool name is decoded: warm up (connect, open, prepare)."""

    def on_field(self, key: str, value: Any) -> None:
        """A top-level argument's value is complete (any JSON type). May raise ToolRejected."""

    def on_line(self, line: str) -> None:
        """A complete line (statement, plan step) of the call's body. May raise ToolRejected."""

    def finish(self, args: dict[str, Any]) -> Any:
        """The whole call is parsed; return the result (text, or any JSON-serialisable value).
        Raising an exception makes its message the call's error result."""
        raise NotImplementedError

    def cancel(self) -> None:
        """The request was aborted or the call cut off: drop partial work."""

    def spec(self) -> dict[str, Any]:
        """The OpenAI / chat-template description of this tool."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class FunctionTool(Tool):
    """A plain typed Python function as a lazy tool: all its work happens in `finish`."""

    def __init__(
        self, fn: Callable[..., Any], *, name: str | None = None, side_effects: SideEffects = "external"
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.description, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
        self.parameters = schema_from_signature(fn, arg_docs)
        self.side_effects = _check_side_effects(side_effects)

    def finish(self, args: dict[str, Any]) -> Any:
        return self.fn(**args)


def tool(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, side_effects: SideEffects = "external"
) -> Any:
    """Decorator: `@tool` or `@tool(side_effects="none")` turns a typed function into a FunctionTool."""
    if fn is None:
        return lambda f: FunctionTool(f, name=name, side_effects=side_effects)
    return FunctionTool(fn, name=name, side_effects=side_effects)


# ---- JSON schema from a typed signature -------------------------------------------------------
_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
    dict: {"type": "object"},
    list: {"type": "array"},
}


def json_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of a type annotation: scalars, list[X], dict[str, X], X | None, Literal[...]."""
    if annotation in _SCALARS:
        return dict(_SCALARS[annotation])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset, Iterable):
        return {"type": "array", "items": json_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return (
            {"type": "object", "additionalProperties": json_schema(args[1])} if args else {"type": "object"}
        )
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [json_schema(a) for a in args]}
    raise TypeError(f"no JSON schema for the annotation {annotation!r}")


def schema_from_signature(fn: Callable[..., Any], arg_docs: dict[str, str] | None = None) -> dict[str, Any]:
    """The parameters schema of `fn`: every parameter must be annotated; those without a
    default are required."""
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {fn.__name__}: *args and **kwargs cannot be described to a model")
        if p.name not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {p.name!r} needs a type annotation")
        prop = json_schema(hints[p.name])
        if arg_docs and p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        else:
            prop["default"] = p.default
        properties[p.name] = prop
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_ARG_LINE = re.compile(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Summary and per-argument descriptions of a Google-style docstring ("Args:" section)."""
    summary, _, rest = doc.partition("\nArgs:")
    arg_docs: dict[str, str] = {}
    for line in rest.splitlines():
        match = _ARG_LINE.match(line)
        if match:
            arg_docs[match.group(1)] = match.group(2).strip()
        elif line.strip() and not line.startswith((" ", "\t")):
            break
    return " ".join(summary.split()), arg_docs


def _check_side_effects(value: str) -> SideEffects:
    if value not in SIDE_EFFECTS:
        raise ValueError(f"side_effects must be one of {', '.join(SIDE_EFFECTS)}, got {value!r}")
    return value  # type: ignore[return-value]


# ---- registry ---------------------------------------------------------------------------------
class ToolRegistry:
    """Tools by name. Register Tool instances, typed functions, or `module:object` specs."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any] | str] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, item: Tool | Callable[..., Any] | str) -> Tool:
        """Add a tool; a name already taken is an error."""
        t = as_tool(load_spec(item) if isinstance(item, str) else item)
        if not t.name or not re.fullmatch(r"[A-Za-z_][\w.-]*", t.name):
            raise ValueError(f"tool name {t.name!r} must be an identifier")
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        _check_side_effects(t.side_effects)
        json.dumps(t.parameters)  # schemas must be plain JSON
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI tool specs, for the chat template and the grammar."""
        chosen = self._tools if names is None else {n: self._tools[n] for n in names}
        return [t.spec() for t in chosen.values()]


def as_tool(obj: Any) -> Tool:
    """A Tool instance as is; a Tool subclass instantiated; a plain function wrapped lazily."""
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, type) and issubclass(obj, Tool):
        return obj()
    if callable(obj):
        return FunctionTool(obj)
    raise TypeError(f"cannot make a tool of {obj!r}")


def load_spec(spec: str) -> Any:
    """Resolve a built-in tool name (python, sqlite, ...) or a `module:object` spec."""
    if ":" not in spec:
        from conveyor.tools.builtin import (
            BUILTIN_TOOLS,  # built-ins import only when named
        )

        if spec not in BUILTIN_TOOLS:
            raise ValueError(
                f"unknown tool {spec!r}: built-ins are {', '.join(sorted(BUILTIN_TOOLS))}; "
                f"other tools are given as module:object"
            )
        spec = BUILTIN_TOOLS[spec]
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load tool {spec!r}: {e}") from e
    return obj
