"""Which path (``paths.py``, ``qlinear.py``) each CPU ``Linear`` and ``QuantLinear`` runs, per weight shape and row bucket: measured.

At load, for each distinct weight shape the layers of that shape are timed with every path that
can run here, at the top of each row bucket, and the fastest is kept. A trial runs the path once
over several layers of the shape (at least ``TRIAL_BYTES`` of weights where the model has them),
so the weights come from memory as in a decode step, not from cache. The choices are cached in
``$CONVEYOR_CACHE/kernels/choices-*.json``, keyed by CPU model, instruction sets, thread count,
torch version and kernel sources; a corrupt or stale file is ignored and rewritten atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable

import torch

from conveyor.config import cache_root
from conveyor.engine.model import quant
from conveyor.engine.model.kernels import cpu_flags, cpu_model, source_digest
from conveyor.engine.model.linear import BUCKETS, Linear
from conveyor.engine.model.paths import PATHS
from conveyor.engine.model.qlinear import QuantLinear, quant_paths

log = logging.getLogger("conveyor.kernels")
TRIAL_BYTES = 64 * 2**20
MIN_TRIAL_S = 0.02  # per path and bucket (shared machines are noisy: more trials, best one counts)
MAX_TRIALS = 20
FORMAT = 3
Choices = dict[str, dict[str, dict]]  # shape -> bucket label -> {"path": name, "ms": {path: ms}}
Layer = Linear | QuantLinear


def shape_key(layer: Layer) -> str:
    return layer.shape_key


def cache_key() -> dict:
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    return {
        "format": FORMAT,
        "cpu": cpu_model(),
        "flags": flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": source_digest(),
        "quant_kernels": quant.source_digest(),
    }


def choose_kernels(
    layers: Iterable[Layer],
    act_dtype: torch.dtype = torch.float32,
    forced: str = "auto",
    forced_quant: str = "auto",
    quant_activations: str = "int8",
) -> Choices:
    """Give every CPU layer its path per bucket (``forced``: one path for all bf16/fp32 layers,
    ``forced_quant``: one for all quantized ones); returns shape -> bucket -> choice.
    ``act_dtype``: the activations the layers will see; ``quant_activations``: int8 lets ``auto``
    pick quantized kernels that round activations to 8 bits per block (``quant.ACTIVATIONS``),
    fp32 does not."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if isinstance(layer, QuantLinear) or layer.weight.device.type == "cpu":
            groups.setdefault(layer.shape_key, []).append(layer)
    if not groups:
        return {}
    force = {
        key: forced_quant if isinstance(group[0], QuantLinear) else forced for key, group in groups.items()
    }
    choices = {
        key: _forced(force[key], group[0], act_dtype) for key, group in groups.items() if force[key] != "auto"
    }
    auto = {key: group for key, group in groups.items() if force[key] == "auto"}
    if auto:
        choices.update(_cached_or_measured(auto, act_dtype, quant_activations))
    for key, group in groups.items():
        plan = [choices[key][label]["path"] for label, _ in BUCKETS]
        for layer in group:
            layer.use(plan)
        log.info("linear %s: %s", key, ", ".join(f"{label} rows {p}" for (label, _), p in zip(BUCKETS, plan)))
    return choices


def _forced(path: str, layer: Layer, act_dtype: torch.dtype) -> dict[str, dict]:
    reasons = layer.path_reasons(act_dtype)
    flag = "--quant-kernel" if isinstance(layer, QuantLinear) else "--linear-kernel"
    if path not in reasons:
        raise ValueError(
            f"{flag} {path} is not a path for {layer.shape_key}; choose auto or one of {', '.join(reasons)}"
        )
    if reasons[path]:
        raise ValueError(f"{flag} {path} cannot run: {reasons[path]}")
    return {label: {"path": path, "ms": {}} for label, _ in BUCKETS}


def _cached_or_measured(
    groups: dict[str, list[Layer]], act_dtype: torch.dtype, quant_activations: str
) -> Choices:
    key = {
        **cache_key(),
        "activations": str(act_dtype).removeprefix("torch."),
        "quant_activations": quant_activations,
    }
    path = (
        cache_root() / "kernels" / f"choices-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    )
    cached = _read(path, key)
    usable = {k: v for k, v in cached.items() if k in groups and _still_runs(v, groups[k][0], act_dtype)}
    missing = [k for k in groups if k not in usable]
    if not missing:
        return usable
    from rich.console import Console

    status = Console(stderr=True).status(
        f"timing the matmul paths for {len(missing)} weight shapes (once per machine)"
    )
    with status, torch.inference_mode():
        measured = {k: _measure(groups[k], act_dtype, quant_activations) for k in missing}
    _write(path, key, {**cached, **measured})
    return {**usable, **measured}


def _still_runs(choice: dict[str, dict], layer: Layer, act_dtype: torch.dtype) -> bool:
    reasons = layer.path_reasons(act_dtype)
    return all(c["path"] in reasons and reasons[c["path"]] is None for c in choice.values())


def _read(path, key: dict) -> Choices:
    """The cached choices, or {} where the file is missing, corrupt or for another key."""
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            return {}
        choices = data["choices"]
        known = (*PATHS, *quant_paths())
        ok = all(isinstance(c, dict) and c["path"] in known for b in choices.values() for c in b.values())
        labels_ok = all(set(b) == {label for label, _ in BUCKETS} for b in choices.values())
        return choices if ok and labels_ok else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write(path, key: dict, choices: Choices) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".choices-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "choices": choices}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _measure(group: list[Layer], act_dtype: torch.dtype, quant_activations: str) -> dict[str, dict]:
    """Time every path that runs here on this shape's layers, per bucket; the fastest wins."""
    first = group[0]
    reasons = first.path_reasons(act_dtype)
    candidates = [p for p, reason in reasons.items() if reason is None]
    if len(candidates) > 1 and isinstance(first, Linear) and first.weight.dtype != act_dtype:
        candidates.remove("torch")  # it widens the whole weight per call: the last resort, not a contender
    allowed = ("fp32", "int8") if quant_activations == "int8" else ("fp32",)
    candidates = [p for p in candidates if quant.ACTIVATIONS.get(p, "fp32") in allowed]
    layers = group[: max(1, -(-TRIAL_BYTES // first.nbytes))]
    products = {p: [layer.product(p) for layer in layers] for p in candidates}
    result = {}
    for label, rows in BUCKETS:
        ms = {
            p: t * 1e3 for p, t in _race(products, torch.randn(rows, first.in_features).to(act_dtype)).items()
        }
        result[label] = {"path": min(ms, key=ms.__getitem__), "ms": {p: round(t, 4) for p, t in ms.items()}}
    _one_layout(result)
    for p, reason in reasons.items():  # a kernel that should have run here: say what runs instead
        if reason and ("self-check" in reason or "build" in reason):
            log.warning(
                "linear kernel %s is not used: %s; %s runs %s instead",
                p,
                reason,
                first.shape_key,
                ", ".join(sorted({c["path"] for c in result.values()})),
            )
    return result


def _one_layout(result: dict[str, dict]) -> None:
    """A repacking kernel (``quant.REPACKED``) keeps the weight only in its own layout, so it runs
    every bucket or none: every bucket if it is the fastest at one row (decode), else none."""
    first = result[BUCKETS[0][0]]["path"]
    for choice in result.values():
        if first in quant.REPACKED:
            choice["path"] = first
        elif choice["path"] in quant.REPACKED:
            rest = {p: t for p, t in choice["ms"].items() if p not in quant.REPACKED}
            choice["path"] = min(rest, key=rest.__getitem__)


def _race(products: dict[str, list], x: torch.Tensor) -> dict[str, float]:
    """Seconds per layer of each path's fastest trial (one call per layer). Trials take turns
    across the paths, so a burst of load from elsewhere slows all of them alike; a path more than
    three times slower than the best after two rounds drops out."""

    def trial(fns: list) -> float:
        start = time.perf_counter()
        for fn in fns:
            fn(x)
        return (time.perf_counter() - start) / len(fns)

    for fns in products.values():  # warm-up: first-call allocations, oneDNN primitive caches
        trial(fns)
    best = {p: float("inf") for p in products}
    running, spent = list(products), 0.0
    for round_ in range(MAX_TRIALS):
        for p in running:
            t = trial(products[p])
            best[p], spent = min(best[p], t), spent + t * len(products[p])
        if round_ >= 1:
            if spent >= MIN_TRIAL_S * len(products):
                break
            running = [p for p in running if best[p] <= 3 * min(best.values())]
    return best
