"""Latent teachers' text conditioning: the pipeline's own empty-prompt embedding, a given file, or explicit zeros.

A tiny Stable-Diffusion-layout folder is built from configs (UNet2DConditionModel, AutoencoderKL, DDPM scheduler,
CLIPTextModel, CLIPTokenizer from a hand-written vocab); nothing is downloaded.
"""

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from test_teacher import LATENT_UNET, PIXEL_UNET, VAE, images

import dreamteacher.teachers.diffusion as teacher_mod
from dreamteacher.config import ConfigError, PretrainConfig, load_config
from dreamteacher.model import teacher_for
from dreamteacher.teachers import DiffusionTeacher

pytestmark = [
    pytest.mark.filterwarnings("ignore:dtkernels.q_sample:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]

CROSS_DIM = 32
MAX_LENGTH = 8
UNET32 = dict(LATENT_UNET, cross_attention_dim=CROSS_DIM)
# Byte-pair vocabulary of the CLIP tokenizer: its special tokens, two letters and one merge.
VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "a</w>": 4, "b</w>": 5, "ab</w>": 6}
FIXES = ("text_encoder/ and tokenizer/", "teacher.text_embedding=FILE", "teacher.conditioning=zeros")



def tiny_tokenizer(work: Path):
    (work / "vocab.json").write_text(json.dumps(VOCAB))
    (work / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    return transformers.CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"),
                                      pad_token="<|endoftext|>", model_max_length=MAX_LENGTH)


def tiny_text_encoder():
    config = transformers.CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=CROSS_DIM, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1)
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory) -> Path:
    """unet/ (conditional, cross_attention_dim 32), vae/, scheduler/ and nothing to condition on."""
    root = tmp_path_factory.mktemp("bare")
    t = DiffusionTeacher.from_config(UNET32, vae_config=VAE, conditioning="zeros")
    t.unet.save_pretrained(str(root / "unet"))
    t.vae.save_pretrained(str(root / "vae"))
    t.scheduler.save_pretrained(str(root / "scheduler"))
    t.taps.remove()
    return root


@pytest.fixture(scope="module")
def sd_template(bare_dir, tmp_path_factory) -> Path:
    """``bare_dir`` plus text_encoder/, tokenizer/ and model_index.json: the diffusers Stable Diffusion layout."""
    root = tmp_path_factory.mktemp("sd") / "pipe"
    shutil.copytree(bare_dir, root)
    tiny_tokenizer(tmp_path_factory.mktemp("vocab")).save_pretrained(str(root / "tokenizer"))
    tiny_text_encoder().save_pretrained(str(root / "text_encoder"))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return root


@pytest.fixture
def sd_dir(sd_template, tmp_path) -> Path:
    """A fresh copy per test: loading it may write the embedding cache into it."""
    root = tmp_path / "pipe"
    shutil.copytree(sd_template, root)
    return root


def by_hand(root: Path, prompt: str = "") -> torch.Tensor:
    """The unconditional embedding as diffusers' StableDiffusionPipeline.encode_prompt makes it."""
    tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    enc = transformers.CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0]


def conditioning_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher conditioning:")]


def load(root: Path, caplog, **kwargs) -> DiffusionTeacher:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamteacher"):
        t = DiffusionTeacher.from_pretrained(root, **kwargs)
    t.taps.remove()
    return t


def _never(*args, **kwargs):
    raise AssertionError("the text encoder ran although it should not have")


# ------------------------------------------------------------------------------------------------ text encoder
def test_text_encoder_gives_the_empty_prompt_embedding_and_logs_it(sd_dir, caplog):
    teacher = load(sd_dir, caplog)
    want = by_hand(sd_dir)
    assert want.shape == (1, MAX_LENGTH, CROSS_DIM)
    assert teacher.uncond_embedding.dtype == torch.float32
    assert torch.equal(teacher.uncond_embedding, want)  # bitwise
    assert not torch.equal(want, by_hand(sd_dir, "ab"))  # the prompt matters, so the check above can fail
    lines = conditioning_lines(caplog)
    assert len(lines) == 1 and f"text encoder of {sd_dir} (empty prompt)" in lines[0]
    assert teacher.conditioning_source in lines[0]

    # the embedding is what the UNet sees: the features equal those of a teacher given it, not those of zeros
    unet, sched, vae = teacher.unet, teacher.scheduler, teacher.vae
    x = images()
    given = DiffusionTeacher(unet, sched, vae=vae, text_embedding=want, taps=["up_blocks.1"])
    zeros = DiffusionTeacher(unet, sched, vae=vae, conditioning="zeros", taps=["up_blocks.1"])
    loaded = DiffusionTeacher(unet, sched, vae=vae, text_embedding=teacher.uncond_embedding, taps=["up_blocks.1"])
    ref = given(x, seed=3)[0]
    assert torch.equal(loaded(x, seed=3)[0], ref)
    assert not torch.allclose(zeros(x, seed=3)[0], ref)


def test_embedding_is_cached_with_metadata_and_reused(sd_dir, caplog, monkeypatch):
    first = load(sd_dir, caplog)
    cache = sd_dir / "uncond_embedding.safetensors"
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("embedding"), first.uncond_embedding)
    assert meta["prompt"] == "" and meta["text_encoder_class"] == "CLIPTextModel"
    assert meta["tokenizer_class"] == "CLIPTokenizer" and meta["max_length"] == str(MAX_LENGTH)
    assert meta["source"] == f"text encoder of {sd_dir} (empty prompt)"

    monkeypatch.setattr(teacher_mod, "encode_empty_prompt", _never)
    again = load(sd_dir, caplog)
    assert torch.equal(again.uncond_embedding, first.uncond_embedding)
    (line,) = conditioning_lines(caplog)
    assert f"text encoder of {sd_dir} (empty prompt), cached in {cache}" in line

    # another text encoder (its files change) makes the cache stale: computed again, from the new weights
    tiny_text_encoder().save_pretrained(str(sd_dir / "text_encoder"))
    monkeypatch.undo()
    fresh = load(sd_dir, caplog)
    assert torch.equal(fresh.uncond_embedding, by_hand(sd_dir))
    assert not torch.equal(fresh.uncond_embedding, first.uncond_embedding)


def test_read_only_teacher_directory_caches_in_the_run_directory(sd_dir, tmp_path, caplog, monkeypatch):
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        # this machine runs tests as root, for whom the permission bits below deny nothing: say what they mean
        if Path(path) == sd_dir and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    before = sorted(p.name for p in sd_dir.iterdir())
    sd_dir.chmod(0o555)
    monkeypatch.setattr(os, "access", access)
    try:
        run = tmp_path / "run"
        teacher = load(sd_dir, caplog, embedding_cache_dir=run)
        assert sorted(p.name for p in sd_dir.iterdir()) == before
        assert (run / "uncond_embedding.safetensors").is_file()
        assert torch.equal(teacher.uncond_embedding, by_hand(sd_dir))
        (line,) = conditioning_lines(caplog)
        assert f"text encoder of {sd_dir} (empty prompt), cached in {run / 'uncond_embedding.safetensors'}" in line
        monkeypatch.setattr(teacher_mod, "encode_empty_prompt", _never)
        assert torch.equal(load(sd_dir, caplog, embedding_cache_dir=run).uncond_embedding, teacher.uncond_embedding)
    finally:
        sd_dir.chmod(0o755)


def test_a_hand_made_embedding_file_is_never_overwritten(sd_dir, tmp_path, caplog):
    hand = torch.randn(1, 3, CROSS_DIM)
    save_file({"embedding": hand}, str(sd_dir / "uncond_embedding.safetensors"))
    teacher = load(sd_dir, caplog, embedding_cache_dir=tmp_path / "run")
    assert torch.equal(teacher.uncond_embedding, by_hand(sd_dir))  # auto: the text encoder comes first
    with safe_open(str(sd_dir / "uncond_embedding.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("embedding"), hand)
    assert (tmp_path / "run" / "uncond_embedding.safetensors").is_file()


def test_pretrain_build_teacher_passes_the_keys(sd_dir, tmp_path, caplog):
    cfg = PretrainConfig()
    cfg.teacher.path, cfg.teacher.taps, cfg.run.out_dir = str(sd_dir), ["up_blocks.1"], str(tmp_path / "run")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamteacher"):
        teacher, _ = teacher_for(cfg, torch.device("cpu"), [8])
    assert torch.equal(teacher.uncond_embedding, by_hand(sd_dir))
    (line,) = conditioning_lines(caplog)  # one line, though build_teacher builds the teacher twice
    assert f"text encoder of {sd_dir} (empty prompt)" in line
    assert teacher.conditioning_source.startswith(f"text encoder of {sd_dir} (empty prompt)")

    emb = torch.randn(4, CROSS_DIM)
    save_file({"embedding": emb}, str(tmp_path / "emb.safetensors"))
    cfg = load_config(None, [f"--teacher.path={sd_dir}", "--teacher.taps=up_blocks.1", "--model.reductions=8",
                             f"--teacher.text_embedding={tmp_path / 'emb.safetensors'}"])
    teacher, _ = teacher_for(cfg, torch.device("cpu"), [8])
    assert torch.equal(teacher.uncond_embedding, emb[None])
    assert teacher.conditioning_source == f"file {tmp_path / 'emb.safetensors'}"

    cfg = load_config(None, [f"--teacher.path={sd_dir}", "--teacher.taps=up_blocks.1", "--model.reductions=8",
                             "--teacher.conditioning=zeros"])
    teacher, _ = teacher_for(cfg, torch.device("cpu"), [8])
    assert teacher.uncond_embedding.shape == (1, 1, CROSS_DIM) and not teacher.uncond_embedding.any()
    assert teacher.conditioning_source == "zeros (explicit opt-in)"


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="teacher.conditioning: expected one of auto, zeros"):
        load_config(None, ["--teacher.conditioning=none"])
    with pytest.raises(ConfigError, match="teacher.conditioning: zeros excludes teacher.text_embedding"):
        load_config(None, ["--teacher.conditioning=zeros", "--teacher.text_embedding=emb.safetensors"])
    cfg = PretrainConfig()
    assert (cfg.teacher.text_embedding, cfg.teacher.conditioning) == ("", "auto")


# ------------------------------------------------------------------------------------------------ files and zeros
def test_explicit_file_is_used_and_logged(sd_dir, tmp_path, caplog, monkeypatch):
    emb = torch.randn(5, CROSS_DIM)
    file = tmp_path / "emb.safetensors"
    save_file({"embedding": emb}, str(file))
    monkeypatch.setattr(teacher_mod, "encode_empty_prompt", _never)  # the file comes before the text encoder
    teacher = load(sd_dir, caplog, text_embedding=file)
    assert torch.equal(teacher.uncond_embedding, emb[None])
    assert conditioning_lines(caplog) == [f"teacher conditioning: file {file}"]
    assert not (sd_dir / "uncond_embedding.safetensors").exists()


def test_existing_embedding_file_in_the_teacher_directory(bare_dir, tmp_path, caplog):
    root = tmp_path / "t"
    shutil.copytree(bare_dir, root)
    emb = torch.randn(1, 2, CROSS_DIM)
    save_file({"embedding": emb}, str(root / "uncond_embedding.safetensors"))
    teacher = load(root, caplog)
    assert torch.equal(teacher.uncond_embedding, emb)
    assert conditioning_lines(caplog) == [f"teacher conditioning: file {root / 'uncond_embedding.safetensors'}"]
    # a saved teacher's file says where its embedding came from, and the log repeats it
    teacher.save_pretrained(tmp_path / "saved")
    load(tmp_path / "saved", caplog)
    (line,) = conditioning_lines(caplog)
    assert line.endswith(f"(saved from: file {root / 'uncond_embedding.safetensors'})")


@pytest.mark.parametrize("shape", [(5, 16), (1, 5, 33), (2, 5, CROSS_DIM), (CROSS_DIM,)])
def test_wrong_shaped_embedding_is_refused(bare_dir, tmp_path, shape):
    file = tmp_path / "emb.safetensors"
    save_file({"embedding": torch.randn(shape)}, str(file))
    padded = (1, *shape) if len(shape) == 2 else shape
    want = (f"text_embedding: file {file} has shape {padded}; expected [L, {CROSS_DIM}] or [1, L, {CROSS_DIM}] "
            f"(the UNet's cross_attention_dim is {CROSS_DIM})")
    with pytest.raises(ValueError) as info:
        DiffusionTeacher.from_pretrained(bare_dir, text_embedding=file)
    assert str(info.value) == want


def test_text_encoder_of_the_wrong_width_is_refused(sd_dir):
    narrow = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=24, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    narrow.save_pretrained(str(sd_dir / "text_encoder"))
    with pytest.raises(ValueError, match=r"text_embedding: the text encoder output of .*text_encoder has shape "
                                         r"\(1, 8, 24\); expected \[L, 32\]"):
        DiffusionTeacher.from_pretrained(sd_dir)


def test_zeros_is_an_explicit_logged_opt_in(sd_dir, bare_dir, caplog, monkeypatch):
    monkeypatch.setattr(teacher_mod, "encode_empty_prompt", _never)
    for root in (bare_dir, sd_dir):  # explicit zeros win over a text encoder too
        teacher = load(root, caplog, conditioning="zeros")
        assert teacher.uncond_embedding.shape == (1, 1, CROSS_DIM) and not teacher.uncond_embedding.any()
        assert conditioning_lines(caplog) == ["teacher conditioning: zeros (explicit opt-in)"]
        assert teacher.conditioning_source == "zeros (explicit opt-in)"
    with pytest.raises(ValueError, match="conditioning: 'zeros' and a text_embedding exclude each other"):
        DiffusionTeacher.from_pretrained(bare_dir, conditioning="zeros", text_embedding=torch.zeros(2, CROSS_DIM))
    with pytest.raises(ValueError, match=r"conditioning: expected one of \('auto', 'zeros'\), got 'none'"):
        DiffusionTeacher.from_pretrained(bare_dir, conditioning="none")


# ------------------------------------------------------------------------------------------------ refusals
def test_conditional_unet_without_conditioning_is_refused(bare_dir, tmp_path):
    with pytest.raises(ValueError) as info:
        DiffusionTeacher.from_pretrained(bare_dir)
    message = str(info.value)
    assert message.startswith(f"conditioning: the UNet of {bare_dir} is conditional (cross_attention_dim=32)")
    assert all(fix in message for fix in FIXES), message
    assert f"to {bare_dir}" in message

    # only half of a text encoder is no text encoder
    root = tmp_path / "half"
    shutil.copytree(bare_dir, root)
    tiny_text_encoder().save_pretrained(str(root / "text_encoder"))
    with pytest.raises(ValueError, match="conditioning: the UNet of .* is conditional"):
        DiffusionTeacher.from_pretrained(root)

    # the constructor refuses the same way, and names the same fixes
    t = DiffusionTeacher.from_config(UNET32, vae_config=VAE, conditioning="zeros")
    with pytest.raises(ValueError) as info:
        DiffusionTeacher(t.unet, t.scheduler, vae=t.vae)
    assert all(fix in str(info.value) for fix in FIXES), str(info.value)
    with pytest.raises(ValueError) as info:
        DiffusionTeacher.from_config(UNET32, vae_config=VAE)
    assert all(fix in str(info.value) for fix in FIXES)


def test_unconditional_unet_needs_nothing(tmp_path, caplog, monkeypatch):
    pixel = DiffusionTeacher.from_config(PIXEL_UNET)
    assert not pixel.conditional and pixel.conditioning_source is None
    pixel.save_pretrained(tmp_path / "pixel")
    # a text encoder beside an unconditional UNet is not run, and zeros are nothing to opt in to
    tiny_text_encoder().save_pretrained(str(tmp_path / "pixel" / "text_encoder"))
    tiny_tokenizer(tmp_path).save_pretrained(str(tmp_path / "pixel" / "tokenizer"))
    monkeypatch.setattr(teacher_mod, "encode_empty_prompt", _never)
    for conditioning in ("auto", "zeros"):
        loaded = load(tmp_path / "pixel", caplog, conditioning=conditioning)
        assert not loaded.conditional and not hasattr(loaded, "uncond_embedding")
        assert conditioning_lines(caplog) == []
    x = images()
    assert torch.equal(DiffusionTeacher.from_pretrained(tmp_path / "pixel")(x, seed=1)[-1], pixel(x, seed=1)[-1])


def test_transformers_is_needed_only_for_a_text_encoder(sd_dir, bare_dir, caplog, monkeypatch):
    """diffusers itself imports transformers where installed, so "lazily" is checked as: without it, only a text
    encoder that must run fails, and with a message that says what to do."""
    cached = load(sd_dir, caplog).uncond_embedding  # writes the cache
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert load(bare_dir, caplog, conditioning="zeros").conditioning_source == "zeros (explicit opt-in)"
    assert torch.equal(load(sd_dir, caplog).uncond_embedding, cached)  # from the cache, no text encoder run
    (sd_dir / "uncond_embedding.safetensors").unlink()
    with pytest.raises(ImportError, match=r"has text_encoder/ and tokenizer/, which need `transformers` \(pip "
                                          r"install 'dtkernels\[train\]'\); or pass teacher.text_embedding"):
        DiffusionTeacher.from_pretrained(sd_dir)
