"""What is left to score: a distributed anti-join of the input URIs against the output's parts.

Both sides become rows ``(uri, listed, rows)``: an input URI counts ``listed = 1``, a row of a part
``rows = 1``. One hash-shuffle ``groupby("uri")`` with two sums (Ray Data, on the workers) gives,
per distinct URI, how often it was listed and how many output rows it has. From that:

- to do: listed, no row (an input listed twice is still one row to do);
- already scored: listed, at least one row;
- duplicate rows: rows beyond the first of a URI (must stay 0: the exactly-once check);
- missing: listed, no row, after a run (must be 0 too).

The grouped table is materialized in the object store (about 100 bytes a distinct URI, spread
over the nodes, spilled to disk under pressure) so that the counts, the pipeline and the final
check read it without listing the input again; the driver only ever sees the counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _side(batch: pa.Table, listed: int) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {"uri": batch.column("uri").cast(pa.string()), "listed": pa.array(np.full(n, listed, np.int64)),
         "rows": pa.array(np.full(n, 1 - listed, np.int64))}
    )  # fmt: skip


def _counts(batch: pa.Table) -> pa.Table:
    """Per-URI flags whose column sums are the plan's counts."""
    listed, rows = batch.column("listed"), batch.column("rows")
    is_input = pc.greater(listed, 0)
    has_rows = pc.greater(rows, 0)
    as_int = lambda mask: pc.cast(mask, pa.int64())  # noqa: E731
    return pa.table(
        {
            "inputs": as_int(is_input),
            "already": as_int(pc.and_(is_input, has_rows)),
            "repeated_inputs": pc.max_element_wise(pc.subtract(listed, 1), 0),
            "duplicate_rows": pc.max_element_wise(pc.subtract(rows, 1), 0),
            "other_rows": pc.if_else(is_input, 0, rows),
        }
    )


def todo_rows(batch: pa.Table) -> pa.Table:
    """Ray Data map: the grouped rows still to score, as ``uri`` rows."""
    keep = pc.and_(pc.greater(batch.column("listed"), 0), pc.equal(batch.column("rows"), 0))
    return batch.filter(keep).select(["uri"])


def listed_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.greater(batch.column("listed"), 0)).select(["uri"])


@dataclass
class Plan:
    """The counts of one anti-join, and its materialized grouped table."""

    grouped: Any
    inputs: int
    already: int
    repeated_inputs: int  # listed more than once (a manifest's repeats); each is scored once
    duplicate_rows: int
    other_rows: int  # rows of URIs that are not inputs (an earlier, larger input): kept, not counted

    @property
    def todo(self) -> int:
        return self.inputs - self.already

    @property
    def missing(self) -> int:
        return self.todo

    def todo_waves(self, wave_files: int) -> list[Any]:
        """The to-do URIs as Datasets of about ``wave_files`` each (whole hash partitions), to be
        scored one after the other. The driver's memory grows during one execution (~140 bytes a
        file measured at 10^5 files: Ray Data keeps stats of every block for ``Dataset.stats()``,
        Ray its task bookkeeping), ~1.4 GB for ten million files in one; per wave it is bounded
        and dropped when the wave ends. A wave costs a restart of the model actors."""
        waves = min(-(-self.todo // wave_files), self.grouped.num_blocks())
        shards = self.grouped.split(waves) if waves > 1 else [self.grouped]
        return [shard.map_batches(todo_rows, batch_format="pyarrow") for shard in shards]

    def inputs_dataset(self) -> Any:
        """The distinct input URIs, from the object store (the input is not listed again)."""
        return self.grouped.map_batches(listed_rows, batch_format="pyarrow")


def reconcile(inputs: Any, done: Any | None, partitions: int) -> Plan:
    """Anti-join ``inputs`` (a Dataset of ``uri``) against ``done`` (the parts' ``uri`` rows, or None)."""
    sides = inputs.map_batches(_side, batch_format="pyarrow", fn_kwargs={"listed": 1})
    if done is not None:
        sides = sides.union(done.map_batches(_side, batch_format="pyarrow", fn_kwargs={"listed": 0}))
    from ray.data.aggregate import Sum

    grouped = (
        sides.groupby("uri", num_partitions=partitions)
        .aggregate(Sum("listed", alias_name="listed"), Sum("rows", alias_name="rows"))
        .materialize()
    )
    names = ["inputs", "already", "repeated_inputs", "duplicate_rows", "other_rows"]
    if grouped.count() == 0:
        return Plan(grouped, **dict.fromkeys(names, 0))
    sums = grouped.map_batches(_counts, batch_format="pyarrow").sum(names)
    return Plan(grouped, **{name: int(sums[f"sum({name})"] or 0) for name in names})
