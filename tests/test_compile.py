"""torch.compile in training and embedding (models/torch_compile.py): the same losses, outputs and state-dict keys as
eager with frozen parameters, resuming across the setting both ways, validation's and the embedding job's padding to
one shape, and an eager run resumed compiled through the real training loop (DDP over 2 workers, gradient
accumulation).

The compiled tests use the aot_eager backend: dynamo and AOTAutograd trace the same forward and backward graphs as
for inductor, but inductor's C++ code generation takes one to two minutes per tiny model on 2 cores (cold cache),
more than this whole file may take. Inductor itself runs in benchmarks/gpu_compile.py.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_landmark.config import load_config
from ray_landmark.data.config import StorageConfig
from ray_landmark.models.factory import build_model
from ray_landmark.models.torch_compile import compile_for_training, compile_wanted
from ray_landmark.models.transfer import freeze_except, warm_start
from ray_landmark.runs.checkpoint import Progress, load_model, read_checkpoint_at, save_checkpoint
from ray_landmark.runs.folders import run_logs

REPO = Path(__file__).resolve().parents[1]
CLASSES = 8


def _tiny(name: str):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, CLASSES, cfg.data.image_size, list(range(1, CLASSES + 1)))
    return cfg, model.to(memory_format=torch.channels_last)


def test_auto_compiles_on_a_gpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("auto", gpu) and not compile_wanted("auto", cpu)
    assert compile_wanted(True, cpu) and not compile_wanted(False, gpu)


def test_a_compiled_model_trains_evaluates_and_resumes_as_eager_with_the_same_state_dict_keys():
    # The hybrid: the family the loop test below does not train (tests/test_models.py compiles every tiny family).
    # Its recipe step 2 trains the CNN embedder alone: the rest is frozen before compiling, as the loop does.
    cfg, eager = _tiny("tiny_hybrid_swin")
    _, compiled = _tiny("tiny_hybrid_swin")  # the same seed: the same initial weights
    for model in (eager, compiled):
        freeze_except(model, ["encoder.swin.patch_embed.*"])
    frozen_head = compiled.head.weight.detach().clone()
    compile_for_training(compiled, "aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." anywhere

    size = cfg.data.image_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (8,), generator=generator)
    runs = [(model.train(), torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3))
            for model in (eager, compiled)]

    def step_both(step: int) -> None:
        losses = []
        for model, optimizer in runs:
            torch.manual_seed(step)  # the same stochastic depth (the tiny Swin's) in both
            loss = model(images, labels)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)

    for step in range(2):  # the second step's loss shows the compiled graph reads the updated weights
        step_both(step)
    assert torch.equal(compiled.head.weight, frozen_head)
    with torch.no_grad():  # validation: evaluation mode, no labels
        torch.testing.assert_close(compiled.eval()(images), eager.eval()(images), rtol=1e-4, atol=1e-4)

    # Resuming across the setting: each continues from the other's model and optimizer state, strictly loaded.
    states = [copy.deepcopy((model.state_dict(), optimizer.state_dict())) for model, optimizer in runs]
    for (model, optimizer), (model_state, optimizer_state) in zip(runs, reversed(states)):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        model.train()
    step_both(2)
    # train.init_from: warm_start loads every tensor of a compiled model's state dict.
    report = warm_start(eager, compiled.state_dict())
    assert not (report.missing or report.unexpected or report.shape_mismatched)


def test_the_embedding_job_pads_a_compiled_model_to_one_shape(tmp_path):
    from ray_landmark.infer.config import EmbedSettings
    from ray_landmark.infer.embed import Embedder

    cfg, model = _tiny("tiny_dolg")
    save_checkpoint(tmp_path, state={"model": model.state_dict(), "landmark_ids": torch.arange(CLASSES)},
                    config=cfg.model_dump(mode="json"), progress=Progress(1, 1, 0))
    eager = Embedder(str(tmp_path), StorageConfig(), EmbedSettings(flip_tta=True, compile=False))
    compiled = Embedder(str(tmp_path), StorageConfig(), EmbedSettings(flip_tta=True, compile=True,
                                                                      compile_backend="aot_eager", batch_size=8))
    size = cfg.data.image_size
    rng = np.random.default_rng(0)

    def batch(rows: int) -> dict:
        return {"image": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8), "id": np.arange(rows),
                "split": np.full(rows, "test"), "shard": np.full(rows, "test-0.tar")}

    full, short = batch(8), batch(5)
    np.testing.assert_allclose(compiled(full)["embedding"], eager(full)["embedding"], atol=2e-3)
    with torch.compiler.set_stance("fail_on_recompile"):  # the short batch is padded: no second graph
        out = compiled(short)
    assert out["embedding"].shape == (5, 512)
    np.testing.assert_allclose(out["embedding"], eager(short)["embedding"], atol=2e-3)


def test_validation_pads_a_compiled_models_short_batch_to_one_shape():
    import contextlib

    from ray_landmark.train.validate import embed_and_classify

    cfg, eager = _tiny("tiny_dolg")
    compiled = copy.deepcopy(eager)
    compile_for_training(compiled, "aot_eager")
    size = cfg.data.image_size
    generator = torch.Generator().manual_seed(2)
    full, short = (torch.randn(rows, 3, size, size, generator=generator) for rows in (8, 5))

    def both(images, pad_to):
        return [embed_and_classify(model.eval(), images, contextlib.nullcontext(), torch.channels_last, pad)
                for model, pad in ((eager, None), (compiled, pad_to))]

    for expected, got in zip(*both(full, 8)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.compiler.set_stance("fail_on_recompile"):  # a rank's short last batch: padded, no second graph
        eager_out, compiled_out = both(short, 8)
    assert compiled_out[0].shape == (5, 512) and compiled_out[1].shape == compiled_out[2].shape == (5,)
    for expected, got in zip(eager_out, compiled_out):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_an_eager_run_resumes_compiled_with_ddp_and_accumulation_and_writes_the_same_keys(
    tiny_checkpoints, tmp_path, capsys
):
    """The session's eager tiny DOLG run (2 epochs), copied, trains 2 more epochs compiled through the real loop."""
    from ray_landmark.config import config_from_dict, set_dotted
    from ray_landmark.runs.checkpoint import read_checkpoint_config
    from ray_landmark.train.metrics_log import read_metrics
    from ray_landmark.train.trainer import fit

    eager_run = Path(tiny_checkpoints["dolg"])
    shutil.copytree(eager_run, tmp_path / eager_run.name)
    tree = read_checkpoint_config(str(eager_run))
    # DDP over 2 workers with accumulation makes an epoch fewer steps than the eager run's: the schedule continues at
    # the same point of its epochs (epoch 2 of a longer one here, cut at epoch 4). Validation (compiled too) of a small
    # eval set at the last epoch only: what is checked is that it runs, not what it scores.
    for key, value in {"run.output_dir": str(tmp_path), "train.epochs": 20, "train.stop_at": 4,
                       "train.num_workers": 2, "train.grad_accum": 2, "train.compile": True,
                       "train.compile_backend": "aot_eager", "train.eval_every": 10, "data.eval_queries": 8,
                       "data.eval_index": 16}.items():
        set_dotted(tree, key, value, "test")
    cfg = config_from_dict(tree)
    result = fit(cfg)

    history = read_metrics(run_logs(cfg.run))
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]  # resumed at epoch 3, no epoch repeated
    assert "the learning-rate schedule continues at the same point of its epochs" in capsys.readouterr().out
    assert np.isfinite(result.metrics["loss"]) and "val_map100" in result.metrics
    compiled, eager = (read_checkpoint_at(run).state["model"] for run in (result.checkpoint.path, str(eager_run)))
    assert list(compiled) == list(eager)
    assert not torch.equal(compiled["head.weight"], eager["head.weight"])  # the compiled epochs trained
    load_model(result.checkpoint.path)  # strictly into an eager model: what an eager resume loads
