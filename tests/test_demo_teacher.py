"""The demo teacher: a whole SD pipeline trained from scratch (experiment=demo_teacher), and the
trained pipeline shipped in src/distillery/assets/demo_teacher."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import ROOT, compose_train
from distillery.config import ConfigError, validate

SHIPPED = ROOT / "src" / "distillery" / "assets" / "demo_teacher"
# A few steps of the real experiment: 2 VAE steps, then 2 U-Net + text encoder steps.
QUICK = ["experiment=demo_teacher", "trainer.max_steps=4", "method.vae_steps=2", "data.batch_size=2",
         "logger=csv", "trainer.accelerator=cpu", "callbacks.model_checkpoint.every_n_train_steps=1000",
         "scheduler.num_inference_steps=2", "optim.lr_scheduler.warmup_steps=0"]


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def test_run_writes_a_loadable_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from distillery.models.teacher import load_teacher
    from distillery.training import train

    result = train(compose_train(QUICK, tmp_path))
    folder = result["pipeline_dir"]
    assert folder == tmp_path / "teacher" and result["pipeline_samples"].is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.unet.config.sample_size == 16
    scale = pipe.vae.config.scaling_factor
    assert scale > 0 and scale != 0.18215  # measured on the data, not diffusers' default
    teacher = load_teacher(str(folder))
    assert teacher.vae.config.scaling_factor == scale and teacher.prediction_type == "epsilon"

    # Resumed after the switch: the measured scaling factor comes back with the checkpoint.
    longer = [o.replace("max_steps=4", "max_steps=5") for o in QUICK]
    resumed = train(compose_train([*longer, f"ckpt_path={result['checkpoint']}"], tmp_path))
    assert resumed["global_step"] == 5
    assert StableDiffusionPipeline.from_pretrained(folder).vae.config.scaling_factor == pytest.approx(scale)


def test_vae_trains_first_then_freezes_with_a_measured_scaling_factor(tmp_path):
    from distillery.methods.from_scratch import build

    parts = build(compose_train(QUICK, tmp_path))
    model = parts["model"]
    vae_seen, unet_seen = [], []

    class Snapshots(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            vae_seen.append(_flat(pl_module.vae))
            unet_seen.append(_flat(pl_module.unet))

    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              use_distributed_sampler=False, callbacks=[Snapshots()]).fit(model, datamodule=parts["datamodule"])
    vae_seen.append(_flat(model.vae))
    unet_seen.append(_flat(model.unet))
    # Steps 0-1 train the VAE only; steps 2-3 the U-Net (and text encoder) only.
    assert not torch.equal(vae_seen[0], vae_seen[1]) and not torch.equal(vae_seen[1], vae_seen[2])
    assert torch.equal(vae_seen[2], vae_seen[3]) and torch.equal(vae_seen[3], vae_seen[4])
    assert torch.equal(unet_seen[0], unet_seen[2]) and not torch.equal(unet_seen[2], unet_seen[4])
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert float(model.latent_scale) > 0
    assert model.vae.config.scaling_factor == pytest.approx(float(model.latent_scale))


@pytest.mark.parametrize("text_encoder_lr", [None, 0.0])
def test_text_encoder_learns_at_its_own_rate(tmp_path, text_encoder_lr):
    from distillery.methods.from_scratch import build

    overrides = [*QUICK, f"method.text_encoder_lr={'null' if text_encoder_lr is None else text_encoder_lr}"]
    parts = build(compose_train(overrides, tmp_path))
    model = parts["model"]
    before_text, before_unet = _flat(model.text_encoder), _flat(model.unet)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(model, datamodule=parts["datamodule"])
    assert not torch.equal(before_unet, _flat(model.unet))
    # null: the U-Net's rate and schedule; 0: the text encoder stays as initialised.
    assert torch.equal(before_text, _flat(model.text_encoder)) == (text_encoder_lr == 0.0)
    groups = trainer.optimizers[0].param_groups
    assert [len(g["params"]) for g in groups] == [len(list(m.parameters())) for m in
                                                  (model.vae, model.unet, model.text_encoder)]
    assert groups[2]["lr"] == (groups[1]["lr"] if text_encoder_lr is None else 0.0)


def test_config_checks(tmp_path):
    cfg = compose_train(QUICK, tmp_path)
    assert "arch" not in cfg and "loss" not in cfg  # nothing is distilled
    validate(cfg)
    bad = compose_train([*QUICK, "method.vae_steps=4", "method.kl_weight=-1", "data.resolution=24",
                         "method.text_encoder_lr=-1e-5"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(bad)
    for text in ("method.vae_steps=4 must be < trainer.max_steps=4", "method.kl_weight=-1",
                 "data.resolution=24 must be a multiple of 16", "method.text_encoder_lr=-1e-05 must be a number >= 0"):
        assert text in str(err.value)


def test_shipped_demo_teacher(tmp_path):
    from diffusers import StableDiffusionPipeline

    from distillery.models.teacher import load_teacher
    from distillery.models.tiny import shapes_tokenizer
    from distillery.training import build

    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20  # float32 safetensors: about 16 MB
    assert not any(p.suffix in (".bin", ".ckpt", ".pt") for p in files)  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    assert isinstance(pipe, StableDiffusionPipeline)
    caption = "a small red circle on a blue background, top left"
    assert pipe.tokenizer(caption).input_ids == shapes_tokenizer()(caption).input_ids
    teacher = load_teacher(str(SHIPPED))
    assert teacher.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    # SD-1.x-shaped: arch=bk_small cuts its student and finds its 8 stage pairs as on SD.
    parts = build(compose_train(["arch=bk_small", f"arch.teacher={SHIPPED}", "data.resolution=32", "logger=csv"],
                                tmp_path))
    assert len(parts["pairs"]) == 8 and parts["student"].mid_block is None
    assert len(parts["student"].down_blocks[0].resnets) == 1
    pipe.set_progress_bar_config(disable=True)
    image = pipe(caption, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
