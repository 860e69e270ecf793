"""Many processes, one run: devices checked against the machine, the global batch, and the
ranks a single-node DDP run starts joining the run folder of the job that started them.

Lightning's strategies (``trainer=ddp``, ``trainer=fsdp``) and cluster environments do the
distributed work; under SLURM every task is a process that srun started, so nothing is spawned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import torch
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
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
    target = str(OmegaConf.select(cfg, "method._target_", default="") or "")
    if strategy == "fsdp" and not target.endswith(".ArchKD"):
        raise ConfigError(
            f"trainer=fsdp shards the student of method=arch_kd (a block-removed student, KD loss); "
            f"{target.rsplit('.', 1)[-1] or 'this method'} keeps other copies of a U-Net beside it (a round's "
            "teacher, a target network) that FSDP would not shard: train it with trainer=ddp")
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


def _config_subdir() -> str:
    """Where Hydra wrote this job's config.yaml inside its folder (.hydra, or a resume's own)."""
    from hydra.core.hydra_config import HydraConfig

    return (HydraConfig.get().output_subdir if HydraConfig.initialized() else None) or ".hydra"


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
    saved = Path(cfg.paths.output_dir) / _config_subdir() / "config.yaml"
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


# What Lightning's DDP launcher sets in the environment of the process that starts the ranks.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def ranks_join_this_job() -> Iterator[None]:
    """During a job: the ranks Lightning's DDP launcher starts on this node run ``rank_command``
    (Lightning's own command repeats ``sys.argv``, which for a multirun job is the whole sweep).

    At the end the process is left as the job found it: the process group the job opened is
    closed and the launcher's variables are unset, so that the next job of a multirun, in this
    same process, starts its own ranks (with them still set, it would wait for this job's ranks,
    which have exited)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    environment = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}
    group_before = torch.distributed.is_available() and torch.distributed.is_initialized()
    original = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = rank_command
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = original
        if not group_before and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- SLURM: requeue at the time-limit notice, resume when requeued ------------------------------
def slurm_job_id() -> str | None:
    """The id ``scontrol`` knows this job by (``<array job>_<task>`` for a job-array task, which
    is how hydra/launcher=slurm_gpu submits a sweep), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_restarts() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM and on the first run)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def requeue_slurm_job() -> str | None:
    """``scontrol requeue`` this job, so that it runs again (same command, same folder) and
    resumes from its last checkpoint; returns the job id, or None when there is no SLURM job or
    scontrol failed (said in the log, with what to do by hand)."""
    import subprocess

    job = slurm_job_id()
    if job is None:
        return None
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        log.error("could not requeue SLURM job %s (%s); resubmit it with ckpt_path=last and the run's folder",
                  job, str(detail).strip())
        return None
    return job


# ---- FSDP ----------------------------------------------------------------------------------------
def block_classes(names) -> set[type]:
    """The diffusers module classes named (``BasicTransformerBlock``, ``ResnetBlock2D``, ...):
    the units FSDP shards and gathers one at a time."""
    import diffusers
    import diffusers.models.attention as attention
    import diffusers.models.resnet as resnet
    import diffusers.models.transformers.transformer_2d as transformer_2d
    import diffusers.models.unets.unet_2d_blocks as unet_blocks

    found, unknown = set(), []
    for name in names:
        modules = (diffusers, attention, resnet, transformer_2d, unet_blocks)
        cls = next((getattr(m, name) for m in modules if hasattr(m, name)), None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            found.add(cls)
        else:
            unknown.append(name)
    if unknown:
        raise ConfigError(f"trainer.strategy.wrap_blocks: {', '.join(unknown)} is not a diffusers U-Net block; "
                          "e.g. BasicTransformerBlock, ResnetBlock2D, Transformer2DModel, CrossAttnDownBlock2D")
    return found


def full_state_dict_type(module: torch.nn.Module, offload: bool, rank0_only: bool = True):
    """FSDP's context for a whole (gathered) state dict of ``module`` and of its optimizer.
    ``offload``: gathered into CPU memory, for shards on a GPU; torch crashes offloading shards
    that already are on the CPU, so CPU processes gather without it (the same tensors)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDPStrategy, configured for U-Nets: every module of a class named in
    ``wrap_blocks`` is one FSDP unit (its parameters sharded across the ranks, gathered for its
    forward and backward only). The U-Net itself is one (its convolutions in and out and its
    embeddings), so that the student and its EMA copy are sharded alike, unit by unit, and the
    EMA update reads each rank's shard of both. ``use_orig_params`` keeps the parameters' names
    and lets the frozen EMA sit beside the trained student."""

    def __init__(self, wrap_blocks=("UNet2DConditionModel", "BasicTransformerBlock", "ResnetBlock2D"),
                 shard_teacher: bool = False, **kwargs) -> None:
        kwargs.setdefault("auto_wrap_policy", block_classes(list(wrap_blocks)))
        kwargs.setdefault("use_orig_params", True)
        super().__init__(**kwargs)
        self.shard_teacher = bool(shard_teacher)

    def shard_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen U-Net (the teacher) sharded like the student, block by block: each rank keeps
        1/N of its weights and gathers a block for its forward only. It stays in its own dtype."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        device = torch.device("cpu") if self.root_device.type == "cpu" else self.root_device.index
        return FullyShardedDataParallel(module, auto_wrap_policy=self.kwargs["auto_wrap_policy"],
                                        sharding_strategy=self.sharding_strategy, device_id=device,
                                        use_orig_params=True)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        # CPU processes (gloo): torch's FSDP needs the CPU named as its device, where Lightning
        # passes the device's index (None for the CPU).
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)

    # CPU processes: Lightning always gathers a full state dict offloaded to the CPU, which
    # torch's FSDP cannot do for shards already there (see full_state_dict_type). On a GPU,
    # Lightning's own gathering applies.
    @contextlib.contextmanager
    def _full_state_dict_on_cpu(self) -> Iterator[None]:
        if self.root_device.type != "cpu":
            yield
            return
        import lightning.fabric.strategies.fsdp as fabric_fsdp
        import lightning.fabric.strategies.model_parallel as fabric_model_parallel
        import lightning.pytorch.strategies.fsdp as pytorch_fsdp

        def without_offload(module, world_size, rank0_only=True):
            return full_state_dict_type(module, offload=False, rank0_only=rank0_only)

        namespaces = (fabric_fsdp, fabric_model_parallel, pytorch_fsdp)
        originals = [ns._get_full_state_dict_context for ns in namespaces]
        for ns in namespaces:
            ns._get_full_state_dict_context = without_offload
        try:
            yield
        finally:
            for ns, original in zip(namespaces, originals):
                ns._get_full_state_dict_context = original

    def lightning_module_state_dict(self):
        with self._full_state_dict_on_cpu():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with self._full_state_dict_on_cpu():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        with self._full_state_dict_on_cpu():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
