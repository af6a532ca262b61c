"""The ensemble config (``configs/ensemble/*.yaml``): which trained models, how they are embedded and combined, and
the post-processing of solution.md §5 with every k configurable."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ray_landmark.config_base import Section
from ray_landmark.data.config import DataConfig, LabelView, StorageConfig

Task = Literal["recognition", "retrieval"]


class EnsembleModel(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # names its embeddings folder and its rows in the report
    checkpoint: str  # checkpoint folder or run folder (its newest checkpoint)
    family: str  # models of one family are averaged before the families are concatenated (DOLG, hybrid, ...)
    weight: float = Field(1.0, gt=0)  # in the family average and in retrieval's score sum
    # The published ensemble uses the plain EfficientNet-B3 for recognition only and the retrieval B5 for retrieval.
    tasks: list[Task] = ["recognition", "retrieval"]


class EmbedSettings(Section):
    batch_size: int = Field(64, gt=0)
    flip_tta: bool = False
    actors: int = Field(1, ge=1)  # model replicas: one per GPU on a cluster
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(2.0, gt=0)  # torch threads of a CPU-only actor (see infer.embed.EmbedRequest)
    shards_per_pass: int = Field(32, ge=1)
    # torch.compile of the encoder, the setting as train.compile: auto = on where the actor has a GPU.
    compile: Literal["auto"] | bool = "auto"
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"


class NonLandmarkSet(Section):
    """The known non-landmark images N of the re-ranking. ``cross_usage`` scores Public test queries with the
    Private split's non-landmark test images and the other way round, so no scored query is its own evidence; or
    ``ids``: a CSV (column ``id``) of test images to use for every query."""

    source: Literal["cross_usage", "ids"] = "cross_usage"
    ids: str | None = None

    @model_validator(mode="after")
    def _ids_given(self):
        if self.source == "ids" and not self.ids:
            raise ValueError("recognition.nonlandmark.ids: a CSV URI is required when source is 'ids'")
        return self


class RecognitionSettings(Section):
    neighbours: int = Field(100, ge=1)  # train neighbours fetched per query (the re-ranking then keeps top_k)
    top_k: int = Field(3, ge=1)  # adjusted similarities summed per landmark
    gallery_nonlandmark_k: int = Field(5, ge=1)  # b_j = mean of train image j's top-k similarities to N
    query_nonlandmark_k: int = Field(10, ge=1)  # confidence -= mean of the query's top-k similarities to N
    nonlandmark: NonLandmarkSet = NonLandmarkSet()


class RetrievalSettings(Section):
    per_model: int = Field(750, ge=1)  # index images kept per query and model before the scores are summed
    # Nearest index images re-ranked per query and model before the cut to per_model: wider, so that a same-label
    # image just below the cut can move up (its boost c_j is up to label_k).
    rerank_pool: int = Field(3000, ge=1)
    out_k: int = Field(100, ge=1)
    label_k: int = Field(3, ge=1)  # train neighbours that label queries and index images
    same_factor: float = 1.0  # s += same_factor * c_j when the labels agree
    other_factor: float = 0.1  # s -= other_factor * c_j otherwise


class ReportSettings(Section):
    queries: int = Field(24, ge=0)  # sampled test queries shown in the gallery
    results: int = Field(10, ge=1)  # retrieved index images shown per query
    seed: int = 0


class EnsembleConfig(Section):
    name: str
    # Embeddings (<output_dir>/embeddings/<model>/<split>/), predictions, submissions, report.html, summary.json.
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
