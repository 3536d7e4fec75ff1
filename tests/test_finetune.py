"""Finetuning on a real local Ray: Ray Train workers, DeepSpeed/DDP on CPU (gloo),
the synthetic dataset. Slow by nature (each run starts a worker group)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import clip_models
from clip_platform.train import TrainConfig, driver, run_finetune
from clip_platform.train.driver import worker_cpus
from cn_clip_ref import cn_clip_model
from helpers import sample_log, synthetic_lmdb

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_lmdb(tmp_path_factory.mktemp("synthetic"), num_valid=48)


def tiny(dataset, logs, **overrides) -> TrainConfig:
    base = dict(train_data=str(dataset / "train"), val_data=str(dataset / "valid"), vision_model="ViT-Tiny",
                text_model="BERT-Tiny-chinese", batch_size=16, valid_batch_size=24, lr=1e-3, wd=0.0, warmup=2,
                max_steps=4, logs=str(logs), name="run", log_interval=1, num_workers=1, cpus_per_worker=0.5,
                max_failures=0, backend="deepspeed", zero_stage=2, precision="fp32", record_sample_ids=True)
    return TrainConfig(**{**base, **overrides})


def train_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def final_state(result) -> dict[str, torch.Tensor]:
    return clip_models.read_checkpoint(result.checkpoint)[0]


# AdamW with eps=1 updates by ~lr * gradient (|g| << eps): the weights after a few steps
# then compare gradients linearly, where Adam's near-sign update would magnify rounding.
SGD_LIKE = dict(lr=0.5, eps=1.0, val_data=None)


def test_two_workers_equal_one_worker_with_the_global_batch(dataset, tmp_path, ray_local):
    one = run_finetune(tiny(dataset, tmp_path / "one", workers=1, batch_size=32, **SGD_LIKE))
    # cn_clip's `--workers 2` with the default --cpus-per-worker (auto) on this 2-core machine
    two = run_finetune(tiny(dataset, tmp_path / "two", workers=2, batch_size=16, cpus_per_worker="auto", **SGD_LIKE))
    losses_one = [m["loss"] for m in train_metrics(one.run_dir)]
    losses_two = [m["loss"] for m in train_metrics(two.run_dir)]
    assert len(losses_one) == 4 and losses_one == pytest.approx(losses_two, abs=5e-5)
    assert {k: sorted(v) for k, v in sample_log(one.run_dir).items()} == \
           {k: sorted(v) for k, v in sample_log(two.run_dir).items()}
    a, b = final_state(one), final_state(two)
    for key in a:  # the weights after 4 steps agree: so did the gradients
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_accumulation_equals_the_larger_batch(dataset, tmp_path, ray_local):
    plain = run_finetune(tiny(dataset, tmp_path / "plain", workers=1, batch_size=32, backend="ddp", max_steps=3,
                              **SGD_LIKE))
    accum = run_finetune(tiny(dataset, tmp_path / "accum", workers=1, batch_size=16, accum_freq=2, backend="ddp",
                              max_steps=3, **SGD_LIKE))
    assert [m["loss"] for m in train_metrics(plain.run_dir)] == \
           pytest.approx([m["loss"] for m in train_metrics(accum.run_dir)], abs=5e-5)
    a, b = final_state(plain), final_state(accum)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_resume_mid_epoch_sees_exactly_the_uninterrupted_samples(dataset, tmp_path, ray_local):
    # 256 pairs / (2 x 16) = 8 steps per epoch: stop at step 3, mid-epoch, then go on to 10 (into epoch 2).
    # The plan's samples are the uninterrupted run's: test_convergence_deepspeed_zero2_two_workers checks
    # that over five epochs, so no third, uninterrupted run is needed here.
    run_finetune(tiny(dataset, tmp_path / "split", workers=2, max_steps=3, val_data=None))
    second = tiny(dataset, tmp_path / "split", workers=2, max_steps=10, val_data=None)
    resumed = run_finetune(second)
    assert sample_log(resumed.run_dir) == planned_samples(second, 10)
    log_text = "".join(p.read_text() for p in resumed.run_dir.glob("out_*.log"))
    assert "=> resumed from checkpoint" in log_text


def test_finetune_on_webdataset_shards(dataset, tmp_path, ray_local):
    """img2dataset's tar shards as --train-data / --val-data: each sample's image and caption
    form a pair; a corrupt image keeps its slot and is counted, a caption-only sample is no pair."""
    from clip_platform.data import lmdb_io
    from helpers import write_tar_shards

    with lmdb_io.pair_reader(dataset / "train") as read:
        pairs = [read(i) for i in range(48)]
    samples = [(f"{i:09d}", image, text) for i, (_, _, text, image) in enumerate(pairs)]
    samples[5] = ("000000005", b"corrupt", samples[5][2])
    samples.append(("000000999", None, "只有文字"))
    write_tar_shards(tmp_path / "train", samples[:40], per_shard=16)
    write_tar_shards(tmp_path / "valid", samples[40:], per_shard=16)
    result = run_finetune(tiny(dataset, tmp_path / "logs", workers=1, max_steps=3,
                               train_data=f"{tmp_path}/train/{{00000..00002}}.tar",
                               val_data=str(tmp_path / "valid"), valid_batch_size=8))
    steps = sample_log(result.run_dir)
    assert len(steps) == 3 and all(len(v) == 16 for v in steps.values())
    assert {i for v in steps.values() for i in v} <= set(range(40))
    assert "valid_mean_recall" in result.final_metrics
    assert clip_models.load(str(result.checkpoint))[0] is not None
    log_text = "".join(p.read_text() for p in result.run_dir.glob("out_*.log"))
    assert "bad training records skipped" in log_text and "unreadable image" in log_text  # the corrupt one


def train_worker_pids() -> list[int]:
    """Ray Train worker processes, found by their process title."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def planned_samples(config: TrainConfig, num_steps: int) -> dict[int, list[int]]:
    """What each step must train on: the plan's indices, rank 0's batch then rank 1's."""
    from clip_platform.train.data import count_pairs
    from clip_platform.train.plan import Plan

    plan = Plan(count_pairs(config.train_data), config.batch_size, config.workers, config.accum_freq, config.seed)
    expected = {}
    for step in range(1, num_steps + 1):
        epoch, i = divmod(step - 1, plan.steps_per_epoch)
        expected[step] = [int(x) for r in range(config.workers)
                          for x in plan.rank_indices(epoch, r)[i * config.batch_size:(i + 1) * config.batch_size]]
    return expected


def test_killed_worker_restores_from_checkpoint_and_finishes(dataset, tmp_path, ray_local):
    import os
    import signal

    config = tiny(dataset, tmp_path / "fault", workers=2, max_steps=32, save_step_frequency=2, max_failures=2,
                  val_data=None)
    killed = []

    def kill_a_worker_once_a_checkpoint_is_registered():
        metrics, seen = config.run_dir / "metrics.jsonl", None
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                seen = seen or time.time()
                # Ray Train's controller collects reported checkpoints every 2 s.
                if time.time() - seen > 3 and (pids := train_worker_pids()):
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_once_a_checkpoint_is_registered, daemon=True)
    killer.start()
    result = run_finetune(config)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert sample_log(result.run_dir) == planned_samples(config, 32)
    log_text = "".join(p.read_text() for p in result.run_dir.glob("out_*.log"))
    assert "=> resumed from checkpoint" in log_text


def test_convergence_deepspeed_zero2_two_workers(tmp_path, ray_local):
    """A tiny CLIP from scratch learns the synthetic captions: validation text->image R@1
    ends far above chance (1/48 = 2.1% for 48 validation images)."""
    # 1024 pairs: 16 steps an epoch at 2 x 32, so the run spends its time on steps rather than
    # on each epoch's validation, checkpoint and data start (the 256 pairs of `dataset`: 4 steps).
    dataset = synthetic_lmdb(tmp_path / "synthetic", num_train=512, num_valid=48)
    config = tiny(dataset, tmp_path / "conv", workers=2, batch_size=32, max_steps=80, lr=2e-3, warmup=10,
                  log_interval=20, valid_step_interval=None)
    result = run_finetune(config)
    # An uninterrupted run trains on the plan's samples, in its order, epoch after epoch.
    assert sample_log(result.run_dir) == planned_samples(config, 80)
    losses = [m["loss"] for m in train_metrics(result.run_dir)]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, (losses[:10], losses[-10:])
    assert result.final_metrics["valid_t2i_r1"] >= 20.0, result.final_metrics
    assert result.plot is not None and result.plot.stat().st_size > 0
    # The cn_clip-layout checkpoint loads in clip_models and in cn_clip's own model.
    checkpoint = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 80 and all(k.startswith("module.") for k in checkpoint["state_dict"])
    model = clip_models.load_model(result.checkpoint)
    reference = cn_clip_model(model.config)
    reference.load_state_dict({k[len("module."):]: v for k, v in checkpoint["state_dict"].items()})


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/finetune.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--vision-model", "ViT-Q-99", "--text-model", "BERT-Tiny-chinese"], "unknown model config 'ViT-Q-99'"),
    (["--vision-model", "RN50", "--text-model", "RBT3-chinese", "--mask-ratio", "0.5"], "ViT towers only"),
    (["--batch-size", "1000"], "fewer than one global batch"),
    (["--precision", "fp16"], "needs --use-gpu"),
    (["--distillation", "--teacher-model-name", "no-such-teacher"], "model 'no-such-teacher' not found"),
    (["--distillation", "--teacher-model-name", "{empty}"], "is a directory but not a Hugging Face model"),
    (["--storage-path", "{file}"], "--storage-path {file} is a file; give a directory path"),
    (["--logs", "s3://bucket/logs"], "--logs s3://bucket/logs: this job writes to local or shared-filesystem paths"),
])
def test_cli_errors_are_one_line(dataset, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    names = {"empty": tmp_path / "empty", "file": tmp_path / "file"}
    args, message = [a.format(**names) for a in args], message.format(**names)
    base = ["--train-data", str(dataset / "train"), "--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese"]
    out = cli(*base, *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def nonfinite_loop(steps: dict[int, list[int]]):
    """A train_loop_per_worker whose Trainer makes the loss NaN on ranks `steps[step]` at those
    steps. Made inside a function, so Ray pickles it (and its Trainer subclass) by value: the
    workers cannot import the test modules."""
    from clip_platform.train.trainer import Trainer

    class NonFiniteTrainer(Trainer):
        def _loss(self, *args):
            loss, acc = super()._loss(*args)
            if self.rank in steps.get(self.position.global_step + 1, ()):
                loss = loss * float("nan")
            return loss, acc

    def train_loop(loop_config: dict) -> None:
        NonFiniteTrainer(loop_config["config"]).fit()

    return train_loop


def test_a_non_finite_step_is_skipped_on_every_worker_and_too_many_stop_the_run(dataset, tmp_path, ray_local,
                                                                                 monkeypatch):
    config = tiny(dataset, tmp_path / "nan", workers=2, max_steps=6, save_step_frequency=2, val_data=None,
                  max_bad_steps=2)
    # worker 1's loss is NaN at step 3 only
    monkeypatch.setattr(driver, "train_loop_per_worker", nonfinite_loop({3: [1]}))
    result = run_finetune(config)
    metrics = train_metrics(result.run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7)) and metrics[-1]["skipped_steps"] == 1
    assert math.isnan(metrics[2]["loss"]) and all(math.isfinite(m["loss"]) for m in metrics if m["step"] != 3)
    assert sample_log(result.run_dir) == planned_samples(config, 6)  # the skipped step used its batch
    log_text = "".join(p.read_text() for p in result.run_dir.glob("out_*.log"))
    assert "step 3: the loss is not finite on a worker; the step is skipped on every worker" in log_text

    again = config.replace(logs=str(tmp_path / "stop"), max_steps=8)
    monkeypatch.setattr(driver, "train_loop_per_worker", nonfinite_loop({5: [0], 6: [1]}))
    with pytest.raises(ValueError, match=r"2 steps in a row up to step 6 had a non-finite loss .* the last good "
                                         r"checkpoint is .*stop/run/checkpoints/epoch_latest.pt"):
        run_finetune(again)


def test_frozen_tensors_stay_bit_identical_and_ema_follows_the_decay(dataset, tmp_path, ray_local):
    start = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")
    checkpoint = clip_models.save_checkpoint(start, tmp_path / "start.pt")
    config = tiny(dataset, tmp_path / "frozen", resume=str(checkpoint), freeze_text=True, unfrozen_vision_layers=1,
                  ema_decay=0.5, max_steps=2, save_step_frequency=1, valid_step_interval=2)
    result = run_finetune(config)
    before, after = start.state_dict(), final_state(result)
    last = f"visual.transformer.resblocks.{len(start.visual.transformer.resblocks) - 1}."
    trained = {k for k in before if k.startswith((last, "visual.ln_post", "visual.proj")) or k == "logit_scale"}
    for key, tensor in before.items():
        if key not in trained:  # the text tower, and the vision tower but its last block and head
            assert torch.equal(tensor, after[key]), key
    assert not torch.equal(before[last + "mlp.c_fc.weight"], after[last + "mlp.c_fc.weight"])

    steps = [clip_models.read_checkpoint(config.checkpoint_dir / f"epoch_1_{s}.pt")[0] for s in (1, 2)]
    ema = clip_models.read_checkpoint(config.checkpoint_dir / "epoch_latest.ema.pt")[0]
    for key in ("visual.proj", last + "mlp.c_fc.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        w0, w1, w2 = before[key], steps[0][key], steps[1][key]
        torch.testing.assert_close(ema[key], 0.25 * w0 + 0.25 * w1 + 0.5 * w2,  # 0.5 ema + 0.5 w after each step
                                   atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ema["visual.proj"], steps[1]["visual.proj"])
    assert "ema_valid_t2i_r1" in result.final_metrics and "valid_t2i_r1" in result.final_metrics


def test_worker_cpus_auto_share_the_machine_with_decoding(dataset):
    def cpus(total, largest, **flags):
        return worker_cpus(TrainConfig(train_data=str(dataset / "train"), **flags), total, largest)

    assert cpus(2, 2, workers=2) == 0.75  # cn_clip's --workers 2 on 2 cores: half a CPU left for decoding
    assert cpus(2, 2) == 1.5 and cpus(16, 4, workers=2) == 4  # a worker fits on the largest node
    assert cpus(2, 2, workers=2, cpus_per_worker=0.5) == 0.5  # a number is kept
    with pytest.raises(ValueError, match="8 training workers on 2 CPUs would get 0.15 CPUs each"):
        cpus(2, 2, workers=8)
    with pytest.raises(ValueError, match="2 training workers x 1 CPUs leave 0 of the cluster's 2 CPUs"):
        cpus(2, 2, workers=2, cpus_per_worker=1)


def test_resume_names_the_towers_unless_given(dataset, tmp_path):
    checkpoint = clip_models.save_checkpoint(clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese"),
                                             tmp_path / "tiny.pt")
    made = TrainConfig(train_data=str(dataset / "train"), resume=str(checkpoint))
    assert (made.vision_model, made.text_model) == ("ViT-Tiny", "BERT-Tiny-chinese")
    assert TrainConfig(train_data=str(dataset / "train")).vision_model == "ViT-B-16"  # cn_clip's default
    out = cli("--train-data", str(dataset / "train"), "--resume", str(checkpoint), "--vision-model", "RN50")
    assert out.returncode == 2 and f"{checkpoint} does not fit RN50@BERT-Tiny-chinese" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # refused before any worker starts


def test_cli_missing_split_is_one_line(tmp_path):
    out = cli("--train-data", str(tmp_path / "lmdb" / "train"), "--vision-model", "ViT-Tiny",
              "--text-model", "BERT-Tiny-chinese")
    assert out.returncode == 2 and "is not a cn_clip LMDB split" in out.stderr and "Traceback" not in out.stderr


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag from the TFRecord event files under `folder` (tensorboardX's protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_lora_trackers_zero_shot_and_long_texts_in_one_run(dataset, tmp_path, ray_local, monkeypatch):
    """LoRA on a 128-token run with TensorBoard, MLflow and zero-shot evaluation: the merged
    checkpoint equals peft's own merge of the saved adapter and loads in clip_models; the base
    stays bit-identical; the trackers hold metrics.jsonl's metrics; embed reads the run's
    checkpoint at 128 tokens too."""
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from clip_platform.data import SyntheticConfig, make_synthetic
    from helpers import load_job

    make_synthetic(SyntheticConfig(str(tmp_path / "zs"), num_train=1, num_valid=1, num_test=0, resolution=32,
                                   lmdb=False, zeroshot_per_class=1))
    torch.manual_seed(0)
    start = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")
    checkpoint = clip_models.save_checkpoint(start, tmp_path / "start.pt")
    config = tiny(dataset, tmp_path / "lora", resume=str(checkpoint), lora_rank=4, lora_alpha=8.0, lr=1e-2,
                  context_length=128, max_steps=16, report_to="tensorboard,mlflow",
                  zeroshot_data=str(tmp_path / "zs" / "zeroshot"), zeroshot_frequency=100, val_data=None)
    result = run_finetune(config)

    merged = final_state(result)
    adapter = config.checkpoint_dir / "epoch_latest.lora"
    base = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")
    base.load_state_dict(start.state_dict())
    expected = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    changed = [k for k in merged if not torch.equal(merged[k], start.state_dict()[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # only adapted layers' weights moved
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=1e-6)
    loaded, _ = clip_models.load(str(result.checkpoint))
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value.float(), merged[key].float(), atol=0, rtol=0)

    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    zero_shot = [r for r in records if "zeroshot_top1" in r]
    assert len(zero_shot) == 1 and zero_shot[0]["step"] == 16 and 0 <= zero_shot[0]["zeroshot_top1"] <= 100
    # The run ends at its first epoch's end (16 steps), where zero-shot was not due (every 100 epochs): the final
    # evaluation comes after the epoch's checkpoint, and the result still reports it.
    assert result.final_metrics["zeroshot_top5"] == zero_shot[0]["zeroshot_top5"]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    events = tensorboard_scalars(result.run_dir / "tensorboard")
    assert events["loss"] == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in losses]
    assert events["zeroshot_top1"] == [(16, pytest.approx(zero_shot[0]["zeroshot_top1"], rel=1e-6))]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when told to
    client = MlflowClient((result.run_dir / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(step, pytest.approx(loss, rel=1e-6)) for step, loss in losses]
    assert run.data.params["lora_rank"] == "4" and "zeroshot_top1" in run.data.metrics

    texts = tmp_path / "long.jsonl"  # a text past 52 tokens: embedded whole at --context-length 128
    texts.write_text(json.dumps({"text_id": 1, "text": "红色的圆形" * 20}, ensure_ascii=False) + "\n")
    load_job("embed").main(["--extract-text-feats", "--text-data", str(texts), "--resume", str(result.checkpoint),
                            "--context-length", "128", "--output-dir", str(tmp_path / "emb")])
    from clip_platform.data.features import read_features

    got = read_features(tmp_path / "emb" / "texts").vectors[0]
    with torch.no_grad():
        feature = loaded.encode_text(clip_models.tokenize([clip_models.preprocess_text("红色的圆形" * 20)], 128))[0]
    torch.testing.assert_close(torch.tensor(got), torch.nn.functional.normalize(feature, dim=-1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("flags, message", [
    (dict(lora_rank=4, freeze_text=True), "--freeze-text does not combine with it"),
    (dict(lora_rank=4, lora_targets="query,in_proj"), "--lora-targets in_proj: no linear layer of the model is named"),
    (dict(report_to="tensorboard,wandb"), "--report-to wandb: the trackers are tensorboard, mlflow"),
    (dict(zeroshot_frequency=0), "--zeroshot-frequency must be at least 1"),
])
def test_lora_tracker_and_zero_shot_flags_refuse_mistakes(dataset, flags, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(train_data=str(dataset / "train"), vision_model="ViT-Tiny", text_model="BERT-Tiny-chinese",
                    **flags)


def test_zero3_counts_the_parameters_it_partitions_and_the_summary_counts_epochs_as_the_log(dataset, tmp_path,
                                                                                           ray_local):
    """Under ZeRO-3 every rank holds empty placeholders: the log still counts the whole model."""
    result = run_finetune(tiny(dataset, tmp_path / "logs", zero_stage=3, max_steps=1, val_data=None))
    total = sum(p.numel() for p in clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese").parameters())
    log_text = "".join(p.read_text() for p in result.run_dir.glob("out_*.log"))
    assert f"{total:,} of {total:,} parameters train (100.00%)" in log_text, log_text[-2000:]
    # The run's records agree with its log on the epoch (mid-epoch here: step 1 of epoch 1).
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["metrics"]["epoch"] == train_metrics(result.run_dir)[-1]["epoch"] == 1


def test_distillation_logs_its_term_beside_the_total_loss(dataset, tmp_path, ray_local):
    teacher = clip_models.save_checkpoint(clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese"), tmp_path / "t.pt")
    result = run_finetune(tiny(dataset, tmp_path / "logs", distillation=True, teacher_model_name=str(teacher),
                               kd_loss_weight=0.5, max_steps=2, val_data=None))
    rows = train_metrics(result.run_dir)
    assert len(rows) == 2 and all(0 < row["kd_loss"] <= 2 and row["loss"] > 0.5 * row["kd_loss"] for row in rows)
    log_text = "".join(p.read_text() for p in result.run_dir.glob("out_*.log"))
    assert f"Distillation Loss: {rows[-1]['kd_loss']:.6f}" in log_text
