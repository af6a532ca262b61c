"""The benchmarks, each run from the repository's root as ``python -m benchmarks.<name>`` (BENCHMARKS.md lists them
and holds their results). Importing this package imports nothing: the GPU benchmarks (``gpu_check``, ``gpu_compile``,
``gpu_decode``, ``model_cost``) run on machines that have torch, torchvision, timm and pillow but neither Ray nor
pydantic."""
