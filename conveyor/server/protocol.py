"""OpenAI protocol models (pydantic): what the server accepts, checked before anything reaches
the engine. Only the fields Conveyor serves are declared; unknown fields are ignored, as
OpenAI's own server does for fields it does not know. Types are strict: `"max_tokens": "10"`
or `"stream": "yes"` is a 400, not coerced. Every string must be valid Unicode and nesting,
schemas and call arguments are bounded (`limits.py`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conveyor.core.request import MAX_LOGPROBS
from conveyor.server.limits import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOOLS,
    InputRejected,
    check_schema,
    check_value,
    decode_arguments,
)
from conveyor.server.unserved import check_served
from conveyor.tools.json_schema import unsupported_keyword

MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's bound)
MAX_SESSION_CHARS = 512  # a session id (`user`, `metadata.session_id`, the X-Session-Id header)
MIN_TOP_P = 1e-6  # below 1 / vocabulary size for any vocabulary under a million tokens


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_schema(schema)
        return schema


class ToolSpec(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(_Model):
    name: str
    arguments: str = "{}"

    @field_validator("arguments")
    @classmethod
    def _bounded(cls, arguments: str) -> str:
        decode_arguments(arguments)
        return arguments

    @property
    def decoded(self) -> Any:
        """The arguments as a JSON value (templates print them as JSON), or the raw string."""
        return decode_arguments(self.arguments)


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _served_fields(cls, message: Any) -> Any:
        """History fields of OpenAI's messages that are not served are named, not dropped."""
        for key in ("function_call", "audio", "refusal"):
            if isinstance(message, dict) and message.get(key) is not None:
                raise ValueError(
                    f"{key} in a message is not served (send tool_calls, or the text as content)"
                )
        return message

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        """Only text parts are served: anything else is named here, so the 400 names the message."""
        for i, part in enumerate(content if isinstance(content, list) else []):
            if part.get("type") != "text":
                raise ValueError(
                    f"only text content parts are supported; part {i} has type {part.get('type')!r}"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"text part {i} has no 'text' string")
        return content


class JsonSchemaSpec(_Model):
    """`response_format.json_schema`: the reply's schema. It is always enforced (`strict` or
    not); a keyword the grammar cannot enforce is refused, named (`tools/json_schema.py`)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _enforceable(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_schema(schema)
        found = unsupported_keyword(schema)
        if found is not None:
            keyword, where = found
            raise ValueError(f"the JSON schema keyword {keyword!r} (at {where}) is not supported")
        return schema


class TextFormat(_Model):
    type: Literal["text"]


class JsonObjectFormat(_Model):
    type: Literal["json_object"]


class JsonSchemaFormat(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Model):
    include_usage: bool = False
    include_obfuscation: bool = False

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool) -> bool:
        if value:
            raise ValueError("stream obfuscation is not served")
        return value


class _Sampling(_Model):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)  # at most ServerConfig.max_n (checked by the route)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(
        default=None, max_length=MAX_SESSION_CHARS
    )  # names the session when nothing else does

    @model_validator(mode="before")
    @classmethod
    def _valid_text_and_depth(cls, body: Any) -> Any:
        """Lone surrogates anywhere and excessive nesting are refused before field validation
        (InputRejected names the path; see limits.py)."""
        check_value(body)
        return body

    @model_validator(mode="before")
    @classmethod
    def _served(cls, body: Any) -> Any:
        check_served(body, cls.model_fields)
        return body

    @field_validator("stop")
    @classmethod
    def _short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """Every stop string is matched after each token: their number and length are bounded."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, not {len(stops)}")
        for s in stops:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string has {len(s)} characters; the limit is {MAX_STOP_CHARS}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids written as decimal strings, biases in [-100, 100] (as OpenAI's)."""
        for key, value in (bias or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise ValueError(
                    f"logit_bias maps token ids to biases in [-100, 100]; not {key!r}: {value!r}"
                )
        return bias

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def limit_param(self) -> str:
        """The field that set `token_limit` (named by errors)."""
        return "max_tokens"

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def engine_params(self, max_tokens: int) -> dict[str, Any]:
        """The engine's sampling params. A top_p below MIN_TOP_P is raised to it: the nucleus is
        then still exactly the most likely token (its probability is at least 1/vocabulary),
        while a value that rounds to 0 in float32 would leave no token at all."""
        return {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": max(self.top_p, MIN_TOP_P),
            "seed": self.seed,
            "stop": self.stops,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "logit_bias": tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
        }


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    lenient_tool_calls: bool = False  # Conveyor's extension: also read calls in ```json fences and bare JSON
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    # OpenAI's tags on a completion; Conveyor reads `session_id` (the program this turn belongs to)
    # and `tool_time_s`; other keys are the client's own labels
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _tags(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        """OpenAI's bounds (keys up to 64 characters, values up to 512); `tool_time_s`: the
        client's estimate of its tools' time after this turn (how long the server keeps the
        conversation's KV)."""
        for key, value in (metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"metadata {key[:64]!r}: keys take at most 64 characters, values 512")
        value = (metadata or {}).get("tool_time_s")
        if value is not None and _seconds(value) is None:
            raise ValueError(f"metadata.tool_time_s must be a number of seconds >= 0, got {value!r}")
        return metadata

    @property
    def tool_time_s(self) -> float | None:
        value = (self.metadata or {}).get("tool_time_s")
        return None if value is None else _seconds(value)

    @model_validator(mode="after")
    def _check_tool_choice(self) -> ChatCompletionRequest:
        """A named tool_choice must name one of the request's tools (or a server tool: checked later)."""
        if self.tool_choice in ("required",) and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InputRejected("top_logprobs", "needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """The engine's `logprobs`: None, or how many alternatives to report per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def reply_schema(self) -> dict[str, Any] | None:
        """The JSON schema the reply must fit (`response_format`), None for free text."""
        if isinstance(self.response_format, JsonObjectFormat):
            return {"type": "object"}
        if isinstance(self.response_format, JsonSchemaFormat):
            return self.response_format.json_schema.schema_
        return None

    @property
    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check_prompts(self) -> CompletionRequest:
        """A batch has at least one prompt, none empty; `echo` repeats text, so it needs text
        prompts; the prompts' logprobs are not computed, so `echo` with `logprobs` is refused."""
        if any(len(p) == 0 for p in self.prompts):
            raise InputRejected("prompt", "every prompt needs at least one character or token")
        if self.echo and not all(isinstance(p, str) for p in self.prompts):
            raise InputRejected("echo", "needs text prompts, not token ids")
        if self.echo and self.logprobs is not None:
            raise InputRejected("echo", "with logprobs: the prompt's logprobs are not computed")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt per entry (a single text or token-id list is a batch of one)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value < 1e6 else None  # NaN and inf fail the comparison too


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as chat-template dicts: text parts joined, tool-call arguments decoded to
    objects (templates print them as JSON), no None contents."""
    out = []
    for m in messages:
        item: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _text(m.content),
        }
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.decoded},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.name:
            item["name"] = m.name
        out.append(item)
    return out


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content)  # text parts only (Message._text_parts)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
