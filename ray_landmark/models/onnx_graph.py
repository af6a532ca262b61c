"""A model's embedding network as an ONNX graph: what ``infer/onnx_export.py`` writes for a checkpoint, and what
``benchmarks/gpu_onnx.py`` builds from a config file on a GPU machine without pydantic. Needs torch, onnx and
onnxscript (the exporter's), no pydantic and no Ray.

The graph comes from ``torch.onnx.export(dynamo=True)`` (the torch.export-based exporter) at ONNX opset 18 with a
dynamic batch dimension; the legacy TorchScript exporter (``dynamo=False``) disagreed with PyTorch by 0.2 on the tiny
models, so it is not used.
"""

from __future__ import annotations

import torch

OPSET = 18  # onnxruntime 1.17+ and TensorRT 10 read it
INPUT = "images"


class EmbeddingNetwork(torch.nn.Module):
    """The exported graph: normalised images -> unit embeddings (and the ArcFace cosines with ``head``)."""

    def __init__(self, model: torch.nn.Module, head: bool = False):
        super().__init__()
        self.model, self.head = model, head
        self.outputs = ["embedding", "cosine"] if head else ["embedding"]

    def forward(self, images: torch.Tensor):
        embedding = self.model.embed(images)
        return (embedding, self.model.head(embedding)) if self.head else embedding


def export_graph(network: EmbeddingNetwork, example: torch.Tensor, path: str):
    """Write ``network``'s graph to ``path`` (traced on ``example``, float32 normalised N×3×S×S images on the CPU,
    N of 2 or more so that the batch dimension stays dynamic), checked by ``onnx.checker``; returns the loaded graph
    (an ``onnx.ModelProto``)."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(network, (example,), input_names=[INPUT], output_names=network.outputs,
                                    opset_version=OPSET, dynamo=True, dynamic_shapes={INPUT: {0: batch}},
                                    external_data=False, verbose=False)
        program.save(path)
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    return graph
