"""Train a DOLG-EfficientNet (default: DOLG-B5 at 768 px on GLDv2x, the published recipe) on the Ray cluster.

    ray job submit --working-dir . -- python jobs/train_dolg.py --config configs/recipes/dolg_efficientnet_b5.yaml
The B7 recipe is three configs run in order (dolg_efficientnet_b7_step1/2/3.yaml); each starts from the previous
step's checkpoint through train.init_from.
"""

import train

from ray_landmark.cli import run_job

if __name__ == "__main__":
    run_job(lambda: train.main("configs/recipes/dolg_efficientnet_b5.yaml", __doc__, arch="dolg"))
