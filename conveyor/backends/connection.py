"""The HTTP side of a remote engine: one pooled client, the model it serves, and the local
tokenizer of the same model (prompts are rendered here)."""

from __future__ import annotations

import os
from typing import Any

import httpx

from conveyor.config import BackendConfig, EngineConfig


class BackendError(RuntimeError):
    """The remote engine cannot be used (unreachable, or it answered with an error at start-up)."""


def connect(backend: BackendConfig) -> httpx.Client:
    """One pooled HTTP client for all requests (keep-alive connections to the remote engine)."""
    key = backend.backend_api_key or os.environ.get("CONVEYOR_BACKEND_API_KEY", "")
    timeout = httpx.Timeout(
        connect=backend.connect_timeout_s,
        read=backend.read_timeout_s,
        write=backend.connect_timeout_s,
        pool=backend.connect_timeout_s,
    )
    limits = httpx.Limits(
        max_connections=backend.max_connections, max_keepalive_connections=backend.max_connections
    )
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=backend.backend.rstrip("/"), timeout=timeout, limits=limits, headers=headers)


def discover_model(client: httpx.Client, url: str) -> str:
    """The first model the remote engine lists; also the readiness check at start-up."""
    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as e:
        raise BackendError(f"remote engine {url} is unreachable: {e}") from None
    if response.status_code != 200:
        raise BackendError(
            f"remote engine {url} answered {response.status_code} to /v1/models: {response.text[:300]}"
        )
    models = response.json().get("data") or []
    if not models:
        raise BackendError(f"remote engine {url} lists no models; pass --backend-model")
    return models[0]["id"]


def open_backend(
    config: EngineConfig, progress: bool, client: httpx.Client | None
) -> tuple[httpx.Client, str, Any]:
    """The client, the remote model's name (`--backend-model`, else the first it lists) and the
    local tokenizer of `config.model.model`; nothing is left open when any of them fails."""
    from transformers import AutoTokenizer

    from conveyor.engine.model.loader import resolve_model

    if not config.backend.backend:
        raise ValueError("RemoteEngine needs config.backend.backend (the remote engine's URL)")
    client = client or connect(config.backend)
    try:
        url = config.backend.backend.rstrip("/")
        model_name = config.backend.backend_model or discover_model(client, url)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model.model, progress=progress))
    except BaseException:
        client.close()
        raise
    return client, model_name, tokenizer
