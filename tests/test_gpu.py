"""CUDA checks, run by benchmarks/gpu_check.sh on a GPU machine (skipped where no GPU is visible).

The loss on the device against the float64 CPU reference; short training runs in bf16 and fp16
(grad scaler) with the single and fsdp engines, whose first-step losses must agree with fp32; no
host synchronisation in a CUDA step of every engine (as tests/test_host_sync.py on the CPU); fused
attention kernels (flash, memory-efficient or cuDNN) at both crop sizes of ViT-S/16; the
photometric ops and data.decode=device (nvJPEG, batched crops) against the CPU device; massl-eval
on the device against the CPU.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from massl.dist import DistEnv
from massl.loss import massl_loss, random_partition_perm
from massl.train import train
from tests.reference import massl_loss_reference
from tests.test_attention import attention_ops
from tests.test_host_sync import VARIANTS, assert_no_host_sync, count_loop_step, tiny_config as step_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_loss_on_device_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    zs = F.normalize(torch.randn(4, 6, 16, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(2, 6, 16, generator=g, dtype=torch.float64), dim=-1)
    memory = F.normalize(torch.randn(16, 96, generator=g, dtype=torch.float64), dim=0)
    perm = random_partition_perm(96, 0, 3, torch.device("cuda"))
    zs_dev = zs.float().cuda().requires_grad_()
    loss = massl_loss(zs_dev, zt.float().cuda(), memory.float().cuda(), perm, 24, 0.1, 0.04)
    loss.backward()
    zs_ref = zs.clone().requires_grad_()
    ref = massl_loss_reference(zs_ref, zt, memory, perm.cpu(), 24, 0.1, 0.04)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert torch.allclose(zs_dev.grad.double().cpu(), zs_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine,precision", [("single", "bf16"), ("single", "fp16"), ("fsdp", "bf16")])
def test_short_cuda_run(tiny_config, tmp_path, engine, precision):
    losses = {}
    for prec in ("fp32", precision):
        out = str(tmp_path / prec)
        train(tiny_config("run.device=cuda", f"run.precision={prec}", f"engine.name={engine}", "run.max_steps=4",
                          output_dir=out))
        losses[prec] = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses[precision]))
    assert abs(losses[precision][0] - losses["fp32"][0]) < 0.05 * abs(losses["fp32"][0])


def test_gpu_augment_on_cuda_equals_cpu(tiny_config):
    """The photometric ops batched on the GPU give the crops they give on CPU tensors."""
    from massl.data import build_data

    source = build_data(tiny_config("data.gpu_augment=true"), 0, 1, "cuda")
    batch = next(iter(source.epoch(0)))
    on_gpu = source.prepare(batch, torch.device("cuda"))
    on_cpu = source.prepare(batch, torch.device("cpu"))
    for a, b in zip(on_gpu, on_cpu):
        assert (a.cpu() - b).abs().max() < 0.02  # normalised units: float rounding of blur and jitter


def synthetic_jpegs(sizes) -> list[bytes]:
    """Photo-like JPEGs without scikit-image (absent from the GPU image): a fractal, gradients, edges."""
    import io

    from PIL import Image

    out = []
    for w, h in sizes:
        fractal = Image.effect_mandelbrot((w, h), (-2.0, -1.2, 0.8, 1.2), 64)
        ramp = Image.linear_gradient("L").resize((w, h))
        ring = Image.radial_gradient("L").resize((w, h))
        buf = io.BytesIO()
        Image.merge("RGB", (fractal, ramp, ring)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def test_device_decode_on_cuda_matches_the_cpu_device(caplog):
    """nvJPEG + the batched crops on the GPU against libjpeg-turbo on the CPU device, same batch.
    Tolerance: nvJPEG's IDCT and chroma upsampling are its own, so pixels differ by a few levels
    at colour edges (mean under 2 levels); a wrong box or size would differ by tens of levels.
    A JPEG with a bogus Huffman table is refused on the GPU too: replaced and counted."""
    from massl.config import DataConfig
    from massl.data import multicrop as M
    from massl.data.augment.draw import sample_rng
    from massl.data.batch import collate
    from massl.data.device_decode import DeviceDecoder

    blobs = synthetic_jpegs([(500, 375), (375, 500), (320, 240), (640, 480)])
    corrupt = bytearray(blobs[2])
    dht = corrupt.index(b"\xff\xc4")
    corrupt[dht + 5:dht + 21] = b"\xf0" * 16
    blobs.append(bytes(corrupt))
    aug = M.MultiCropAugmentation(DataConfig(decode="device"))
    decoder = DeviceDecoder(aug)

    def batch():
        return collate([(aug.load(b, sample_rng(0, 0, i)), 0, i, ()) for i, b in enumerate(blobs)]).pin_memory()

    gpu_batch = batch()
    on_gpu = decoder(gpu_batch, torch.device("cuda"))
    cpu_batch = batch()
    on_cpu = decoder(cpu_batch, torch.device("cpu"))
    assert gpu_batch.skipped == cpu_batch.skipped == 1 and "skipping sample 4" in caplog.text
    for a, b in zip(on_gpu, on_cpu):
        assert a.shape == b.shape and a.is_cuda
        diff = (a.cpu().float() - b.float()).abs()
        assert diff.mean() < 2 and torch.quantile(diff.flatten()[::7], 0.99) <= 16


def test_device_decode_training_on_cuda(tiny_config, tmp_path):
    """data.decode=device end to end on the GPU, from a JPEG folder through pinned loader batches."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for i, data in enumerate(synthetic_jpegs([(40 + 4 * (i % 5), 36 + 2 * (i % 3)) for i in range(24)])):
        (folder / f"{i:03d}.jpg").write_bytes(data)
    summary = train(tiny_config("run.device=cuda", "data.decode=device", "data.num_workers=2", f"data.path={folder}",
                                "run.max_steps=3", output_dir=str(tmp_path / "run")))
    assert summary["step"] == 3 and summary["decode_fallback_images"] == 0 and summary["skipped_images"] == 0


def test_eval_on_cuda_agrees_with_cpu(tiny_run, digits_dir, tmp_path):
    """massl-eval on the device (bf16 autocast extraction, the SGD probe sweep on the GPU) gives
    the CPU's accuracies up to the precision of bf16 features."""
    from massl.eval.cli import main

    top1 = {}
    for device in ("cpu", "cuda"):
        for cmd, extra in (("knn", ["--k", "20"]), ("linear", ["--solver", "sgd", "--epochs", "5"])):
            out = str(tmp_path / f"{cmd}-{device}.json")
            main([cmd, "--checkpoint", tiny_run, "--train", os.path.join(digits_dir, "train"), "--val",
                  os.path.join(digits_dir, "val"), "--device", device, "--workers", "0", "--out", out, *extra])
            result = json.load(open(out))["results"]
            top1[cmd, device] = result[0]["top1"] if cmd == "knn" else result["top1"]
    for cmd in ("knn", "linear"):
        assert abs(top1[cmd, "cuda"] - top1[cmd, "cpu"]) <= 0.03, top1


@pytest.mark.parametrize("engine,precision", [("single", "bf16"), ("single", "fp16"), ("ddp", "bf16"),
                                              ("fsdp", "bf16"), ("fsdp", "fp16")])
def test_no_host_sync_in_a_cuda_step(engine, precision):
    env = DistEnv(device=torch.device("cuda"))  # ddp and fsdp start a one-rank NCCL group
    for variant in VARIANTS:
        result = count_loop_step(step_config(engine, "cuda", precision, **variant), env)
        assert_no_host_sync(result, f"{engine} {precision} {variant}")


FUSED_KERNELS = ("aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
                 "aten._scaled_dot_product_cudnn_attention")


def test_fused_attention_kernels_at_both_crop_sizes():
    """ViT-S/16 heads (dim 64) at 224 px (197 tokens) and 96 px (37 tokens), bf16."""
    ops, depth = attention_ops("cuda", "bf16", **{"model.embed_dim": 384, "model.num_heads": 6, "model.patch_size": 16,
                                                   "data.global_crop_size": 224, "data.local_crop_size": 96})
    assert sum(ops.get(k, 0) for k in FUSED_KERNELS) == 3 * depth, ops
    assert sum(ops.get(k + "_backward", 0) for k in FUSED_KERNELS) == 2 * depth, ops
    assert not any(k in ops for k in ("aten._softmax", "aten.softmax", "aten.bmm")), ops
