"""Frozen configuration dataclasses; the CLI generates its flags from them.

Each field's ``metadata["help"]`` becomes the flag's help text, the field name
becomes ``--field-name`` and the default and type come from the annotation.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_type_hints

T = TypeVar("T")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _require(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class InterceptPolicy(enum.StrEnum):
    """What happens to the KV of a request waiting on a tool (core/intercept.py)."""

    PRESERVE = "preserve"
    DISCARD = "discard"
    SWAP = "swap"
    AUTO = "auto"
    NEW_REQUEST = "new-request"


INTERCEPT_HELP = {
    InterceptPolicy.PRESERVE: "keep; when blocks run out the newest is dropped",
    InterceptPolicy.DISCARD: "recompute on resume",
    InterceptPolicy.SWAP: "to host memory",
    InterceptPolicy.AUTO: "least waste per request, InferCept",
    InterceptPolicy.NEW_REQUEST: "today's servers: the continuation is a new request, last in line, helped only by the prefix cache",
}


class SchedulePolicy(enum.StrEnum):
    """Which waiting request goes first (core/programs.py)."""

    FCFS = "fcfs"
    PROGRAM_FCFS = "program-fcfs"
    LAS = "las"


SCHEDULE_HELP = {
    SchedulePolicy.FCFS: "each request by its own arrival: a follow-up turn queues behind newer work",
    SchedulePolicy.PROGRAM_FCFS: "a session's turns keep the arrival of its first request, Continuum",
    SchedulePolicy.LAS: "the session with the least service so far (tokens prefilled and decoded) first, "
    "Autellix; a request waiting past --starvation-s goes ahead",
}


def _one_of(items: list[str]) -> str:
    return f"{', '.join(items[:-1])} or {items[-1]}"


def _choices_help(intro: str, helps: dict[Any, str]) -> str:
    """A flag's help text listing its choices from their registry."""
    return f"{intro}: " + _one_of([f"{name} ({text})" if text else str(name) for name, text in helps.items()])


LINEAR_KERNELS = ("auto", "avx2", "avx512", "avx512bf16", "onednn", "torch")
WEIGHTS = ("auto", "native", "bf16")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str = field(
        default="default",
        metadata=_help(
            "'default' (Qwen2.5-Coder-0.5B-Instruct, installed on first use), a GGUF file "
            "or a Hugging Face safetensors directory"
        ),
    )
    device: str = field(default="cpu", metadata=_help("torch device: cpu or cuda"))
    dtype: str = field(
        default="bfloat16", metadata=_help("weights and KV cache dtype: bfloat16, float16 or float32")
    )
    max_model_len: int = field(
        default=4096, metadata=_help("longest prompt plus output, capped by the model's own limit")
    )
    num_threads: int = field(default=0, metadata=_help("CPU threads for torch; 0 keeps torch's choice"))
    linear_kernel: str = field(
        default="auto",
        metadata=_help(
            "CPU matmul path: auto (the fastest per weight shape and row count, measured at load and cached), "
            "or one of avx2, avx512, avx512bf16 (our kernels), onednn (fp32-packed weights), torch (F.linear)"
        ),
    )
    weights: str = field(
        default="auto",
        metadata=_help(
            "GGUF models: native (Q4_K/Q5_K/Q6_K/Q8_0 blocks kept as in the file, Q4_0/Q5_0 as Q8_0; CPU only), "
            "bf16 (de-quantized once into bf16 safetensors, then run in --dtype) or auto (native on CPU where the "
            "quantized kernels build, else bf16); safetensors models are always run as stored"
        ),
    )
    quant_kernel: str = field(
        default="auto",
        metadata=_help(
            "matmul path of quantized weights: auto (measured per shape and row count among the paths that "
            "--quant-activations allows, cached), dequant (de-quantize tiles, then the fp32 GEMM) or one of the "
            "quantized kernels (q_avx2, q_avx512 with fp32 activations; q_avx512vnni, q_vnni_x16 with 8-bit ones)"
        ),
    )
    quant_activations: str = field(
        default="int8",
        metadata=_help(
            "what quantized weights multiply under --quant-kernel auto: int8 (activations rounded to 8 bits per "
            "block of 32, as llama.cpp does; kernels of both kinds compete) or fp32 (only kernels that take "
            "the activations as they are)"
        ),
    )

    def __post_init__(self) -> None:
        _require(
            [
                (
                    self.device.split(":")[0] in ("cpu", "cuda"),
                    f"device must be cpu or cuda, got {self.device!r}",
                ),
                (
                    self.weights in WEIGHTS,
                    f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}",
                ),
                (
                    self.quant_kernel == "auto"
                    or self.quant_kernel == "dequant"
                    or self.quant_kernel.startswith("q_"),
                    f"quant_kernel must be auto, dequant or a q_ kernel, got {self.quant_kernel!r}",
                ),
                (
                    self.quant_activations in ("int8", "fp32"),
                    f"quant_activations must be int8 or fp32, got {self.quant_activations!r}",
                ),
                (
                    self.linear_kernel in LINEAR_KERNELS,
                    f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {self.linear_kernel!r}",
                ),
                (self.max_model_len > 0, "max_model_len must be positive"),
                (self.num_threads >= 0, "num_threads must be >= 0"),
            ]
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("tokens per KV block"))
    kv_cache_mb: int = field(default=1024, metadata=_help("memory for the paged KV cache on CPU, in MiB"))
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata=_help(
            "on CUDA, the share of the GPU's memory this engine may fill: the KV cache takes what the weights "
            "leave of it, measured with torch.cuda.mem_get_info after loading (--kv-cache-mb is for CPU)"
        ),
    )
    num_blocks: int = field(default=0, metadata=_help("KV blocks; 0 derives the count from --kv-cache-mb"))
    prefix_caching: bool = field(default=True, metadata=_help("reuse the KV of full blocks seen before"))
    swap_space_mb: int = field(
        default=1024,
        metadata=_help("host memory for KV blocks swapped out while their request waits on a tool, in MiB"),
    )
    num_host_blocks: int = field(
        default=0, metadata=_help("host KV blocks; 0 derives the count from --swap-space-mb")
    )

    def __post_init__(self) -> None:
        _require(
            [
                (self.block_size > 0, "block_size must be positive"),
                (self.kv_cache_mb > 0, "kv_cache_mb must be positive"),
                (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
                (self.swap_space_mb >= 0, "swap_space_mb must be >= 0"),
                (self.num_host_blocks >= 0, "num_host_blocks must be >= 0 (0 derives it from swap_space_mb)"),
                (self.num_blocks >= 0, "num_blocks must be >= 0 (0 derives it from kv_cache_mb)"),
            ]
        )


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata=_help("most requests in one step's batch"))
    max_num_batched_tokens: int = field(
        default=512, metadata=_help("token budget of one step: decodes plus prefill chunks")
    )
    intercept: str = field(
        default=InterceptPolicy.PRESERVE.value,
        metadata=_help(_choices_help("KV of requests waiting on a tool", INTERCEPT_HELP)),
    )
    swap_budget_ms: float = field(
        default=5.0,
        metadata=_help(
            "time one step may spend copying KV blocks each way; turned into blocks by a copy timed at start-up"
        ),
    )
    default_tool_s: float = field(
        default=1.0, metadata=_help("expected tool time before a tool has a declared estimate or a past call")
    )
    schedule: str = field(
        default=SchedulePolicy.FCFS.value,
        metadata=_help(
            _choices_help("order of waiting requests; a session's requests form a program", SCHEDULE_HELP)
        ),
    )
    starvation_s: float = field(
        default=10.0,
        metadata=_help("under --schedule las, a request waiting longer than this goes ahead of all others"),
    )
    session_kv: bool = field(
        default=True,
        metadata=_help(
            "keep the KV of a request that ended with client tool calls for its follow-up (a TTL from the "
            "expected tool time; given up earlier under memory pressure by least waste); off: freed at once, "
            "only the prefix cache may still hold it"
        ),
    )
    session_ttl_factor: float = field(
        default=2.0,
        metadata=_help(
            "a kept session's time-to-live in multiples of its expected tool time (per tool name: the "
            "client's hint metadata.tool_time_s, else past follow-ups, else --default-tool-s)"
        ),
    )
    session_max_ttl_s: float = field(
        default=60.0, metadata=_help("longest a finished request's KV waits for its follow-up")
    )

    def __post_init__(self) -> None:
        policies = [p.value for p in InterceptPolicy]
        schedules = [p.value for p in SchedulePolicy]
        _require(
            [
                (self.max_num_seqs > 0, "max_num_seqs must be positive"),
                (self.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive"),
                (
                    self.intercept in policies,
                    f"intercept must be one of {', '.join(policies)}, got {self.intercept!r}",
                ),
                (self.swap_budget_ms >= 0, "swap_budget_ms must be >= 0"),
                (self.default_tool_s >= 0, "default_tool_s must be >= 0"),
                (
                    self.schedule in schedules,
                    f"schedule must be one of {', '.join(schedules)}, got {self.schedule!r}",
                ),
                (self.starvation_s > 0, "starvation_s must be positive"),
                (self.session_ttl_factor >= 0, "session_ttl_factor must be >= 0"),
                (self.session_max_ttl_s >= 0, "session_max_ttl_s must be >= 0"),
            ]
        )


@dataclass(frozen=True, slots=True)
class ToolConfig:
    tools: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "tools the engine runs: built-in names ({names}) "
            "or module:object specs; worker processes start with the engine when any are given"
        ),
    )
    tool_mode: str = field(
        default="partial",
        metadata=_help(
            "partial: hand each completed field or line to the tool as it is decoded; lazy: only at the call's end"
        ),
    )
    constrained: bool = field(
        default=True,
        metadata=_help(
            "once a call starts (<tool_call>), mask logits so it names a known tool and fits its schema"
        ),
    )
    grammar_timeout_s: float = field(
        default=0.0,
        metadata=_help(
            "compile tool-call grammars in a helper process killed past this many seconds (a runaway "
            "compile is stopped; costs a helper start and ~10x per uncached compile); 0: on the calling thread"
        ),
    )
    max_tool_rounds: int = field(default=4, metadata=_help("most tool-result turns per request"))
    num_workers: int = field(
        default=4, metadata=_help("tool worker processes, started before they are needed")
    )
    handoff_ms: float = field(
        default=1.0,
        metadata=_help(
            "after sending a worker new work, the engine waits up to this long for the worker to take it "
            "(its core then runs the tool's hook at once instead of after a scheduler slice); 0 disables"
        ),
    )
    share_cores: bool = field(
        default=True,
        metadata=_help(
            "on CPU, run the forward pass on one thread fewer per worker computing a tool's code (not one "
            "waiting on the network), so tools and decoding do not oversubscribe the cores (a preempted "
            "thread stalls the whole parallel op)"
        ),
    )
    call_timeout_s: float = field(
        default=30.0,
        metadata=_help(
            "wall-clock limit of one call from its end in the stream; a worker past it is killed and replaced"
        ),
    )
    cpu_time_s: int = field(default=20, metadata=_help("CPU seconds one call may use in its worker"))
    memory_mb: int = field(default=2048, metadata=_help("memory limit of a worker's data segment, in MiB"))
    file_size_mb: int = field(default=64, metadata=_help("largest file a tool may write, in MiB"))
    worker_nice: int = field(
        default=0,
        metadata=_help(
            "CPU priority of tool workers below the engine (0-19). 0: a worker woken by new work runs at "
            "once (niced workers waited 1-5 ms behind busy decode threads here), and --share-cores gives "
            "running tools their own core; raise it where tools must never slow decoding"
        ),
    )
    max_processes: int = field(
        default=64,
        metadata=_help("most processes and threads one tool worker and everything it starts may have"),
    )
    sandbox_uid: int = field(
        default=60100,
        metadata=_help(
            "uid and gid tool workers run as when the server runs as root (one no other process or file uses)"
        ),
    )
    unsafe_tools: bool = field(
        default=False,
        metadata=_help(
            "run tools that execute model-written code (python) even where the machine cannot isolate them "
            "(no user/PID/mount/network namespaces, seccomp or no_new_privs); see docs/security.md"
        ),
    )

    def __post_init__(self) -> None:
        _require(
            [
                (
                    self.tool_mode in ("partial", "lazy"),
                    f"tool_mode must be partial or lazy, got {self.tool_mode!r}",
                ),
                (self.max_tool_rounds >= 0, "max_tool_rounds must be >= 0"),
                (self.num_workers > 0, "num_workers must be positive"),
                (self.call_timeout_s > 0, "call_timeout_s must be positive"),
                (0 <= self.handoff_ms <= 1000, "handoff_ms must be in [0, 1000]"),
                (self.cpu_time_s > 0, "cpu_time_s must be positive"),
                (self.memory_mb > 0, "memory_mb must be positive"),
                (self.file_size_mb > 0, "file_size_mb must be positive"),
                (0 <= self.worker_nice <= 19, "worker_nice must be between 0 and 19"),
                (self.max_processes >= 4, "max_processes must be at least 4"),
                (0 < self.sandbox_uid < 2**32 - 1, "sandbox_uid must be a uid other than 0"),
            ]
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=8000, metadata=_help("port to listen on (0: any free port)"))
    api_key: str = field(
        default="",
        metadata=_help(
            "require 'Authorization: Bearer KEY' on every /v1 route (also read from CONVEYOR_API_KEY); empty: no auth"
        ),
    )
    served_model_name: str = field(
        default="", metadata=_help("the model name clients send; empty: the --model value's last path part")
    )
    max_pending: int = field(
        default=256, metadata=_help("most requests in flight; more get HTTP 429 until some finish")
    )
    default_max_tokens: int = field(
        default=1024, metadata=_help("max_tokens of requests that give none (cut to the model's context)")
    )
    max_body_kb: int = field(
        default=4096,
        metadata=_help("largest request body in KiB; a larger one gets HTTP 413 before it is parsed"),
    )
    prepare_timeout_s: float = field(
        default=30.0,
        metadata=_help(
            "longest a request's chat template, tokenization and tool-grammar compilation may take (off the "
            "engine thread); past it the request gets HTTP 400"
        ),
    )
    exact_continuation: bool = field(
        default=True,
        metadata=_help(
            "a chat request that repeats a conversation this server answered reuses the token ids the "
            "model generated (only later messages are rendered), so the prefix cache matches its output"
        ),
    )
    continuation_entries: int = field(
        default=4096, metadata=_help("most conversations remembered for exact continuation")
    )
    continuation_mb: int = field(
        default=64, metadata=_help("memory for the token ids remembered for exact continuation, in MiB")
    )
    continuation_ttl_s: float = field(
        default=3600.0, metadata=_help("a remembered conversation is forgotten this long after its last use")
    )
    mcp: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "MCP tool servers to start over stdio, each a quoted command line; their tools join the registry"
        ),
    )
    max_n: int = field(
        default=8,
        metadata=_help(
            "largest n (choices per prompt) a request may ask for; each choice is an engine request "
            "sharing the prompt's KV; more gets HTTP 400"
        ),
    )
    max_prompts: int = field(
        default=32,
        metadata=_help("most prompts in one /v1/completions batch; more gets HTTP 400"),
    )
    allow_missing_tools: bool = field(
        default=False,
        metadata=_help(
            "start without an --mcp server or --tools spec that fails at start (logged, listed in /health); "
            "default: such a failure stops the server with its error"
        ),
    )
    response_store_entries: int = field(
        default=1024,
        metadata=_help("most stored /v1/responses responses (for previous_response_id); 0: store none"),
    )
    response_store_mb: int = field(
        default=64,
        metadata=_help("most memory stored responses take, in MiB (their JSON); least recent go first"),
    )
    response_store_ttl_s: float = field(
        default=3600.0, metadata=_help("seconds a stored response stays available to previous_response_id")
    )

    def __post_init__(self) -> None:
        _require(
            [
                (0 <= self.port < 65536, "port must be in [0, 65535]"),
                (self.max_pending > 0, "max_pending must be positive"),
                (self.max_n > 0, "max_n must be positive"),
                (self.max_prompts > 0, "max_prompts must be positive"),
                (self.default_max_tokens > 0, "default_max_tokens must be positive"),
                (self.max_body_kb > 0, "max_body_kb must be positive"),
                (self.prepare_timeout_s > 0, "prepare_timeout_s must be positive"),
                (self.response_store_entries >= 0, "response_store_entries must be >= 0"),
                (self.response_store_mb > 0, "response_store_mb must be positive"),
                (self.response_store_ttl_s > 0, "response_store_ttl_s must be positive"),
                (self.continuation_entries >= 0, "continuation_entries must be >= 0"),
                (self.continuation_mb >= 0, "continuation_mb must be >= 0"),
                (self.continuation_ttl_s >= 0, "continuation_ttl_s must be >= 0"),
            ]
        )


# how tool calls are constrained remotely, by dialect (each one's form: backends/constraints.py)
BACKEND_DIALECTS: dict[str, str] = {
    "llama.cpp": 'json_schema, and a lazy GBNF grammar for "auto"',
    "vllm": "the embedded engine's xgrammar structural tag",
    "none": "",
}


@dataclass(frozen=True, slots=True)
class BackendConfig:
    backend: str | None = field(
        default=None,
        metadata=_help(
            "URL of a remote OpenAI-compatible engine (vLLM, SGLang, llama.cpp server), e.g. http://127.0.0.1:8080: "
            "Conveyor's tool layer drives its /v1/completions stream; unset: the embedded engine"
        ),
    )
    backend_model: str = field(
        default="",
        metadata=_help("the model name sent to the remote engine; empty: the first one its /v1/models lists"),
    )
    backend_api_key: str = field(
        default="",
        metadata=_help("bearer token for the remote engine (also read from CONVEYOR_BACKEND_API_KEY)"),
    )
    backend_dialect: str = field(
        default="llama.cpp",
        metadata=_help(
            _choices_help("how constrained calls are asked of the remote engine", BACKEND_DIALECTS)
        ),
    )
    connect_timeout_s: float = field(
        default=5.0, metadata=_help("limit on opening a connection to the remote engine")
    )
    read_timeout_s: float = field(
        default=60.0,
        metadata=_help(
            "longest wait for the remote engine's next streamed chunk (the first one includes its prefill)"
        ),
    )
    max_retries: int = field(
        default=2,
        metadata=_help(
            "retries of a remote request that failed before its first token (connection refused, 429, 502-504); "
            "never once text has reached the tool layer"
        ),
    )
    retry_backoff_s: float = field(
        default=0.2, metadata=_help("wait before the first retry; doubles each time")
    )
    max_connections: int = field(default=64, metadata=_help("pooled HTTP connections to the remote engine"))

    def __post_init__(self) -> None:
        _require(
            [
                (
                    self.backend is None or self.backend.startswith(("http://", "https://")),
                    f"backend must be an http(s) URL, got {self.backend!r}",
                ),
                (
                    self.backend_dialect in BACKEND_DIALECTS,
                    f"backend_dialect must be {_one_of(list(BACKEND_DIALECTS))}, got {self.backend_dialect!r}",
                ),
                (self.connect_timeout_s > 0 and self.read_timeout_s > 0, "backend timeouts must be positive"),
                (self.max_retries >= 0, "max_retries must be >= 0"),
                (self.retry_backoff_s >= 0, "retry_backoff_s must be >= 0"),
                (self.max_connections > 0, "max_connections must be positive"),
            ]
        )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    tools: ToolConfig = ToolConfig()
    backend: BackendConfig = BackendConfig()


def cache_root() -> Path:
    """Directory for converted models and other caches (``CONVEYOR_CACHE``)."""
    return Path(os.environ.get("CONVEYOR_CACHE") or Path.home() / ".cache" / "conveyor")


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str | None = None,
    names: dict[str, Iterable[str]] | None = None,
) -> None:
    """Add one ``--flag`` per field of the dataclass ``cls`` (bool, int, float, str, optional
    scalars and tuples of scalars). ``names[field]``, a registry's names, fill the ``{names}``
    of that field's help (this module imports no registry)."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        text = f.metadata.get("help", "").replace("{names}", ", ".join((names or {}).get(f.name, ())))
        doc = f"{text} (default: {f.default})".strip()
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        elif isinstance(kind, types.UnionType):  # X | None
            group.add_argument(flag, type=get_args(kind)[0], default=f.default, help=doc)
        elif getattr(kind, "__origin__", None) is tuple:  # tuple[X, ...]
            group.add_argument(flag, type=get_args(kind)[0], nargs="*", default=f.default, help=doc)
        else:
            group.add_argument(flag, type=kind, default=f.default, help=doc)


def from_flags(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed flags that ``add_flags`` declared."""
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


def engine_config_from_flags(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=from_flags(ModelConfig, args),
        cache=from_flags(CacheConfig, args),
        scheduler=from_flags(SchedulerConfig, args),
        tools=from_flags(ToolConfig, args),
        backend=from_flags(BackendConfig, args) if hasattr(args, "backend") else BackendConfig(),
    )
