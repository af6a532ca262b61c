"""Export a trained model's embedding network to ONNX (dynamic batch, the model's image size), checked with
onnxruntime against PyTorch on test images of its data before it reports success.

    python jobs/export_onnx.py --checkpoint s3://my-bucket/runs/dolg_efficientnet_b5 --out exported/dolg_b5 \\
        [--head] [--triton] [--endpoint-url URL]
Writes <out>/model.onnx (or <out>/1/model.onnx with --triton, beside config.pbtxt) and <out>/model.json (input size,
normalisation, preprocessing, embedding dimension, the check's max abs difference). No Ray is needed.
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import check_writable, resolve
from ray_landmark.infer.onnx_export import export_onnx
from ray_landmark.progress import say


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its newest checkpoint)")
    parser.add_argument("--out", required=True, help="local folder for model.onnx and model.json")
    parser.add_argument("--head", action="store_true", help="also output the ArcFace cosines per class")
    parser.add_argument("--triton", action="store_true", help="lay the folder out as a Triton model, config.pbtxt")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint of the checkpoint and its data; default AWS")
    parser.add_argument("--check-images", type=int, default=8, help="test images compared with PyTorch")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed")
    args = parser.parse_args()
    check_writable(resolve(args.out), "--out")  # before the model is loaded and traced
    result = export_onnx(args.checkpoint, args.out, StorageConfig(endpoint_url=args.endpoint_url), head=args.head,
                         triton=args.triton, check_images=args.check_images, tolerance=args.tolerance)
    check = result.metadata["check"]
    say(f"[export] {result.onnx}: opset {result.metadata['opset']}, {result.metadata['image_size']} px, "
        f"{result.metadata['embedding_dim']}-d; onnxruntime vs PyTorch on {check['images']} test images at batch "
        f"sizes {check['batch_sizes']}: max abs diff {check['max_abs_diff']}")
    say(f"[export] wrote {', '.join(result.files)}")


if __name__ == "__main__":
    run_job(main)
