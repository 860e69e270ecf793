"""The shipped shapes-world classifier: caption parsing, prompt fidelity, FID/KID features."""

import itertools
import json

import numpy as np
import pytest
import torch

from distillery.data import shapes
from distillery.eval.shapes import (
    ATTRIBUTES,
    DEFAULT_PATH,
    ShapesClassifier,
    ShapesFeatures,
    ShapesFidelity,
    load_shapes_classifier,
    parse_caption,
    render_batch,
    train_shapes_classifier,
)

# The classifier is tiny: one thread is as fast, and much faster on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(seed: int, n: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_attributes(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def fidelity() -> ShapesFidelity:
    return ShapesFidelity()


@pytest.fixture(scope="module")
def held_out() -> tuple[list[dict[str, str]], list[str], torch.Tensor]:
    attrs = _sample(20_241, 200)
    return attrs, [shapes.caption(a) for a in attrs], render_batch(attrs, 32)


def test_parse_caption_inverts_caption_for_every_combination():
    vocab = {
        "shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "size": tuple(shapes.SIZES),
        "position": tuple(shapes.POSITIONS), "background": tuple(shapes.BACKGROUNDS),
    }
    n = 0
    for combo in itertools.product(*(vocab[k] for k in ATTRIBUTES)):
        attrs = dict(zip(ATTRIBUTES, combo))
        assert parse_caption(shapes.caption(attrs)) == attrs
        n += 1
    assert n == 4 * 6 * 2 * 5 * 8


@pytest.mark.parametrize("prompt", [
    "a photo of an astronaut riding a horse",
    "a small red circle on a blue background",          # no position
    "a tiny red circle on a blue background, top left",  # unknown size
    "a small red circle on a blue background, top left, extra",
])
def test_parse_caption_rejects_other_prompts_with_the_expected_form(prompt):
    with pytest.raises(ValueError, match="not a shapes caption") as err:
        parse_caption(prompt)
    assert repr(prompt) in str(err.value)
    assert "a <size> <colour> <shape> on a <background> background, <position>" in str(err.value)


def test_shipped_classifier_is_small_and_documents_its_training():
    model = load_shapes_classifier()
    assert isinstance(model, ShapesClassifier) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 250_000
    assert (DEFAULT_PATH / "model.safetensors").stat().st_size < 1_000_000
    config = json.loads((DEFAULT_PATH / "config.json").read_text())
    assert list(config["vocabularies"]) == list(ATTRIBUTES)
    assert config["vocabularies"]["colour"] == list(shapes.COLOURS)
    assert config["resolution"] == 32
    record = config["training"]
    assert record["steps"] > 0 and "seed" in record
    assert all(v >= 0.98 for k, v in record["validation"]["clean"].items() if k != "all")


@pytest.mark.parametrize("resolution", [32, 64])
def test_prompt_fidelity_on_clean_held_out_renders(fidelity, held_out, resolution):
    attrs, prompts, images32 = held_out
    images = images32 if resolution == 32 else render_batch(attrs, resolution)
    scores = fidelity(images, prompts)
    assert set(scores) == {"prompt_fidelity", *(f"fidelity/{k}" for k in ATTRIBUTES)}
    assert scores["prompt_fidelity"] >= 0.95, scores
    assert all(scores[f"fidelity/{k}"] >= 0.97 for k in ATTRIBUTES), scores
    predicted = fidelity.predict(images[:20])
    assert sum(p == a for p, a in zip(predicted, attrs[:20])) >= 18


def test_prompt_fidelity_is_low_for_mismatched_prompts(fidelity, held_out):
    _, prompts, images = held_out
    shuffled = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]
    assert fidelity(images, shuffled)["prompt_fidelity"] < 0.2


def test_fidelity_input_errors(fidelity, held_out):
    _, prompts, images = held_out
    with pytest.raises(ValueError, match="not a shapes caption"):
        fidelity(images[:2], [prompts[0], "a cat"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        fidelity(images[:2], prompts[:1])
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        fidelity(images[:2] * 2 - 1, prompts[:2])
    # uint8 images are accepted as [0, 255].
    as_uint8 = (images[:4] * 255).round().to(torch.uint8)
    assert fidelity.predict(as_uint8) == fidelity.predict(images[:4])


def _fid(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=ShapesFeatures(), normalize=True)
    fid.update(a, real=True)
    fid.update(b, real=False)
    return float(fid.compute())


def test_shapes_features_in_torchmetrics_fid():
    a100 = render_batch(_sample(101, 100), 32)
    features = ShapesFeatures()
    assert features(a100).shape == (100, features.num_features)
    assert features(render_batch(_sample(101, 4), 64)).shape == (4, features.num_features)
    assert abs(_fid(a100, a100)) < 1e-6 * float(torch.cov(features(a100).T).trace())

    a, b = render_batch(_sample(101, 200), 32), render_batch(_sample(202, 200), 32)
    rng = torch.Generator().manual_seed(0)
    between_seeds = _fid(a, b)
    noise = _fid(a, torch.rand(200, 3, 32, 32, generator=rng))
    solid = _fid(a, torch.rand(200, 3, 1, 1, generator=rng).expand(-1, -1, 32, 32))
    one_layout = _fid(a, render_batch([dict(x, shape="circle", position="center") for x in _sample(202, 200)], 32))
    print(f"FID between seeds {between_seeds:.2f}, noise {noise:.2f}, solid {solid:.2f}, centred circles {one_layout:.2f}")
    assert noise > 10 * between_seeds and solid > 10 * between_seeds
    assert one_layout > 4 * between_seeds


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_shapes_features_in_torchmetrics_kid():
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = render_batch(_sample(101, 100), 32), render_batch(_sample(202, 100), 32)

    def kid(x, y):
        metric = KernelInceptionDistance(feature=ShapesFeatures(), normalize=True, subset_size=50, subsets=20)
        torch.manual_seed(0)  # KID draws its subsets from the global generator
        metric.update(x, real=True)
        metric.update(y, real=False)
        metric.train()  # a metric's mode change leaves the frozen extractor in eval mode
        assert not metric.inception.classifier.training
        return float(metric.compute()[0])

    between_seeds, noise = kid(a, b), kid(a, torch.rand(100, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    print(f"KID between seeds {between_seeds:.4f}, noise {noise:.4f}")
    assert noise > 20 * max(between_seeds, 1e-3 * noise), (between_seeds, noise)


def test_training_runs_and_the_result_loads(tmp_path):
    record = train_shapes_classifier(
        tmp_path / "clf", steps=3, batch_size=8, seed=0, source_resolutions=(32,), val_size=16, verbose=False,
    )
    assert record["steps"] == 3 and set(record["validation"]["clean"]) == {*ATTRIBUTES, "all"}
    model = load_shapes_classifier(tmp_path / "clf")
    logits = model(torch.rand(2, 3, 48, 48))
    assert [tuple(v.shape) for v in logits.values()] == [(2, 4), (2, 6), (2, 2), (2, 5), (2, 8)]
    fid_features = ShapesFeatures(tmp_path / "clf")
    assert fid_features(torch.rand(3, 3, 32, 32)).shape == (3, fid_features.num_features)
    with pytest.raises(FileNotFoundError, match="python -m distillery.eval.shapes"):
        load_shapes_classifier(tmp_path / "missing")
