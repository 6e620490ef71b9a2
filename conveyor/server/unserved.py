"""Fields of OpenAI's chat and completions requests that Conveyor does not serve, found by
comparing the request models with the `openai` package's `CompletionCreateParams` types: a
request that sets one to a value that would do something gets a 400 naming it, so nothing a
client sends is silently ignored. Identifiers and cache hints that cannot change the answer
are accepted as sent."""

from __future__ import annotations

from typing import Any

from conveyor.server.limits import InputRejected

# set to anything but their no-op value (None, or the value given here): a 400 naming them
_OFF = object()  # no value but None is a no-op
UNSERVED: dict[str, tuple[Any, str]] = {
    "best_of": (1, "best_of (ranking choices on the server) is not served; use n"),
    "suffix": ("", "suffix (inserting text) is not served"),
    "audio": (_OFF, "audio output is not served"),
    "modalities": (["text"], "only text output is served"),
    "prediction": (_OFF, "predicted outputs are not served"),
    "web_search_options": (_OFF, "web search is not served; server tools come from --tools and --mcp"),
    "functions": (_OFF, "the deprecated functions API is not served; send tools"),
    "function_call": (_OFF, "the deprecated functions API is not served; send tool_choice"),
    "reasoning_effort": (_OFF, "not served: the model's chat template decides how it reasons"),
    "verbosity": (_OFF, "not served"),
    "store": (False, "stored chat completions are not served"),
    "service_tier": ("auto", "only the default service tier is served"),
    "moderation": (_OFF, "moderation is not served"),
}
# Identifiers and cache hints that cannot change the output: accepted as sent.
NO_EFFECT = frozenset(
    {
        "user",
        "safety_identifier",
        "metadata",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
    }
)


def check_served(body: Any, declared: Any) -> None:
    """Refuse (400 naming it) a top-level field that is not `declared` and would change the
    answer: one of UNSERVED set to a value that does something, or a field OpenAI does not know
    either (as OpenAI's server refuses it). Nothing a client sends is silently ignored."""
    if not isinstance(body, dict):
        return
    for key, value in body.items():
        if key in declared or key in NO_EFFECT or value is None:
            continue
        if key not in UNSERVED:
            raise InputRejected(key, "unrecognized request argument")
        off, why = UNSERVED[key]
        if off is _OFF or (value != off and not (key == "best_of" and value == body.get("n", 1))):
            raise InputRejected(key, why)
