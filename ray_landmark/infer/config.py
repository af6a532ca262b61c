"""The ensemble config (``configs/ensemble/*.yaml``): which trained models, how they are embedded and combined, and
the post-processing of the 2021 method (arXiv 2110.03786) with every k configurable."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ray_landmark.config_base import Section
from ray_landmark.data.config import DataConfig, LabelView, StorageConfig

Task = Literal["recognition", "retrieval"]


class EnsembleModel(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # names its embeddings folder and its rows in the report
    checkpoint: str  # checkpoint folder or run folder (its newest checkpoint)
    family: str  # models of one family are averaged before the families are concatenated (DOLG, hybrid, ...)
    weight: float = Field(1.0, gt=0)  # in its family's average and in retrieval's score sum
    # The published ensemble uses the plain EfficientNet-B3 for recognition only and the retrieval B5 for retrieval.
    tasks: list[Task] = ["recognition", "retrieval"]


class EmbedSettings(Section):
    """How a checkpoint's images are embedded: the ensemble config's ``embed`` section, ``jobs/embed.py``'s flags and
    ``--set embed.KEY=VALUE``, and what each model actor (``infer.embed.Embedder``) and service replica receives."""

    batch_size: int = Field(64, gt=0)
    flip_tta: bool = False  # average each image's embedding with its mirror image's
    # Each image is also embedded resized by these factors, and its unit embeddings are averaged and L2-normalised
    # (multi-scale descriptors, as Revisited Oxford and Paris are evaluated; the method embeds at 1 only).
    scales: list[Annotated[float, Field(gt=0)]] = Field([1.0], min_length=1)
    actors: int = Field(1, ge=1)  # model replicas: one per GPU on a cluster
    gpus_per_actor: float = Field(0.0, ge=0)
    # A CPU-only actor runs torch on this many threads. Unlike the decode tasks' 1 CPU, it also keeps Ray Data from
    # fusing decoding into the model actor (it fuses stages with equal resources), which ran 3.4x slower.
    cpus_per_actor: float = Field(2.0, gt=0)
    shards_per_pass: int = Field(32, ge=1)  # shards embedded by one Ray Data pipeline (bounds what the driver holds)
    # torch.compile of the encoder, the setting as train.compile (models/torch_compile.py): auto = on where the actor
    # has a GPU; a compiled model gets every batch padded to batch_size, so it compiles once per scale.
    compile: Literal["auto"] | bool = "auto"
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"


Usage = Literal["Public", "Private", "Ignored"]


class NonLandmarkSet(Section):
    """The known non-landmark images N of the re-ranking.

    ``split`` (the method, after the 2020 1st-place code): the test images without a landmark in a recognition
    ground-truth file (``ground_truth``, default the manifest's, from ``recognition_solution_v2.1.csv``), of the
    ``usages`` given (default all). ``ids``: the images listed in a CSV (column ``id``), embedded in ``ids_split``
    or, for a set from elsewhere, in ``embeddings`` (a folder with one sub-folder per model name, as
    ``jobs/embed.py`` writes them). ``cross_usage``: Public queries are re-ranked with the Private non-landmark test
    images and the other way round (an honest validation, not the method). In every case an image that is in N is
    never its own evidence: it is left out of its own penalty and of the b_j it would meet.
    """

    source: Literal["split", "ids", "cross_usage"] = "split"
    ground_truth: str | None = None  # split: a CSV with id, landmarks and Usage columns
    usages: list[Usage] = Field(["Public", "Private", "Ignored"], min_length=1)  # split: the rows used
    ids: str | None = None  # ids: a CSV with an id column
    ids_split: Literal["test", "index", "train"] = "test"  # ids: the split whose embeddings hold them
    embeddings: str | None = None  # ids: instead, an outside folder <embeddings>/<model name>/

    @model_validator(mode="after")
    def _source_settings(self):
        if self.source == "ids" and not self.ids:
            raise ValueError("recognition.nonlandmark.ids: a CSV URI is required when source is 'ids'")
        if self.source != "ids" and (self.ids or self.embeddings):
            raise ValueError("recognition.nonlandmark.ids and .embeddings are read only when source is 'ids'")
        if self.source != "split" and self.ground_truth:
            raise ValueError("recognition.nonlandmark.ground_truth is read only when source is 'split'")
        return self


class RecognitionSettings(Section):
    # The top_k are exact over the whole gallery after the adjustment clamp(cos, 0, 1) - b_j (no raw shortlist).
    top_k: int = Field(3, ge=1)  # adjusted similarities summed per landmark
    gallery_nonlandmark_k: int = Field(5, ge=1)  # b_j = mean of train image j's top-k similarities to N
    query_nonlandmark_k: int = Field(10, ge=1)  # confidence -= mean of the query's top-k similarities to N
    nonlandmark: NonLandmarkSet = NonLandmarkSet()


class Expansion(Section):
    """Alpha query expansion (alpha-QE) or database-side augmentation (DBA), Radenovic et al., TPAMI 2019: a
    descriptor is replaced by the L2-normalised sum of itself and its ``k`` nearest index images, each weighted by
    its similarity to the power ``alpha`` (negative similarities count as 0). Not part of the 2021 method."""

    enabled: bool = False
    k: int = Field(10, ge=1)  # index neighbours summed (DBA: besides the image itself)
    alpha: float = Field(3.0, ge=0)


class RetrievalSettings(Section):
    per_model: int = Field(750, ge=1)  # index images kept per query and model before the scores are summed
    # Nearest index images searched per query and model for the label re-rank, which is exact whatever this is
    # (postprocess.label_rerank): a wider pool needs fewer second searches.
    rerank_pool: int = Field(3000, ge=1)
    out_k: int = Field(100, ge=1)
    label_k: int = Field(3, ge=1)  # train neighbours that label queries and index images
    # Who labels queries and index images: each model by its own train neighbours (the published code), or the
    # retrieval models' ensemble embedding (one label per image for every model).
    labels: Literal["model", "ensemble"] = "model"
    # c_j, the boost: the summed clamp(cos) of the winning label over the label_k neighbours (0..label_k, the
    # published code), or that sum / label_k (0..1, one similarity).
    boost: Literal["sum", "mean"] = "sum"
    # Applied to each model's descriptors before its index search and label re-rank; off as published.
    qe: Expansion = Expansion()  # the queries
    dba: Expansion = Expansion()  # the index images
    # Score each choice flipped alone (labels, boost, qe, dba) as an ablation row of the report: one more retrieval
    # each.
    ablations: bool = True
    same_factor: float = 1.0  # s += same_factor * c_j when the labels agree
    other_factor: float = 0.1  # s -= other_factor * c_j otherwise


class ReportSettings(Section):
    queries: int = Field(24, ge=0)  # sampled test queries shown in the gallery
    results: int = Field(10, ge=1)  # retrieved index images shown per query
    seed: int = 0


class EnsembleConfig(Section):
    name: str
    # <output_dir>/<name>/ holds the embeddings (embeddings/<model>/<split>/), submissions, report.html, summary.json.
    output_dir: str
    storage: StorageConfig = StorageConfig()  # how to reach output_dir and the checkpoints
    # Where GLDv2 lives; default: the first model's checkpoint config. The image size is each model's own.
    data: DataConfig | None = None
    gallery_view: LabelView = "gldv2c"  # the train images that are the kNN gallery
    models: list[EnsembleModel] = Field(min_length=1)
    embed: EmbedSettings = EmbedSettings()
    recognition: RecognitionSettings = RecognitionSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    report: ReportSettings = ReportSettings()
    # The search and post-processing run as one Ray task: a GPU for it (a cluster's head node has none), and the CPUs
    # whose threads torch and faiss may use.
    score_gpus: float = Field(0.0, ge=0)
    score_cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _unique_names_and_both_tasks(self):
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: the names {duplicates} appear more than once")
        for task in ("recognition", "retrieval"):
            if not any(task in m.tasks for m in self.models):
                raise ValueError(f"models: no model is used for {task}")
        return self
