"""The paper-scale configurations at full size with random weights of the exact architectures (nothing downloaded).

``configs/adm_ddpmseg_r50.yaml`` (a guided-diffusion teacher with DDPM-segmentation's flags, 552 M parameters, at
256x256, converted by ``dreamteacher convert-adm``) and ``configs/sd15_latent_r50.yaml`` (a Stable-Diffusion-1.5-
shaped UNet2DConditionModel + AutoencoderKL), each with its ResNet-50 student, measured on this machine:

* ``convert``: peak RSS of ``dreamteacher convert-adm`` on the full-size checkpoint (its own process), against the
  file's size;
* ``load``: seconds to build the pretraining source (teacher from disk, tap dry runs) in a fresh process;
* ``online``: seconds per pretraining step at ``--batch`` images (targets + student/regressor forward, fused loss,
  backward, AdamW), and the teacher's share of it;
* ``early exit``: one teacher call with the forward cut after the last tap against the full forward;
* ``cache``: seconds per step fed from a feature cache of the same teacher (``data.cache``: no teacher built);
* ``peak RSS`` of the process that ran the online and cache-fed steps.

Every measurement of a configuration runs in one worker process (``--worker``) so RSS is that process's own;
the conversion in another. Usage::

    python benchmarks/paper_scale.py --work /tmp/paper_scale [--steps 2] [--batch 2] [--only adm|sd15]

It writes ``WORK/results.json`` and prints a markdown table (docs/scale.md's). ``--cache-bytes [--images N]``
prints instead what a feature cache of each configuration takes per stored view (ADM at 256x256, SD 1.5 at
512x512), from the architectures alone, in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"adm": ROOT / "configs" / "adm_ddpmseg_r50.yaml", "sd15": ROOT / "configs" / "sd15_latent_r50.yaml"}

#: Stable Diffusion 1.5's UNet, VAE and scheduler configs (the published ones, minus bookkeeping keys).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": 0.18215}
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "clip_sample": False}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_adm_state(flags: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A guided-diffusion state_dict for ``flags`` with random weights: the exact names and shapes
    (``adm_layout``, checked against the original code's state_dicts by tests/test_adm.py), weights
    ``N(0, 1/fan_in)``, norm scales 1, biases 0, so activations stay of order one through the whole UNet."""
    from dreamteacher.teachers.adm import adm_layout, parse_adm_flags

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in adm_layout(parse_adm_flags(flags)).adm_shapes.items():
        if len(shape) == 1:
            is_scale = name.endswith(".weight")  # 1-d weights are GroupNorm scales
            state[name] = torch.ones(shape) if is_scale else torch.zeros(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return state


# --tiny: the same architectures at a width that runs in seconds (a check of this script, not a measurement)
TINY_ADM = " --num_channels 32 --num_head_channels 16"
TINY_SD = {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32, "attention_head_dim": 8}
TINY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
TINY_OVERRIDES = ["--model.student=test_resnet", "--model.width=16", "--data.image_size=64"]


def make_teachers(work: Path, only: list[str], tiny: bool = False) -> dict:
    """The full-size teacher directories (made once; reused when present) and the ADM conversion's numbers."""
    from dreamteacher.teachers.adm import DDPMSEG_FLAGS, adm_layout, parse_adm_flags

    info: dict = {}
    if "adm" in only:
        flags = DDPMSEG_FLAGS + (TINY_ADM if tiny else "")
        ckpt = work / "adm_ddpmseg_random.pt"
        if not ckpt.is_file():
            t0 = time.perf_counter()
            torch.save(random_adm_state(flags), ckpt)
            print(f"wrote {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        out = work / "adm_teacher"
        cmd = [sys.executable, "-m", "dreamteacher", "convert-adm", str(ckpt), "--out", str(out),
               f"--flags={flags}", "--overwrite"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"convert-adm failed ({status})")
        size = ckpt.stat().st_size
        params = sum(math.prod(s) for s in adm_layout(parse_adm_flags(flags)).adm_shapes.values())
        info["convert"] = {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "file_mib": size / 2**20,
                           "ratio": usage.ru_maxrss * 1024 / size, "params": params}
        print(f"convert-adm: {seconds:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB = "
              f"{info['convert']['ratio']:.2f}x the {size / 2**20:.0f} MiB checkpoint")
    if "sd15" in only:
        out = work / "sd15_teacher"
        if not (out / "unet" / "config.json").is_file():
            from dreamteacher.teachers.diffusion import DiffusionTeacher

            torch.manual_seed(0)
            unet, vae = {**SD15_UNET, **(TINY_SD if tiny else {})}, {**SD15_VAE, **(TINY_VAE if tiny else {})}
            teacher = DiffusionTeacher.from_config(unet, vae_config=vae, scheduler_config=SD15_SCHEDULER,
                                                   text_embedding=torch.randn(1, 77, unet["cross_attention_dim"]),
                                                   taps=["up_blocks.0"])
            teacher.save_pretrained(out)
            del teacher
    return info


def _images(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def worker(name: str, work: Path, steps: int, batch: int, tiny: bool = False) -> dict:
    """Everything measured for one configuration, in this process."""
    import dtkernels
    from dreamteacher.config import load_config
    from dreamteacher.data import load_image_folder
    from dreamteacher.feature_cache import write_feature_cache
    from dreamteacher.model import DistillationModel, build_source, build_student, teacher_dtype
    from dreamteacher.optim import build_optimizer
    from dreamteacher.perf import keep_freed_memory, single_pixel_convs_as_linear
    from dreamteacher.regressor import FeatureRegressor

    keep_freed_memory()  # as every dreamteacher command does
    teacher_dir = work / ("adm_teacher" if name == "adm" else "sd15_teacher")
    size = 64 if tiny else 256
    folder = _images(work / "images", 2 * batch, size)
    base = [f"--teacher.path={teacher_dir}", f"--data.source={folder}", "--data.num_workers=0",
            f"--run.batch_size={batch}", "--run.device=cpu", "--data.augment=false", f"--run.out_dir={work / 'run'}",
            *(TINY_OVERRIDES if tiny else [])]
    cfg = load_config(CONFIGS[name], base)
    device = torch.device("cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    student = build_student(cfg)
    strides = [i["reduction"] for i in student.feature_info]
    source = build_source(cfg, device, strides)
    load_s = time.perf_counter() - t0
    teacher = source.teacher
    teacher.source = str(teacher_dir)  # the cache records the directory's digest, as cache-features does
    model = DistillationModel(student, FeatureRegressor(student.feature_info, source.teacher_channels,
                                                        width=cfg.model.width, pool_sizes=cfg.model.pool_sizes))
    single_pixel_convs_as_linear(model)
    optimizer = build_optimizer(cfg, model, device)
    amp = cfg.run.amp
    from dreamteacher.runtime import amp_dtype

    autocast_to = amp_dtype(amp, device)
    loss_kwargs = dict(mse_weight=cfg.loss.mse_weight, at_weight=cfg.loss.at_weight, whiten=cfg.loss.whiten)

    def step(src, batch_data, seed: int) -> tuple[float, float]:
        t_start = time.perf_counter()
        images, targets = src.targets(batch_data, seed=seed)
        t_teacher = time.perf_counter() - t_start
        with torch.autocast("cpu", dtype=autocast_to) if autocast_to is not None else torch.autocast(
                "cpu", enabled=False):
            preds = model(images)
        level = [targets[src.order[lvl]] for lvl in range(len(preds))]
        loss = dtkernels.fused_feat_loss(preds, [t.to(p.dtype) for t, p in zip(level, preds)], **loss_kwargs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t_start, t_teacher

    loader = torch.utils.data.DataLoader(source.dataset, batch_size=batch, shuffle=False)
    first = next(iter(loader))
    step(source, first, 0)  # warm-up
    times = [step(source, first, s + 1) for s in range(steps)]
    online = sum(t for t, _ in times) / steps
    share = sum(tt for _, tt in times) / sum(t for t, _ in times)
    images = first[0] if isinstance(first, (list, tuple)) else first

    def teacher_call() -> float:
        t_start = time.perf_counter()
        teacher(images, seed=1)
        return time.perf_counter() - t_start

    with_exit = min(teacher_call() for _ in range(1))
    teacher.taps.early_exit = False
    full = min(teacher_call() for _ in range(1))
    teacher.taps.early_exit = True

    cache = work / f"cache_{name}"
    t0 = time.perf_counter()
    write_feature_cache(teacher, load_image_folder(folder, size, "--data", uint8=True), cache, shard_size=2 * batch,
                        batch_size=batch, seed=0, progress=False)
    cache_write_s = time.perf_counter() - t0
    ccfg = load_config(CONFIGS[name], base + [f"--data.cache={cache}"])
    csource = build_source(ccfg, device, strides)
    cfirst = next(iter(torch.utils.data.DataLoader(csource.dataset, batch_size=batch, shuffle=False)))
    step(csource, cfirst, 0)
    cached = sum(step(csource, cfirst, s + 1)[0] for s in range(steps)) / steps
    params = sum(p.numel() for p in teacher.parameters())
    return {"config": str(CONFIGS[name].relative_to(ROOT)), "teacher_params_m": params / 1e6,
            "taps": [f"{i.get('block', i['module'])}:{i['num_chs']}@{i.get('native_reduction')}->{i['reduction']}"
                     for i in teacher.feature_info],
            "dtype": teacher_dtype(cfg, device), "amp": str(autocast_to), "load_s": load_s, "online_s": online,
            "teacher_share": share, "teacher_early_exit_s": with_exit, "teacher_full_s": full,
            "early_exit_saving": 1 - with_exit / full, "cache_write_s": cache_write_s, "cached_s": cached,
            "peak_rss_mib": _rss_mib(), "batch": batch, "steps": steps, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ --cache-bytes
def cache_bytes_per_view(resolution: int, levels: list[tuple[int, int]]) -> dict:
    """Bytes one stored view takes in a feature cache (the tensors of a ``write_feature_cache`` shard row): the
    uint8 image ``3 x R x R``, float16 features ``C x ceil(R/s) x ceil(R/s)`` per level (``C`` channels read at
    student stride ``s``, as the manifest's level shapes) and the int64 item index and view number. Each shard adds
    its safetensors header (about 0.5 kB: a few bytes per view at 256 views a shard), left out."""
    image = 3 * resolution * resolution
    features = sum(2 * c * math.ceil(resolution / s) ** 2 for c, s in levels)
    return {"image": image, "features": features, "index": 16, "total": image + features + 16}


def paper_cache_levels(name: str, image_size: int) -> list[tuple[str, int, int]]:
    """``(tap, channels, student stride)`` per cached level of a paper configuration at ``image_size``: the taps and
    strides of its config (``teacher.taps`` feed ``model.reductions`` level by level, as build_teacher pairs them),
    the channels from the teacher's architecture without building it (ADM: the converted layout of DDPM-
    segmentation's flags; SD 1.5: its UNet built on the meta device, no memory, the tapped block's last resnet)."""
    from dreamteacher.config import load_config

    cfg = load_config(CONFIGS[name], [f"--data.image_size={image_size}"])
    taps, strides = list(cfg.teacher.taps), list(cfg.model.reductions)
    if name == "adm":
        from dreamteacher.teachers.adm import DDPMSEG_FLAGS, adm_layout, parse_adm_flags

        blocks = {b["name"]: b["channels"] for b in adm_layout(parse_adm_flags(DDPMSEG_FLAGS)).blocks}
        channels = [blocks[t] for t in taps]
    else:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in SD15_UNET.items() if not k.startswith("_")})
        channels = [unet.get_submodule(t).resnets[-1].out_channels for t in taps]
    return list(zip(taps, channels, strides))


def cache_bytes_table(images: int) -> str:
    """docs/scale.md's table of cache bytes per stored view at the paper configurations, and for ``images``."""
    rows = [f"| configuration | cached levels (C x h x w, float16) | image (uint8) | features | per view | "
            f"{images:,} views |", "|---|---|---:|---:|---:|---:|"]
    for name, size in (("adm", 256), ("sd15", 512)):
        levels = paper_cache_levels(name, size)
        b = cache_bytes_per_view(size, [(c, s) for _, c, s in levels])
        shapes = ", ".join(f"{t} {c}x{math.ceil(size / s)}x{math.ceil(size / s)}" for t, c, s in levels)
        total = b["total"] * images
        rows.append(f"| `{CONFIGS[name].relative_to(ROOT)}` at {size}x{size} | {shapes} | {b['image']:,} B | "
                    f"{b['features']:,} B | {b['total']:,} B ({b['total'] / 1e6:.2f} MB) | {total / 1e9:.0f} GB "
                    f"({total / 2**30:.0f} GiB) |")
    return "\n".join(rows)


#: The rows of issue 28's comparison, as pretrain's own settings: ``run.naive`` is the stock teacher with its full
#: forward, hooks on every block, the losses in eager PyTorch and PyTorch's default AdamW; ``lean before`` is the lean
#: loop as it was before the teacher's precision and fused ops (float32, stock GroupNorm + SiLU); ``lean now`` is
#: the defaults (teacher.dtype=auto, teacher.fused_ops=true).
VARIANTS = {"naive": ["--run.naive=true", "--teacher.dtype=float32"],
            "lean before": ["--teacher.dtype=float32", "--teacher.fused_ops=false"],
            "lean now": []}


def variant_step(name: str, work: Path, variant: str, steps: int, batch: int, tiny: bool = False) -> dict:
    """Online seconds per step and the teacher's share for one of :data:`VARIANTS`, built as pretrain builds it."""
    import dtkernels
    from dreamteacher.config import load_config
    from dreamteacher.losses import eager_feat_loss
    from dreamteacher.model import DistillationModel, build_source, build_student, teacher_dtype
    from dreamteacher.optim import build_optimizer
    from dreamteacher.perf import single_pixel_convs_as_linear
    from dreamteacher.regressor import FeatureRegressor
    from dreamteacher.runtime import amp_dtype

    teacher_dir = work / ("adm_teacher" if name == "adm" else "sd15_teacher")
    folder = _images(work / "images", 2 * batch, 64 if tiny else 256)
    cfg = load_config(CONFIGS[name], [f"--teacher.path={teacher_dir}", f"--data.source={folder}",
                                      "--data.num_workers=0", f"--run.batch_size={batch}", "--run.device=cpu",
                                      "--data.augment=false", f"--run.out_dir={work / 'run'}",
                                      *(TINY_OVERRIDES if tiny else []), *VARIANTS[variant]])
    device = torch.device("cpu")
    torch.manual_seed(0)
    student = build_student(cfg)
    source = build_source(cfg, device, [i["reduction"] for i in student.feature_info])
    model = DistillationModel(student, FeatureRegressor(student.feature_info, source.teacher_channels,
                                                        width=cfg.model.width, pool_sizes=cfg.model.pool_sizes))
    if not cfg.run.naive:
        single_pixel_convs_as_linear(model)
    optimizer = build_optimizer(cfg, model, device)
    feat_loss = eager_feat_loss if cfg.run.naive else dtkernels.fused_feat_loss
    autocast_to = amp_dtype(cfg.run.amp, device)
    batch_data = next(iter(torch.utils.data.DataLoader(source.dataset, batch_size=batch, shuffle=False)))

    def step(seed: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        images, targets = source.targets(batch_data, seed=seed)
        t_teacher = time.perf_counter() - t0
        with torch.autocast("cpu", dtype=autocast_to, enabled=autocast_to is not None):
            preds = model(images)
        level = [targets[source.order[lvl]] for lvl in range(len(preds))]
        out = feat_loss(preds, [t.to(p.dtype) for t, p in zip(level, preds)], mse_weight=cfg.loss.mse_weight,
                        at_weight=cfg.loss.at_weight, whiten=cfg.loss.whiten)
        (out.loss if hasattr(out, "loss") else out).backward()  # the eager loss returns its parts too
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t_teacher

    step(0)  # warm-up
    times = [step(s + 1) for s in range(steps)]
    online = sum(t for t, _ in times) / steps
    return {"variant": variant, "overrides": VARIANTS[variant], "teacher_dtype": teacher_dtype(cfg, device),
            "online_s": online, "images_per_s": batch / online,
            "teacher_share": sum(t for _, t in times) / sum(t for t, _ in times), "batch": batch, "steps": steps}


def variants_table(results: dict) -> str:
    """docs/scale.md's table of the three rows per configuration."""
    rows = ["| configuration | row | teacher dtype | online s/step | images/s | teacher share | vs lean before | "
            "vs naive |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, res in results["variants"].items():
        by = {r["variant"]: r for r in res}
        for r in res:
            rows.append(f"| `{CONFIGS[name].relative_to(ROOT)}` | {r['variant']} | {r['teacher_dtype']} | "
                        f"{r['online_s']:.1f} | {r['images_per_s']:.3f} | {100 * r['teacher_share']:.0f}% | "
                        f"{by['lean before']['online_s'] / r['online_s']:.2f}x | "
                        f"{by['naive']['online_s'] / r['online_s']:.2f}x |")
    return "\n".join(rows)


def table(results: dict) -> str:
    rows = ["| configuration | teacher | load | online s/step | teacher share | early exit saves | cache-fed s/step "
            "| peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for r in results.get("configs", {}).values():
        rows.append(f"| `{r['config']}` | {r['teacher_params_m']:.0f} M params | {r['load_s']:.1f} s | "
                    f"{r['online_s']:.1f} | {100 * r['teacher_share']:.0f}% | {100 * r['early_exit_saving']:.0f}% "
                    f"({r['teacher_full_s']:.1f} -> {r['teacher_early_exit_s']:.1f} s) | {r['cached_s']:.2f} | "
                    f"{r['peak_rss_mib'] / 1024:.1f} GiB |")
    c = results.get("convert")
    if c:
        rows.append("")
        rows.append(f"`convert-adm` of the {c['file_mib'] / 1024:.2f} GiB checkpoint ({c['params'] / 1e6:.0f} M "
                    f"parameters): {c['seconds']:.0f} s, peak RSS {c['peak_rss_mib'] / 1024:.2f} GiB = "
                    f"{c['ratio']:.2f}x the file")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="scratch directory (~10 GB for both); required but with "
                                                  "--cache-bytes")
    parser.add_argument("--cache-bytes", action="store_true",
                        help="print the feature cache's bytes per stored view of both configurations (ADM at 256, "
                             "SD 1.5 at 512; computed from the architectures, nothing built or run) and exit")
    parser.add_argument("--images", type=int, default=70_000, help="--cache-bytes: views to total")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="narrow twins of both architectures: checks the script")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--variants", action="store_true",
                        help="only the rows naive / lean before / lean now (online s/step, teacher share), each "
                             "configuration's three in one process")
    args = parser.parse_args()
    if args.cache_bytes:
        print(cache_bytes_table(args.images))
        return
    if args.work is None:
        parser.error("--work: required (a scratch directory)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker and args.variants:
        print(json.dumps([variant_step(args.worker, args.work, v, args.steps, args.batch, args.tiny)
                          for v in VARIANTS]))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.work, args.steps, args.batch, args.tiny)))
        return
    results: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "configs": {}}
    try:
        results["cpu"] = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        results["cpu"] = "unknown"
    results["cores"] = os.cpu_count()
    results.update(make_teachers(args.work, args.only, args.tiny))
    key = "variants" if args.variants else "configs"
    results[key] = {}
    for name in args.only:
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--work", str(args.work), "--steps",
                              str(args.steps), "--batch", str(args.batch), *(["--tiny"] if args.tiny else []),
                              *(["--variants"] if args.variants else [])], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"worker {name} failed:\n{out.stderr[-3000:]}")
        results[key][name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[key][name], indent=1))
    (args.work / ("variants.json" if args.variants else "results.json")).write_text(json.dumps(results, indent=1))
    from dreamteacher.runtime import machine_info

    isa = " ".join(machine_info()["isa"])
    print(f"\n{results['date']}, {results['cpu']} ({isa}), {results['cores']} cores, torch {results['torch']}\n")
    print(variants_table(results) if args.variants else table(results))


if __name__ == "__main__":
    main()
