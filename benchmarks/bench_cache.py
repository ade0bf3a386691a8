"""Pretraining from the feature cache vs the online teacher, and the cache reader against the disk, on the CPU.

Run (see benchmarks/README.md, section "Feature cache"):

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_cache.py --benchmark-only \
        --benchmark-json=.benchmarks/cache.json
    .venv/bin/python benchmarks/bench_cache.py .benchmarks/cache.json      # the markdown table

Groups ``cache-step-{teacher}``, providers side by side in one run: one full pretraining step (targets, student +
regressor forward, ``dtkernels.fused_feat_loss``, backward, clipping, fused AdamW) as :mod:`dreamteacher.train`
takes it, the targets from

* ``online``: :class:`dreamteacher.model.OnlineTargets`, the frozen teacher built by ``build_teacher`` (one-step
  noising, taps at the student's strides, early exit), over the cached images held in memory (so the online step
  pays no image decoding: the comparison favours it);
* ``cache``: :class:`dreamteacher.feature_cache.CacheTargets` from ``build_source`` with ``data.cache``: images and
  float16 features read from the shards by a ``DataLoader`` in the main process (``num_workers=0``: the reads are
  inside the timed step), no teacher built.

Teachers: ``demo`` = the shipped ``shapes32`` teacher (5-level DDPM UNet, 32x32), batch 16, resnet18, regressor width
128 (the demo's pretraining configuration); ``adm64`` = an ADM-like 64x64 pixel-space UNet (:data:`ADM64_HALF`:
ADM's ImageNet-64 layout at half width, random init: weights do not change the speed), batch 8. Same student,
weights and images for both providers; the cache is written once per teacher before timing (its write rate is in
``extra_info``).

Group ``cache-read``: ``reader`` reads one shuffled epoch of a 1024-sample cache with the adm64 levels through
``FeatureCacheDataset`` + ``DataLoader`` (MB/s of images + features served), ``disk`` reads a freshly written 256 MiB
file sequentially in 8 MiB blocks; each ``_cold`` after ``posix_fadvise(DONTNEED)`` on its files (evicts their pages
from the page cache, nothing else), each ``_warm`` from the page cache.

Plain ``pytest benchmarks`` (disabled mode) runs the demo step once per provider and the reader once, untimed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import dtkernels
from dreamteacher.config import load_config
from dreamteacher.data import ProceduralShapes
from dreamteacher.feature_cache import FeatureCacheDataset, write_feature_cache
from dreamteacher.model import (
    DistillationModel,
    DistillationSource,
    OnlineTargets,
    build_source,
    build_student,
    teacher_for,
)
from dreamteacher.optim import build_optimizer
from dreamteacher.perf import keep_freed_memory, single_pixel_convs_as_linear
from dreamteacher.regressor import FeatureRegressor
from dreamteacher.teacher_training import shipped_teacher
from dreamteacher.teachers import DiffusionTeacher

#: ADM's ImageNet-64 UNet (Dhariwal & Nichol: 192 base channels, multipliers 1-2-3-4, 3 res blocks per level,
#: attention at 32, 16 and 8 with 64-channel heads, scale-shift norm, residual up/down-sampling) at half width and
#: 2 res blocks per level, as a diffusers UNet2DModel config; the full model would take minutes per benchmark round.
ADM64_HALF = dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(96, 192, 288, 384),
                  layers_per_block=2, attention_head_dim=64, norm_num_groups=32, resnet_time_scale_shift="scale_shift",
                  downsample_type="resnet", upsample_type="resnet",
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

#: teacher -> image size, batch, cached images, shard size, (warm-up, timed) rounds per provider.
TEACHERS = {
    "demo": {"image_size": 32, "batch": 16, "images": 256, "shard": 64, "rounds": {"online": (5, 30),
                                                                                   "cache": (5, 30)}},
    "adm64": {"image_size": 64, "batch": 8, "images": 64, "shard": 16, "rounds": {"online": (1, 6),
                                                                                  "cache": (3, 20)}},
}
PROVIDERS = ("online", "cache")
READ_SAMPLES, DISK_BYTES, BLOCK = 1024, 256 * 2**20, 8 * 2**20


class _UInt8Images(torch.utils.data.Dataset):
    """The procedural shapes as uint8 ``[3, R, R]`` images (what a cache stores)."""

    def __init__(self, n: int, size: int) -> None:
        self.shapes = ProceduralShapes(n, size, seed=0)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.shapes[i][0].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class _InMemory(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _config(name: str, out: Path, **extra):
    t = TEACHERS[name]
    values = {"data.image_size": t["image_size"], "data.num_workers": 0, "model.width": 128,
              "run.batch_size": t["batch"], "run.out_dir": out, "run.progress": False, "run.device": "cpu"}
    values.update(extra)
    return load_config(None, [f"--{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """teacher name -> {"online": DistillationSource, "cache": DistillationSource, "cfg", "write_img_s"}, built once."""
    keep_freed_memory()  # what every dreamteacher command sets on the CPU
    built: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name in built:
            return built[name]
        root = tmp_path_factory.mktemp(name)
        t = TEACHERS[name]
        if name == "demo":
            teacher_dir = shipped_teacher("shapes32")
        else:
            teacher_dir = root / "teacher"
            torch.manual_seed(0)
            DiffusionTeacher.from_config(ADM64_HALF).save_pretrained(teacher_dir)
        cfg = _config(name, root / "run", **{"teacher.path": teacher_dir})
        student = build_student(cfg)
        strides = [i["reduction"] for i in student.feature_info]
        cpu = torch.device("cpu")
        teacher, order = teacher_for(cfg, cpu, strides)
        images = _UInt8Images(t["images"], t["image_size"])
        start = time.perf_counter()
        write_feature_cache(teacher, images, root / "cache", shard_size=t["shard"], batch_size=t["batch"],
                            progress=False)
        write_img_s = t["images"] / (time.perf_counter() - start)
        cache_cfg = _config(name, root / "run", **{"data.cache": root / "cache"})
        in_memory = _InMemory(torch.stack([images[i] for i in range(len(images))]).float().div_(127.5).sub_(1.0))
        built[name] = {"cfg": cfg, "write_img_s": write_img_s,
                       "online": DistillationSource(in_memory, OnlineTargets(teacher, cpu, torch.contiguous_format),
                                                    teacher, order),
                       "cache": build_source(cache_cfg, cpu, strides)}
        return built[name]

    return get


def make_step(cfg, source: DistillationSource):
    """The loop's step (dreamteacher.train) without logging: ``step() -> loss``."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    student = build_student(cfg)
    regressor = FeatureRegressor(student.feature_info, source.teacher_channels, width=cfg.model.width,
                                 pool_sizes=cfg.model.pool_sizes)
    model = DistillationModel(student, regressor).train()
    single_pixel_convs_as_linear(model)
    optimizer = build_optimizer(cfg, model, cpu)
    from dreamteacher.data import build_loader

    loader = build_loader(source.dataset, cfg.run.batch_size, seed=0, num_workers=0, pin_memory=False)

    def batches():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    data = batches()
    counter = [0]

    def step() -> torch.Tensor:
        counter[0] += 1
        images, targets = source.targets(next(data), seed=counter[0])
        preds = model(images)
        level_targets = [targets[source.order[lvl]] for lvl in range(len(preds))]
        loss = dtkernels.fused_feat_loss(preds, [t.to(p.dtype) for t, p in zip(level_targets, preds)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.run.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sample_bytes(dataset: FeatureCacheDataset) -> int:
    c, h, w = dataset.manifest["config"]["image_shape"]
    return c * h * w + sum(2 * int(torch.tensor(lv["shape"]).prod()) for lv in dataset.levels)


# ------------------------------------------------------------------------------------------------ steps
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_cache_step(benchmark, setups, teacher: str, provider: str) -> None:
    if benchmark.disabled and teacher != "demo":
        pytest.skip("smoke run (no --benchmark-only): only the demo teacher runs, once")
    benchmark.group = f"cache-step-{teacher}"
    s = setups(teacher)
    source = s[provider]
    step = make_step(s["cfg"], source)
    loss = step()  # untimed: a step that does not compute a finite loss fails instead of being timed
    assert torch.isfinite(loss), loss
    warmup, rounds = TEACHERS[teacher]["rounds"][provider]
    batch = s["cfg"].run.batch_size
    cache = s["cache"].dataset
    benchmark.extra_info.update(provider=provider, teacher=teacher, batch=batch,
                                image_size=TEACHERS[teacher]["image_size"], threads=torch.get_num_threads(),
                                cache_write_img_s=s["write_img_s"], sample_bytes=_sample_bytes(cache),
                                teacher_params=sum(p.numel() for p in s["online"].teacher.parameters()),
                                loadavg_1m=os.getloadavg()[0], torch=torch.__version__)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update(steps_per_s=1 / mean, images_per_s=batch / mean,
                                    read_mb_s_needed=batch * _sample_bytes(cache) / mean / 1e6)


# ------------------------------------------------------------------------------------------------ reads
class _FakeTeacher:
    """Random features in the adm64 teacher's level shapes, for a large cache written fast."""

    def __init__(self, feature_info: list[dict]) -> None:
        self.feature_info = feature_info

    def identity(self) -> dict:
        return {"class": "FakeTeacher", "fingerprint": "random"}

    def extraction_config(self) -> dict:
        return {"taps": [i["module"] for i in self.feature_info], "strides": [i["reduction"] for i in
                                                                              self.feature_info],
                "t": 150, "mode": "stochastic", "n_noise": 1, "ddim_steps": None, "feature_dtype": "float32"}

    def __call__(self, images: torch.Tensor, *, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed % 2**62)
        size = images.shape[-1]
        return [torch.randn(len(images), i["num_chs"], -(-size // i["reduction"]), -(-size // i["reduction"]),
                            generator=g) for i in self.feature_info]


def _drop_from_page_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


#: The taps build_teacher picks in ADM64_HALF for the student's strides (call order), and those strides.
ADM64_TAPS, ADM64_STRIDES = ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"], [32, 16, 8, 4]


@pytest.fixture(scope="module")
def read_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reads")
    probe = DiffusionTeacher.from_config(ADM64_HALF, taps=ADM64_TAPS, strides=ADM64_STRIDES)
    info = [{k: v for k, v in i.items() if k != "native_reduction"} for i in probe.feature_info]
    del probe
    write_feature_cache(_FakeTeacher(info), _UInt8Images(READ_SAMPLES, 64), root / "cache", shard_size=128,
                        batch_size=64, progress=False)
    big = root / "sequential.bin"
    with open(big, "wb") as f:
        block = torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for _ in range(DISK_BYTES // BLOCK):
            f.write(block.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return {"cache": root / "cache", "file": big}


@pytest.mark.parametrize("provider", ["reader_cold", "reader_warm", "disk_cold", "disk_warm"])
def test_cache_read(benchmark, read_setup, provider: str) -> None:
    benchmark.group = "cache-read"
    cold = provider.endswith("_cold")
    if provider.startswith("reader"):
        dataset = FeatureCacheDataset(read_setup["cache"], verify_hash=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=0,
                                             generator=torch.Generator().manual_seed(0))
        files = [read_setup["cache"] / s["file"] for s in dataset.shards]
        nbytes = len(dataset) * _sample_bytes(dataset)

        def run() -> int:
            return sum(len(images) for images, _ in loader)
    else:
        files = [read_setup["file"]]
        nbytes = DISK_BYTES
        buf = bytearray(BLOCK)

        def run() -> int:
            total = 0
            with open(read_setup["file"], "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
            return total

    def setup():
        if cold:
            _drop_from_page_cache(files)
        return (), {}

    assert run() == (len(dataset) if provider.startswith("reader") else DISK_BYTES)  # reads everything
    benchmark.extra_info.update(provider=provider, bytes=nbytes, threads=torch.get_num_threads(),
                                loadavg_1m=os.getloadavg()[0])
    benchmark.pedantic(run, setup=setup, rounds=3 if cold else 5, warmup_rounds=0 if cold else 1)
    if benchmark.stats is not None:
        benchmark.extra_info["mb_s"] = nbytes / benchmark.stats.stats.mean / 1e6


# ------------------------------------------------------------------------------------------------ table
def table(data: dict) -> str:
    """The markdown table of a ``--benchmark-json`` file of this module."""
    by = {(b["extra_info"].get("teacher") or "read", b["extra_info"]["provider"]): b for b in data["benchmarks"]
          if str(b.get("group", "")).startswith("cache-")}
    lines = ["| teacher | batch | online ms/step | cache ms/step | online steps/s | cache steps/s | cache vs online "
             "| cache reads needed MB/s | cache write img/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in TEACHERS:
        on, ca = by.get((name, "online")), by.get((name, "cache"))
        if not on or not ca:
            continue
        mo, mc = on["stats"]["mean"], ca["stats"]["mean"]
        lines.append(f"| {name} | {on['extra_info']['batch']} | {mo * 1e3:.0f} | {mc * 1e3:.0f} | {1 / mo:.2f} | "
                     f"{1 / mc:.2f} | {mo / mc:.2f}x | {ca['extra_info']['read_mb_s_needed']:.1f} | "
                     f"{ca['extra_info']['cache_write_img_s']:.1f} |")
    reads = [(p, by[("read", p)]) for p in ("reader_cold", "reader_warm", "disk_cold", "disk_warm")
             if ("read", p) in by]
    if reads:
        lines += ["", "| read | MB/s (mean) | MB/s (best round) | bytes |", "|---|---:|---:|---:|"]
        for p, b in reads:
            best = b["extra_info"]["bytes"] / b["stats"]["min"] / 1e6
            lines.append(f"| {p} | {b['extra_info']['mb_s']:.0f} | {best:.0f} | {b['extra_info']['bytes'] / 2**20:.0f} "
                         "MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
