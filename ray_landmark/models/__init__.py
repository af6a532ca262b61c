"""Landmark embedding models and their loss (docs/method.md §2, §3).

config.py      the ``model`` and ``loss`` config sections (pydantic): typed, validated, errors naming key and file
factory.py     build_model: config sections (or plain dicts of the same keys) -> the classes' keyword arguments
layers.py      GeM, necks, multi-atrous, spatial attention, orthogonal fusion
efficientnet.py, dolg.py, hybrid_swin.py   the three model families, plain keyword arguments as timm's models
arcface.py     sub-center ArcFace head, dynamic margins, ArcFace loss
transfer.py    freeze_except / warm_start between recipe steps
amp.py         mixed precision and the scaled optimizer step (training, validation, embedding, benchmarks)
torch_compile.py   torch.compile in place, one way for training and embedding
onnx_graph.py  the embedding network as an ONNX graph (infer/onnx_export.py checks and describes it)

Nothing is imported here, so that loading a config does not import torch. Everything but config.py
needs torch and timm alone (onnx_graph.py also onnx and onnxscript; no pydantic, no Ray), as on the GPU machines the
benchmarks run on.
"""
