"""Training chains: every published model's steps load, build and warm-start from one another with only the tensors
they name dropped; the recipes carry the sources' numbers; a tiny three-step hybrid chain runs end to end, resumes when
stopped and skips finished steps. (The optimizers and lr schedules the recipes need: tests/test_optim.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from ray_landmark.config import load_config
from ray_landmark.errors import ConfigError
from ray_landmark.models.factory import build_model
from ray_landmark.models.transfer import warm_start
from ray_landmark.runs.identity import run_state
from ray_landmark.train.chain import load_chain, pending_steps, run_chain
from ray_landmark.train.trainer import fit

REPO = Path(__file__).resolve().parents[1]
# The on_step hook below runs in the Train workers, which cannot import this test module: pickle it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
CHAINS = sorted((REPO / "configs" / "chains").glob("*.yaml"))
PUBLISHED = {  # chain -> its last step: the model of the seed README's score table
    "dolg_efficientnet_b5": "dolg_efficientnet_b5", "dolg_efficientnet_b6": "dolg_efficientnet_b6",
    "dolg_efficientnet_b7": "dolg_efficientnet_b7_step3",
    "efficientnet_b3_swin_base_224": "efficientnet_b3_swin_base_224",
    "efficientnet_b5_swin_base_224": "efficientnet_b5_swin_base_224",
    "efficientnet_b6_swin_base_384": "efficientnet_b6_swin_base_384",
    "efficientnet_b3": "efficientnet_b3_step4", "efficientnet_b6": "efficientnet_b6_step2",
    "efficientnet_b5": "efficientnet_b5",
}


def test_every_published_model_has_a_chain_ending_in_its_recipe_and_each_step_starts_from_the_one_before(tmp_path):
    assert set(PUBLISHED) <= {p.stem for p in CHAINS}
    for path in CHAINS:
        chain, steps = load_chain(path, [f"run.output_dir={tmp_path}"])
        if chain.name in PUBLISHED:
            assert steps[-1].run.name == PUBLISHED[chain.name]
        assert steps[0].train.init_from is None
        for before, step in zip(steps, steps[1:]):
            assert step.train.init_from == str(tmp_path / before.run.name), (chain.name, step.run.name)
        if steps[-1].model.arch == "dolg":
            assert {s.model.fusion for s in steps} == {"published"}  # as the released models were trained


@pytest.mark.slow  # ~25 s: builds every step of every chain (on the meta device)
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("path", CHAINS, ids=[p.stem for p in CHAINS])
def test_each_step_of_a_chain_builds_and_loads_the_previous_one_dropping_only_what_it_names(path):
    _, steps = load_chain(path, ["model.pretrained=false"])
    previous = None
    for step in steps:
        with torch.device("meta"):  # shapes and names only: the real models are 100-250 M parameters
            model = build_model(step.model, step.loss, 50, step.data.image_size)
        if previous is not None:
            report = warm_start(model, previous, step.train.drop_keys)
            assert not report.shape_mismatched and not report.unexpected, (step.run.name, report.summary()[:500])
            assert report.loaded
        previous = model.state_dict()
    for step in (s for s in steps if s.train.trainable):  # docs/method.md §2.2 step 2: the CNN embedder alone
        assert step.train.trainable == ["encoder.swin.patch_embed.*"]
        assert step.train.epochs == 1 or path.stem.startswith("tiny_"), step.run.name  # one epoch


def test_the_2020_recipes_carry_their_sources_numbers():
    def train(name):
        return load_config(REPO / "configs" / "recipes" / f"{name}.yaml").train

    for name in ("efficientnet_b3_step1", "efficientnet_b3_step2", "efficientnet_b6_step1", "efficientnet_b6_step2"):
        assert (train(name).lr, train(name).warmup_start) == (1e-3, 0.1), name  # warm-up from 1e-4 to a 1e-3 peak
    assert (train("efficientnet_b3_step2").batch_size, train("efficientnet_b3_step2").stop_at) == (17, 29)
    assert (train("efficientnet_b6_step2").batch_size, train("efficientnet_b6_step2").stop_at) == (22, 28)
    for name in ("efficientnet_b3_step3", "efficientnet_b3_step4"):
        assert (train(name).epochs, train(name).batch_size, train(name).lr) == (5, 22, 5e-5)
    b5 = train("efficientnet_b5")
    assert (b5.optimizer, b5.lr, b5.momentum, b5.weight_decay, b5.schedule, b5.warmup_epochs) == (
        "sgd", 0.01, 0.9, 1e-5, "constant", 0)


def test_a_chain_with_a_broken_step_fails_before_anything_runs_naming_the_step(tmp_path):
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"name: c\nsteps:\n  - config: {REPO / 'configs' / 'tiny_dolg.yaml'}\n"
                     f"  - config: {REPO / 'configs' / 'tiny_dolg.yaml'}\n    overrides: ['run.name=b', 'train.lr=-1']\n")
    with pytest.raises(ConfigError, match=r"chain.yaml step 2: .*train.lr"):
        load_chain(chain)
    chain.write_text(f"name: c\nsteps:\n  - config: {REPO / 'configs' / 'tiny_dolg.yaml'}\n"
                     f"  - config: {REPO / 'configs' / 'tiny_dolg.yaml'}\n")
    with pytest.raises(ConfigError, match=r"step 2: run.name 'tiny_dolg' is used by an earlier step"):
        load_chain(chain)


class StopInSecondEpochOfStep2:
    """Stops step 2 at the first optimizer step of its second epoch: its epoch-1 checkpoint is stored by then."""

    def __call__(self, rank: int, epoch: int, step: int, rows=None) -> None:
        if rank == 0 and epoch == 1:
            raise RuntimeError("stopped by the test")


@pytest.mark.slow
def test_a_three_step_hybrid_chain_runs_resumes_a_half_done_step_and_skips_finished_ones(
    gldv2_learnable, ray_session, tmp_path, capsys
):
    chain_file = REPO / "configs" / "chains" / "tiny_hybrid_swin.yaml"
    # What is checked is what each step starts from, not what it learns: validation on a small eval set, at a step's
    # last epoch only.
    overrides = [f"data.root={gldv2_learnable}", f"run.output_dir={tmp_path}", "train.cpus_per_worker=0.5",
                 "data.augment=false", "train.max_failures=0", "data.eval_queries=8", "data.eval_index=16",
                 "train.eval_every=2"]
    chain, steps = load_chain(chain_file, overrides)
    lines: list[str] = []

    def fit_stopping_in_step_2(cfg):
        fit(cfg, on_step=StopInSecondEpochOfStep2() if cfg.run.name == "tiny_hybrid_swin_step2" else None)

    with pytest.raises(Exception, match="stopped by the test"):
        run_chain(chain, steps, fit_stopping_in_step_2, printer=lines.append)
    assert lines == [
        "[chain] tiny_hybrid_swin step 1/3 tiny_hybrid_swin_step1: starting; gldv2c, 32 px, 2 epochs, from random weights",
        f"[chain] tiny_hybrid_swin step 2/3 tiny_hybrid_swin_step2: starting; gldv2c, 64 px, 2 epochs, "
        f"from {tmp_path / 'tiny_hybrid_swin_step1'}",
    ]
    # Step 2 swaps Swin's patch embedding (4x4 conv and its norm) for the CNN embedder and trains only that.
    assert "dropped: encoder.swin.patch_embed.proj.weight, encoder.swin.patch_embed.proj.bias" in capsys.readouterr().out
    assert run_state(steps[1]) == (1, [])

    lines.clear()
    run_chain(chain, steps, fit, printer=lines.append)  # the same chain again
    assert lines[0].endswith("step 1/3 tiny_hybrid_swin_step1: finished earlier (2/2 epochs), skipped")
    assert "step 2/3 tiny_hybrid_swin_step2: resuming after epoch 1" in lines[1]
    assert "step 3/3 tiny_hybrid_swin_step3: starting" in lines[2]
    assert lines[3] == f"[chain] tiny_hybrid_swin finished: its model is {tmp_path / 'tiny_hybrid_swin_step3'}"
    out = capsys.readouterr().out
    assert "[train] resumed from" in out
    # Step 3 adds a CNN level: the 1x1 projection's input channels change, so its weight starts anew.
    assert "dropped: encoder.swin.patch_embed.proj.weight\n" in out
    assert [run_state(step) for step in steps] == [(2, [])] * 3

    # The job, rerun: every step is finished, so nothing trains and no Ray starts.
    job = subprocess.run(
        [sys.executable, "jobs/train_chain.py", "--chain", str(chain_file), *(f"--set={o}" for o in overrides)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 0 and job.stdout.count("finished earlier") == 3, job.stdout[-2000:] + job.stderr[-2000:]
    assert "[ray]" not in job.stdout

    # Step 3 changed (another image size): it is not finished; the job refuses before Ray starts, naming the key.
    changed = [*overrides, "data.image_size=48"]
    _, changed_steps = load_chain(chain_file, changed)
    assert pending_steps(changed_steps) == [0, 1, 2]  # the size reaches every step
    job = subprocess.run(
        [sys.executable, "jobs/train_chain.py", "--chain", str(chain_file), *(f"--set={o}" for o in changed)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 1, job.stdout[-2000:] + job.stderr[-2000:]
    assert job.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'tiny_hybrid_swin_step1'} was made with another config (data.image_size 32 -> 48); "
        f"resuming it would mix two configs: choose a new run.name, or pass --restart to move the old one aside")
    assert "[ray]" not in job.stdout


def test_a_step_whose_init_from_does_not_exist_fails_before_ray_starts_saying_what_to_do(tmp_path):
    from ray_landmark.train.trainer import load_training_data

    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", [f"train.init_from={tmp_path / 'step1'}"])
    with pytest.raises(ConfigError, match=r"train.init_from: nothing at .*step1; train the step before first"):
        load_training_data(cfg)
