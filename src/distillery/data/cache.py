"""A latent and text-embedding cache: encode the data once, train without the VAE encoder or text encoders.

Folder layout (``python src/cache.py`` writes it, ``CacheSource`` streams it):

    stamp.json                what the cache depends on (``cache_stamp``) plus the build's shard_size;
                              written first, so a restarted build can refuse other settings
    empty_prompt.safetensors  the embeddings of a dropped caption (caption dropout from the cache): those
                              of "", or zeros for an SDXL teacher with force_zeros_for_empty_prompt
    shard-00000.safetensors   samples [0, shard_size), shard-00001 the next shard_size, ...
    index.json                shard names, counts, sizes and sha256 checksums; written last: its presence
                              marks a complete cache. A shard is checked against them when it is opened.

A shard holds, for its N samples:
    latent_mean, latent_std  [N, 4, h, w]  the VAE posterior's mean and std, UNSCALED (as the VAE gives
                             them). Training draws latents = (mean + std * noise) * scaling_factor with its
                             own generator (``sample_latents``), exactly as on-the-fly encoding does.
    prompt_embeds            [N, 77, D]    ``Teacher.encode_prompts`` of the caption
    pooled_prompt_embeds     [N, D2]       SDXL only: the second encoder's projected pooled output
    original_size, crop_top_left  int64 [N, 2]
and a single metadata entry "distillery" (JSON: captions, keys, scaling_factor, format_version).
One entry because safetensors writes its metadata map in hash order: several entries would make two
builds of the same data differ in bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from distillery.files import atomic_open, file_fingerprint, teacher_folder

from distillery.data.sources import DataSourceError

# 2: teacher weight-file fingerprints in the stamp, shard sizes and checksums in the index.
FORMAT_VERSION = 2
STAMP_FILE, INDEX_FILE, EMPTY_PROMPT_FILE = "stamp.json", "index.json", "empty_prompt.safetensors"
META_KEY = "distillery"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
# Stored in stamp.json by build_cache but not part of what a run depends on: check_stamp skips them.
BUILD_KEYS = ("shard_size",)
# Config entries that name a library version or a runtime flag, not the model: ignored by the stamp.
_IGNORED_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype",
                        "output_hidden_states", "output_attentions", "return_dict"}
_STORAGE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                   "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CacheMismatchError(ValueError):
    """The cache folder does not match the run (or is not a complete cache)."""


class CacheCorruptError(DataSourceError):
    """A cache file is missing, truncated or changed since the build; the message names the file."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _STORAGE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of: {', '.join(_STORAGE_DTYPES)}")
    return _STORAGE_DTYPES[dtype]


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(storage_dtype(dtype)).removeprefix("torch.")


def _jsonable(value: Any) -> Any:
    """What the value becomes after a trip through stamp.json (tuples -> lists, ...), so a fresh
    stamp compares equal to a stored one."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ---- the stamp ----------------------------------------------------------------------------------
def weights_hash(module: torch.nn.Module, max_tensors: int = 8, max_elements: int = 1 << 20) -> str:
    """A short fingerprint of a module's weights: every tensor's name and shape, and the float32
    values of a few evenly spaced tensors (the first million elements of each). Cheap even for
    SDXL's encoders, and any fine-tune or other checkpoint changes it."""
    state = module.state_dict()
    names = list(state)  # registration order: fixed by the class and config
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    if names:
        picks = sorted({round(k * (len(names) - 1) / max(max_tensors - 1, 1)) for k in range(max_tensors)})
        for i in picks:
            flat = state[names[i]].detach().reshape(-1)[:max_elements]
            h.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Weight files as diffusers / transformers save them (sharded ones with their index).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")


def folder_fingerprint(folder) -> str | None:
    """One fingerprint over the weight files of a component folder (``<teacher>/vae``): total
    bytes and a hash of every file's name and ``file_fingerprint``. None without weight files."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)) \
        if folder.is_dir() else []
    if not files:
        return None
    h, total = hashlib.sha256(), 0
    for p in files:
        fp = file_fingerprint(p)
        total += int(fp.split(":")[0])
        h.update(f"{p.name}={fp};".encode())
    return f"{total} bytes, sha256 {h.hexdigest()[:16]}"


def teacher_identity(source: str) -> str:
    """How the stamp names a teacher: a folder or shipped name as its resolved folder, so the
    run's ``arch.teacher=shapes-teacher`` and the folder that name loads are the same teacher;
    a hub id or tiny-random as given."""
    from distillery.models.teacher import teacher_path

    path = Path(teacher_path(str(source))).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def teacher_fingerprints(source: str) -> dict:
    """``{"vae": {"fingerprint": ...}, "text_encoders": [{"fingerprint": ...}, ...]}`` from the
    teacher's weight files alone (no model is loaded): a training run compares them with the
    stamp, so a VAE or text encoder changed in place is refused. Fingerprints are None where
    the teacher has no folder."""
    folder = teacher_folder(source)
    if folder is None:
        return {"vae": {"fingerprint": None}}
    return {"vae": {"fingerprint": folder_fingerprint(folder / "vae")},
            "text_encoders": [{"fingerprint": folder_fingerprint(folder / name)}
                              for name in ENCODER_FOLDERS if (folder / name).is_dir()]}


def _module_identity(module: torch.nn.Module, fingerprint: str | None = None) -> dict:
    config = module.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS}
    return {"class": type(module).__name__, "config": _jsonable(config), "weights": weights_hash(module),
            "fingerprint": fingerprint}


def cache_stamp(teacher_source: str, vae, text_encoders: list, resolution: int, crop: str, dtype: str,
                data_description: str, tokenizers: Iterable = ()) -> dict:
    """Everything the cached tensors depend on, as plain JSON values.

    Compute it from the teacher as ``load_teacher`` returns it (float32), before ``freeze``: the
    weight hashes hash float32 values, so a bf16 copy would not match. The fingerprints of the
    teacher's weight files (``teacher_fingerprints``) are what a training run, which loads no
    encoder, checks."""
    files = teacher_fingerprints(teacher_source)
    encoder_files = files.get("text_encoders", [])
    return _jsonable({
        "format_version": FORMAT_VERSION,
        "teacher_source": teacher_identity(teacher_source),
        "vae": _module_identity(vae, files["vae"]["fingerprint"]),
        "text_encoders": [_module_identity(enc, encoder_files[i]["fingerprint"] if i < len(encoder_files) else None)
                          for i, enc in enumerate(text_encoders)],
        "tokenizers": [{"class": type(t).__name__, "max_length": int(t.model_max_length),
                        "vocab_size": len(t)} for t in tokenizers],
        "resolution": int(resolution),
        "crop": str(crop),
        "dtype": _dtype_name(dtype),
        "data_description": str(data_description),
    })


def teacher_stamp(teacher, resolution: int, crop: str, dtype: str, data_description: str) -> dict:
    """``cache_stamp`` with the VAE, text encoders and tokenizers of a ``Teacher``."""
    encoders = [e for e in (teacher.text_encoder, teacher.text_encoder_2) if e is not None]
    tokenizers = [t for t in (teacher.tokenizer, teacher.tokenizer_2) if t is not None]
    return cache_stamp(teacher.source, teacher.vae, encoders, resolution, crop, dtype,
                       data_description, tokenizers)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    # Dicts and lists of dicts become dotted keys (text_encoders.1.weights); lists of plain
    # values (block_out_channels) stay whole.
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_ABSENT = object()


def stamp_differences(cached: Mapping, run: Mapping, ignore: Iterable[str] = (),
                      run_keys_only: bool = False) -> list[str]:
    """One line per differing (dotted) key: ``resolution: cache 512, run 1024``.

    ``run_keys_only``: compare only the (dotted) keys ``run`` has, for a run that knows part of
    the stamp (training from a cache knows the teacher's files, not its loaded encoders)."""
    a, b = _flatten(_jsonable(dict(cached))), _flatten(_jsonable(dict(run)))
    skip = tuple(ignore)
    show = lambda v: "<absent>" if v is _ABSENT else json.dumps(v)  # noqa: E731
    lines = []
    for key in sorted(set(b) if run_keys_only else set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            lines.append(f"{key}: cache {show(va)}, run {show(vb)}")
    return lines


def _read_stamp(cache_dir: Path) -> dict:
    path = cache_dir / STAMP_FILE
    if not path.is_file():
        raise CacheMismatchError(f"{cache_dir} is not a latent cache (no {STAMP_FILE}); "
                                 "build one with: python src/cache.py data=... arch=... out=<folder>")
    return json.loads(path.read_text())


def check_stamp(cache_dir, expected: dict, ignore: Iterable[str] = ()) -> None:
    """Raise ``CacheMismatchError`` unless ``cache_dir`` is a complete cache built with ``expected``.

    ``ignore``: (dotted) keys the run cannot know and should not compare, e.g. ``data_description``."""
    cache_dir = Path(cache_dir)
    stored = _read_stamp(cache_dir)
    if not (cache_dir / INDEX_FILE).is_file():
        raise CacheMismatchError(
            f"{cache_dir} is an incomplete latent cache (no {INDEX_FILE}: its build did not finish); "
            "rerun python src/cache.py with the same arguments to complete it")
    diffs = stamp_differences({k: v for k, v in stored.items() if k not in BUILD_KEYS}, expected, ignore)
    if diffs:
        raise CacheMismatchError(f"the latent cache {cache_dir} was built for other settings than this run:\n  "
                                 + "\n  ".join(diffs))


# ---- building ---------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """A killed build never leaves a half file under the final name."""
    with atomic_open(path) as f:
        f.write(data)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write the file; return its index entry (name, bytes, sha256), hashed from the bytes written."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, {META_KEY: json.dumps(meta, sort_keys=True)})
    _write_atomic(path, data)
    return {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_entry(path: Path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest}


def _shard_count(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.get_slice("latent_mean").get_shape()[0])
    except (SafetensorError, OSError) as err:
        raise CacheCorruptError(f"latent cache shard {path} is damaged ({err}); delete it and rerun "
                                "the build to encode it again") from err


def _claim_folder(out: Path, stored_stamp: dict) -> None:
    """Write stamp.json into a fresh folder, or check that a restarted build has the same settings."""
    path = out / STAMP_FILE
    if path.is_file():
        diffs = stamp_differences(json.loads(path.read_text()), stored_stamp)
        if diffs:
            raise CacheMismatchError(
                f"refusing to continue the build in {out}: it was started with other settings "
                "(use another out folder, or delete this one):\n  " + "\n  ".join(diffs))
        return
    if any(SHARD_RE.match(p.name) for p in out.iterdir()):
        raise CacheMismatchError(f"{out} holds shard files but no {STAMP_FILE}: not a cache this build can continue")
    _write_atomic(path, json.dumps(stored_stamp, indent=2, sort_keys=True).encode())


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None,
                   scaling_factor: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latents from cached posterior statistics: the same draw as
    ``vae.encode(pixels).latent_dist.sample(generator) * scaling_factor`` for a float32 VAE on the
    generator's device (the noise has the batch's full shape, drawn in one call); ``noise``: the
    standard normal draw itself (a rank's slice of the global batch's, see Distiller.randn)."""
    mean, std = mean.float(), std.float()
    if noise is None:
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
    noise = noise.float().to(mean.device)
    return (mean + std * noise) * scaling_factor


class _Encoder:
    """The teacher's VAE encoder and text encoder(s), in float32 on one device."""

    def __init__(self, teacher, device, dtype: torch.dtype, resolution: int | None) -> None:
        from distillery.models.teacher import place

        self.teacher, self.device, self.dtype, self.resolution = teacher, torch.device(device), dtype, resolution
        # float32 whatever the run's teacher dtype: the cache is encoded once and reused many times.
        for module in (teacher.vae, teacher.text_encoder, teacher.text_encoder_2):
            if module is not None:
                place(module, self.device, torch.float32).eval()

    @torch.no_grad()
    def prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        text, pooled = self.teacher.encode_prompts(captions, self.device)
        out = {"prompt_embeds": text}
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled
        return {k: v.to("cpu", self.dtype) for k, v in out.items()}

    @torch.no_grad()
    def batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([torch.as_tensor(s["pixel_values"]) for s in samples])
        if self.resolution is not None and tuple(pixels.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"samples have pixel_values of size {tuple(pixels.shape[-2:])}, "
                             f"the stamp says resolution {self.resolution}")
        captions = []
        for s in samples:
            if not isinstance(s.get("caption"), str):
                got = type(s.get("caption")).__name__
                raise ValueError(f"sample {s.get('key', '?')}: caption must be a str, got {got}")
            captions.append(s["caption"])
        dist = self.teacher.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        out = {"latent_mean": dist.mean.to("cpu", self.dtype), "latent_std": dist.std.to("cpu", self.dtype),
               **self.prompts(captions)}
        for name, t in out.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} is not finite in storage dtype {self.dtype} (overflow?); "
                                 "try cache.dtype=fp32 or bf16")
        # Defaults as arch_kd's: the target size, never cropped.
        defaults = {"original_size": tuple(pixels.shape[-2:]), "crop_top_left": (0, 0)}
        for name, default in defaults.items():
            out[name] = torch.stack([torch.as_tensor(s.get(name, default)).long().view(2) for s in samples])
        return out


def build_cache(samples: Iterable[dict] | Callable[[int], Iterable[dict]], teacher, out_dir, stamp: dict,
                shard_size: int = 1024, dtype: torch.dtype = torch.float16, device="cpu", batch_size: int = 32,
                progress: bool = True, total: int | None = None) -> dict:
    """Encode ``samples`` (training samples of the data spec, a finite pass from the start of the
    data) into ``out_dir``; return the index (plus ``encoded``: samples encoded by this call).

    ``samples`` is an iterable, or a callable ``start -> iterable of the samples from index start
    on``. Resume: shards already in the folder are kept. With a callable the build jumps straight to
    the first missing shard; an iterable is read from the start and the samples of kept shards are
    consumed without encoding (the pass still decodes them). A kept shard the pass reads has its
    count checked against the samples it stands for. Batches never cross a shard boundary, so a resumed
    build encodes every shard in the same batches as an uninterrupted one (identical bytes on
    deterministic kernels). ``teacher``'s VAE and text encoders are moved to ``device`` in float32.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    dtype = storage_dtype(dtype)
    stamp = _jsonable(stamp)
    if stamp.get("dtype", _dtype_name(dtype)) != _dtype_name(dtype):
        raise ValueError(f"the stamp says dtype {stamp['dtype']} but the build stores {_dtype_name(dtype)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, {**stamp, "shard_size": int(shard_size)})
    if (out / INDEX_FILE).is_file():  # complete already, with these settings
        return {**json.loads((out / INDEX_FILE).read_text()), "encoded": 0}
    for stale in out.glob(".*.tmp-*"):  # leftovers of a killed build
        stale.unlink()

    enc = _Encoder(teacher, device, dtype, stamp.get("resolution"))
    scaling = float(teacher.vae.config.scaling_factor)
    if not (out / EMPTY_PROMPT_FILE).is_file():
        # Teacher.encode_prompts gives "" the pipeline's unconditional embeddings (zeros for SDXL
        # teachers with force_zeros_for_empty_prompt); the metadata says which, for a reader.
        empty = {k: v[0] for k, v in enc.prompts([""]).items()}
        _save_tensors(out / EMPTY_PROMPT_FILE, empty, {
            "format_version": FORMAT_VERSION, "caption": "",
            "unconditional": "zeros" if teacher.zeros_for_dropped_caption else "encoded"})

    kept = {int(m.group(1)): _shard_count(out / p.name) for p in out.iterdir() if (m := SHARD_RE.match(p.name))}
    entries: dict[int, dict] = {}  # index entries of the shards written by this call
    first_missing = next(i for i in range(len(kept) + 1) if i not in kept)
    if callable(samples):
        pos, stream = first_missing * shard_size, iter(samples(first_missing * shard_size))
    else:
        pos, stream = 0, iter(samples)

    from tqdm.auto import tqdm

    if total is None and hasattr(samples, "__len__"):
        total = len(samples)
    bar = tqdm(total=total, initial=pos, unit="img", desc=f"caching to {out.name}", disable=not progress)
    state: dict[str, Any] = {"shard": None, "seen": 0, "pending": [], "parts": [], "keys": [], "captions": []}
    encoded, counts = 0, dict(kept)

    def flush_batch() -> None:
        nonlocal encoded
        if state["pending"]:
            state["parts"].append(enc.batch(state["pending"]))
            encoded += len(state["pending"])
            bar.update(len(state["pending"]))
            state["pending"] = []

    def finish_shard() -> None:
        i = state["shard"]
        if i is None:
            return
        if i in kept:
            if kept[i] != state["seen"]:
                raise CacheMismatchError(
                    f"{out / shard_name(i)} holds {kept[i]} samples but the data gives {state['seen']} for it: "
                    "the data changed since the build started; use another out folder")
            return
        flush_batch()
        tensors = {k: torch.cat([p[k] for p in state["parts"]]) for k in state["parts"][0]}
        meta = {"format_version": FORMAT_VERSION, "scaling_factor": scaling, "latents": "unscaled",
                "first_index": i * shard_size, "keys": state["keys"], "captions": state["captions"]}
        entries[i] = _save_tensors(out / shard_name(i), tensors, meta)
        counts[i] = state["seen"]

    for sample in stream:
        i = pos // shard_size
        if i != state["shard"]:
            finish_shard()
            state.update(shard=i, seen=0, pending=[], parts=[], keys=[], captions=[])
        state["seen"] += 1
        if i in kept:
            bar.update(1)
        else:
            state["keys"].append(str(sample.get("key", pos)))
            state["captions"].append(sample.get("caption"))
            state["pending"].append(sample)
            if len(state["pending"]) == batch_size:
                flush_batch()
        pos += 1
    finish_shard()
    bar.close()

    n_shards = -(-pos // shard_size)
    if pos == 0:
        raise ValueError("no samples to cache: the data is empty")
    if extra := sorted(i for i in kept if i >= n_shards):
        raise CacheMismatchError(f"{out} holds shards {extra} beyond the data's {pos} samples: "
                                 "the data changed; use another out folder")
    with safe_open(str(out / shard_name(0)), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape()[1:] for k in f.keys()}
    index = {
        "format_version": FORMAT_VERSION, "num_samples": pos, "shard_size": shard_size, "dtype": _dtype_name(dtype),
        "latents": "unscaled posterior mean/std: latents = (mean + std * noise) * scaling_factor",
        "scaling_factor": scaling, "shapes": shapes,
        # Kept shards (an earlier call wrote them) are hashed from disk: one read each.
        "shards": [{**(entries.get(i) or _file_entry(out / shard_name(i))), "count": counts[i]}
                   for i in range(n_shards)],
    }
    _write_atomic(out / INDEX_FILE, json.dumps(index, indent=2).encode())
    return {**index, "encoded": encoded}


# ---- reading ------------------------------------------------------------------------------------
def load_empty_prompt(cache_dir) -> dict[str, torch.Tensor]:
    """prompt_embeds [77, D] (and pooled_prompt_embeds [D2]) of a dropped caption, in the storage
    dtype: the encoding of "", or zeros where the teacher pipeline zeros its unconditional branch."""
    return load_file(str(Path(cache_dir) / EMPTY_PROMPT_FILE))


class CacheSource:
    """The Source API (data spec) over a complete cache folder: one shard per shard file; a record
    holds key, caption and the cached tensors of one sample (latent_mean, latent_std,
    prompt_embeds, [pooled_prompt_embeds], original_size, crop_top_left)."""

    def __init__(self, cache_dir, expected_stamp: dict | None = None, ignore: Iterable[str] = (),
                 chunk: int = 64) -> None:
        self.dir = Path(cache_dir)
        if expected_stamp is not None:
            check_stamp(self.dir, expected_stamp, ignore)
        self.stamp = _read_stamp(self.dir)
        if not (self.dir / INDEX_FILE).is_file():
            raise CacheMismatchError(f"{self.dir} is an incomplete latent cache "
                                     f"(no {INDEX_FILE}: its build did not finish)")
        self.index = json.loads((self.dir / INDEX_FILE).read_text())
        self.chunk = chunk  # records read from the file at a time
        self._entries = {s["name"]: s for s in self.index["shards"]}
        # Shards whose checksum held, by (size, mtime): each process hashes a shard once, not every epoch.
        self._verified: dict[str, tuple[int, int]] = {}

    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    @property
    def scaling_factor(self) -> float:
        return float(self.index["scaling_factor"])

    def shards(self) -> list[str]:
        return [str(self.dir / s["name"]) for s in self.index["shards"]]

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """Embeddings of the empty caption, for caption dropout (classifier-free guidance)."""
        return load_empty_prompt(self.dir)

    def verify(self, shard) -> None:
        """Raise ``CacheCorruptError``, naming the shard, unless it is the file the build wrote:
        present, of the size and sha256 its index entry records."""
        path = Path(shard)
        entry = self._entries.get(path.name)
        if entry is None or "sha256" not in entry:
            return  # nothing recorded to check against
        where = f"latent cache shard {path}"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CacheCorruptError(f"{where} is missing ({INDEX_FILE} lists it); rebuild the cache") from None
        if self._verified.get(str(path)) == (st.st_size, st.st_mtime_ns):
            return
        if st.st_size != entry["bytes"]:
            what = "truncated" if st.st_size < entry["bytes"] else "longer than built"
            raise CacheCorruptError(f"{where} is {what}: {st.st_size} bytes, {INDEX_FILE} records {entry['bytes']}; "
                                    "rebuild the cache (or copy the file again)")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise CacheCorruptError(f"{where}: checksum mismatch (sha256 {digest[:16]}..., {INDEX_FILE} records "
                                    f"{entry['sha256'][:16]}...): the file changed or was damaged after the "
                                    "build; rebuild the cache (or copy the file again)")
        self._verified[str(path)] = (st.st_size, st.st_mtime_ns)

    def read(self, shard, start: int = 0) -> Iterator[dict]:
        self.verify(shard)
        try:
            with safe_open(str(shard), "pt") as f:
                meta = json.loads(f.metadata()[META_KEY])
                names, n = list(f.keys()), len(meta["keys"])
                for lo in range(start, n, self.chunk):
                    hi = min(lo + self.chunk, n)
                    block = {k: f.get_slice(k)[lo:hi] for k in names}  # reads only these rows
                    for j in range(hi - lo):
                        # clone: a record must not keep its whole block alive (or ship it to another process)
                        record = {k: v[j].clone() for k, v in block.items()}
                        record.update(key=meta["keys"][lo + j], caption=meta["captions"][lo + j])
                        yield record
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            if isinstance(err, CacheCorruptError):
                raise
            raise CacheCorruptError(f"latent cache shard {shard} cannot be read: {type(err).__name__}: {err}; "
                                    "rebuild the cache") from err

    def describe(self) -> str:
        s = self.stamp
        return (f"latent cache {self.dir} ({self.num_samples} samples in {len(self.index['shards'])} shards; "
                f"teacher {s.get('teacher_source')}, {s.get('resolution')} px, {s.get('dtype')})")

    def columns(self) -> list[str]:
        return ["key", "caption", *self.index["shapes"]]
