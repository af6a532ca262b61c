"""Train a DOLG-EfficientNet on the Ray cluster (default: step 1 of DOLG-B5's chain, 256 px on GLDv2c).

    ray job submit --working-dir . -- python jobs/train_dolg.py --config configs/recipes/dolg_efficientnet_b5_step1.yaml
Each published DOLG is a chain of such configs, each starting from the previous step's checkpoint through
train.init_from; jobs/train_chain.py --chain configs/chains/dolg_efficientnet_b5.yaml runs one whole.
"""

from ray_landmark.cli import run_job, train_job

if __name__ == "__main__":
    run_job(lambda: train_job(__doc__, default_config="configs/recipes/dolg_efficientnet_b5_step1.yaml", arch="dolg"))
