import string

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer

from distillery.data.shapes import ShapesDataset, caption_vocabulary
from distillery.models.tiny import save_tiny_sd_pipeline, shapes_tokenizer, tiny_sd_components
from distillery.models.tokenizer import SHAPES_TOKENIZER_DIR, build_clip_tokenizer

CAPTION = "a small red circle on a blue background, top left"


@pytest.fixture(scope="module")
def tokenizer():
    return shapes_tokenizer()


def assert_real_clip_tokenizer(tok, words):
    """Fails if the vocabulary collapsed to the special tokens (the transformers-5 trap)."""
    assert len(tok) > 512  # 256 bytes + their </w> forms + merges + specials
    specials = set(tok.all_special_ids)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] not in specials, (w, ids)


# ---- tokenizer ----

def test_every_caption_word_is_one_token(tokenizer):
    assert_real_clip_tokenizer(tokenizer, caption_vocabulary())


def test_caption_encoding_and_padding(tokenizer):
    ids = tokenizer(CAPTION).input_ids
    # start, 10 words, the comma, end
    assert len(ids) == 13 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == CAPTION
    padded = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    assert tokenizer.model_max_length == 77 and len(padded.input_ids) == 77
    assert tokenizer.pad_token == "<|endoftext|>" and padded.input_ids[13:] == [tokenizer.pad_token_id] * 64


def test_any_ascii_text_stays_encodable(tokenizer):
    ids = tokenizer(string.printable.strip(), add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids


def test_build_custom_tokenizer_is_deterministic(tmp_path):
    words = ["Distillery", "teacher", "student", "unet", "naïve", "a"]
    first = build_clip_tokenizer(words, tmp_path / "one")
    second = build_clip_tokenizer(reversed(words), tmp_path / "two")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert_real_clip_tokenizer(CLIPTokenizer.from_pretrained(str(first)), words)


def test_shipped_tokenizer_is_current_and_small(tmp_path):
    fresh = build_clip_tokenizer(caption_vocabulary(), tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (fresh / name).read_bytes() == (SHAPES_TOKENIZER_DIR / name).read_bytes(), "rerun python -m distillery.models.tokenizer"
    assert sum(f.stat().st_size for f in SHAPES_TOKENIZER_DIR.iterdir()) < 64 * 1024


@pytest.mark.parametrize("word", ["two words", "x1", "top-left", ""])
def test_words_that_cannot_be_one_token_are_refused(tmp_path, word):
    with pytest.raises(ValueError, match=repr(word)):
        build_clip_tokenizer(["red", word], tmp_path)


# ---- tiny components and pipeline ----

@pytest.fixture(scope="module")
def components():
    return tiny_sd_components(seed=0)


def test_components_are_sd_shaped(components):
    c = components
    assert isinstance(c["scheduler"], DDPMScheduler) and isinstance(c["sampling_scheduler"], DDIMScheduler)
    for s in (c["scheduler"], c["sampling_scheduler"]):
        cfg = s.config
        assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
        assert cfg.prediction_type == "epsilon"
    images = ShapesDataset(size=2, resolution=64)[0]["pixel_values"][None]
    with torch.no_grad():
        latents = c["vae"].encode(images).latent_dist.mode() * c["vae"].config.scaling_factor
        ids = c["tokenizer"]([CAPTION], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = c["text_encoder"](ids)[0]
        out = c["unet"](latents, torch.tensor([500]), encoder_hidden_states=text).sample
    assert latents.shape == (1, 4, 16, 16) and text.shape == (1, 77, 32) and out.shape == latents.shape


def test_components_are_seeded_and_leave_global_rng_alone(components):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = tiny_sd_components(seed=0, prediction_type="v_prediction")
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(components["unet"].state_dict().values(), again["unet"].state_dict().values()):
        assert torch.equal(a, b)
    assert again["scheduler"].config.prediction_type == "v_prediction"
    other = tiny_sd_components(seed=1)["unet"].state_dict()
    assert not torch.equal(other["conv_in.weight"], components["unet"].state_dict()["conv_in.weight"])


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="'x0'"):
        tiny_sd_components(prediction_type="x0")


def test_saved_pipeline_reloads_identically_and_samples(tmp_path, components):
    out = save_tiny_sd_pipeline(tmp_path / "tiny", seed=0, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    saved, built = pipe.unet.state_dict(), components["unet"].state_dict()
    assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in saved)
    assert_real_clip_tokenizer(pipe.tokenizer, caption_vocabulary())
    image = pipe(CAPTION, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
