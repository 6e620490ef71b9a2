"""Field -> hook dispatch latency measured directly through `WorkerPool` (docs/security.md,
"What it costs"): a 5-field probe tool, fields 5 ms apart, calls one after another, and
per field `hook_delays_s - hook_queued_s` (the time from sending to the hook running).

    PYTHONPATH=$PWD python scripts/hook_latency.py [--calls 100] [--workers 4] [--reuse-workers]

--reuse-workers is a diagnostic, not a mode of the pool: a worker is given call after call
instead of being discarded, so no replacement starts; the difference from a plain run is
what starting the replacements costs the hooks of the calls that overlap them.
"""

from __future__ import annotations

import argparse
import time

from conveyor.bench.overhead import Probe
from conveyor.config import ToolConfig
from conveyor.tools import worker_procs
from conveyor.tools.base import CallInfo, ToolRegistry
from conveyor.tools.workers import WorkerPool

FIELDS = ("city", "country", "temperature_c", "conditions", "notes")


def measure(calls: int, workers: int) -> list[float]:
    """The field -> hook delays of every field of every call, in seconds."""
    delays: list[float] = []
    with WorkerPool(ToolRegistry([Probe()]), ToolConfig(num_workers=workers)) as pool:
        for i in range(calls):
            call_id = f"c{i}"
            pool.open_call(CallInfo(call_id, "probe", "bench"), time.perf_counter())
            for key in FIELDS:
                time.sleep(0.005)
                pool.send_field(call_id, key, "x", time.perf_counter())
                pool.poll()
            pool.finish(call_id, dict.fromkeys(FIELDS, "x"))
            deadline, found = time.monotonic() + 10.0, []
            while not found and time.monotonic() < deadline:
                found = [r for r in pool.poll(0.05) if r.call_id == call_id]
            if not found:
                raise RuntimeError(f"call {call_id} got no result within 10 s")
            delays += [d - q for d, q in zip(found[0].hook_delays_s, found[0].hook_queued_s, strict=True)]
    return delays


def _keep_worker(pool: WorkerPool, worker: worker_procs.Worker) -> None:
    worker_procs.free(worker)
    worker.served = False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--reuse-workers", action="store_true")
    args = parser.parse_args()
    if args.reuse_workers:
        WorkerPool._retire = _keep_worker  # type: ignore[method-assign]
    delays = sorted(measure(args.calls, args.workers))
    at = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] * 1e3
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(
        f"{'reuse' if args.reuse_workers else 'per-call'}: {len(delays)} fields, p50 {at(0.5):.2f} ms, "
        f"p99 {at(0.99):.2f} ms, max {delays[-1] * 1e3:.2f} ms, load {load}"
    )


if __name__ == "__main__":
    main()
