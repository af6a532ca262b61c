"""Exactly once per epoch across resumes: the ``EpochRows`` ledger, and a train stream that leaves out the rows a
resumed epoch trained before its checkpoint (ranged and streamed reads, decoded by Ray Data or by the workers)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig
from ray_landmark.data.epoch_rows import EpochLedger, EpochRows, is_set
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.pipeline import TRAINED_EARLIER, train_stream

pytestmark = pytest.mark.usefixtures("ray_session")


def test_the_ledger_counts_rows_trained_twice_and_refuses_a_ledger_of_another_view():
    import ray

    ledger = EpochRows.remote(20, "view-a")
    assert ray.get(ledger.start_epoch.remote(None)) is None and ray.get(ledger.excluded_rows.remote()) is None
    ray.get(ledger.add.remote(np.array([1, 5, 19])))
    ray.get(ledger.add.remote(np.array([5, 7, 7])))  # 5 again, and 7 twice in one call
    assert ray.get(ledger.totals.remote()) == {"trained": 4, "trained_twice": 2}
    saved = ray.get(ledger.ledger.remote())
    assert np.flatnonzero(np.unpackbits(saved.trained, count=20)).tolist() == [1, 5, 7, 19]

    # A resume: the saved rows are trained already and left out of the stream; the count of twice starts again.
    restored = EpochLedger.of({**saved.state(), "trained": saved.trained.copy()})
    assert ray.get(ledger.start_epoch.remote(restored)) is None
    assert ray.get(ledger.totals.remote()) == {"trained": 4, "trained_twice": 0}
    excluded = ray.get(ledger.excluded_rows.remote())
    assert is_set(excluded, np.arange(20)).nonzero()[0].tolist() == [1, 5, 7, 19]
    ray.get(ledger.add.remote(np.array([7])))
    assert ray.get(ledger.totals.remote())["trained_twice"] == 1

    other = ray.get(EpochRows.remote(20, "view-b").ledger.remote())
    assert "20 train ids (view digest view-b), the run's view 20 (view-a)" in ray.get(ledger.start_epoch.remote(other))
    assert ray.get(ledger.start_epoch.remote(None)) is None and ray.get(ledger.totals.remote())["trained"] == 0


@pytest.mark.parametrize("ranged, worker_decode", [(True, False), (False, False), (True, True)],
                         ids=["ranged", "streamed", "worker-decode"])
def test_a_resumed_epoch_streams_exactly_the_rows_its_ledger_lacks(gldv2_local, ranged, worker_decode):
    import ray

    cfg = DataConfig(root=gldv2_local, view="gldv2c", image_size=32, decode_batch_size=16, ranged_reads=ranged)
    manifest = open_manifest(cfg)
    lookup = manifest.label_lookup("gldv2c")
    view_rows = np.sort(lookup.rows_of(manifest.view_images("gldv2c")["id"].to_numpy(np.uint64)))
    stream = train_stream(cfg, manifest, worker_decode=worker_decode)

    def epoch(with_ids: bool = False):
        # Whole epochs only: an execution left unfinished would go on reading beside the next one.
        batches = list(stream.dataset.iter_batches(batch_size=16, batch_format="numpy"))
        rows = np.concatenate([b["row"] for b in batches])
        return (rows, np.concatenate([b["id"] for b in batches])) if with_ids else rows

    # A new epoch: every row of the view, each once, and each row is its image's (the read stage's rows, which the
    # workers decode, carry their ids too).
    first, ids = epoch(with_ids=True) if worker_decode else (epoch(), None)
    assert np.array_equal(np.sort(first), view_rows)
    if worker_decode:
        assert np.array_equal(lookup.rows_of(gldv2.ids_to_u64(ids)), first)

    # Resumed after a third of the view was trained: the rest comes, each once, and none of the third.
    ray.get(stream.epoch_rows.start_epoch.remote(None))
    trained = np.random.default_rng(0).choice(view_rows, len(view_rows) // 3, replace=False)
    ray.get(stream.epoch_rows.add.remote(trained))
    ray.get(stream.epoch_rows.start_epoch.remote(ray.get(stream.epoch_rows.ledger.remote())))
    before = stream.counts()
    rest = epoch()
    assert np.array_equal(np.sort(rest), np.setdiff1d(view_rows, trained))
    assert stream.counts()[TRAINED_EARLIER] - before.get(TRAINED_EARLIER, 0) == len(trained)

    # The next epoch starts from nothing.
    ray.get(stream.epoch_rows.start_epoch.remote(None))
    assert np.array_equal(np.sort(epoch()), view_rows)


def test_a_checkpoint_whose_ledger_was_made_under_another_view_is_refused_in_one_line_naming_it():
    from types import SimpleNamespace

    import ray

    from ray_landmark.runs.checkpoint import CorruptCheckpoint, LoadedCheckpoint, Progress
    from ray_landmark.train.loop import start_epoch_rows

    said = []
    worker = SimpleNamespace(rank=0, inputs=SimpleNamespace(epoch_rows=EpochRows.remote(4_000, "this-view")),
                             say=said.append)
    other = ray.get(EpochRows.remote(3_000, "other-view").ledger.remote())
    resume = LoadedCheckpoint({"epoch_ledger": other.state()}, {}, Progress(1, 12, 5), "s3://b/runs/r/checkpoint_7")
    with pytest.raises(CorruptCheckpoint) as err:
        start_epoch_rows(worker, resume)
    assert str(err.value).startswith("s3://b/runs/r/checkpoint_7: its ledger of trained images covers 3,000 train ids")
    assert "\n" not in str(err.value) and "train.restart" in str(err.value)

    # A mid-epoch checkpoint saved before ledgers: it resumes, drawing the rest from the whole epoch, and says so.
    start_epoch_rows(worker, LoadedCheckpoint({}, {}, Progress(1, 12, 5), "s3://b/runs/r/checkpoint_6"))
    assert said == ["[train] s3://b/runs/r/checkpoint_6 does not record which images its epoch trained (a checkpoint "
                    "of before that was saved): the rest of the epoch is drawn from all of them"]
    assert ray.get(worker.inputs.epoch_rows.excluded_rows.remote()) is None
