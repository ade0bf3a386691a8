"""teacher.dtype: what auto chooses and where, that half precision keeps its statistics, resize and targets in
float32, and that the chosen dtype is written down (log, config.yaml, checkpoint) and a resume onto another refused."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import save_tiny_teacher, tiny_overrides

from dreamteacher.config import ConfigError, load_config
from dreamteacher.teachers.build import describe_dtype, resolve_dtype

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model",
                               "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`"),
    pytest.mark.usefixtures("one_thread"),
]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_on_gpus_and_native_bf16_cpus_only(monkeypatch, native):
    import dreamteacher.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_dtype("auto", CPU) == ("bfloat16" if native else "float32")
    assert resolve_dtype("auto", CUDA) == "bfloat16"
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, CPU) == explicit == resolve_dtype(explicit, CUDA)
    said = describe_dtype("auto", CPU)
    assert said.startswith("bfloat16 (teacher.dtype=auto: this CPU multiplies" if native else
                           "float32 (teacher.dtype=auto: this CPU has no native bfloat16")


def test_this_cpu_resolves_auto_by_its_flags():
    from dreamteacher.runtime import cpu_info

    native = bool(cpu_info()["flags"] & {"avx512_bf16", "amx_bf16"})
    assert resolve_dtype("auto", CPU) == ("bfloat16" if native else "float32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_normalisations_keep_half_precision_statistics_in_float32(dtype):
    """The teacher's GroupNorms outside the fused op (attention blocks) and LayerNorms (transformer blocks) are
    ATen's: with a group of 2^17 values near 3, a sum kept in 8 or 11 bits of mantissa would stall long before the
    end and give a mean off by far more than the output's rounding. The outputs equal float32 statistics of the
    same half-precision inputs, rounded once."""
    x = (torch.rand(2, 8, 128, 128, dtype=torch.float64) * 0.5 + 3.0).to(dtype)
    ref = F.group_norm(x.double(), 2, eps=1e-5)
    got, f32 = F.group_norm(x, 2, eps=1e-5), F.group_norm(x.float(), 2, eps=1e-5).to(dtype)
    assert (got.double() - ref).abs().max() <= (f32.double() - ref).abs().max() * 1.001 + 1e-12
    y = (torch.rand(2, 4096, 320, dtype=torch.float64) * 0.5 + 3.0).to(dtype)
    ref = F.layer_norm(y.double(), (320,))
    got, f32 = F.layer_norm(y, (320,)), F.layer_norm(y.float(), (320,)).to(dtype)
    assert (got.double() - ref).abs().max() <= (f32.double() - ref).abs().max() * 1.001 + 1e-12


def test_a_bfloat16_teacher_gives_float32_features_resized_in_float32(teacher_dir):
    from dreamteacher.teachers.diffusion import DiffusionTeacher
    from dreamteacher.teachers.taps import resize_to_stride

    teacher = DiffusionTeacher.from_pretrained(str(teacher_dir), taps=["up_blocks.0", "up_blocks.1"],
                                               strides=[32, 4]).to(torch.bfloat16)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = teacher(images, seed=3)
    assert [f.dtype for f in feats] == [torch.float32, torch.float32]
    native = DiffusionTeacher(teacher.unet, teacher.scheduler, taps=["up_blocks.0", "up_blocks.1"])(images, seed=3)
    assert [f.dtype for f in native] == [torch.float32, torch.float32]  # upcast even without a resize
    for f, n, stride in zip(feats, native, (32, 4)):
        # the float32 average of the bfloat16 activations, not a bfloat16 average rounded again
        assert torch.equal(f, resize_to_stride(n, (32, 32), stride))
        assert not torch.equal(f, f.bfloat16().float()) or f.numel() < 4
    two = teacher(images, seed=3, n_noise=2)
    assert all(f.dtype == torch.float32 for f in two)


def test_the_dtype_is_logged_written_and_a_resume_onto_another_refused(teacher_dir, tmp_path, caplog):
    from dreamteacher.serialization import load_checkpoint
    from dreamteacher.train import pretrain

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="dreamteacher"):
        pretrain(load_config(None, tiny_overrides(teacher_dir, out, {"run.steps": 2, "run.ckpt_every": 100})))
    assert f"teacher dtype: {describe_dtype('auto', CPU)}" in caplog.text
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["teacher"]["dtype"] == resolve_dtype("auto", CPU)  # auto resolved: the file reproduces the run
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["teacher_dtype"] == resolve_dtype("auto", CPU)
    other = "bfloat16" if resolve_dtype("auto", CPU) == "float32" else "float32"
    cfg = load_config(None, tiny_overrides(teacher_dir, out, {"run.steps": 3, "teacher.dtype": other}))
    with pytest.raises(ConfigError, match=f"teacher.dtype: the checkpoint .* was trained with "
                                          f"teacher.dtype={resolve_dtype('auto', CPU)}, this run asks for '{other}'"):
        pretrain(cfg, resume="auto")
    cfg = load_config(None, tiny_overrides(teacher_dir, out, {"run.steps": 3, "teacher.t": 400}))
    with pytest.raises(ConfigError, match="teacher.t: the checkpoint .* was trained with teacher.t=150"):
        pretrain(cfg, resume="auto")
    # the same dtype named explicitly resumes
    cfg = load_config(None, tiny_overrides(teacher_dir, out, {"run.steps": 3,
                                                              "teacher.dtype": resolve_dtype("auto", CPU)}))
    assert pretrain(cfg, resume="auto")["loss"] is not None


def test_teacher_channels_last_on_cpu_gives_the_nchw_features(teacher_dir):
    """teacher.channels_last=true (an opt-in on CPU: faster for the ADM-256 teacher on an AVX2 CPU) changes only the
    layout: the taps equal the NCHW teacher's within float32 rounding of another convolution algorithm."""
    from dreamteacher.model import teacher_for

    feats = {}
    for cl in (False, True):
        cfg = load_config(None, [f"--teacher.path={teacher_dir}", "--data.image_size=32",
                                 f"--teacher.channels_last={str(cl).lower()}", "--teacher.dtype=float32"])
        teacher, order = teacher_for(cfg, CPU, [4, 8, 16, 32])
        conv = next(m for m in teacher.unet.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == cl
        feats[cl] = teacher(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1, seed=4)
    for a, b in zip(feats[False], feats[True]):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    # auto (null) keeps the CPU teacher NCHW, as before the key existed
    cfg = load_config(None, [f"--teacher.path={teacher_dir}", "--data.image_size=32"])
    teacher, _ = teacher_for(cfg, CPU, [4, 8, 16, 32])
    conv = next(m for m in teacher.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last) or conv.weight.shape[-1] == 1
