"""Which images of the view the current epoch has trained, so that an epoch resumed from a mid-epoch checkpoint streams
exactly the rest: every image of the view once per epoch, across any number of resumes.

Rows are an image's position among the train ids (``LabelLookup.rows_of``), and the ledger is a bitmap over them: 1 bit
an image (GLDv2's 4,132,914 train ids: 516,615 bytes), whatever the view. One small actor per training run holds it,
started by the driver with the train stream, so that it outlives the worker groups that Ray Train restarts:

- at each checkpoint every rank adds the rows its optimizer steps trained since the last one; rank 0 saves the bitmap
  in the checkpoint (``EpochLedger``);
- a worker group that resumes inside an epoch sets the checkpoint's bitmap as the epoch's ``excluded`` rows, before
  any worker reads the stream; the stream's read tasks leave those rows out (``data/pipeline.py``);
- a new epoch clears it.

Rows trained twice (which the above rules out) are counted, not hidden. Imports only Ray and numpy: the actor is a
process of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray


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


@ray.remote(num_cpus=0)
class EpochRows:
    """The current epoch's bitmap of trained rows, and the rows its stream leaves out (those trained before the
    resume it started from)."""

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

    def excluded_rows(self) -> np.ndarray | None:
        return self.excluded

    def totals(self) -> dict[str, int]:
        return {"trained": int(self.trained.sum()), "trained_twice": self.trained_twice}


def is_set(packed: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether each of ``rows`` (positions >= 0) is set in the packed bitmap ``packed``."""
    return ((packed[rows >> 3] >> (7 - (rows & 7))) & 1).astype(bool)
