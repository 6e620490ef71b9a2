"""The HTTP side of a remote engine: one pooled client and the model it serves."""

from __future__ import annotations

import os

import httpx

from conveyor.config import BackendConfig


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
