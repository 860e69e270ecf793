"""Many processes, one run: devices checked against the machine, the global batch, and the
ranks a single-node DDP run starts joining the run folder of the job that started them.

Lightning's strategies (``trainer=ddp``, ``trainer=fsdp``) and cluster environments do the
distributed work; under SLURM every task is a process that srun started, so nothing is spawned.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from distillery.config import ConfigError

log = logging.getLogger(__name__)

MULTI_PROCESS = ("ddp", "fsdp")


def strategy_name(trainer_cfg: DictConfig) -> str:
    """'ddp', 'fsdp' or what else the trainer config names ('auto' when it names none)."""
    strategy = trainer_cfg.get("strategy", "auto")
    if OmegaConf.is_config(strategy) or isinstance(strategy, dict):
        target = str(strategy.get("_target_", ""))
        for name in MULTI_PROCESS:
            if target.endswith(f"{name.upper()}Strategy"):
                return name
        return target.rsplit(".", 1)[-1] or "auto"
    name = str(strategy)
    return next((n for n in MULTI_PROCESS if name.startswith(n)), name)


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_devices(cfg: DictConfig) -> int:
    """``trainer.devices`` as a number, checked against the machine: a multi-process strategy
    asking for every GPU of a machine that has one runs in one process (said so), a request for
    more GPUs than there are, or for GPUs on a machine without any, is refused with the numbers."""
    t = cfg.trainer
    strategy = strategy_name(t)
    accelerator = str(t.get("accelerator", "auto"))
    devices = t.get("devices", 1)
    on_gpu = _on_gpu(accelerator)
    visible = torch.cuda.device_count() if on_gpu else 1  # the CPU: trainer.devices=N starts N processes on it
    if accelerator in ("gpu", "cuda") and visible == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch sees no CUDA GPU on this machine"
            + (f" (trainer={strategy}): for {strategy.upper()} over CPU processes use trainer.accelerator=cpu "
               "trainer.devices=2" if strategy in MULTI_PROCESS else ": use trainer=cpu"))
    if devices in (-1, "-1", "auto", None):
        n = visible
    elif isinstance(devices, int) or str(devices).isdigit():
        n = int(devices)
    else:  # a list of device indices
        n = len(list(devices))
    if n < 1:
        raise ConfigError(f"trainer.devices={devices!r}: at least one device is needed")
    if on_gpu and n > visible:
        raise ConfigError(f"trainer.devices={devices!r} asks for {n} GPUs but this machine has {visible}")
    nodes = int(t.get("num_nodes", 1) or 1)
    if strategy in MULTI_PROCESS and n == 1 and nodes == 1:
        log.warning("trainer=%s on one device (%s): training runs in a single process, world size 1 (the "
                    "same step as trainer=%s, plus a %s wrapper); give trainer.devices=N for N processes",
                    strategy, "1 GPU" if on_gpu else "the CPU", "gpu" if on_gpu else "cpu", strategy.upper())
    with open_dict(cfg):
        t.devices = n if not isinstance(devices, (list, tuple)) and not OmegaConf.is_list(devices) else devices
    return n


def global_batch_size(cfg: DictConfig, devices: int) -> int:
    """Samples per optimizer step: per-device batch x devices x nodes x accumulation."""
    t = cfg.trainer
    return int(cfg.data.batch_size) * int(devices) * int(t.get("num_nodes", 1) or 1) * \
        int(t.get("accumulate_grad_batches", 1) or 1)


def record_global_batch(cfg: DictConfig, devices: int, is_rank_zero: bool = True) -> int:
    """Say the global batch at the start of a run and store it in the run's config (the W&B
    config, and ``global_batch_size`` in the run folder's ``.hydra/config.yaml``)."""
    t = cfg.trainer
    total = global_batch_size(cfg, devices)
    with open_dict(cfg):
        cfg.global_batch_size = total
    if not is_rank_zero:
        return total
    log.info("global batch %d = data.batch_size %d x %d devices x %d nodes x %d accumulated micro-batches",
             total, int(cfg.data.batch_size), int(devices), int(t.get("num_nodes", 1) or 1),
             int(t.get("accumulate_grad_batches", 1) or 1))
    saved = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
    if saved.is_file():
        stored = OmegaConf.load(saved)
        stored.global_batch_size = total
        OmegaConf.save(stored, saved)
    return total


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command line of local rank ``local_rank`` of a DDP run started under Hydra: this
    job's own overrides (a multirun's job passes its sweep point, not the sweep), as a single
    run in this job's folder, writing no second ``.hydra`` folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    import __main__

    hc = HydraConfig.get()
    if getattr(__main__, "__spec__", None) is None:
        command = [sys.executable, str(Path(get_original_cwd(), sys.argv[0]).resolve())]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hc.overrides.task)
    command += [f"hydra.run.dir={hc.runtime.output_dir}", "hydra.output_subdir=null", "hydra.mode=RUN",
                f"hydra.job.name={hc.job.name}_rank{local_rank}"]
    return command, get_original_cwd()


@contextlib.contextmanager
def ranks_join_this_job() -> Iterator[None]:
    """While fitting: the ranks Lightning's DDP launcher starts on this node run ``rank_command``
    (Lightning's own command repeats ``sys.argv``, which for a multirun job is the whole sweep)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    original = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = rank_command
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = original
