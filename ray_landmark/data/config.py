"""The ``data`` section: where GLDv2 lives and how it is streamed into training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ray_landmark.config_base import Section

LabelView = Literal["gldv2c", "gldv2x", "full"]


class StorageConfig(Section):
    """How to reach object storage. Credentials never live here: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN) or the instance role."""

    # S3-compatible endpoint (MinIO, Ceph, a local moto server); None means AWS itself.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Unsigned requests, for public buckets such as GLDv2's own s3://google-landmark/.
    anonymous: bool = False
    # Tries of each request (listing a prefix, opening or reading a shard, writing a checkpoint) before the job fails
    # naming the URI: the S3 filesystem's retry strategy, the only layer that retries.
    retries: int = Field(3, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)


class DataConfig(Section):
    # GLDv2 root, a local folder or a bucket URI, laid out like the official bucket:
    # train/ index/ test/ (tar shards), metadata/ and ground_truth/ (CSVs).
    root: str
    # Where jobs/prepare_gldv2.py writes the compact manifests; default <root>/manifest.
    manifest: str | None = None
    storage: StorageConfig = StorageConfig()
    # How to reach the manifest when it differs from the root (GLDv2's public bucket read anonymously, the manifest
    # in your own bucket); default: as storage.
    manifest_storage: StorageConfig | None = None
    view: LabelView = "gldv2c"
    image_size: int = Field(448, gt=0)
    # How a JPEG becomes an image_size² image, at training and evaluation alike. fast: decode at 1/2, 1/4 or 1/8 scale
    # where both sides stay >= image_size (libjpeg's draft mode), then resize bilinearly with antialiasing. original:
    # decode the full JPEG and resize bilinearly without antialiasing, the pixels of the 2021 solution (OpenCV's
    # imread and INTER_LINEAR resize; here PIL or torchvision decode and torch resizes): for the released weights.
    preprocessing: Literal["fast", "original"] = "fast"
    augment: bool = True
    # Train rows are shuffled every epoch: the shard order, and each read task's raw JPEGs in a window of this many
    # rows (about 120 KB each for GLDv2), before they are decoded.
    shuffle_buffer: int = Field(512, ge=0)
    # Batches each training worker prepares ahead of the one it trains on.
    prefetch_batches: int = Field(4, ge=0)
    seed: int = 0
    # Where JPEGs become images (decode, resize, augment):
    #   cpu: Ray Data CPU tasks; the stream carries decoded S×S images.
    #   gpu: each training or embedding worker on its GPU (nvjpeg); the stream carries JPEG bytes. Needs GPU workers.
    #   worker: each worker on its own device, GPU or CPU: gpu's code path, also on CPU-only workers (CI, tests).
    #   auto: gpu on workers with a GPU, cpu otherwise.
    # See ray_landmark/data/worker_decode.py for what decoding in the worker costs in device memory.
    decode: Literal["cpu", "gpu", "worker", "auto"] = "cpu"
    # data.decode: cpu: rows per block a read task decodes and hands on (its images decoded together).
    decode_batch_size: int = Field(32, gt=0)
    # CPUs reserved per read task (one task reads one tar) when it only reads (data.decode: gpu or worker); below 1
    # lets more S3 streams run at once. With data.decode: cpu each task reads and decodes, holding decode_cpus.
    read_cpus: float = Field(0.25, gt=0)
    # Where the manifest has a split's shard index (jobs/prepare_gldv2.py --verify-shards), read only the members a
    # stream uses, by ranged requests; false (or no index) streams every shard whole.
    ranged_reads: bool = True
    # Ranged reads: a member whose data starts at most this many bytes after the previous wanted member's end is read
    # by the same request, the bytes between included (fewer requests, more bytes; measured in BENCHMARKS.md).
    range_gap_bytes: int = Field(65536, ge=0)
    # CPUs reserved per task that reads and decodes a tar (data.decode: cpu).
    decode_cpus: float = Field(1.0, gt=0)
    # Per-epoch validation: at most this many test images as queries (None: all scored ones), and at most this many
    # index images (the selected queries' relevant ones first, then others; None: the whole index).
    eval_queries: int | None = Field(None, gt=0)
    eval_index: int | None = Field(None, gt=0)
    # A tar shard the manifest lists (its shard index, or the tar list jobs/prepare_gldv2.py records) that is missing,
    # empty, a folder, or shorter than its index: error (the job stops before reading, naming it) or skip (the job
    # goes on without it, naming it at the start and in every epoch's line).
    missing_shards: Literal["error", "skip"] = "error"

    @property
    def manifest_uri(self) -> str:
        return self.manifest or self.root.rstrip("/") + "/manifest"


class SyntheticSpec(Section):
    """The ``synthetic`` config section: the size and look of a synthetic GLDv2. Bounds are checked before anything
    is written, so a bad value never leaves a partial dataset."""

    num_landmarks: int = Field(40, ge=2)  # landmarks in the full train set
    clean_landmark_fraction: float = Field(0.5, gt=0, le=1)  # share of landmarks that GLDv2c keeps
    # share of a landmark's train images that are label noise / very hard views
    noisy_image_fraction: float = Field(0.2, ge=0, lt=1)
    max_images_per_landmark: int = Field(40, ge=1)
    min_images_per_landmark: int = Field(3, ge=1)
    tail_exponent: float = Field(1.0, ge=0)  # class size ~ rank^-exponent
    test_landmark_images: int = Field(40, ge=1)
    test_non_landmark_images: int = Field(15, ge=0)
    index_images_per_test_landmark: int = Field(3, ge=1)
    index_distractor_landmarks: int = Field(8, ge=0)  # index-only landmarks, never in train or test
    index_distractor_images: int = Field(4, ge=0)
    # Index images listed in metadata/index.csv with no row in index_image_to_landmark.csv, as in the real GLDv2:
    # retrieval must still rank them (they are never relevant).
    index_unlisted_images: int = Field(6, ge=0)
    width: int = Field(96, ge=16)
    height: int = Field(72, ge=16)
    train_shards: int = Field(4, ge=1)
    index_shards: int = Field(2, ge=1)
    test_shards: int = Field(1, ge=1)
    jpeg_quality: int = Field(90, ge=1, le=100)
    seed: int = 0

    @model_validator(mode="after")
    def _image_counts_in_order(self):
        if self.min_images_per_landmark > self.max_images_per_landmark:
            raise ValueError(f"min_images_per_landmark ({self.min_images_per_landmark}) is above "
                             f"max_images_per_landmark ({self.max_images_per_landmark})")
        return self
