"""DDP for real: `src/train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2` (two
processes, gloo) on the tiny teacher, against one process with twice the per-device batch, and
resumed on the same and on another world size."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import ROOT, compose_train
from forkserver import run_script

# 8 records in 8 one-record shards: with a batch of 1 per rank, 2 ranks x 4 steps is one epoch,
# and a global batch holds the same two records, in the same order, as one process's batch of 2.
DATA = ["data.source.size=8", "+data.source.shard_size=1", "data.resolution=64"]
COMMON = ["arch=bk_small", *DATA, "trainer.log_every_n_steps=1", "eval.at_end=false", "optim.optimizer.lr=1e-3",
          "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=4", "method.ema_decay=0.9",
          # Below the gradient's norm (4-7 here): every step clips, over all ranks' gradients.
          "trainer.gradient_clip_val=0.05"]
TIMEOUT = 300  # no run may hang the suite, whatever a process group does


class RankProbe(L.Callback):
    """Writes, per rank, the keys of every record it trains on and its student's final weights."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"keys_rank{trainer.global_rank}.txt", "a") as f:
            f.write("".join(f"{trainer.global_step} {k}\n" for k in batch["key"]))

    def on_train_end(self, trainer, pl_module) -> None:
        # What this rank holds of the teacher, the student and its EMA: the teacher's wrapper,
        # and the share of each one's weights.
        unet = pl_module.teacher.unet
        (self.out / f"teacher_rank{trainer.global_rank}.txt").write_text(
            f"{type(unet).__name__} {sum(p.numel() for p in unet.parameters())}")
        held = {name: sum(p.numel() for p in module.parameters())
                for name, module in (("student", pl_module.student), ("ema", pl_module.ema)) if module is not None}
        (self.out / f"held_rank{trainer.global_rank}.json").write_text(json.dumps(held))
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            return  # each rank holds shards: the checkpoint has the whole student
        torch.save({k: v.detach().clone() for k, v in pl_module.student.state_dict().items()},
                   self.out / f"student_rank{trainer.global_rank}.pt")


def train_py(args: list[str], cwd: Path, probe: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")]),
           "WANDB_MODE": "offline"}
    cmd = [str(ROOT / "src" / "train.py"), *args, "+callbacks.probe._target_=test_distributed.RankProbe",
           f"+callbacks.probe.out={probe}"]
    proc = run_script(cmd, cwd=cwd, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def keys(probe: Path, rank: int) -> list[tuple[int, str]]:
    lines = (probe / f"keys_rank{rank}.txt").read_text().splitlines()
    return [(int(step), key) for step, key in (line.split(" ", 1) for line in lines)]


def weights(probe: Path, rank: int) -> dict:
    return torch.load(probe / f"student_rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_process_run(tiny_sd_folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    run, probe = base / "run", base / "probe"
    proc = train_py([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "data.batch_size=1", "logger=wandb", f"hydra.run.dir={run}"], base, probe)
    return {"base": base, "run": run, "probe": probe, "out": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_two_processes_train_one_student_on_disjoint_shards_into_one_run(two_process_run, tiny_sd_folder):
    run, probe, base = two_process_run["run"], two_process_run["probe"], two_process_run["base"]
    a, b = weights(probe, 0), weights(probe, 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on both ranks
    k0, k1 = keys(probe, 0), keys(probe, 1)
    assert len(k0) == len(k1) == 4
    seen0, seen1 = {k for _, k in k0}, {k for _, k in k1}
    assert not seen0 & seen1  # disjoint shards
    assert seen0 | seen1 == {f"shapes/{i}" for i in range(8)}  # together every record, once, in the epoch
    # The global batch is said and stored.
    assert "global batch 2 = data.batch_size 1 x 2 devices x 1 nodes x 1 accumulated" in two_process_run["out"]
    assert "global_batch_size: 2" in (run / ".hydra" / "config.yaml").read_text()
    # One run folder: no second .hydra, no dated folder of the spawned rank, one W&B run, one
    # set of checkpoints, one export.
    assert [p.relative_to(base) for p in base.rglob(".hydra")] == [Path("run/.hydra")]
    assert not (base / "outputs").exists()
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000002.ckpt",
                                                                     "step_0000004.ckpt"]
    assert (run / "student" / "unet" / "config.json").is_file() and (run / "samples.png").is_file()
    assert not (run / "student_rank1").exists()


@pytest.fixture(scope="module")
def one_process_run(tiny_sd_folder, tmp_path_factory):
    """The reference: one process with the global batch (2) as its own."""
    base = tmp_path_factory.mktemp("single")
    run, probe = base / "run", base / "probe"
    train_py([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=cpu", "data.batch_size=2", "logger=csv",
              "export_at_end=false", f"hydra.run.dir={run}"], base, probe)
    return {"run": run, "probe": probe}


def assert_same_training(a: dict, b: dict) -> None:
    """The same sums in another order (the ranks' gradients averaged): AdamW turns a rounding
    difference of a gradient near zero into up to a step of lr, so the tolerance is half of one
    step (lr 1e-3) for every weight and 1e-6 for all but 0.1% of them."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert diff.max() < 5e-4, diff.max()
    assert (diff > 1e-6).float().mean() < 1e-3, (diff > 1e-6).float().mean()


def assert_halved(probe: Path, whole: dict) -> None:
    """Each of the two ranks held about half of the student's and of the EMA's weights (FSDP
    pads the last shard), together all of them."""
    total = sum(v.numel() for k, v in whole.items() if k.startswith("student."))
    for name in ("student", "ema"):
        held = [json.loads((probe / f"held_rank{r}.json").read_text())[name] for r in range(2)]
        assert all(n <= total // 2 + 64 for n in held) and sum(held) == total, (name, held, total)


def student_and_ema(ckpt: Path, prefixes: tuple[str, ...] = ("student.", "ema.module.")) -> dict:
    """The checkpoint's trained networks: the student and its EMA, or those ``prefixes`` name."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


@pytest.mark.slow
def test_one_process_with_twice_the_batch_trains_the_same_student(two_process_run, one_process_run):
    single = keys(one_process_run["probe"], 0)
    k0, k1 = keys(two_process_run["probe"], 0), keys(two_process_run["probe"], 1)
    assert single == [x for pair in zip(k0, k1) for x in pair]  # the same records per step
    assert_same_training(weights(one_process_run["probe"], 0), weights(two_process_run["probe"], 0))


def _resume_from_step_2(two_process_run, run: Path) -> None:
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(two_process_run["run"] / "checkpoints" / "step_0000002.ckpt", run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_resumed_two_process_run_continues_each_ranks_stream(two_process_run, tiny_sd_folder, tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    _resume_from_step_2(two_process_run, run)
    train_py([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "data.batch_size=1", "logger=csv", "export_at_end=false", "ckpt_path=last", f"hydra.run.dir={run}"],
             tmp_path, probe)
    for rank in range(2):
        assert keys(probe, rank) == [(s, k) for s, k in keys(two_process_run["probe"], rank) if s >= 2]
    a, b = weights(probe, 0), weights(two_process_run["probe"], 0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_resumed_on_one_process_the_epoch_goes_on_where_it_stopped(two_process_run, tiny_sd_folder, tmp_path):
    """A two-process run preempted at step 2 comes back on one process: the four records the
    ranks had not read yet are read, none twice, and the next epoch follows."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    _resume_from_step_2(two_process_run, run)
    proc = train_py([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=cpu", "data.batch_size=2", "logger=csv",
                     "export_at_end=false", "ckpt_path=last", "trainer.max_steps=6", f"hydra.run.dir={run}"],
                    tmp_path, probe)
    assert "had 2 stream workers, this run has 1" in proc.stdout + proc.stderr
    before = {k for rank in range(2) for s, k in keys(two_process_run["probe"], rank) if s < 2}
    after = keys(probe, 0)
    epoch_rest = [k for s, k in after if s < 4]
    assert len(epoch_rest) == 4 and not set(epoch_rest) & before
    assert set(epoch_rest) | before == {f"shapes/{i}" for i in range(8)}
    assert len({k for s, k in after if s >= 4}) == 4  # steps 4 and 5: the next epoch, four new draws


def test_devices_are_checked_against_the_machine(tmp_path, caplog, monkeypatch):
    from distillery.config import ConfigError
    from distillery.distributed import global_batch_size, resolve_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU.*trainer.accelerator=cpu trainer.devices=2"):
        resolve_devices(compose_train(["trainer=ddp"], tmp_path))
    with pytest.raises(ConfigError, match="trainer=fsdp shards the student of method=arch_kd.*"
                                          "LatentConsistencyDistillation.*train it with trainer=ddp"):
        resolve_devices(compose_train(["trainer=fsdp", "trainer.accelerator=cpu", "method=lcm"], tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_train(["trainer=ddp"], tmp_path)
    with caplog.at_level("WARNING"):
        assert resolve_devices(cfg) == 1
    assert "trainer=ddp on one device (1 GPU): training runs in a single process" in caplog.text
    with pytest.raises(ConfigError, match="trainer.devices=4 asks for 4 GPUs but this machine has 1"):
        resolve_devices(compose_train(["trainer=ddp", "trainer.devices=4"], tmp_path))
    cfg = compose_train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=3",
                         "data.batch_size=4", "trainer.accumulate_grad_batches=2"], tmp_path)
    assert resolve_devices(cfg) == 2 and global_batch_size(cfg, 2) == 4 * 2 * 3 * 2


def test_ranks_without_a_shard_are_refused_and_uneven_shards_said(caplog):
    from distillery.data.datamodule import DistillDataModule
    from distillery.data.sources import DataSourceError, ShapesSource

    dm = DistillDataModule(ShapesSource(size=8, resolution=16, shard_size=4), resolution=16, num_workers=2)
    with pytest.raises(DataSourceError, match="has 2 shards but this run has 4 stream workers .2 ranks x 2 dataloader "
                                              "workers.: rank 1 would get no shard"):
        dm.check_world(2)
    dm = DistillDataModule(ShapesSource(size=10, resolution=16, shard_size=4), resolution=16, num_workers=2)
    with caplog.at_level("WARNING"):
        dm.check_world(1)
    assert "3 data shards over 2 stream workers (1 ranks x 2 dataloader workers) do not divide evenly: each epoch " \
           "1 workers read 2 shards and the others 1" in caplog.text


@pytest.mark.slow
def test_a_multirun_runs_each_job_on_its_own_two_ranks(tiny_sd_folder, tmp_path):
    # Both jobs in one process (Hydra's basic launcher): the second must not find the first's
    # process group or launcher variables, and each job's second rank runs that job's overrides.
    train_py(["-m", "loss=task_only,segmind", *COMMON, "trainer.max_steps=2", f"arch.teacher={tiny_sd_folder}",
              "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=1", "logger=none",
              "export_at_end=false", f"paths.log_dir={tmp_path}"], tmp_path, Path("${hydra:runtime.output_dir}/probe"))
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    students = []
    for job in ("0", "1"):
        probe = sweep / job / "probe"
        a, b = weights(probe, 0), weights(probe, 1)
        assert all(torch.equal(a[k], b[k]) for k in a), f"job {job}: the ranks disagree"
        assert not {k for _, k in keys(probe, 0)} & {k for _, k in keys(probe, 1)}
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
        students.append(a)
    # Job 1's ranks trained with job 1's loss (feature KD), not job 0's: other weights.
    assert any(not torch.equal(students[0][k], students[1][k]) for k in students[0])
    assert "| 1 | segmind |" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_fsdp_shards_the_student_and_its_checkpoint_loads_anywhere(one_process_run, tiny_sd_folder, tmp_path):
    """trainer=fsdp over two CPU processes: the student and its EMA sharded block by block, the
    gradient clipped over every shard; the checkpoint is gathered whole, resumes on one process
    without FSDP, and the export is the whole student."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    train_py([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=fsdp", "trainer.accelerator=cpu",
              "trainer.devices=2", "data.batch_size=1", "logger=none", "eval.every_n_steps=2",
              "eval.prompts=[a red circle,a blue square]", f"hydra.run.dir={run}"], tmp_path, probe)
    reference = one_process_run["run"]
    # The grids during training: every rank gathers the student, rank 0 draws from the whole copy.
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert not {k for _, k in keys(probe, 0)} & {k for _, k in keys(probe, 1)}  # disjoint shards
    # One file holding the whole student and EMA, with the names of an unsharded run, the same
    # training as one process.
    sharded = student_and_ema(run / "checkpoints" / "last.ckpt")
    assert_same_training(sharded, student_and_ema(reference / "checkpoints" / "last.ckpt"))
    assert_halved(probe, sharded)
    assert any(k.startswith("ema.module.") for k in sharded)
    # The exported student is the whole (EMA) student; the teacher was replicated, whole on each rank.
    from diffusers import UNet2DConditionModel

    total = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet").parameters())
    assert [(probe / f"teacher_rank{r}.txt").read_text() for r in range(2)] == [f"UNet2DConditionModel {total}"] * 2
    unet = UNet2DConditionModel.from_pretrained(run / "student" / "unet")
    for k, v in unet.state_dict().items():
        assert torch.equal(v, sharded[f"ema.module.{k}"]), k
    # Step 2's checkpoint resumes on one process, without FSDP, and trains the same student.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step_0000002.ckpt", resumed / "checkpoints" / "last.ckpt")
    from distillery.training import train

    result = train(compose_train([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=cpu", "data.batch_size=2",
                                  "logger=none", "export_at_end=false", "ckpt_path=last"], resumed))
    assert result["global_step"] == 4
    assert_same_training(student_and_ema(result["checkpoint"]), student_and_ema(reference / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_sharded_teacher_and_sharded_checkpoints_resume_on_another_world_size(one_process_run, tiny_sd_folder,
                                                                              tmp_path):
    """The teacher sharded too, the checkpoints written as per-rank shards: the same training as
    one process; the shards resume on one process under FSDP, and only under FSDP."""
    from diffusers import UNet2DConditionModel

    from distillery.checkpoints import is_sharded, read_checkpoint
    from distillery.config import ConfigError
    from distillery.training import train

    run = tmp_path / "run"
    train_py([*COMMON, f"arch.teacher={tiny_sd_folder}", "trainer=fsdp", "trainer.accelerator=cpu",
              "trainer.devices=2", "trainer.strategy.state_dict_type=sharded", "trainer.strategy.shard_teacher=true",
              "eval.every_n_steps=4", "eval.prompts=[a red circle]", "data.batch_size=1", "logger=none",
              f"hydra.run.dir={run}"], tmp_path, tmp_path / "probe")
    # Each rank held about half of the teacher's weights (FSDP pads the last shard).
    total = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet").parameters())
    held = [(tmp_path / "probe" / f"teacher_rank{r}.txt").read_text().split() for r in range(2)]
    assert [kind for kind, _ in held] == ["FullyShardedDataParallel"] * 2
    assert all(int(n) <= total // 2 + 2 for _, n in held) and sum(int(n) for _, n in held) == total, (held, total)
    step_2 = run / "checkpoints" / "step_0000002.ckpt"
    assert is_sharded(step_2) and is_sharded(run / "checkpoints" / "last.ckpt")  # folders of shards
    whole = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]  # gathered in this process
    reference = student_and_ema(one_process_run["run"] / "checkpoints" / "last.ckpt")
    assert_same_training({k: v for k, v in whole.items() if k.startswith(("student.", "ema.module."))}, reference)
    assert_halved(tmp_path / "probe", whole)
    assert (run / "samples" / "step_0000004.png").is_file()  # drawn from the gathered teacher and student
    unet = UNet2DConditionModel.from_pretrained(run / "student" / "unet")  # the export reads the shards too
    assert all(torch.equal(v, whole[f"ema.module.{k}"]) for k, v in unet.state_dict().items())

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_2, resumed / "checkpoints" / "last.ckpt")
    one_process = [*COMMON, f"arch.teacher={tiny_sd_folder}", "data.batch_size=2", "logger=none",
                   "export_at_end=false", "ckpt_path=last"]
    with pytest.raises(ConfigError, match=r"is a sharded FSDP checkpoint .* this run's strategy is auto: resume it "
                                          r"with trainer=fsdp \(on any number of devices\)"):
        train(compose_train([*one_process, "trainer=cpu"], resumed))
    # On one process under FSDP: the two ranks' shards are read as one, and training goes on as
    # the one-process run's.
    result = train(compose_train([*one_process, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1"],
                                 resumed))
    assert result["global_step"] == 4
    resumed_state = read_checkpoint(result["checkpoint"])["state_dict"]
    assert_same_training({k: v for k, v in resumed_state.items() if k.startswith(("student.", "ema.module."))},
                         reference)


@pytest.mark.slow
def test_dmd2_on_two_processes_trains_what_one_process_trains_with_the_global_batch(tiny_sd_folder, tmp_path):
    """method=dmd2 under DDP (two CPU processes, gloo): the generator and the fake score take
    their own optimizer steps in one iteration, each backward reaching one of them; every network
    (generator, its EMA, fake score, discriminator head) ends as one process trains it with the
    global batch, and the two-step generator's backward simulation reads the global batch's draws."""
    # Plain SGD: AdamW's first steps move every weight by about its learning rate whatever the
    # gradient's size, so a rounding difference of a gradient near zero becomes a whole step;
    # SGD keeps the two runs' difference at the size of the gradients' rounding.
    sgd = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps"]
    dmd = ["arch=copy", "method=dmd2", "method.timesteps=[999,499]", "method.fake_updates_per_generator_step=2",
           *sgd, "method.generator_lr=0.1", "method.fake_lr=0.1", "method.gan_weight=0.1", "method.disc_weight=0.1",
           "method.ema_decay=0.9", *DATA, "trainer.max_steps=4", "trainer.log_every_n_steps=1", "eval.at_end=false",
           "export_at_end=false", "logger=csv", f"arch.teacher={tiny_sd_folder}"]
    two, one = tmp_path / "two", tmp_path / "one"
    train_py([*dmd, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.strategy.find_unused_parameters=true", "data.batch_size=1", f"hydra.run.dir={two}"],
             tmp_path, two / "probe")
    train_py([*dmd, "trainer=cpu", "data.batch_size=2", f"hydra.run.dir={one}"], tmp_path, one / "probe")
    a, b = weights(two / "probe", 0), weights(two / "probe", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the generator bit-identical on both ranks
    trained = ("student.", "ema.module.", "fake_score.", "disc_head.")
    for run in (two, one):
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    got, expected = (student_and_ema(run / "checkpoints" / "last.ckpt", trained) for run in (two, one))
    assert {k.split(".")[0] for k in got} == {"student", "ema", "fake_score", "disc_head"}
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    # ... where training moved the generator and the fake score (both start as the teacher's
    # U-Net) by far more than that: a rank's gradient left out of one of them would show.
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet").state_dict()
    for name in ("student", "fake_score"):
        moved = max(float((expected[f"{name}.{k}"] - v).abs().max()) for k, v in start.items())
        assert moved > 1e-3, (name, moved)
    # The run logged the update counts of the alternation: 2 generator and 4 fake-score updates.
    rows = list(csv.DictReader(open(two / "csv" / "metrics.csv")))
    last = [r for r in rows if r.get("train/fake_updates")][-1]
    assert (float(last["train/generator_updates"]), float(last["train/fake_updates"])) == (2.0, 4.0)
