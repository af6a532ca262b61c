"""Exactly once per epoch across resumes: a train stream's ledger of trained rows, and a train stream that leaves out
the rows a resumed epoch trained before its checkpoint (ranged and streamed reads, decoded by Ray Data or by the
workers)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig
from ray_landmark.data.epoch_rows import EpochLedger, ForgottenStream, is_set, stream_rows
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.pipeline import TRAINED_EARLIER, train_stream

pytestmark = pytest.mark.usefixtures("ray_session")


def test_the_ledger_counts_rows_trained_twice_and_refuses_a_ledger_of_another_view():
    ledger = stream_rows(20, "view-a")
    assert ledger.start_epoch(None) is None and ledger.excluded_rows() is None
    ledger.add(np.array([1, 5, 19]))
    ledger.add(np.array([5, 7, 7]))  # 5 again, and 7 twice in one call
    assert ledger.totals() == {"trained": 4, "trained_twice": 2}
    saved = ledger.ledger()
    assert np.flatnonzero(np.unpackbits(saved.trained, count=20)).tolist() == [1, 5, 7, 19]

    # A resume: the saved rows are trained already and left out of the stream; the count of twice starts again.
    restored = EpochLedger.of({**saved.state(), "trained": saved.trained.copy()})
    assert ledger.start_epoch(restored) is None
    assert ledger.totals() == {"trained": 4, "trained_twice": 0}
    excluded = ledger.excluded_rows()
    assert is_set(excluded, np.arange(20)).nonzero()[0].tolist() == [1, 5, 7, 19]
    ledger.add(np.array([7]))
    assert ledger.totals()["trained_twice"] == 1

    other = stream_rows(20, "view-b").ledger()
    assert "20 train ids (view digest view-b), the run's view 20 (view-a)" in ledger.start_epoch(other)
    assert ledger.start_epoch(None) is None and ledger.totals()["trained"] == 0


def test_a_processs_streams_share_one_actor_each_with_a_ledger_of_its_own_forgotten_with_the_stream():
    import gc

    import ray

    first, second = stream_rows(20, "view-a"), stream_rows(20, "view-a")
    assert first.actor == second.actor and first.stream != second.stream
    first.add(np.array([3, 4]))
    assert first.totals()["trained"] == 2 and second.totals()["trained"] == 0
    actor, stream = second.actor, second.stream
    del second
    gc.collect()
    # The actor's calls from this process run in order: the forgetting first.
    with pytest.raises(ForgottenStream, match=f"train stream {stream}: its ledger was dropped once the process"):
        ray.get(actor.totals.remote(stream))
    assert ray.get(actor.excluded_rows.remote(stream)) is None  # a block made again from its lineage leaves none out
    assert first.totals()["trained"] == 2


@pytest.mark.parametrize("ranged, worker_decode", [(True, False), (False, False), (True, True)],
                         ids=["ranged", "streamed", "worker-decode"])
def test_a_resumed_epoch_streams_exactly_the_rows_its_ledger_lacks(gldv2_local, ranged, worker_decode):
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
    stream.epoch_rows.start_epoch(None)
    trained = np.random.default_rng(0).choice(view_rows, len(view_rows) // 3, replace=False)
    stream.epoch_rows.add(trained)
    stream.epoch_rows.start_epoch(stream.epoch_rows.ledger())
    before = stream.counts()
    rest = epoch()
    assert np.array_equal(np.sort(rest), np.setdiff1d(view_rows, trained))
    assert stream.counts()[TRAINED_EARLIER] - before.get(TRAINED_EARLIER, 0) == len(trained)

    # The next epoch starts from nothing.
    stream.epoch_rows.start_epoch(None)
    assert np.array_equal(np.sort(epoch()), view_rows)


def test_a_checkpoint_whose_ledger_was_made_under_another_view_is_refused_in_one_line_naming_it():
    from types import SimpleNamespace

    from ray_landmark.runs.checkpoint import CorruptCheckpoint, LoadedCheckpoint, Progress
    from ray_landmark.train.loop import start_epoch_rows

    said = []
    worker = SimpleNamespace(rank=0, inputs=SimpleNamespace(epoch_rows=stream_rows(4_000, "this-view")),
                             say=said.append)
    other = stream_rows(3_000, "other-view").ledger()
    resume = LoadedCheckpoint({"epoch_ledger": other.state()}, {}, Progress(1, 12, 5), "s3://b/runs/r/checkpoint_7")
    with pytest.raises(CorruptCheckpoint) as err:
        start_epoch_rows(worker, resume)
    assert str(err.value).startswith("s3://b/runs/r/checkpoint_7: its ledger of trained images covers 3,000 train ids")
    assert "\n" not in str(err.value) and "train.restart" in str(err.value)

    # A mid-epoch checkpoint saved before ledgers: it resumes, drawing the rest from the whole epoch, and says so.
    start_epoch_rows(worker, LoadedCheckpoint({}, {}, Progress(1, 12, 5), "s3://b/runs/r/checkpoint_6"))
    assert said == ["[train] s3://b/runs/r/checkpoint_6 does not record which images its epoch trained (a checkpoint "
                    "of before that was saved): the rest of the epoch is drawn from all of them"]
    assert worker.inputs.epoch_rows.excluded_rows() is None
