"""Which images of the view the current epoch has trained, so that an epoch resumed from a mid-epoch checkpoint streams
exactly the rest: every image of the view once per epoch, across any number of resumes.

Rows are an image's position among the train ids (``LabelLookup.rows_of``), and the ledger is a bitmap over them: 1 bit
an image (GLDv2's 4,132,914 train ids: 516,615 bytes), whatever the view. Each train stream has one, held by its
process's small ``EpochRows`` actor (one per process and Ray session, ``progress.bookkeeping_actor``), started by the
driver with the stream, so that it outlives the worker groups that Ray Train restarts:

- at each checkpoint every rank adds the rows its optimizer steps trained since the last one; rank 0 saves the bitmap
  in the checkpoint (``EpochLedger``);
- a worker group that resumes inside an epoch sets the checkpoint's bitmap as the epoch's ``excluded`` rows, before
  any worker reads the stream; the stream's read tasks leave those rows out (``data/pipeline.py``);
- a new epoch clears it.

Rows trained twice (which the above rules out) are counted, not hidden. Imports only Ray, numpy and ``progress``: the
actor is a process of its own.
"""

from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass

import numpy as np
import ray

from ray_landmark.progress import bookkeeping_actor, ray_job


@dataclass(frozen=True)
class EpochLedger:
    """The part of a checkpoint that says which rows of its epoch were trained."""

    rows: int  # the bitmap's length: the train ids of the lookup it was made under
    digest: str  # LabelLookup.digest() of that lookup
    trained: np.ndarray  # np.packbits of a bool per row

    def state(self) -> dict:
        """For a checkpoint's state (the caller may make ``trained`` a tensor: anything np.asarray takes)."""
        return {"rows": self.rows, "digest": self.digest, "trained": self.trained}

    @classmethod
    def of(cls, state: dict) -> "EpochLedger":
        return cls(int(state["rows"]), str(state["digest"]), np.asarray(state["trained"], np.uint8))


class TrainedRows:
    """One stream's current epoch: its bitmap of trained rows, and the rows the stream leaves out (those trained
    before the resume it started from)."""

    def __init__(self, rows: int, digest: str):
        self.rows, self.digest = rows, digest
        self.trained = np.zeros(rows, bool)
        self.excluded: np.ndarray | None = None  # packed bits; None: the stream gives every row
        self.trained_twice = 0

    def start_epoch(self, ledger: EpochLedger | None) -> str | None:
        """A new epoch (``None``), or one resumed from a checkpoint's ledger: its trained rows are left out of the
        stream from now on. A ledger made under another lookup is refused: what is wrong with it, else None."""
        if ledger is not None and (ledger.rows, ledger.digest) != (self.rows, self.digest):
            return (f"its ledger of trained images covers {ledger.rows:,} train ids (view digest {ledger.digest}), "
                    f"the run's view {self.rows:,} ({self.digest})")
        self.trained = np.unpackbits(ledger.trained, count=self.rows).astype(bool) if ledger else \
            np.zeros(self.rows, bool)
        self.excluded = ledger.trained if ledger is not None and ledger.trained.any() else None
        self.trained_twice = 0
        return None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        # Within one call too: np.unique finds a row twice in the same batch of rows.
        unique, counts = np.unique(rows, return_counts=True)
        self.trained_twice += int(self.trained[unique].sum() + (counts - 1).sum())
        self.trained[unique] = True

    def ledger(self) -> EpochLedger:
        return EpochLedger(self.rows, self.digest, np.packbits(self.trained))

    def totals(self) -> dict[str, int]:
        return {"trained": int(self.trained.sum()), "trained_twice": self.trained_twice}


class ForgottenStream(LookupError):
    """A call for a stream whose driver no longer holds it: nothing trains from that stream any more."""


@ray.remote(num_cpus=0)
class EpochRows:
    """The ``TrainedRows`` of each train stream that one process made, by stream."""

    def __init__(self):
        self.streams: dict[str, TrainedRows] = {}

    def open(self, stream: str, rows: int, digest: str) -> None:
        self.streams[stream] = TrainedRows(rows, digest)

    def close(self, stream: str) -> None:
        self.streams.pop(stream, None)

    def _of(self, stream: str) -> TrainedRows:
        if stream not in self.streams:
            raise ForgottenStream(f"train stream {stream}: its ledger was dropped once the process that made the "
                                  f"stream no longer held it; make the stream again (data.pipeline.train_stream)")
        return self.streams[stream]

    def start_epoch(self, stream: str, ledger: EpochLedger | None) -> str | None:
        return self._of(stream).start_epoch(ledger)

    def add(self, stream: str, rows: np.ndarray) -> None:
        self._of(stream).add(rows)

    def ledger(self, stream: str) -> EpochLedger:
        return self._of(stream).ledger()

    def excluded_rows(self, stream: str) -> np.ndarray | None:
        # A read task of a stream already dropped (a block Ray Data makes again from its lineage): nothing trains from
        # it any more, so it leaves nothing out.
        return self.streams[stream].excluded if stream in self.streams else None

    def totals(self, stream: str) -> dict[str, int]:
        return self._of(stream).totals()


@dataclass(frozen=True)
class StreamRows:
    """One train stream's ``TrainedRows`` in its process's ``EpochRows``; it travels with the stream to its read tasks
    and the training workers. Each call waits for the actor, so that what one process set, the next reads."""

    actor: "ray.actor.ActorHandle"
    stream: str

    def start_epoch(self, ledger: EpochLedger | None) -> str | None:
        """``TrainedRows.start_epoch``: a new epoch (``None``) or one resumed from ``ledger``; what is wrong with it."""
        return ray.get(self.actor.start_epoch.remote(self.stream, ledger))

    def add(self, rows: np.ndarray) -> None:
        ray.get(self.actor.add.remote(self.stream, rows))

    def ledger(self) -> EpochLedger:
        return ray.get(self.actor.ledger.remote(self.stream))

    def excluded_rows(self) -> np.ndarray | None:
        """Packed bits of the rows the stream leaves out, or None: every row."""
        return ray.get(self.actor.excluded_rows.remote(self.stream))

    def totals(self) -> dict[str, int]:
        return ray.get(self.actor.totals.remote(self.stream))


def stream_rows(rows: int, digest: str) -> StreamRows:
    """A new stream's ledger of ``rows`` train ids (the lookup's ``digest``), in this process's ``EpochRows``; the
    actor forgets it once the stream is gone from this process (its copies elsewhere must not outlive it)."""
    actor = bookkeeping_actor(EpochRows)
    stream = StreamRows(actor, uuid.uuid4().hex)
    ray.get(actor.open.remote(stream.stream, rows, digest))
    weakref.finalize(stream, _forget, actor, stream.stream, ray_job()).atexit = False
    return stream


def _forget(actor, stream: str, job: tuple[str, str, str]) -> None:
    # Not after Ray's shutdown, nor in a later Ray job of this process: the actor went with its job.
    if ray.is_initialized() and ray_job() == job:
        actor.close.remote(stream)


def is_set(packed: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether each of ``rows`` (positions >= 0) is set in the packed bitmap ``packed``."""
    return ((packed[rows >> 3] >> (7 - (rows & 7))) & 1).astype(bool)
