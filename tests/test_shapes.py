import numpy as np
import pytest
import torch

from distillery.data import shapes
from distillery.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    caption_vocabulary,
    render,
)


def test_same_seed_and_index_give_identical_samples_in_any_order():
    a, b = ShapesDataset(size=50, seed=3), ShapesDataset(size=50, seed=3)
    forward = [a[i]["pixel_values"] for i in range(10)]
    backward = [b[i]["pixel_values"] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x, y)
    assert a[7]["caption"] == b[7]["caption"]


def test_different_index_or_seed_differ():
    ds = ShapesDataset(size=50, seed=0)
    images = [ds[i]["pixel_values"] for i in range(8)]
    assert all(not torch.equal(images[0], im) for im in images[1:])
    other = ShapesDataset(size=50, seed=1)
    assert [ds[i]["caption"] for i in range(8)] != [other[i]["caption"] for i in range(8)]


def test_dataloader_workers_see_the_same_samples():
    ds = ShapesDataset(size=8, resolution=16, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batched = torch.cat([b["pixel_values"] for b in loader])
    assert torch.equal(batched, torch.stack([ds[i]["pixel_values"] for i in range(8)]))


@pytest.mark.parametrize("resolution", [16, 37, 64])
def test_tensor_format_and_range(resolution):
    x = ShapesDataset(size=4, resolution=resolution)[1]["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.max() - x.min() > 0.5  # a shape was drawn on a contrasting background


@pytest.mark.parametrize("resolution", [16, 64])
def test_sdxl_size_and_crop_conditioning(resolution):
    ds = ShapesDataset(size=6, resolution=resolution, seed=1)
    item = ds[2]
    assert item["original_size"].dtype == torch.long and item["crop_top_left"].dtype == torch.long
    assert item["original_size"].tolist() == [resolution, resolution] == list(item["pixel_values"].shape[1:])
    assert item["crop_top_left"].tolist() == [0, 0]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["original_size"].shape == (3, 2) and batch["crop_top_left"].shape == (3, 2)
    assert batch["original_size"].dtype == torch.long
    assert torch.equal(batch["original_size"], torch.tensor([[resolution, resolution]] * 3))
    assert torch.equal(batch["crop_top_left"], torch.zeros(3, 2, dtype=torch.long))
    # SDXL's time ids for these samples: original size, crop top-left, target size.
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["original_size"]], dim=1)
    assert time_ids.tolist() == [[resolution, resolution, 0, 0, resolution, resolution]] * 3


def test_caption_matches_attributes():
    ds = ShapesDataset(size=300, seed=2)
    vocab = set(caption_vocabulary())
    seen = {k: set() for k in ("shape", "colour", "size", "position", "background")}
    for i in range(len(ds)):
        a = ds.attributes(i)
        assert a["background"] != a["colour"]
        for k, v in a.items():
            seen[k].add(v)
        if i < 20:
            item = ds[i]
            assert item["attributes"] == a
            cap = item["caption"]
            assert cap == f"a {a['size']} {a['colour']} {a['shape']} on a {a['background']} background, {a['position']}"
            assert set(cap.replace(",", "").split()) <= vocab
    # every value of every attribute occurs in a few hundred samples
    assert seen == {
        "shape": set(SHAPES), "colour": set(COLOURS), "size": set(SIZES),
        "position": set(POSITIONS), "background": set(BACKGROUNDS),
    }


def test_vocabulary_is_complete_and_sorted():
    vocab = caption_vocabulary()
    assert vocab == sorted(set(vocab))
    assert {"a", "on", "background", "top", "left", "center"} <= set(vocab)
    assert set(SHAPES) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS) <= set(vocab)


def test_render_places_the_shape():
    attrs = {"shape": "square", "colour": "red", "size": "large", "position": "top left", "background": "blue"}
    img = np.asarray(render(attrs, 64))
    assert tuple(img[18, 18]) == COLOURS["red"]  # centre of the top-left quadrant
    assert tuple(img[46, 46]) == BACKGROUNDS["blue"]
    ds = ShapesDataset(size=5, resolution=32)
    item = ds[4]
    assert torch.equal(item["pixel_values"], shapes.to_tensor(render(item["attributes"], 32)))


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"size": 0}, "0"), ({"resolution": 8}, "8"), ({"seed": -1}, "-1"), ({"resolution": 64.0}, "64.0")],
)
def test_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ShapesDataset(**kwargs)


def test_bad_render_arguments_and_index():
    attrs = ShapesDataset(size=1)[0]["attributes"]
    with pytest.raises(ValueError, match="magenta"):
        render({**attrs, "colour": "magenta"}, 64)
    with pytest.raises(ValueError, match="12"):
        render(attrs, 12)
    with pytest.raises(IndexError):
        ShapesDataset(size=3)[3]
