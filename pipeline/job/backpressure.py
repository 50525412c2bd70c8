"""How far reading runs ahead of generation: a few units per generate actor, not a file.

Reading and prompts are far faster than generation, and Ray Data reads ahead until its
object-store budget (by default half of the cluster's object store) is full: a 400k-row JSONL
file was read whole into 217 MiB of object store within 16 s of the start and then drained
for three minutes, a 1M-row file peaked at 0.54 GiB, so the job's memory grew with the file
(1.25x its 100k-row run; `benchmarks/bench_data_plane.py memory`). The job gives its dataset a
budget of `resources.read_ahead_units` units per generate actor beyond the units they are
filling, sized from the largest unit the plan will read; the generate actors, not the size of
the object store or of the file, set how much waits. Compressed JSONL streams, whose unit size
is not known up front, keep Ray Data's own budget when they are all there is to read.
"""

from __future__ import annotations

from ray.data.context import DataContext

from pipeline.job.plan import Unit

UNITS_IN_FLIGHT = 2  # per generate actor (the runner's max_tasks_in_flight_per_actor)
# A unit's block, from read to written, per byte of input read (a 2.7 MiB JSONL unit: 6.5 MiB
# read, 10 MiB with its prompts, more with its fills)
BLOCK_GROWTH = 4
MIN_BUDGET = 64 * 2**20  # units of a few rows: reads and writes still overlap


def object_store_budget(units: list[Unit], actors: int, read_ahead_units: int) -> int | None:
    """Bytes of object store the dataset may use, or None for Ray Data's own budget."""
    sizes = [unit.data_bytes for unit in units if unit.data_bytes is not None]
    if read_ahead_units == 0 or not sizes:
        return None
    per_unit = BLOCK_GROWTH * max(sizes)
    return max(MIN_BUDGET, per_unit * actors * (UNITS_IN_FLIGHT + read_ahead_units))


def bound_read_ahead(context: DataContext, budget: int | None) -> None:
    """Cap the object-store budget of the dataset whose context this is (a user's lower
    limit is kept)."""
    if budget is None:
        return
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(
        object_store_memory=min(limits.object_store_memory, budget))
