"""The benchmarks, each run from the repository's root as ``python -m benchmarks.<name>`` (BENCHMARKS.md lists them
and holds their results). Importing this package imports nothing: the GPU benchmarks (``gpu_check``, ``gpu_compile``,
``gpu_decode``, ``gpu_onnx``, ``model_cost``) run on machines that have torch, torchvision, timm and pillow (and for
``gpu_onnx`` onnx, onnxscript and onnxruntime) but neither Ray nor pydantic."""
