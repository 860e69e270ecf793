"""Reading, checking and writing training checkpoints.

A ``.ckpt`` file is a pickle: loaded by the full unpickler it can run any code it carries.
Every checkpoint distillery writes (any method, precision, LR schedule or logger) holds only
tensors, containers, strings and numbers, which torch's ``weights_only`` unpickler accepts as is,
so nothing is added to its allow-list (``SAFE_GLOBALS``) and anything else is refused with a
message. Checkpoints are written to a temporary file beside their target and renamed over it, so
a full disk or a kill mid-write never leaves a truncated ``last.ckpt``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from distillery.files import atomic_open

# Types beyond torch's weights_only defaults that distillery checkpoints may hold: none.
SAFE_GLOBALS: list[Any] = []


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, unsafe, foreign or of another student."""


def _unsafe_global(err: Exception) -> str | None:
    """The global a weights_only load refused ("builtins.exec"), from torch's message."""
    text = str(err)
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in text:
            return text.split(marker, 1)[1].split()[0].rstrip(".,:")
    return None


def _explain(path: Path, err: Exception) -> CheckpointError:
    with open(path, "rb") as f:
        head = f.read(4)
    size = path.stat().st_size
    name = _unsafe_global(err) if isinstance(err, pickle.UnpicklingError) else None
    if name or (head.startswith(b"PK") and isinstance(err, pickle.UnpicklingError)):
        return CheckpointError(
            f"checkpoint {str(path)!r} holds Python objects that are not plain data"
            f"{f' ({name})' if name else ''}; a distillery checkpoint holds only tensors, numbers and strings. "
            "It was not loaded, since unpickling it could run code: use a checkpoint written by a distillery run.")
    if head.startswith(b"PK"):
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile:
            return CheckpointError(f"checkpoint {str(path)!r} is truncated or damaged ({size:,} bytes, its archive "
                                   "has no end): it was probably cut short by a full disk or a killed run")
        return CheckpointError(f"checkpoint {str(path)!r} does not load: {err}")
    return CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint ({size:,} bytes, not a torch.save archive)")


def load_safely(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``; every failure becomes a CheckpointError naming
    the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # whatever the unpickler trips on, the file is what is wrong
        raise _explain(path, err) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a training checkpoint")
    return ckpt


# The file of a sharded FSDP checkpoint folder (trainer=fsdp trainer.strategy.state_dict_type=
# sharded) that holds everything but the model's and optimizer's tensors (Lightning's name).
SHARDED_META = "meta.pt"


def is_sharded(path: str | Path) -> bool:
    """A sharded FSDP checkpoint: a folder of per-rank shards (torch.distributed.checkpoint)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def _sharded_weights(path: Path) -> dict:
    """The model's tensors of a sharded checkpoint gathered into one state dict, in this process
    (no process group): the optimizer's shards are left, only trainer=fsdp resumes those."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        try:
            dcp_to_torch_save(path, whole)
        except Exception as err:
            raise CheckpointError(f"sharded checkpoint {str(path)!r} does not load: {err}") from None
        return load_safely(whole)["model"]


def read_checkpoint(path: str | Path, mmap: bool = False, weights: bool = True) -> dict:
    """A distillery training checkpoint, loaded safely and checked to be one: a file, or the
    folder of a sharded FSDP checkpoint (its weights gathered; ``weights=False``: only what is
    not a tensor of the model or optimizer, e.g. to check a resume)."""
    if is_sharded(path):
        ckpt = load_safely(Path(path) / SHARDED_META)
        if weights:
            ckpt["state_dict"] = _sharded_weights(Path(path))
        elif "distillery" in ckpt:
            return ckpt
    else:
        ckpt = load_safely(path, mmap=mmap)
    if "distillery" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{str(path)!r} is not a distillery training checkpoint (no student description in it; "
            f"it holds {', '.join(map(str, list(ckpt)[:6])) or 'nothing'})")
    return ckpt


def _how_to_resume(path: str | Path) -> str:
    """The fix a refused resume names: the overrides of the run that wrote the checkpoint."""
    overrides = Path(path).resolve().parent.parent / ".hydra" / "overrides.yaml"
    where = f" (they are in {overrides})" if overrides.is_file() else ""
    return f"resume it with that run's overrides{where}, or train this one into a new folder"


def _written_by(info: dict) -> str:
    arch = f"arch={info['arch']}, " if info.get("arch") else ""
    return f"{arch}method={info.get('method') or 'arch_kd'}"


def check_same_run(path: str | Path, ckpt: dict, export_info: dict) -> None:
    """Refuse to resume from a checkpoint of another student: the weights would not fit."""
    saved = ckpt.get("distillery") or {}
    problems = []
    if saved and export_info:  # the arch KD runs write no method name
        mine, theirs = saved.get("method") or "arch_kd", export_info.get("method") or "arch_kd"
        if mine != theirs:
            problems.append(f"method={mine} (this run: method={theirs})")
    if "arch" in saved and "arch" in export_info and saved["arch"] != export_info["arch"]:
        problems.append(f"arch={saved['arch']} (this run: arch={export_info['arch']})")
    for key in ("student_config", "components"):
        if not problems and key in saved and key in export_info and \
                _plain(saved[key]) != _plain(export_info[key]):
            problems.append(f"another student architecture ({key} differs)")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by a run of " + "; ".join(problems)
                              + ": " + _how_to_resume(path))


def resume_mismatch(path: str | Path, saved_state: dict, model_state: dict, saved_info: dict,
                    run_info: dict) -> CheckpointError:
    """The one-line error for a checkpoint whose weights do not load into this run's model
    (what torch reports as a long list of missing keys and size mismatches)."""
    missing = [k for k in model_state if k not in saved_state]
    unexpected = [k for k in saved_state if k not in model_state]
    reshaped = [k for k in model_state if k in saved_state
                and tuple(getattr(saved_state[k], "shape", ())) != tuple(getattr(model_state[k], "shape", ()))]
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in
             ((missing, "weights this run has and it lacks"), (unexpected, "weights it has and this run lacks"),
              (reshaped, "weights of another shape")) if v]
    this = _written_by(run_info)
    return CheckpointError(f"checkpoint {str(path)!r} (written by {_written_by(saved_info)}) does not fit this "
                           f"run's model ({this}): {'; '.join(parts) or 'its weights do not load'}; "
                           + _how_to_resume(path))


def _plain(value: Any) -> Any:
    """Config values as JSON would keep them (tuples and lists alike)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def newest_loadable(folder: Path, exclude: Path | None = None) -> tuple[Path, dict] | None:
    """The most recently written checkpoint of ``folder`` that loads, with its content."""
    candidates = sorted((p for p in folder.glob("*.ckpt") if p != exclude), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    for path in candidates:
        try:
            return path, read_checkpoint(path, mmap=True, weights=False)
        except CheckpointError:
            continue
    return None


def save_atomically(checkpoint: dict, path: str | Path) -> None:
    """``torch.save`` through ``atomic_open``: a reader sees the old file or the new one."""
    with atomic_open(path) as f:
        torch.save(checkpoint, f)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with the two guarantees above: atomic local writes, and loads
    (a resume's included) that never unpickle code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Callable] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_safely(path, map_location=map_location if map_location is not None else "cpu")
