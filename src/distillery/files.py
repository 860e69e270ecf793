"""Files: atomic writes, and cheap identities of teacher files.

Checkpoints, latent-cache shards and teacher-evaluation entries are all written through
``atomic_open``: a temporary file beside the target, flushed to disk and renamed over it, so a
reader sees the old file or the new one, never a part of one. Which folder a teacher is read
from and a fingerprint of a weight file from a few reads are shared by the latent cache's stamp
and the teacher-evaluation cache's key, so a teacher replaced in place is noticed by either."""

from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

_SLICES, _SLICE_BYTES = 16, 1 << 16


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: renamed over it once the block ends without an
    error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_fingerprint(path) -> str:
    """``<bytes>:<sha256 prefix>`` of a weight file from a few reads, never the whole file: the
    safetensors header (every tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB
    slices of the data (a small file: all of it). A fine-tune or any other checkpoint saved in
    its place changes the sampled bytes; about 1 MiB is read however large the file."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = 0
        if path.suffix == ".safetensors" and size >= 8:
            head = min(size, 8 + int.from_bytes(f.read(8), "little"))
            f.seek(0)
            h.update(f.read(head))
        body = size - head
        if body <= _SLICES * _SLICE_BYTES:
            h.update(f.read())
        else:
            for k in range(_SLICES):
                f.seek(head + k * (body - _SLICE_BYTES) // (_SLICES - 1))
                h.update(f.read(_SLICE_BYTES))
    return f"{size}:{h.hexdigest()[:16]}"




def teacher_folder(source: str) -> Path | None:
    """The pipeline folder a teacher is read from: a folder (however spelt), a shipped teacher's
    name, or a hub id's snapshot in the local HF cache. None otherwise (tiny-random, a hub id not
    downloaded yet)."""
    from distillery.models.teacher import teacher_path

    path = Path(teacher_path(str(source))).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(source), "model_index.json")
    except Exception:  # not a valid repo id: nothing cached under it
        return None
    return Path(hit).parent if isinstance(hit, str) else None
