"""User mistakes on the command line end in one ``error:`` line naming the option, exit status 2 and no traceback.

Two tables. Mistakes caught while the options are parsed or the config is read run in-process through ``cli.main``
(a subprocess per case would mostly time the torch import); the ones that need built files (a tiny teacher, an
interpreter trained at another timestep, a feature cache, a checkpoint of another student, a conditional teacher
without an embedding) run as real ``python -m dreamteacher`` subprocesses. The files are built once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_teacher import LATENT_UNET, VAE

from dreamteacher import cli
from dreamteacher.config import load_config
from dreamteacher.data import ImageFolderDataset
from dreamteacher.feature_cache import write_feature_cache
from dreamteacher.interpreter import train_interpreter
from dreamteacher.teacher_training import TINY_UNET, train_teacher
from dreamteacher.teachers import DiffusionTeacher
from dreamteacher.train import pretrain

pytestmark = [
    pytest.mark.filterwarnings("ignore:dtkernels.q_sample:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]

HUB_ID = "runwayml/stable-diffusion-v1-5"



def tiny(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"teacher.path": teacher_dir, "data.image_size": 32, "data.length": 8, "data.num_workers": 0,
              "model.student": "test_resnet", "model.width": 16, "run.batch_size": 4, "run.steps": 1,
              "run.log_every": 1, "run.out_dir": out, "run.progress": False, "schedule.warmup_steps": 1,
              "run.ckpt_every": 100, "run.device": "cpu"}
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


# ---------------------------------------------------------------------------------------------------- built files
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clierr")


@pytest.fixture(scope="module")
def teacher_dir(work) -> Path:
    out = work / "teacher"
    train_teacher(out, image_size=32, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0, log_every=1,
                  progress=False)
    return out


@pytest.fixture(scope="module")
def teacher2(work) -> Path:
    """Another teacher: same architecture, other weights."""
    out = work / "teacher2"
    train_teacher(out, image_size=32, unet=TINY_UNET, steps=1, batch_size=2, num_workers=0, log_every=1, seed=1,
                  progress=False)
    return out


@pytest.fixture(scope="module")
def images(work) -> Path:
    root = work / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def empty_dir(work) -> Path:
    (work / "empty").mkdir()
    return work / "empty"


@pytest.fixture(scope="module")
def broken_dir(work) -> Path:
    """Image files that are not images: the folder has no readable image."""
    root = work / "broken"
    root.mkdir()
    (root / "a.png").write_bytes(b"\x89PNG not really")
    (root / "b.jpg").write_bytes(b"nope")
    return root


@pytest.fixture(scope="module")
def cache_dir(work, teacher_dir, images) -> Path:
    out = work / "cache"
    teacher = DiffusionTeacher.from_pretrained(teacher_dir, strides=[4, 8, 16])
    write_feature_cache(teacher, ImageFolderDataset(images, 32, uint8=True), out, shard_size=4, batch_size=4,
                        progress=False)
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="module")
def checkpoint(work, teacher_dir) -> Path:
    """A one-step pretrain checkpoint of timm's tiny test_resnet student."""
    summary = pretrain(load_config(None, tiny(teacher_dir, work / "run")))
    return Path(summary["checkpoint"])


@pytest.fixture(scope="module")
def interpreter_file(work, teacher_dir) -> Path:
    """An interpreter trained on the teacher's features at t = 150 (the default)."""
    result = train_interpreter(load_config(None, tiny(teacher_dir, work / "interp")), labels=2, steps=2,
                               batch_size=2, width=8, out=work / "interp", n_test=2, progress=False)
    return Path(result["path"])


@pytest.fixture(scope="module")
def conditional_dir(work) -> Path:
    """A latent teacher with a conditional UNet and nothing to condition it on (no text encoder, no embedding)."""
    root = work / "conditional"
    t = DiffusionTeacher.from_config(LATENT_UNET, vae_config=VAE, conditioning="zeros")
    t.unet.save_pretrained(str(root / "unet"))
    t.vae.save_pretrained(str(root / "vae"))
    t.scheduler.save_pretrained(str(root / "scheduler"))
    t.taps.remove()
    return root


@pytest.fixture(scope="module")
def files(work, teacher_dir, teacher2, images, empty_dir, broken_dir, cache_dir, checkpoint, interpreter_file,
          conditional_dir) -> dict[str, str]:
    """What the subprocess cases' ``{name}`` placeholders stand for."""
    (work / "a_file").write_text("not a folder")
    return {"work": str(work), "teacher": str(teacher_dir), "teacher2": str(teacher2), "images": str(images),
            "empty": str(empty_dir), "broken": str(broken_dir), "cache": str(cache_dir), "ckpt": str(checkpoint),
            "interp": str(interpreter_file), "cond": str(conditional_dir), "a_file": str(work / "a_file")}


# ---------------------------------------------------------------------------------------------------- checks
def check_error(code: int, out: str, err: str, names: tuple[str, ...]) -> None:
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    assert code == 2, err


# Parse- and config-time mistakes: (argv, fragments the error line must contain). `{tmp}` is a fresh directory.
IN_PROCESS = [
    (["train-teacher", "--out", "{tmp}", "--steps", "0"], ("--steps", "positive integer")),
    (["train-teacher", "--out", "{tmp}", "--steps", "-3"], ("--steps",)),
    (["train-teacher", "--out", "{tmp}", "--steps", "1e3"], ("--steps", "integer")),
    (["train-teacher", "--out", "{tmp}", "--lr", "nan"], ("--lr", "finite")),
    (["train-teacher", "--out", "{tmp}", "--lr", "inf"], ("--lr", "finite")),
    (["train-teacher", "--out", "{tmp}", "--lr", "0"], ("--lr",)),
    (["train-teacher", "--out", "{tmp}", "--batch-size", "0"], ("--batch-size",)),
    (["train-teacher", "--out", "{tmp}", "--max-minutes", "-1"], ("--max-minutes", ">= 0")),
    (["train-teacher", "--out", "{tmp}", "--ema-decay", "1"], ("--ema-decay", "[0, 1)")),
    (["train-teacher", "--out", "{tmp}", "--clip-grad", "nan"], ("--clip-grad",)),
    (["train-teacher", "--out", "{tmp}", "--warmup-steps", "-1"], ("--warmup-steps",)),
    (["train-teacher", "--out", "{tmp}", "--image-size", "abc"], ("--image-size", "integer")),
    (["train-teacher", "--out", "{tmp}", "--image-size", "20"], ("--image-size", "multiple of 16")),
    (["train-teacher", "--out", "{tmp}", "--num-workers", "-1"], ("--num-workers",)),
    (["train-teacher", "--out", "{tmp}", "--seed", "x"], ("--seed", "integer")),
    (["train-teacher", "--out", "{tmp}", "--data", "{tmp}/nope"], ("--data", "not a directory")),
    (["train-teacher", "--out", "{tmp}", "--device", "nonsense"], ("--device",)),
    (["train-teacher", "--out", "{tmp}", "--bogus"], ("--bogus", "unrecognized")),
    (["train-teacher"], ("--out", "required")),
    (["cache-features", "--teacher", "T", "--data", "D", "--out", "O", "--resolution", "0"], ("--resolution",)),
    (["cache-features", "--teacher", "T", "--data", "D", "--out", "O", "--t", "-1"], ("--t",)),
    (["cache-features", "--teacher", "T", "--data", "D", "--out", "O", "--batch-size", "1.5"], ("--batch-size",)),
    (["cache-features", "--teacher", "T", "--data", "D", "--out", "O", "--mode", "fast"], ("--mode",)),
    (["cache-features", "--teacher", "T", "--data", "{tmp}/nope", "--out", "O"], ("--data", "not a directory")),
    (["train-interpreter", "--out", "{tmp}", "--lr", "0"], ("--lr",)),
    (["train-interpreter", "--out", "{tmp}", "--steps", "nan"], ("--steps",)),
    (["train-interpreter", "--out", "{tmp}", "--teacher.path={tmp}", "--images", "{tmp}/nope", "--masks", "{tmp}"],
     ("--images", "not a directory")),
    (["evaluate", "--labels", "0"], ("--labels",)),
    (["evaluate", "--lr", "-1e-3"], ("--lr",)),
    (["evaluate", "--image-size", "inf"], ("--image-size",)),
    (["evaluate", "--student", "no_such_model"], ("--student", "no_such_model")),
    (["viz", "--num-images", "0"], ("--num-images",)),
    (["demo", "--pretrain-minutes", "-5"], ("--pretrain-minutes",)),
    (["demo", "--teacher-minutes", "nan"], ("--teacher-minutes",)),
    (["demo", "--run.steps=0"], ("run.steps",)),
    (["pretrain", "--run.steps=0"], ("run.steps", ">= 1")),
    (["pretrain", "--run.steps=nan"], ("run.steps",)),
    (["pretrain", "--run.steps=2.5"], ("run.steps", "int")),
    (["pretrain", "--optim.lr=-1"], ("optim.lr",)),
    (["pretrain", "--optim.lr=inf"], ("optim.lr", "finite")),
    (["pretrain", "--run.batch_size=0"], ("run.batch_size",)),
    (["pretrain", "--run.max_minutes=-1"], ("run.max_minutes",)),
    (["pretrain", "--data.image_size=4"], ("data.image_size",)),
    (["pretrain", "--model.reductions=0,8"], ("model.reductions",)),
    (["pretrain", "--loss.level_weights=-1,1,1,1"], ("loss.level_weights",)),
    (["pretrain", "--bogus=1"], ("bogus", "unknown key")),
    (["pretrain", "--run.stepz=5"], ("run.stepz", "unknown key")),
    (["pretrain", "--run.progress=maybe"], ("run.progress", "bool")),
    (["pretrain", "--teacher.mode=fast"], ("teacher.mode",)),
    (["pretrain", "--config", "{tmp}/missing.yaml"], ("--config", "no such file")),
    (["pretrain", "--teacher.path={tmp}", "--run.device=nonsense", "--run.out_dir={tmp}"], ("run.device",)),
    (["pretrain", "--model.student=no_such_model", "--run.device=cpu", "--run.out_dir={tmp}"],
     ("model.student", "no_such_model")),
    (["pretrain", "--run.device=cpu", "--run.out_dir={tmp}"], ("teacher.path",)),
    (["export", "{tmp}/missing.pt"], ("checkpoint", "no such file")),
    (["train-teacher", "--out", "{tmp}/a_file"], ("--out", "is a file")),
    (["train-teacher", "--out", "{tmp}/a_file/sub"], ("--out", "is a file")),
    (["pretrain", "--run.out_dir={tmp}/a_file", "--run.device=cpu"], ("run.out_dir", "is a file")),
    (["train-interpreter", "--out", "{tmp}/a_file", "--teacher.path={tmp}"], ("--out", "is a file")),
    (["evaluate", "--train-images", "{tmp}/nope", "--train-masks", "{tmp}", "--test-images", "{tmp}",
      "--test-masks", "{tmp}", "--num-classes", "3"], ("--train-images", "not a directory")),
    (["evaluate", "--train-images", "{tmp}"], ("--train-masks", "required")),
    (["convert-checkpoint", "{tmp}/in.pt", "{tmp}/out.pt"], ("--trust-pickle", "required")),
]


@pytest.mark.parametrize("argv, names", IN_PROCESS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in IN_PROCESS])
def test_parse_and_config_mistakes(argv, names, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = cli.main(["--default-malloc", *args])
    except SystemExit as e:  # argparse refusals exit
        code = e.code
    out, err = capsys.readouterr()
    check_error(code, out, err, names)


# A YAML config with mistakes: (its text, fragments the error line must contain).
YAML_CONFIGS = [
    ("run: {stepz: 3}\n", ("run.stepz", "unknown key")),
    ("runs: {steps: 3}\n", ("runs", "unknown section")),
    ("run: {steps: -1}\n", ("run.steps", ">= 1")),
    ("run: {steps: ten}\n", ("run.steps", "int")),
    ("optim: {lr: .nan}\n", ("optim.lr", "finite")),
    ("optim: {betas: [0.9, 1.5]}\n", ("optim.betas",)),
    ("model: {student: [resnet18]}\n", ("model.student", "str")),
    ("- 1\n- 2\n", ("config", "mapping")),
    ("run: {steps: [\n", ("--config", "not valid YAML")),
]


@pytest.mark.parametrize("text, names", YAML_CONFIGS, ids=[t.strip() for t, _ in YAML_CONFIGS])
def test_config_file_mistakes(text, names, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(text)
    code = cli.main(["--default-malloc", "pretrain", "--config", str(tmp_path / "config.yaml")])
    out, err = capsys.readouterr()
    check_error(code, out, err, names)


# Mistakes that need built files, through real subprocesses.
SUBPROCESS = [
    ("hub id as teacher.path", ["pretrain", "--teacher.path=" + HUB_ID, "--run.device=cpu", "--run.out_dir={work}/x"],
     ("teacher.path", f"huggingface-cli download {HUB_ID} --local-dir DIR", "--teacher.path=DIR", "downloaded")),
    ("missing folder as teacher.path", ["pretrain", *"--teacher.path={work}/nope --run.device=cpu".split()],
     ("teacher.path", "not a directory", "--local-dir DIR")),
    ("hub id as --teacher", ["cache-features", "--teacher", HUB_ID, "--data", "{images}", "--out", "{work}/c"],
     ("--teacher", f"huggingface-cli download {HUB_ID}", "--teacher DIR")),
    ("t beyond the teacher's steps", ["cache-features", "--teacher", "{teacher}", "--data", "{images}", "--out",
                                      "{work}/c2", "--t", "5000"], ("--t", "[0, 1000)")),
    ("cache as --data", ["cache-features", "--teacher", "{teacher}", "--data", "{cache}", "--out", "{work}/c4"],
     ("--data", "feature cache")),
    ("cache as data.source", ["pretrain", "--teacher.path={teacher}", "--data.source={cache}", "--run.device=cpu"],
     ("data.source", "feature cache")),
    ("empty data.source", [*"pretrain @tiny --data.source={empty}".split()], ("data.source", "no readable images")),
    ("unreadable data.source", [*"pretrain @tiny --data.source={broken}".split()],
     ("data.source", "no readable images", "2 unreadable")),
    ("teacher.t out of range", [*"pretrain @tiny --teacher.t=5000".split()], ("teacher.t", "[0, 1000)")),
    ("interpreter of another t", [*"pretrain @tiny --label.interpreter={interp} --teacher.t=99".split()],
     ("label.interpreter", "t = 150", "teacher.t=150")),
    ("interpreter of other taps", [*"pretrain @tiny --label.interpreter={interp}".split(),
                                   "--teacher.taps=mid_block,up_blocks.0,up_blocks.1,up_blocks.2"],
     ("label.interpreter", "taps", "teacher.taps=")),
    ("interpreter of another teacher", [*"pretrain @tiny --label.interpreter={interp} --teacher.path={teacher2}"
                                        .split()], ("label.interpreter", "fingerprint", "teacher.path=")),
    ("resume into another student", [*"pretrain @tiny --resume {ckpt} --model.student=resnet18".split()],
     ("model.student", "test_resnet", "--model.student=test_resnet")),
    ("export to an unwritable place", ["export", "{ckpt}", "--out", "{a_file}/backbone.safetensors"],
     ("--out", "cannot write")),
    ("evaluate another student's checkpoint", ["evaluate", "--backbone", "x={ckpt}", "--student", "resnet18",
                                               "--labels", "2", "--seeds", "0", "--image-size", "32", "--n-test",
                                               "2", "--out", "{work}/ev"], ("--student", "backbone")),
    ("conditional teacher without an embedding", [*"pretrain @tiny --teacher.path={cond}".split()],
     ("conditioning", "teacher.text_embedding=FILE", "teacher.conditioning=zeros", "text_encoder/ and tokenizer/")),
]


# More mistakes with built files, in-process (the subprocess table above covers the path through the real entry).
WITH_FILES = [
    ("image size the UNet cannot run", [*"pretrain @tiny --data.image_size=34".split()],
     ("data.image_size", "multiple of 4", "32 or 36")),
    ("resolution the UNet cannot run", ["cache-features", "--teacher", "{teacher}", "--data", "{images}", "--out",
                                        "{tmp}/c", "--resolution", "30"], ("--resolution", "28 or 32")),
    ("embedding for an unconditional teacher", ["cache-features", "--teacher", "{teacher}", "--data", "{images}",
                                                "--out", "{tmp}/c", "--text-embedding", "{tmp}/e.pt"],
     ("--text-embedding", "not a conditional UNet")),
    ("conditional teacher without an embedding (cache-features)",
     ["cache-features", "--teacher", "{cond}", "--data", "{images}", "--out", "{tmp}/c", "--resolution", "16"],
     ("--conditioning", "--text-embedding FILE", "--conditioning zeros")),
    ("missing embedding file", [*"pretrain @tiny --teacher.path={cond} --data.image_size=16".split(),
                                "--teacher.text_embedding={tmp}/nope.pt"], ("teacher.text_embedding", "no such file")),
    ("fewer images than a batch", [*"pretrain @tiny --data.source={images} --run.batch_size=8".split()],
     ("run.batch_size", "4 images")),
    ("resume with another width", [*"pretrain @tiny --resume {ckpt} --model.width=32".split()],
     ("model.width", "--model.width=16")),
    ("export onto a folder", ["export", "{ckpt}", "--out", "{tmp}/folder.safetensors"], ("--out", "cannot write")),
    ("convert to an unwritable place", ["convert-checkpoint", "{ckpt}", "{tmp}/a_file/x.pt", "--trust-pickle"],
     ("OUT", "cannot write")),
    ("missing backbone", ["evaluate", "--backbone", "x={tmp}/nope.pt"], ("--backbone", "no such file")),
    ("empty --data", ["cache-features", "--teacher", "{teacher}", "--data", "{empty}", "--out", "{tmp}/c"],
     ("--data", "no readable images")),
    ("labels beyond the pool", ["train-interpreter", "--out", "{tmp}/i", "--labels", "100000",
                                *"@tiny".split()], ("--labels", "fewer than 100000")),
    ("a file as --teacher", ["cache-features", "--teacher", "{a_file}", "--data", "{images}", "--out", "{work}/c"],
     ("--teacher", "is a file")),
    ("unknown tap", ["cache-features", "--teacher", "{teacher}", "--data", "{images}", "--out", "{work}/c3",
                     "--taps", "no_block"], ("--taps", "no_block")),
    ("cache as train-teacher --data", ["train-teacher", "--out", "{work}/t", "--data", "{cache}"],
     ("--data", "feature cache")),
    ("missing interpreter", [*"pretrain @tiny --label.interpreter={work}/nope.pt".split()],
     ("label.interpreter", "no such file")),
    ("resume missing", [*"pretrain @tiny --resume {work}/nope.pt".split()], ("--resume", "no such file")),
    ("export suffix", ["export", "{ckpt}", "--out", "{work}/backbone.bin"], ("--out", ".safetensors")),
]


@pytest.mark.parametrize("argv, names", [c[1:] for c in WITH_FILES], ids=[c[0] for c in WITH_FILES])
def test_mistakes_with_files_in_process(argv, names, files, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "folder.safetensors").mkdir()
    args = []
    for a in argv:
        args += tiny(Path(files["teacher"]), tmp_path / "run") if a == "@tiny" else [a.format(**files, tmp=tmp_path)]
    try:
        code = cli.main(["--default-malloc", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    check_error(code, out, err, names)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user mistakes become `error:` lines: anything else escapes cli.main with its traceback."""
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "export", (cli.add_export, broken))
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["--default-malloc", "export", "x.pt"])

    def broken_value(args):
        raise ValueError("a bug that is a ValueError")

    monkeypatch.setitem(cli.COMMANDS, "export", (cli.add_export, broken_value))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["--default-malloc", "export", "x.pt"])


@pytest.fixture(scope="module")
def warm():
    """``python -m dreamteacher`` as forks of one interpreter that has imported torch and diffusers
    (tests/warm_interpreter.py): a new process per case, without the seconds of third-party imports each."""
    from warm_interpreter import WarmInterpreter

    server = WarmInterpreter({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    yield server
    server.close()


@pytest.mark.parametrize("argv, names", [c[1:] for c in SUBPROCESS], ids=[c[0] for c in SUBPROCESS])
def test_mistakes_with_files_in_a_subprocess(argv, names, files, tmp_path, warm):
    args = []
    for a in argv:
        if a == "@tiny":
            args += tiny(Path(files["teacher"]), tmp_path / "run")
        else:
            args.append(a.format(**files))
    proc = warm.run(argv=args, cwd=tmp_path, timeout=300)
    check_error(proc.returncode, proc.stdout, proc.stderr, names)


def test_the_real_entry_point_in_a_cold_interpreter(files, tmp_path):
    """One case through `python -m dreamteacher` in a fresh interpreter, as a user runs it (the others fork a warm
    one): the same single error line and exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    name, argv, names = next(c for c in SUBPROCESS if c[0] == "teacher.t out of range")
    args = [*tiny(Path(files["teacher"]), tmp_path / "run"), *argv[2:]]
    proc = subprocess.run([sys.executable, "-m", "dreamteacher", "pretrain", *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    check_error(proc.returncode, proc.stdout, proc.stderr, names)
