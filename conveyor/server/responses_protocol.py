"""The Responses API's request models (pydantic) and its input items as chat messages.

A request is checked before anything reaches the engine, as the chat request is
(`protocol.py`: strict types, valid Unicode, bounded nesting), with one difference: the
Responses API has many fields Conveyor does not serve (hosted tools, reasoning, background
runs, ...). A field outside `SERVED` that is set to anything but null (or its neutral value,
`NEUTRAL`) is a 400 naming it, never silently dropped.

Input items: messages (`input_text` / `output_text` parts), `function_call`,
`function_call_output`, and `mcp_call`, the item type the server's own tool calls come back
as (see `responses.py`), so that a client may send our output back as input.
`response_items.items_to_messages` turns them into the chat messages the engine renders.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from conveyor.server.limits import MAX_TOOLS, InputRejected, check_schema, check_value, decode_arguments

SERVER_LABEL = "conveyor"  # `server_label` of the server's tool calls (`mcp_call` items)

# request fields served; any other one must be absent, null or its NEUTRAL value
SERVED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "store",
        "previous_response_id",
        "stream",
        "metadata",
    }
)
# values that ask for what the server does anyway: `include` nothing extra, no truncation
# (a prompt past the context is a 400), no stream obfuscation
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "include": ([],),
    "truncation": ("disabled",),
    "stream_options": ({"include_obfuscation": False},),
}


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Model):
    """A text content part; other part types (images, files, refusals) are a 400 naming them."""

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return joined(self.content)


class FunctionCallItem(_Model):
    """A call of a client tool (our output, sent back by the client with its output)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _bounded(cls, arguments: str) -> str:
        decode_arguments(arguments)
        return arguments


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[TextPart]


class ServerCallItem(_Model):
    """A server tool's call with its output, as we returned it (`mcp_call`)."""

    type: Literal["mcp_call"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    output: str | None = None

    @field_validator("arguments")
    @classmethod
    def _bounded(cls, arguments: str) -> str:
        decode_arguments(arguments)
        return arguments


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ServerCallItem, Discriminator("type")
]
ITEMS = TypeAdapter(list[InputItem])


class FunctionTool(_Model):
    """A client tool. `strict` is accepted: arguments are checked against `parameters` by the
    engine, and follow it token by token where constrained decoding is on (`--constrained`)."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_schema(schema)
        return schema

    def chat_spec(self) -> dict[str, Any]:
        """The tool as a chat completions tool."""
        parameters = self.parameters or {"type": "object", "properties": {}}
        function = {"name": self.name, "description": self.description or "", "parameters": parameters}
        return {"type": "function", "function": function}


class NamedFunction(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    """`text.format`: plain text, or a structured reply enforced as chat's `response_format` is."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def response_format(self) -> dict[str, Any] | None:
        """Chat's `response_format` for this format (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec = {
            "name": self.name,
            "schema": self.schema_,
            "strict": self.strict,
            "description": self.description,
        }
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: None = None  # only null: the model's output length is not steered


class ResponsesRequest(_Model):
    """`POST /v1/responses`. See the module docstring for what is refused."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @model_validator(mode="before")
    @classmethod
    def _served_fields_only(cls, body: Any) -> Any:
        """Valid Unicode and bounded nesting (as on every route), then a 400 naming the first
        field set that is not served; message items may omit their `type`."""
        check_value(body)
        if not isinstance(body, dict):
            return body
        for key, value in body.items():
            if key not in SERVED and value is not None and value not in NEUTRAL.get(key, ()):
                raise InputRejected(
                    key, f"{key!r} is not supported by this server (set it to null or omit it)"
                )
        items = body.get("input")
        if isinstance(items, list):
            body = {**body, "input": [_typed(item, f"input.{i}") for i, item in enumerate(items)]}
        return body

    @field_validator("metadata")
    @classmethod
    def _short_metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        """OpenAI's bounds: keys up to 64 characters, values up to 512 (it is stored and echoed)."""
        for key, value in (metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"metadata key {key[:64]!r}: keys have at most 64 characters, values 512")
        return metadata

    @model_validator(mode="after")
    def _choice_has_tools(self) -> ResponsesRequest:
        if self.tool_choice == "required" and not self.tools:
            raise InputRejected("tool_choice", "tool_choice 'required' needs tools")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_output_tokens

    @property
    def limit_param(self) -> str:
        return "max_output_tokens"

    @property
    def items(self) -> list[Any]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return self.input


ITEM_TYPES = ("message", "function_call", "function_call_output", "mcp_call")
PART_TYPES = ("input_text", "output_text", "text")


def _typed(item: Any, where: str) -> Any:
    """A message item may come without `"type": "message"` (the easy form); an item or content
    part of a type not served is refused here, naming it (a union's errors would not)."""
    if not isinstance(item, dict):
        return item
    if "type" not in item and "role" in item:
        item = {**item, "type": "message"}
    if item.get("type") not in ITEM_TYPES:
        raise InputRejected(f"{where}.type", f"input items of type {item.get('type')!r} are not supported")
    key = "output" if item["type"] == "function_call_output" else "content"
    for j, part in enumerate(item.get(key) if isinstance(item.get(key), list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise InputRejected(
                f"{where}.{key}.{j}.type", f"only text content parts are supported, not {kind!r}"
            )
    return item


def joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)
