"""Images added to an ensemble run's retrieval index after the run: the service's ``POST /index/add`` appends them,
and every replica of every service on the run, and the next ensemble run (``infer.ensemble.load_split``), read them.

They are a log in the run's folder, ``<output_dir>/<name>/index_additions/<number>.parquet``, numbered from 1 without
a gap: one file per accepted request, holding its image ids, every model's float16 embedding rows and the checkpoint
each model embedded them with. A file is written once and never changed, and

- whole or not at all (``storage.write_new``: one PUT on S3, a link on a local disk): a reader never sees half an
  addition, or one model's rows without the others';
- only where its number is free (``write_new`` creates only where nothing is): two writers racing for the same number
  cannot overwrite each other; the loser reads the winner's file, refuses ids it took, and takes the next number.

So the log is one sequence that every reader reads alike: the index rows of a run are its embedded index images
followed by the additions in number order, whichever process reads them and whenever.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Container
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_landmark.data.storage import Location, exists, list_files, read_bytes, write_new
from ray_landmark.errors import JobError
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.runs.folders import output_folder

LOG_FOLDER = "index_additions"
FILE_NAME = re.compile(r"(\d{8})\.parquet")
METADATA_KEY = b"ray_landmark"  # the parquet file's own metadata: checkpoints and writer


@dataclass(frozen=True)
class Addition:
    number: int  # its place in the log, from 1
    ids: list[str]
    by_model: dict[str, np.ndarray]  # model name -> float16 [len(ids), D]
    checkpoints: dict[str, str]  # model name -> the checkpoint that embedded its rows
    writer: str  # a token its writer chose: a writer whose write succeeded but whose reply was lost knows its own file


def additions_folder(cfg: EnsembleConfig) -> Location:
    return output_folder(cfg).child(LOG_FOLDER)


def _file(folder: Location, number: int) -> Location:
    return folder.child(f"{number:08d}.parquet")


def append_addition(cfg: EnsembleConfig, addition: Addition) -> bool:
    """Write ``addition`` as entry ``addition.number`` of the log; False when that number is taken (read the log
    past it and try the next)."""
    columns = {"id": pa.array(addition.ids, pa.string())}
    for name, rows in addition.by_model.items():
        columns[f"embedding:{name}"] = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float16()),
                                                                         rows.shape[1])
    table = pa.table(columns).replace_schema_metadata(
        {METADATA_KEY: json.dumps({"checkpoints": addition.checkpoints, "writer": addition.writer})})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return write_new(_file(additions_folder(cfg), addition.number), buf.getvalue(), cfg.storage)


def read_additions(cfg: EnsembleConfig, after: int = 0) -> list[Addition]:
    """The log's entries after number ``after``, in order: one existence check when there is none (what a service
    does at every refresh), a listing and a read per entry otherwise. ``check_additions`` says whether they fit."""
    folder = additions_folder(cfg)
    tries = cfg.storage.retries
    if not exists(_file(folder, after + 1), tries):
        return []
    numbers = {int(m.group(1)) for path in list_files(folder, ".parquet", tries)
               if (m := FILE_NAME.fullmatch(path.rsplit("/", 1)[-1]))}
    additions = []
    number = after + 1
    while number in numbers:  # numbers have no gap: a writer takes n + 1 only after reading n
        additions.append(_read(_file(folder, number), number, tries))
        number += 1
    return additions


def _read(loc: Location, number: int, tries: int) -> Addition:
    table = pq.read_table(io.BytesIO(read_bytes(loc, tries)))
    written = json.loads(table.schema.metadata[METADATA_KEY])
    by_model = {}
    for name in written["checkpoints"]:
        column = table.column(f"embedding:{name}").combine_chunks()
        rows = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)
        by_model[name] = rows.astype(np.float16, copy=False)
    return Addition(number, table.column("id").to_pylist(), by_model, written["checkpoints"], written["writer"])


def check_additions(cfg: EnsembleConfig, additions: list[Addition], checkpoints: dict[str, str],
                    taken: Container[str]) -> None:
    """That the additions extend this index: each holds rows of every model in ``checkpoints`` (model name -> the
    checkpoint that embedded the run's index), embedded by it, and no id of ``taken`` (the index's ids) or of an
    earlier addition. ``append_addition``'s writers never repeat an id, but a run re-embedded with a new checkpoint
    or a longer index.csv can leave a log that no longer fits; one line names the entry."""
    folder, seen = additions_folder(cfg), {}
    for addition in additions:
        uri = _file(folder, addition.number).uri
        for name, checkpoint in checkpoints.items():
            theirs = addition.checkpoints.get(name)
            if theirs != checkpoint:
                how = f"were embedded with {theirs}" if theirs else "are missing (added before the model joined)"
                raise JobError(f"{uri}: model {name}'s rows {how}, but the run's index was embedded with "
                               f"{checkpoint}; move {LOG_FOLDER}/ out of the run's folder and add its images again")
        for image_id in addition.ids:
            if image_id in taken or image_id in seen:
                where = _file(folder, seen[image_id]).uri if image_id in seen else "the run's embedded index"
                raise JobError(f"{uri}: image {image_id} is already in {where}; an id is added once: remove one "
                               f"of them")
            seen[image_id] = addition.number
