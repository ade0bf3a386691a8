"""The paper-scale configurations (configs/adm_ddpmseg_r50.yaml, configs/sd15_latent_r50.yaml) run as written, on
narrow twins of their teachers: the same architectures (DDPM-segmentation's ADM flags, Stable Diffusion 1.5's block
layout) at a width that runs in seconds, the configs' taps and strides, a tiny student. Full size:
benchmarks/paper_scale.py."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from dreamteacher import cli
from dreamteacher.config import load_config
from dreamteacher.teachers.adm import DDPMSEG_FLAGS, adm_layout, convert_adm, parse_adm_flags

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = {"model.student": "test_resnet", "model.width": 16, "data.image_size": 64, "data.length": 4,
        "data.num_workers": 0, "run.batch_size": 2, "run.steps": 1, "run.progress": False,
        "schedule.warmup_steps": 1, "run.device": "cpu"}


def _pretrain(config: Path, teacher: Path, out: Path, caplog) -> list[str]:
    caplog.set_level(logging.INFO, logger="dreamteacher")
    args = ["pretrain", "--config", str(config), f"--teacher.path={teacher}", f"--run.out_dir={out}",
            *(f"--{k}={v}" for k, v in TINY.items())]
    assert cli.main(args) == 0
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher tap")]


def test_adm_ddpmseg_config_on_a_narrow_twin(tmp_path, caplog):
    flags = DDPMSEG_FLAGS + " --num_channels 32 --num_head_channels 16"  # the paper's flags, 1/8 of the width
    gen = torch.Generator().manual_seed(0)
    state = {name: (torch.ones(s) if len(s) == 1 and name.endswith(".weight") else torch.zeros(s)) if len(s) == 1
             else torch.randn(s, generator=gen) / math.sqrt(math.prod(s[1:]))
             for name, s in adm_layout(parse_adm_flags(flags)).adm_shapes.items()}
    torch.save(state, tmp_path / "ddpmseg.pt")
    convert_adm(tmp_path / "ddpmseg.pt", tmp_path / "teacher", flags)
    cfg = load_config(CONFIGS / "adm_ddpmseg_r50.yaml", [])
    assert cfg.model.student == "resnet50" and cfg.data.image_size == 256
    lines = _pretrain(CONFIGS / "adm_ddpmseg_r50.yaml", tmp_path / "teacher", tmp_path / "run", caplog)
    # the config's blocks, at the native strides its comments give (channels 1/8 of the full model's)
    assert [line.split(": ", 1)[1] for line in lines] == [
        "output_blocks.12 (up_blocks.4.resnets.0): 32 channels, native stride 2, read at stride 4",
        "output_blocks.8 (up_blocks.2.upsamplers.0): 64 channels, native stride 4, read at stride 8",
        "output_blocks.5 (up_blocks.1.upsamplers.0): 128 channels, native stride 8, read at stride 16",
        "output_blocks.2 (up_blocks.0.upsamplers.0): 128 channels, native stride 16, read at stride 32"]


def test_sd15_latent_config_on_a_narrow_twin(tmp_path, caplog):
    from dreamteacher.teachers.diffusion import DiffusionTeacher

    unet = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [32, 64, 64, 64],
            "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32}
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 32, "scaling_factor": 0.18215}
    torch.manual_seed(0)
    DiffusionTeacher.from_config(unet, vae_config=vae, text_embedding=torch.randn(77, 32),
                                 scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                   "beta_start": 0.00085, "beta_end": 0.012}
                                 ).save_pretrained(tmp_path / "teacher")
    lines = _pretrain(CONFIGS / "sd15_latent_r50.yaml", tmp_path / "teacher", tmp_path / "run", caplog)
    assert [line.split(": ", 1)[1] for line in lines] == [
        "up_blocks.3: 32 channels, native stride 8, read at stride 4",
        "up_blocks.2: 64 channels, native stride 8, read at stride 8",
        "up_blocks.1: 64 channels, native stride 16, read at stride 16",
        "up_blocks.0: 64 channels, native stride 32, read at stride 32"]


@pytest.mark.parametrize("name", ["adm_ddpmseg_r50.yaml", "sd15_latent_r50.yaml"])
def test_paper_configs_load_as_written(name):
    cfg = load_config(CONFIGS / name, [])
    assert cfg.model.student == "resnet50" and cfg.model.reductions == [4, 8, 16, 32]
    assert len(cfg.teacher.taps) == 4 and cfg.teacher.t == 150
