"""Fidelity to the teacher pipeline: SDXL's zero unconditional embeddings, exported tokenizers that
transformers 4 loads, teacher folders that say what they lack, the loaded VAE's downsampling factor."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, compose_train
from distillery.models.teacher import TeacherLoadError, load_teacher

CAPTION = "a small red circle on a blue background, top left"
# No feature KD: checking feature-pair shapes is most of building an SDXL student, and not needed here.
NO_FEATURES = ["arch.features.pairs=none", "loss.feature=0"]


# ---- SDXL: a dropped caption gets the pipeline's unconditional embeddings ------------------------
@pytest.fixture(scope="module")
def xl_folders(tiny_sdxl_folder, tmp_path_factory) -> dict[bool, Path]:
    """force_zeros_for_empty_prompt -> a tiny SDXL pipeline folder saved with that setting."""
    from distillery.models.tiny import save_tiny_sdxl_pipeline

    off = save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("xl_no_zeros") / "pipe", force_zeros_for_empty_prompt=False)
    return {True: tiny_sdxl_folder, False: off}


def pipeline_unconditional(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative prompt embeds and pooled embeds StableDiffusionXLPipeline itself uses (no negative prompt)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    _, neg, _, neg_pooled = pipe.encode_prompt(CAPTION, device="cpu", do_classifier_free_guidance=True)
    return neg[0], neg_pooled[0]


def test_the_teacher_carries_the_pipelines_flag(xl_folders, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from distillery.sampling import make_pipeline

    for flag, folder in xl_folders.items():
        assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is flag
        teacher = load_teacher(str(folder), encoders=False)
        assert teacher.force_zeros_for_empty_prompt is flag and teacher.zeros_for_dropped_caption is flag
        # what export and sample grids build keeps the teacher's setting
        assert make_pipeline(load_teacher(str(folder)), teacher.unet).config.force_zeros_for_empty_prompt is flag
    # absent from model_index.json: diffusers' default
    bare = tmp_path / "bare"
    bare.mkdir()
    for sub in xl_folders[False].iterdir():
        if sub.is_dir():
            os.symlink(sub, bare / sub.name)
    index = json.loads((xl_folders[False] / "model_index.json").read_text())
    del index["force_zeros_for_empty_prompt"]
    (bare / "model_index.json").write_text(json.dumps(index))
    default = inspect.signature(StableDiffusionXLPipeline.__init__).parameters["force_zeros_for_empty_prompt"].default
    assert load_teacher(str(bare), encoders=False).force_zeros_for_empty_prompt is default is True
    assert not load_teacher("tiny-random").zeros_for_dropped_caption  # SD pipelines have no such branch


@pytest.mark.parametrize("flag", [True, False])
def test_raw_and_cached_dropped_captions_get_the_pipelines_unconditional_embeddings(xl_folders, flag, tmp_path):
    from distillery.data.cache import CacheSource, build_cache, load_empty_prompt, teacher_stamp
    from distillery.data.streaming import StreamingDataset
    from distillery.training import build

    folder = xl_folders[flag]
    ref_text, ref_pooled = pipeline_unconditional(folder)
    assert bool((ref_text == 0).all()) is flag  # the pipeline zeros its branch only with the flag

    # raw: the data stream drops every caption (to ""), the training step encodes the batch
    cfg = compose_train(["arch=ssd1b", f"arch.teacher={folder}", *FAST, *NO_FEATURES, "data.source.size=4",
                         "data.caption_dropout=1.0"], tmp_path / "run")
    parts = build(cfg)
    model, teacher = parts["model"], parts["teacher"]
    batch = next(iter(torch.utils.data.DataLoader(parts["datamodule"].dataset, batch_size=2)))
    assert batch["caption"] == ["", ""]
    text, added = model.encode_conditioning(batch)
    for row in range(2):
        torch.testing.assert_close(text[row], ref_text)
        torch.testing.assert_close(added["text_embeds"][row], ref_pooled)
    # a kept caption next to a dropped one is encoded as usual
    text, added = model.encode_conditioning({**batch, "caption": [CAPTION, ""]})
    kept_text, kept_pooled = teacher.encode_prompts([CAPTION], "cpu")
    torch.testing.assert_close(text[0], kept_text[0])
    torch.testing.assert_close(added["text_embeds"][0], kept_pooled[0])
    torch.testing.assert_close(text[1], ref_text)

    # cached: empty_prompt.safetensors, the cached stream's dropped samples, and their training step
    samples = list(parts["datamodule"].dataset.single_pass())[:2]  # single_pass drops no caption
    cache = tmp_path / "cache"
    build_cache(samples, teacher, cache, teacher_stamp(teacher, 64, "center", "fp32", "shapes 2"), shard_size=2,
                dtype=torch.float32, progress=False)
    empty = load_empty_prompt(cache)
    torch.testing.assert_close(empty["prompt_embeds"], ref_text)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], ref_pooled)
    stream = StreamingDataset(CacheSource(cache), transform=None, caption_dropout=1.0)
    cached = next(iter(torch.utils.data.DataLoader(stream, batch_size=2)))
    assert cached["caption"] == ["", ""]
    torch.testing.assert_close(cached["prompt_embeds"][0], ref_text)
    torch.testing.assert_close(cached["pooled_prompt_embeds"][0], ref_pooled)
    text, added = model.encode_conditioning(cached)
    torch.testing.assert_close(text[1], ref_text)
    torch.testing.assert_close(added["text_embeds"][1], ref_pooled)


# ---- exported tokenizers load with transformers 4 --------------------------------------------------
PROMPTS = [CAPTION, "", "A Large GREEN square, CENTER!!", "xyzzy 42 triangles on magenta?", "café ☃ naïve\ttab",
           " ".join(["large"] * 100)]


def clip_bpe_from_slow_files(folder: Path):
    """A CLIP tokenizer built only from vocab.json, merges.txt and tokenizer_config.json, with the
    pre-processing of CLIP's (and transformers 4's slow CLIPTokenizer's): NFC, whitespace runs
    to one space, lower case, CLIP's split pattern, byte-level BPE with "</w>" ending each word."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                         unk_token=config["unk_token"], continuing_subword_prefix="",
                                         end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bos, eos = config["bos_token"], config["eos_token"]
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                      add_prefix_space=False, trim_offsets=False)
    n = int(config["model_max_length"])
    tok.enable_truncation(n)
    tok.enable_padding(length=n, pad_id=vocab[config["pad_token"]], pad_token=config["pad_token"])
    return tok


def assert_loads_like_transformers_4(folder: Path, reference) -> None:
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    specials = {k: str(getattr(reference, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == reference.model_max_length
    assert {k: config[k] for k in specials} == specials
    assert json.loads((folder / "special_tokens_map.json").read_text()) == specials
    want = reference(PROMPTS, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids
    assert [e.ids for e in clip_bpe_from_slow_files(folder).encode_batch(PROMPTS)] == want
    assert len(set(want[0]) - set(reference.all_special_ids)) > 5  # the real vocabulary, not specials only
    # transformers' own route from the slow files (no tokenizer.json to fall back on)
    slow = folder.parent / f"{folder.name}-slow-files"
    shutil.copytree(folder, slow, ignore=shutil.ignore_patterns("tokenizer.json"))
    again = CLIPTokenizer.from_pretrained(slow)
    assert again(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids == want


def untrained_checkpoint(parts: dict, path: Path) -> Path:
    """What a training checkpoint holds for export, before any step."""
    model = parts["model"]
    torch.save({"distillery": model.export_info, "state_dict": model.state_dict(), "global_step": 0}, path)
    return path


def test_export_writes_tokenizer_files_transformers_4_reads(tiny_sd_folder, tmp_path):
    from distillery.export import export_student
    from distillery.training import build

    parts = build(compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, *NO_FEATURES], tmp_path / "run"))
    out = export_student(untrained_checkpoint(parts, tmp_path / "student.ckpt"), tmp_path / "export",
                         teacher=parts["teacher"])
    assert_loads_like_transformers_4(out / "tokenizer", parts["teacher"].tokenizer)


def test_the_shipped_teacher_tokenizer_has_the_slow_files(tmp_path):
    from transformers import CLIPTokenizer

    shipped = ROOT / "src" / "distillery" / "assets" / "demo_teacher" / "tokenizer"
    folder = tmp_path / "tokenizer"
    shutil.copytree(shipped, folder)
    assert_loads_like_transformers_4(folder, CLIPTokenizer.from_pretrained(shipped))


def test_the_end_of_training_exports_sdxl_students_with_both_tokenizers_complete(tiny_sdxl_folder, tmp_path):
    from distillery.training import build, finish

    cfg = compose_train(["arch=ssd1b", f"arch.teacher={tiny_sdxl_folder}", *FAST, *NO_FEATURES, "scheduler=euler",
                         "scheduler.num_inference_steps=1", "eval.prompts=[a red circle]", "eval.resolution=32"], tmp_path)
    parts = build(cfg)
    result = finish(cfg, parts, untrained_checkpoint(parts, tmp_path / "last.ckpt"), tmp_path, [])
    assert result["export_dir"] == tmp_path / "student"
    for name in ("tokenizer", "tokenizer_2"):
        assert_loads_like_transformers_4(result["export_dir"] / name, getattr(parts["teacher"], name))


# ---- teacher folders say what they lack ------------------------------------------------------------
def partial_copy(folder: Path, dest: Path, without: str) -> Path:
    dest.mkdir()
    for item in folder.iterdir():
        if item.name != without:
            os.symlink(item, dest / item.name)
    return dest


def test_a_missing_teacher_folder_is_named_and_never_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in (str(tmp_path / "no" / "teacher"), "./teacher", "~/no-such-distillery-teacher", "runs/a/teacher"):
        with pytest.raises(TeacherLoadError) as err:
            load_teacher(value)
        msg = str(err.value)
        assert "does not exist" in msg and str(Path(value).expanduser().absolute()) in msg, msg
        assert "huggingface" not in msg.lower() and "so it was tried as a hub id" not in msg
        for part in ("model_index.json", "unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/",
                     "text_encoder_2/", "tokenizer_2/"):
            assert part in msg
    # a hub-id-shaped value that is no folder either says both
    with pytest.raises(TeacherLoadError, match=r"no folder .*some-org/no-such-model exists, so it was tried as a hub id"):
        load_teacher("some-org/no-such-model")


@pytest.mark.parametrize("missing", ["unet", "vae"])
def test_a_teacher_folder_without_a_part_names_it(tiny_sd_folder, tmp_path, missing):
    folder = partial_copy(tiny_sd_folder, tmp_path / "teacher", without=missing)
    with pytest.raises(TeacherLoadError) as err:
        load_teacher(str(folder))
    msg = str(err.value)
    assert f"lacks {missing}/" in msg and str(folder) in msg and "a teacher folder holds model_index.json" in msg
    if missing == "vae":  # a latent-cache run loads no VAE, so it does not need one
        assert load_teacher(str(folder), encoders=False).vae is None


def test_an_sdxl_teacher_folder_without_tokenizer_2_names_it(tiny_sdxl_folder, tmp_path):
    folder = partial_copy(tiny_sdxl_folder, tmp_path / "teacher", without="tokenizer_2")
    with pytest.raises(TeacherLoadError, match=r"lacks tokenizer_2/; a teacher folder holds"):
        load_teacher(str(folder), encoders=False)


# ---- the resolution check names the teacher VAE's factor ------------------------------------------
def test_the_resolution_check_names_the_teacher_vaes_factor(tiny_sd_folder, tmp_path):
    from distillery.config import ConfigError, validate
    from distillery.models.tiny import tiny_vae
    from distillery.training import build, latent_size

    vae = tiny_vae()  # three levels: downsamples by 4, not SD's 8
    assert latent_size(36, vae, "tiny-random") == 9
    for teacher in ("tiny-random", str(tiny_sd_folder)):
        # 36 px suits these teachers: the config check does not assume SD's factor
        validate(compose_train(["arch=bk_small", f"arch.teacher={teacher}", *FAST, "data.resolution=36"], tmp_path))
    want = "data.resolution=34 is not a multiple of 4: the VAE of arch.teacher='{}' downsamples by 4; use e.g. 32 or 36"
    # a local folder's VAE config is read before anything loads ...
    bad = compose_train(["arch=bk_small", f"arch.teacher={tiny_sd_folder}", *FAST, "data.resolution=34"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(bad)
    assert want.format(tiny_sd_folder) in str(err.value)
    # ... any other teacher's VAE is checked once loaded
    bad = compose_train(["arch=bk_small", "arch.teacher=tiny-random", *FAST, "data.resolution=34"], tmp_path)
    validate(bad)
    with pytest.raises(ConfigError) as err:
        build(bad)
    assert str(err.value) == want.format("tiny-random")
