"""The paper's six workloads (CodeGen, Search, Planning, Validation, Database, Calculator) with
real tools and no network; `runner.py` drives them in paced or live mode."""

from __future__ import annotations

from collections.abc import Callable

from conveyor.bench.workloads import calculator, codegen, database, planning, search, validation
from conveyor.bench.workloads.base import Workload, WorkloadOptions

BUILDERS: dict[str, Callable[[WorkloadOptions], Workload]] = {
    "codegen": codegen.build,
    "search": search.build,
    "planning": planning.build,
    "validation": validation.build,
    "database": database.build,
    "calculator": calculator.build,
}
