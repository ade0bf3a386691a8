"""The naive loop's eager losses (dreamteacher.losses) compute what the lean loop's fused ops compute, so a
speed comparison between ``run.naive`` and the lean loop compares like with like."""

from __future__ import annotations

import json

import pytest
import torch

import dtkernels
from dreamteacher.losses import eager_feat_loss, eager_soft_ce

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")


def _levels(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 7, 9, 9), (3, 5, 5, 3), (3, 11, 1, 1)]
    s = [(torch.randn(sh, generator=g, dtype=dtype) * 1.7 + 0.3).requires_grad_() for sh in shapes]
    t = [torch.randn(sh, generator=g, dtype=dtype) * 2.5 - 0.4 for sh in shapes]
    return s, t


@pytest.mark.parametrize("whiten", ["channel", "sample", None])
@pytest.mark.parametrize("at_mode, at_p", [("paper", 2.0), ("mean_sq", 2.0), ("paper", 3.0)])
def test_eager_feat_loss_equals_the_fused_op_in_float64(whiten, at_mode, at_p):
    kwargs = dict(mse_weight=0.7, at_weight=10.0, at_p=at_p, at_mode=at_mode, whiten=whiten, eps=1e-5,
                  level_weights=[1.0, 0.5, 2.0])
    s1, t = _levels()
    s2 = [x.detach().clone().requires_grad_() for x in s1]
    fused = dtkernels.fused_feat_loss(s1, t, return_parts=True, **kwargs)
    eager = eager_feat_loss(s2, t, **kwargs)
    torch.testing.assert_close(eager.loss, fused.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager.mse, fused.mse.to(eager.mse.dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager.at, fused.at.to(eager.at.dtype), rtol=1e-10, atol=1e-12)
    (2 * fused.loss).backward()
    (2 * eager.loss).backward()
    for a, b in zip(s1, s2):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)


def test_eager_soft_ce_equals_the_fused_op_in_float64():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(2, 5, 7, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(2, 5, 7, 3, generator=g, dtype=torch.float64) * 3
    s2 = s.detach().clone().requires_grad_()
    a, b = dtkernels.soft_ce(s, t, tau=4.0), eager_soft_ce(s2, t, tau=4.0)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    (3 * a).backward()
    (3 * b).backward()
    torch.testing.assert_close(s2.grad, s.grad, rtol=1e-10, atol=1e-14)


def test_naive_and_lean_loops_log_the_same_first_losses(tmp_path):
    """Same seed, same batch, same teacher noise: the first steps' losses agree to float32 rounding."""
    from dreamteacher.config import load_config
    from dreamteacher.teacher_training import TINY_UNET, train_teacher
    from dreamteacher.train import pretrain

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = tmp_path / "teacher"
        train_teacher(teacher, image_size=32, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0, log_every=1,
                      progress=False)
        logs = {}
        for naive in (False, True):
            out = tmp_path / f"run_{naive}"
            cfg = load_config(None, [f"--teacher.path={teacher}", "--data.image_size=32", "--data.length=32",
                                     "--data.num_workers=0", "--model.width=16", "--run.batch_size=4",
                                     "--run.steps=2", "--run.log_every=1", f"--run.out_dir={out}",
                                     "--run.progress=false", "--schedule.warmup_steps=1", f"--run.naive={naive}",
                                     "--run.single_pixel_linear=false",
                                     "--run.amp=off"])  # float32: the agreement asked for is float32 rounding
            pretrain(cfg)
            logs[naive] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(n)
    lean, naive = logs[False], logs[True]
    assert len(lean) == len(naive) == 2
    assert lean[0]["loss"] == pytest.approx(naive[0]["loss"], rel=1e-5)
    assert lean[0]["mse"] == pytest.approx(naive[0]["mse"], rel=1e-5)
    assert lean[1]["loss"] == pytest.approx(naive[1]["loss"], rel=1e-3)  # after one step of fused vs plain AdamW
