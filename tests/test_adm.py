"""guided-diffusion (ADM) checkpoints converted to diffusers: exact against golden tensors of the original code.

The goldens (tests/data/adm_golden, see its README) were computed once by openai/guided-diffusion itself from
checkpoints whose every weight was moved away from ADM's initialisation; nothing of that code is imported here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dreamteacher.config import UserError
from dreamteacher.serialization import LoadError
from dreamteacher.teachers.adm import (
    ADM_RECORD_FILE,
    ADM_TAPS_FILE,
    DDPMSEG_FLAGS,
    ADMConversionError,
    adm_layout,
    convert_adm,
    parse_adm_flags,
    read_adm_taps,
    translate_adm_taps,
)

GOLDEN = Path(__file__).parent / "data" / "adm_golden"
NOTE = json.loads((GOLDEN / "golden.json").read_text())
CONFIGS = sorted(NOTE["configs"])
TOL = 1e-5  # relative max error, float32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Each golden checkpoint converted once (float16 file -> float32 diffusers weights)."""
    out = {}
    for name in CONFIGS:
        root = tmp_path_factory.mktemp(f"adm_{name}")
        convert_adm(GOLDEN / f"{name}.pt", root, NOTE["configs"][name]["flags"], overwrite=True)
        out[name] = root
    return out


def _run_with_taps(root: Path, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(root / "unet"), low_cpu_mem_usage=False).eval().to(dtype)
    x = x.to(dtype)
    taps = read_adm_taps(root)["taps"]
    got: dict[str, torch.Tensor] = {}
    for name, module in taps.items():
        unet.get_submodule(module).register_forward_hook(
            lambda m, a, o, n=name: got.__setitem__(n, o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = unet(x, t).sample
    return out, got


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_unet_equals_the_original_output_and_every_block(converted, name):
    from safetensors.torch import load_file

    gold = load_file(str(GOLDEN / f"{name}.safetensors"))
    out, got = _run_with_taps(converted[name], gold["x"], gold["t"])
    out64, got64 = _run_with_taps(converted[name], gold["x"], gold["t"], torch.float64)
    blocks = sorted(k.removeprefix("block.") for k in gold if k.startswith("block."))
    assert sorted(got) == blocks  # adm_taps.json names every ADM block, no more
    # The goldens are float32 from another machine. Where this network amplifies float32 rounding past TOL on this
    # CPU (ddpmseg's output_blocks.6: 2.4e-5 between float32 and float64 of the same weights on an AVX2-only CPU),
    # the bound is twice that measured rounding; a conversion error is ~1e-1 (the attention-order test below).
    # The float64 run is held to the same bound: it carries only the goldens' own float32 rounding.
    for what, ours, ours64, ref in [("out", out, out64, gold["out"])] + [
            (b, got[b], got64[b], gold[f"block.{b}"]) for b in blocks]:
        bound = max(TOL, 2 * _rel(ours.double(), ours64))
        assert _rel(ours, ref) <= bound and _rel(ours64, ref.double()) <= bound, (
            what, _rel(ours, ref), _rel(ours64, ref.double()), bound)


def test_a_wrong_attention_order_is_caught_by_the_goldens(tmp_path):
    # The goldens are sensitive to the qkv layout: reading the legacy model as new-order must fail loudly.
    from safetensors.torch import load_file

    flags = NOTE["configs"]["ddpmseg"]["flags"] + " --use_new_attention_order True"
    convert_adm(GOLDEN / "ddpmseg.pt", tmp_path, flags)
    gold = load_file(str(GOLDEN / "ddpmseg.safetensors"))
    out, _ = _run_with_taps(tmp_path, gold["x"], gold["t"])
    assert _rel(out, gold["out"]) > 1e-2


def test_float32_checkpoint_through_the_cli_gives_the_same_weights(tmp_path, converted, capsys):
    from safetensors.torch import load_file

    from dreamteacher.cli import main

    sd = torch.load(GOLDEN / "ddpmseg.pt", weights_only=True)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / "ema.pt")
    flags = NOTE["configs"]["ddpmseg"]["flags"]
    assert main(["convert-adm", str(tmp_path / "ema.pt"), "--out", str(tmp_path / "conv"), f"--flags={flags}"]) == 0
    printed = capsys.readouterr().out
    assert "ignored --use_fp16" in printed and "ignored --dropout" in printed
    a = load_file(str(tmp_path / "conv" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(converted["ddpmseg"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "conv" / ADM_RECORD_FILE).read_text())
    assert record["source_sha256"] == hashlib.sha256((tmp_path / "ema.pt").read_bytes()).hexdigest()
    assert record["flags"] == flags and record["resolved_flags"]["num_head_channels"] == 16
    assert set(record["ignored_flags"]) == {"dropout", "use_fp16"}
    # DDPM-segmentation's checkpoints ran in float16: the record keeps that and says what it means here
    assert record["use_fp16"]["value"] is True and record["use_fp16"]["given"] is True
    assert "float16" in record["use_fp16"]["meaning"] and "teacher.dtype=auto" in record["use_fp16"]["meaning"]


@pytest.mark.parametrize("name", sorted(NOTE["state_dict_shapes"]))
def test_layout_is_the_originals_state_dict_and_diffusers_unet(name):
    from diffusers import UNet2DModel

    entry = NOTE["state_dict_shapes"][name]
    layout = adm_layout(parse_adm_flags(entry["flags"]))
    # same names, same order (the original's module order), same shapes
    assert [(k, list(v)) for k, v in layout.adm_shapes.items()] == list(entry["shapes"].items())
    with torch.device("meta"):
        unet = UNet2DModel(**layout.unet_config)
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == layout.diffusers_shapes
    for block in layout.blocks:  # every tap names a module of the UNet
        unet.get_submodule(block["module"])


def test_ddpmseg_layout_blocks_channels_and_strides():
    layout = adm_layout(parse_adm_flags(DDPMSEG_FLAGS))
    info = {b["name"]: (b["channels"], b["stride"]) for b in layout.blocks}
    assert len(info) == 18 + 1 + 18
    # DDPM-segmentation's blocks: 5..7 at stride 8 (32x32 of 256), 8 at 4, 12 at 2; 5 and 8 end in an upsample
    assert [info[f"output_blocks.{i}"] for i in (5, 6, 7, 8, 12)] == [(1024, 8), (512, 8), (512, 8),
                                                                      (512, 4), (256, 2)]
    assert layout.taps["output_blocks.5"] == "up_blocks.1.upsamplers.0"
    assert layout.taps["output_blocks.6"] == "up_blocks.2.attentions.0"
    assert layout.unet_config["attention_head_dim"] == 64


@pytest.mark.parametrize("key", sorted(NOTE["alphas_cumprod"]))
def test_scheduler_reproduces_the_original_schedule(tmp_path, key):
    from dreamteacher.teachers.adm import _scheduler

    schedule, steps = key.split("_")
    sched = _scheduler(parse_adm_flags(f"--noise_schedule {schedule} --diffusion_steps {steps}"))
    want = torch.tensor(NOTE["alphas_cumprod"][key], dtype=torch.float64)
    got = sched.alphas_cumprod.double()
    assert got.shape == want.shape
    # diffusers keeps the schedule in float32 (the original in float64): a 1000-step float32 cumprod drifts ~1e-5
    torch.testing.assert_close(got, want, rtol=5e-5, atol=0)


def test_converted_directory_loads_as_a_diffusion_teacher(converted):
    from dreamteacher.teachers import DiffusionTeacher

    teacher = DiffusionTeacher.from_pretrained(converted["new_order"], taps=["up_blocks.1"], t=100)
    assert teacher.num_train_timesteps == 500  # --diffusion_steps 500
    assert teacher.scheduler.config.variance_type == "learned_range"
    feats = teacher(torch.zeros(1, 3, 8, 8), seed=0)
    assert feats[0].shape == (1, 32, 8, 8)


# ------------------------------------------------------------------------------------------------ flags
def test_flags_parse_as_the_original_does():
    f = parse_adm_flags(DDPMSEG_FLAGS)
    assert f.channel_mult == (1, 1, 2, 2, 4, 4) and f.attention_ds == (8, 16, 32)
    assert f.learn_sigma and f.resblock_updown and f.use_scale_shift_norm and not f.use_new_attention_order
    assert f.num_head_channels == 64 and f.num_res_blocks == 2 and f.diffusion_steps == 1000
    assert set(f.ignored) == {"dropout", "use_fp16"}
    assert parse_adm_flags("--image_size=128 --learn_sigma yes").channel_mult == (1, 1, 2, 3, 4)
    assert parse_adm_flags("--image_size 64").channel_mult == (1, 2, 3, 4)
    g = parse_adm_flags("--image_size 64 --batch_size 4 --use_ddim True --timestep_respacing 250")
    assert set(g.ignored) == {"batch_size", "use_ddim", "timestep_respacing"}
    assert parse_adm_flags("").num_channels == 128  # guided-diffusion's defaults
    assert parse_adm_flags("--image_size 64 --image_size 128").image_size == 128  # the last wins, as in argparse


@pytest.mark.parametrize("flags, match", [
    ("--image_size 256 --class_cond True", r"--class_cond True.*256x256_diffusion_uncond\.pt with --class_cond False"),
    ("--image_size 512", r"channel_mult\[0\] = 0.5.*512x512"),
    ("--image_size 64 --num_channels 64", r"--num_heads 4 gives attention layers different head widths"),
    ("--image_size 64 --num_channels 64 --num_head_channels 48", r"--num_head_channels 48 does not divide"),
    ("--image_size 64 --num_channels 48 --num_head_channels 16", r"not divisible by ADM's 32 normalization groups"),
    ("--image_size 64 --channel_mult 2,2", r"channel_mult\[0\] = 2"),
    ("--image_size 100", r"--image_size 100 has no default channel_mult"),
    ("--image_sise 64", r"unknown flag --image_sise; did you mean --image_size"),
    ("--learn_sigma maybe", r"--learn_sigma: expected a boolean"),
    ("--num_channels wide", r"--num_channels: expected an integer"),
    ("--noise_schedule sqrt", r"--noise_schedule: expected linear or cosine"),
    ("--image_size", r"--image_size has no value"),
    ("image_size 64", r"expected --name value pairs"),
])
def test_flags_that_cannot_be_converted_exactly_are_refused(flags, match):
    with pytest.raises(ADMConversionError, match=match):
        adm_layout(parse_adm_flags(flags))


def test_rescaled_timesteps_are_refused_unless_identity(tmp_path):
    with pytest.raises(ADMConversionError, match=r"--rescale_timesteps True with --diffusion_steps 500"):
        convert_adm(GOLDEN / "new_order.pt", tmp_path, NOTE["configs"]["new_order"]["flags"]
                    + " --rescale_timesteps True")


def test_unknown_flags_are_ignored_with_a_warning(caplog):
    f = parse_adm_flags("--image_size 64 --frobnicate 3")
    assert f.ignored["frobnicate"] == "not a guided-diffusion model flag"
    assert "--frobnicate is not a guided-diffusion model flag" in caplog.text


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("extra, match", [
    ("--learn_sigma False", r"tensor out\.2\.weight has shape \[6, 32, 3, 3\] but the flags give \[3, 32, 3, 3\]; "
                            r"check --learn_sigma"),
    ("--num_channels 64", r"tensor time_embed\.0\.weight has shape \[128, 32\] but the flags give \[256, 64\]"),
    ("--use_scale_shift_norm False", r"tensor input_blocks\.1\.0\.emb_layers\.1\.weight has shape \[64, 128\] but "
                                     r"the flags give \[32, 128\]"),
    ("--channel_mult 1,1", r"tensor input_blocks\.6\.0\.in_layers\.0\.weight \[32\] is not part of the model"),
])
def test_flags_that_do_not_match_the_checkpoint_name_the_first_tensor(tmp_path, extra, match):
    flags = NOTE["configs"]["ddpmseg"]["flags"] + " " + extra
    with pytest.raises(ADMConversionError, match=match):
        convert_adm(GOLDEN / "ddpmseg.pt", tmp_path / "out", flags)
    assert not (tmp_path / "out").exists()  # nothing written


def test_class_conditional_checkpoint_is_named(tmp_path):
    sd = torch.load(GOLDEN / "plain.pt", weights_only=True)
    sd["label_emb.weight"] = torch.zeros(1000, 128)
    torch.save(sd, tmp_path / "cond.pt")
    with pytest.raises(ADMConversionError, match=r"label_emb\.weight \[1000, 128\].*class-conditional"):
        convert_adm(tmp_path / "cond.pt", tmp_path / "out", NOTE["configs"]["plain"]["flags"])


def test_not_a_state_dict_is_refused(tmp_path):
    sd = torch.load(GOLDEN / "plain.pt", weights_only=True)
    torch.save({"model": sd, "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(LoadError, match=r"not a plain state_dict of tensors"):
        convert_adm(tmp_path / "wrapped.pt", tmp_path / "out", NOTE["configs"]["plain"]["flags"])


def test_pickled_objects_are_refused_before_running(tmp_path):
    import os

    class Planted:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"x": Planted()}, tmp_path / "bad.pt")
    with pytest.raises(LoadError, match=r"pickled Python objects"):
        convert_adm(tmp_path / "bad.pt", tmp_path / "out", NOTE["configs"]["plain"]["flags"])


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match=r"--out: .* is not empty"):
        convert_adm(GOLDEN / "plain.pt", tmp_path / "out", NOTE["configs"]["plain"]["flags"])


def test_cli_error_is_one_line(tmp_path, capsys):
    from dreamteacher.cli import main

    assert main(["convert-adm", str(GOLDEN / "plain.pt"), "--out", str(tmp_path / "o"),
                 "--flags=--image_size 32 --class_cond True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --flags: --class_cond True")


# ------------------------------------------------------------------------------------------------ tap names
def test_adm_tap_names_translate(converted):
    adm = read_adm_taps(converted["ddpmseg"])
    assert translate_adm_taps(["output_blocks.8", "up_blocks.0", "middle_block"], adm) == [
        adm["taps"]["output_blocks.8"], "up_blocks.0", "mid_block"]
    with pytest.raises(UserError, match=r"taps: the converted ADM teacher has no block 'output_blocks\.40'"):
        translate_adm_taps(["output_blocks.40"], adm)
    with pytest.raises(UserError, match=r"ADM block name, but this teacher has no adm_taps\.json"):
        translate_adm_taps(["output_blocks.1"], None)
    assert ADM_TAPS_FILE == "adm_taps.json"


# ------------------------------------------------------------------------------------------------ pretrain / cache
def _images(root: Path, n: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


# DDPM-segmentation style: decoder blocks, fine to coarse for the student's strides 4, 8, 16, 32 (the tiny ddpmseg
# model has 9 output blocks over 3 levels: 2, 5 end in an upsample).
ADM_TAPS = "output_blocks.8,output_blocks.5,output_blocks.2,middle_block"


def test_pretrain_taps_adm_blocks_of_a_converted_teacher(converted, tmp_path, caplog):
    import logging

    from helpers import tiny_overrides

    from dreamteacher import cli

    caplog.set_level(logging.INFO, logger="dreamteacher")
    args = tiny_overrides(converted["ddpmseg"], tmp_path / "run", {"teacher.taps": ADM_TAPS, "run.steps": 2,
                                                                   "teacher.t": 50, "data.length": 4})
    assert cli.main(["pretrain", *args]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher tap")]
    assert lines == [
        "teacher tap for student stride 4: output_blocks.8 (up_blocks.2.resnets.2): 32 channels, native stride 1, "
        "read at stride 4",
        "teacher tap for student stride 8: output_blocks.5 (up_blocks.1.upsamplers.0): 32 channels, native stride 1, "
        "read at stride 8",
        "teacher tap for student stride 16: output_blocks.2 (up_blocks.0.upsamplers.0): 32 channels, native stride 2,"
        " read at stride 16",
        "teacher tap for student stride 32: middle_block (mid_block): 32 channels, native stride 4, read at stride 32"]


def test_pretrain_chooses_adm_blocks_automatically(converted, tmp_path, caplog):
    import logging

    from helpers import tiny_overrides

    from dreamteacher import cli

    caplog.set_level(logging.INFO, logger="dreamteacher")
    args = tiny_overrides(converted["plain"], tmp_path / "run", {"run.steps": 1, "data.length": 4,
                                                                 "model.reductions": "4,8"})
    assert cli.main(["pretrain", *args]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher tap")]
    # candidates: middle_block and every output block (natives 2, 2, 1, 1, 1); one octave finer than the student
    # (2 for stride 4, 4 for stride 8), matched coarse to fine in call order, earliest on ties
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["output_blocks.0", "middle_block"]


def test_cache_features_and_pretrain_from_the_cache_with_adm_names(converted, tmp_path, capsys):
    from helpers import tiny_overrides

    from dreamteacher import cli

    data = _images(tmp_path / "images")
    cache = tmp_path / "cache"
    assert cli.main(["cache-features", "--teacher", str(converted["ddpmseg"]), "--data", str(data), "--out",
                     str(cache), "--resolution", "32", "--taps", "output_blocks.8", "output_blocks.5", "--strides",
                     "4", "8", "--t", "50", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tap output_blocks.8 (up_blocks.2.resnets.2): 32 channels, native stride 1, read at stride 4" in out
    assert "tap output_blocks.5 (up_blocks.1.upsamplers.0): 32 channels, native stride 1, read at stride 8" in out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [lv["block"] for lv in manifest["levels"]] == ["output_blocks.5", "output_blocks.8"]  # call order
    args = tiny_overrides(converted["ddpmseg"], tmp_path / "run", {
        "data.cache": cache, "teacher.taps": "output_blocks.8,output_blocks.5", "model.reductions": "4,8",
        "teacher.t": 50, "run.steps": 1})
    assert cli.main(["pretrain", *args]) == 0
    assert cli.main(["pretrain", *args, "--teacher.taps=output_blocks.7,output_blocks.5"]) == 2
    assert 'teacher.taps: cache ["output_blocks.8", "output_blocks.5"]' in capsys.readouterr().err
