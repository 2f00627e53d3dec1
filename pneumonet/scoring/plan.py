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

The re-run of a finished job skips the anti-join (the job's fixed cost: it lists, reads every part's
``uri`` and shuffles both, ~10 % of a first run at 10^6 files here) when nothing changed. A run whose
final check proved the output complete records, in ``_summary.json``, a :class:`Digest` of what it
listed and a fingerprint of the parts it checked (:func:`pneumonet.scoring.parts.fingerprint`). The
next run lists again and digests the listing in one streaming pass, with no shuffle and nothing per
file kept (:func:`digest`): when the parts are still exactly those (same names and sizes; parts are
immutable and named by the digest of their URIs) and the listing's digest equals the recorded one,
every listed URI already has exactly one row, so there is nothing to do (:func:`unchanged`). Any
difference (a file added, removed or renamed, a part deleted, another model, an older summary)
falls back to the full anti-join. Why this is sound: the digest is order-independent and exact
for multisets (each URI weighted by how often it is listed, so a manifest's repeats match too):
two different listings give the same digest only by a collision of sums of 128-bit hashes modulo
2^128, with a chance of 2^-128 (2^-(128-k) if every URI's count changed by a multiple of 2^k). Why not cheaper: the
listing itself is the one thing that must be redone, since only it says what the archive holds now.
"""

from __future__ import annotations

import hashlib
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


DIGEST_BITS = 128


@dataclass(frozen=True)
class Digest:
    """An order-independent digest of a multiset of URIs: how many, and the sum modulo 2^128 of
    their 128-bit BLAKE2b hashes (a sum, not an XOR: a URI listed twice must not cancel out)."""

    count: int
    value: int

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": f"{self.value:032x}"}

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> Digest:
        return cls(int(recorded["count"]), int(recorded["sum"], 16))


def digest_batch(batch: pa.Table) -> pa.Table:
    """Ray Data map: ``uri`` rows (weighted by their ``listed`` column when there is one, as in the
    anti-join's grouped table) → one row, the batch's :class:`Digest` (``sum`` as hex: Arrow has no
    128-bit integers)."""
    uris = batch.column("uri").to_pylist()
    weights = batch.column("listed").to_pylist() if "listed" in batch.column_names else [1] * len(uris)
    total = sum(weight * int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=DIGEST_BITS // 8).digest(), "little")
                for uri, weight in zip(uris, weights) if weight)  # fmt: skip
    return pa.table({"count": [sum(weights)], "sum": [f"{total % 2**DIGEST_BITS:032x}"]})


def digest(dataset: Any) -> Digest:
    """The :class:`Digest` of a Dataset of ``uri`` rows: one streaming pass, one row per block back."""
    count = value = 0
    for table in dataset.map_batches(digest_batch, batch_size=None, batch_format="pyarrow").iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        count += sum(table.column("count").to_pylist())
        value += sum(int(text, 16) for text in table.column("sum").to_pylist())
    return Digest(count, value % 2**DIGEST_BITS)


@dataclass
class Plan:
    """The counts of one anti-join, and its materialized grouped table (None when :func:`unchanged`
    found the output complete without one)."""

    grouped: Any
    inputs: int
    already: int
    repeated_inputs: int  # listed more than once (a manifest's repeats); each is scored once
    duplicate_rows: int
    other_rows: int  # rows of URIs that are not inputs (an earlier, larger input): kept, not counted
    listing: Digest | None = None  # of the listing, as a multiset; computed from grouped when asked

    @property
    def unchanged(self) -> bool:
        """Found complete by the digest of the listing (:func:`unchanged`): no anti-join ran."""
        return self.grouped is None

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

    def resume_state(self, parts_fingerprint: str) -> dict[str, Any]:
        """What a later run needs to find this output unchanged (:func:`unchanged`), recorded once a
        check has proved it complete: the listing's digest and the fingerprint of the parts checked."""
        listing = self.listing or digest(self.grouped)  # weighted by "listed": a pass over the object store
        return {"inputs": self.inputs, "other_rows": self.other_rows, "listing": listing.as_dict(), "parts": parts_fingerprint}


def unchanged(inputs: Any, resume: dict[str, Any]) -> Plan | None:
    """A plan with nothing to do when ``inputs`` digest to what the last verified run listed
    (``resume``, from :meth:`Plan.resume_state`; the caller has checked that its parts are still
    there, unchanged); None when the listing differs: then only the anti-join can tell."""
    recorded = Digest.from_dict(resume["listing"])
    if digest(inputs) != recorded:
        return None
    n = int(resume["inputs"])
    return Plan(None, n, n, recorded.count - n, 0, int(resume["other_rows"]), listing=recorded)


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
