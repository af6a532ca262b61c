"""Training chains (``configs/chains/*.yaml``): the steps that produced one published model, run in order.

Each step is an ordinary training config (a recipe). From the second step on, ``train.init_from`` is the previous
step's run folder, so each step warm-starts from the last checkpoint of the one before, dropping the tensors its
``train.drop_keys`` names and training only its ``train.trainable`` ones. A step whose run already holds its last
epoch, trained with the step's config (``runs.identity``), is skipped; a half-done one resumes from its latest
checkpoint (Ray Train's ordinary resume), so rerunning the same command continues the chain wherever it stopped. A
step whose run was trained with another config is not finished: training it refuses in one line, or with
``--restart`` moves the old run aside and trains the step afresh.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ray_landmark.config import Config, load_config
from ray_landmark.config_base import Section
from ray_landmark.errors import ConfigError
from ray_landmark.progress import Printer, say
from ray_landmark.runs.folders import output_folder
from ray_landmark.runs.identity import run_state


class ChainStep(Section):
    config: str  # the step's training config: a path relative to the repository root (or to the chain file)
    overrides: list[str] = []  # KEY=VALUE for this step only, applied before the job's --set values


class ChainConfig(Section):
    name: str
    steps: list[ChainStep] = Field(min_length=1)


def load_chain(path: str | Path, overrides: list[str] = ()) -> tuple[ChainConfig, list[Config]]:
    """The chain and every step's validated config; ``overrides`` (the job's ``--set``) apply to every step.
    Every step is checked before anything runs: a bad key in step 3 fails before step 1 starts."""
    chain = load_config(path, [], ChainConfig)
    steps: list[Config] = []
    for number, step in enumerate(chain.steps, 1):
        step_path = Path(step.config)
        if not step_path.is_absolute() and not step_path.exists():
            step_path = Path(path).parent / step_path
        source = f"{path} step {number}"
        step_overrides = [*step.overrides, *overrides]
        if steps:  # warm-start from the previous step's run (its latest checkpoint)
            step_overrides.append(f"train.init_from={output_folder(steps[-1].run).uri}")
        try:
            cfg = load_config(step_path, step_overrides)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        if cfg.model is None or cfg.train is None:
            raise ConfigError(f"{source}: {step.config} has no model or train section")
        if any(output_folder(cfg.run).uri == output_folder(earlier.run).uri for earlier in steps):
            raise ConfigError(f"{source}: run.name '{cfg.run.name}' is used by an earlier step; each step needs its "
                              f"own run folder")
        steps.append(cfg)
    return chain, steps


def pending_steps(steps: list[Config]) -> list[int]:
    """Indices of the steps whose runs do not yet hold their last epoch of their own config."""
    pending = []
    for i, cfg in enumerate(steps):
        done, breaking = run_state(cfg)
        if breaking or done < cfg.train.last_epoch:
            pending.append(i)
    return pending


def run_chain(chain: ChainConfig, steps: list[Config], fit_step, printer: Printer = say) -> str:
    """Run the pending steps in order with ``fit_step(cfg)``; returns the final step's run folder."""
    for i, cfg in enumerate(steps):
        label = f"[chain] {chain.name} step {i + 1}/{len(steps)} {cfg.run.name}"
        (done, breaking), last = run_state(cfg), cfg.train.last_epoch
        if done >= last and not breaking:
            printer(f"{label}: finished earlier ({done}/{last} epochs), skipped")
            continue
        state = ("trained earlier with another config" if breaking
                 else f"resuming after epoch {done}" if done else "starting")
        source = (f"from {cfg.train.init_from}" if cfg.train.init_from
                  else "from ImageNet weights" if cfg.model.pretrained else "from random weights")
        printer(f"{label}: {state}; {cfg.data.view}, {cfg.data.image_size} px, {last} epochs, {source}")
        fit_step(cfg)
    final = output_folder(steps[-1].run).uri
    printer(f"[chain] {chain.name} finished: its model is {final}")
    return final
