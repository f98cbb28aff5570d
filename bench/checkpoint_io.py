"""Checkpoint upload/download throughput and the step time cost of saving, against baselines from the same run.

1. Transfer: a checkpoint-like folder (one big model file + per-rank shards) goes up and down
   - single stream: one file after another, one connection, one part at a time  <- baseline
   - Dhad store: files in parallel (thread pool), big files as parallel multipart uploads, sha256 on the fly
2. Step time: a training-like loop (GPU-like waits, then CPU-bound matmuls) that saves every k steps
   - no checkpoints                                                               <- baseline
   - synchronous publish (training waits for the upload)
   - AsyncPublisher (upload in a background thread, waited for at the next save)

Uses the S3 endpoint in AWS_ENDPOINT_URL/AWS_ACCESS_KEY_ID/... if set, else starts a private SeaweedFS.
python bench/checkpoint_io.py [--mb 256 --files 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_checkpoint(folder: Path, megabytes: int, shards: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    model = megabytes // 2
    (folder / "model.safetensors").write_bytes(os.urandom(model * 1024 * 1024))
    for i in range(shards):
        (folder / f"zero_pp_rank_{i}_optim_states.pt").write_bytes(os.urandom((megabytes - model) * 1024 * 1024 // shards))
    return sum(p.stat().st_size for p in folder.iterdir())


def single_stream_up(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        client.fput_object(bucket, f"{prefix}/{path.name}", str(path), part_size=512 * 1024 * 1024, num_parallel_uploads=1)


def single_stream_down(client, bucket: str, prefix: str, dest: Path) -> None:
    for obj in client.list_objects(bucket, prefix=prefix + "/", recursive=True):
        client.fget_object(bucket, obj.object_name, str(dest / obj.object_name.rsplit("/", 1)[-1]))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(publisher_mode: str, ckpts, tmp: Path, steps: int, every: int, folder: Path, cpu: bool) -> float:
    """Mean seconds per step of a loop that saves `folder` every `every` steps. A step is either CPU work
    (matmuls: training on CPU) or a 60 ms wait (training on a GPU, where the host CPU is mostly idle)."""
    import torch

    from dhad_trainer.storage.checkpoints import AsyncPublisher

    torch.manual_seed(0)
    a = torch.randn(768, 768)
    publisher = AsyncPublisher(ckpts, tmp / f"staging-{publisher_mode}", True, keep_last=2)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if cpu:
            for _ in range(12):
                a = torch.tanh(a @ a) * 0.5
        else:
            time.sleep(0.06)
        if step % every == 0 and publisher_mode != "none":
            if publisher_mode == "sync":
                ckpts.publish(folder, step, True, keep_last=2)
            else:
                publisher.start(folder, step)
    publisher.wait()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256, help="checkpoint size in MB")
    p.add_argument("--files", type=int, default=8, help="shard files besides the model file")
    p.add_argument("--every", type=int, default=0, help="steps between saves (default: ~3 upload times)")
    args = p.parse_args()

    from dhad_trainer.storage.checkpoints import CheckpointStore
    from dhad_trainer.storage.routing import open_store

    tmp = Path(tempfile.mkdtemp(prefix="dhad-bench-ckpt-"))
    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        from tests.harness.s3 import S3Server

        server = S3Server(tmp / "s3").start()
        os.environ.update(server.env())
    try:
        store = open_store("s3://bench/x")
        bucket = "dhad-bench-" + uuid.uuid4().hex[:6]
        store.client.make_bucket(bucket)
        size = make_checkpoint(tmp / "ckpt", args.mb, args.files)
        mb = size / 1e6
        up1 = timed(lambda: single_stream_up(store.client, bucket, tmp / "ckpt", "single"))
        (tmp / "down1").mkdir()
        down1 = timed(lambda: single_stream_down(store.client, bucket, "single", tmp / "down1"))
        up2 = timed(lambda: store.upload_dir(tmp / "ckpt", f"s3://{bucket}/dhad"))
        down2 = timed(lambda: store.download_dir(f"s3://{bucket}/dhad", tmp / "down2"))
        print(f"checkpoint {mb:.0f} MB in {args.files + 1} files, {store.workers} transfer threads")
        print(f"{'transfer':44s} {'seconds':>8s} {'MB/s':>8s} {'vs single stream':>17s}")
        for name, secs, base in (("upload single stream (baseline)", up1, up1), ("upload Dhad store (+sha256)", up2, up1),
                                 ("download single stream (baseline)", down1, down1),
                                 ("download Dhad store (+sha256)", down2, down1)):
            print(f"{name:44s} {secs:8.2f} {mb / secs:8.1f} {base / secs:16.2f}x")
        shutil.rmtree(tmp / "down1")
        shutil.rmtree(tmp / "down2")

        ckpts = CheckpointStore(store, f"s3://{bucket}/steps/checkpoints")
        every = args.every or max(5, int(3 * up2 / 0.06))  # saves ~3 upload-times apart, as real jobs are
        steps = 4 * every
        for cpu in (False, True):
            rows = {m: step_times(m, ckpts, tmp, steps, every, tmp / "ckpt", cpu) for m in ("none", "sync", "async")}
            kind = "CPU-bound step" if cpu else "GPU-like step (60 ms, CPU idle)"
            print(f"{kind + ', save every ' + str(every):44s} {'s/step':>8s} {'vs no saving':>13s}")
            for name, mode in (("  no checkpoints (baseline)", "none"), ("  synchronous upload", "sync"),
                               ("  async upload (AsyncPublisher)", "async")):
                print(f"{name:44s} {rows[mode]:8.3f} {rows[mode] / rows['none']:12.2f}x")
    finally:
        if server:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
