"""Self-supervised baselines (ssl.method, dreamteacher.baselines): each method's loss from lightly against its
formula computed here in float64, the views keyed by the step, tiny runs through `dreamteacher pretrain` that
checkpoint and resume bit for bit, the export into plain timm resnet18, and the refusals.

Tiny everything: timm's test_resnet (resnet18 for the export) at 32x32, batches of 4, 12 images, 4 steps.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import keep_every_checkpoint

pytest.importorskip("lightly", reason="needs the baselines extra (docs/baselines.md)")

from dreamteacher import baselines, cli  # noqa: E402
from dreamteacher.config import ConfigError, load_config  # noqa: E402
from dreamteacher.student import StudentBackbone  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


def model_of(method: str, **settings):
    """The method's module around a tiny student, with the config's default settings (``settings`` win)."""
    cfg = load_config(None, [f"--ssl.method={method}", "--model.student=test_resnet", "--data.image_size=32"])
    student = StudentBackbone("test_resnet")
    return baselines._MODELS[method](student, baselines.import_lightly(),
                                     {**baselines.method_settings(cfg), **settings})


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def info_nce64(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo's InfoNCE in float64: -log softmax of [q.k, q.bank] / t at the positive, rows normalized."""
    q, k, bank = unit(q.double()), unit(k.double()), bank.double()
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ bank.T], dim=1) / t
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def check_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert abs(got.item() - want.item()) <= 2e-5 * max(1.0, abs(want.item())), (got.item(), want.item())


# ------------------------------------------------------------------------------------------------ the losses
def test_simclr_loss_is_nt_xent_over_both_views():
    model = model_of("simclr")
    z0, z1 = torch.randn(6, 128), torch.randn(6, 128)
    loss, parts = model.loss([z0, z1])
    # float64: 2B anchors; the positive is the other view of the same image, every other view a negative
    z = unit(torch.cat([z0, z1]).double())
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    positive = sim[torch.arange(12), (torch.arange(12) + 6) % 12]
    check_close(loss, (torch.logsumexp(sim, dim=1) - positive).mean())
    assert parts == {}


def test_moco_loss_takes_the_queue_as_negatives_then_enqueues_the_keys():
    model = model_of("moco", memory_bank=16)
    bank = model.criterion.memory_bank
    before = bank.bank.clone()
    q, k = torch.randn(4, 128, requires_grad=True), torch.randn(4, 128)
    loss, _ = model.loss([q, k])
    check_close(loss, info_nce64(q, k, before, 0.2))
    assert torch.allclose(bank.bank[:4], unit(k)) and torch.equal(bank.bank[4:], before[4:])
    assert bank.bank_ptr.item() == 4
    assert {"criterion.memory_bank.bank", "criterion.memory_bank.bank_ptr"} <= model.state_dict().keys()


def test_byol_loss_is_the_symmetric_negative_cosine():
    model = model_of("byol")
    p0, p1, z0, z1 = (torch.randn(5, 256) for _ in range(4))
    loss, _ = model.loss({"predictions": [p0, p1], "targets": [z0, z1]})
    cos = lambda a, b: (unit(a.double()) * unit(b.double())).sum(-1).mean()  # noqa: E731
    check_close(loss, -0.5 * (cos(p0, z1) + cos(p1, z0)))


def test_densecl_loss_matches_locations_by_backbone_similarity():
    model = model_of("densecl", memory_bank=32, dense_weight=0.3)
    b, n, c = 2, 5, 7  # batch, locations, backbone channels
    banks = [model.criterion_global.memory_bank.bank.clone(), model.criterion_dense.memory_bank.bank.clone()]
    q_global, k_global = torch.randn(b, 128, requires_grad=True), torch.randn(b, 128)
    q_feats, k_feats = torch.randn(b, n, c), torch.randn(b, n, c)
    q_dense, k_dense = torch.randn(b, n, 128, requires_grad=True), torch.randn(b, n, 128)
    loss, parts = model.loss({"query": [q_global, q_feats, q_dense], "key": [k_global, k_feats, k_dense]})
    # float64: each query location's key is the key location of highest cosine similarity between backbone features
    match = torch.einsum("bnc,bmc->bnm", unit(q_feats.double()), unit(k_feats.double())).argmax(dim=2)
    matched = torch.stack([k_dense[i, match[i]] for i in range(b)])
    global_term = info_nce64(q_global, k_global, banks[0], 0.2)
    dense_term = info_nce64(q_dense.flatten(0, 1), matched.flatten(0, 1), banks[1], 0.2)
    check_close(parts["global"], global_term)
    check_close(parts["dense"], dense_term)
    check_close(loss, 0.7 * global_term + 0.3 * dense_term)


def test_momentum_follows_the_method_schedule():
    byol = model_of("byol")
    with torch.no_grad():
        for p in byol.student.parameters():
            p.add_(1.0)
    old = [p.clone() for p in byol.momentum_student.parameters()]
    byol.momentum_update(0, 10)  # cosine from 0.996 at step 0
    for p, o, s in zip(byol.momentum_student.parameters(), old, byol.student.parameters()):
        torch.testing.assert_close(p, 0.996 * o + 0.004 * s)
    old = [p.clone() for p in byol.momentum_student.parameters()]
    byol.momentum_update(9, 10)  # ... to 1 at the last step: the target encoder stays
    assert all(torch.equal(p, o) for p, o in zip(byol.momentum_student.parameters(), old))
    assert not any(p.requires_grad for p in byol.momentum_projection.parameters())


def test_dense_stride_reads_a_map_of_the_papers_size():
    def stride(size, given=0):
        return baselines.dense_stride(load_config(None, [f"--data.image_size={size}", f"--ssl.dense_stride={given}"]))

    assert (stride(224), stride(64), stride(32), stride(16), stride(32, 8)) == (32, 8, 4, 4, 8)


# ------------------------------------------------------------------------------------------------ the views
def test_views_are_a_function_of_the_key_and_leave_the_global_rngs_alone():
    import numpy as np

    transform = baselines.view_transform("byol", 32, baselines.import_lightly())
    views = baselines.SSLViews(transform, torch.device("cpu"), torch.contiguous_format)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a, _ = views(images, seed=7)
    assert torch.equal(torch.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    b, _ = views(images, seed=7)
    c, _ = views(images, seed=8)
    assert len(a) == 2 and a[0].shape == (3, 3, 32, 32) and a[0].min() >= -1 and a[0].max() <= 1
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # two different views of each image


# ------------------------------------------------------------------------------------------------ runs
def run_options(tmp_path, out, method: str, **extra) -> list[str]:
    """`dreamteacher pretrain --config FILE --ssl.method=METHOD ...` of a tiny run."""
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {student: test_resnet, width: 16}\n"
                      "data: {image_size: 32, length: 12, num_workers: 0}\n"
                      "run: {batch_size: 4, steps: 4, log_every: 1, ckpt_every: 2, progress: false}\n"
                      "schedule: {warmup_steps: 1}\n")
    values = {"ssl.method": method, "run.out_dir": out, **extra}
    return ["pretrain", "--config", str(config), *(f"--{k}={v}" for k, v in values.items())]


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "densecl"])
def test_a_baseline_run_resumes_bit_for_bit(method, tmp_path, monkeypatch):
    saved = keep_every_checkpoint(monkeypatch)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    small_bank = {"ssl.memory_bank": 64} if method in ("moco", "densecl") else {}
    assert cli.main(run_options(tmp_path, full, method, **small_bank)) == 0
    assert [p.name for p in saved] == ["step2.pt", "step4.pt"]
    assert cli.main([*run_options(tmp_path, resumed, method, **small_bank), "--resume", str(saved[0])]) == 0
    a, b = read_log(full), read_log(resumed)
    assert [r["step"] for r in b] == [3, 4] and all(r["loss"] == r["loss"] for r in a)  # finite, not NaN
    for ra, rb in zip(a[2:], b):  # 12 images / batch 4: step 4 also crosses an epoch boundary
        assert {k: v for k, v in ra.items() if k not in ("time", "images_per_s")} == \
               {k: v for k, v in rb.items() if k not in ("time", "images_per_s")}
    sa = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    sb = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # momentum encoder, queue too
    if method in ("moco", "densecl"):  # the queue moved and is checkpointed
        bank = next(k for k in sa if k.endswith("memory_bank.bank_ptr"))
        assert sa[bank].item() != 0
    assert not any(k.startswith("regressor.") for k in sa) and (full / "backbone.pth").is_file()


def test_resuming_another_objectives_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    saved = keep_every_checkpoint(monkeypatch)
    assert cli.main(run_options(tmp_path, tmp_path / "a", "simclr", **{"run.steps": 2})) == 0
    capsys.readouterr()
    code = cli.main(["pretrain", "--resume", str(saved[0]), "--ssl.method=byol", f"--run.out_dir={tmp_path / 'b'}"])
    assert code == 2 and "ssl.method: the checkpoint" in capsys.readouterr().err


def test_the_export_loads_into_plain_timm_resnet18(tmp_path):
    import timm
    from safetensors.torch import load_file

    from dreamteacher.evaluate import load_backbone

    out = tmp_path / "run"
    assert cli.main(run_options(tmp_path, out, "densecl", **{"model.student": "resnet18", "run.steps": 1})) == 0
    ckpt = out / "checkpoints" / "last.pt"
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "b.safetensors")]) == 0
    state = load_file(str(tmp_path / "b.safetensors"))
    model = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected  # no head, no momentum encoder
    trained = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(model.conv1.weight, trained["student.body.conv1.weight"])
    assert not torch.equal(model.conv1.weight, trained["momentum_student.body.conv1.weight"])
    load_backbone(StudentBackbone("resnet18"), tmp_path / "b.safetensors")  # what `dreamteacher evaluate` reads
    load_backbone(StudentBackbone("resnet18"), out / "backbone.pth")


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("override,message", [
    ("--data.augment=true", "data.augment: ssl.method=simclr pretrains without a teacher"),
    ("--data.cache=/some/cache", "data.cache: ssl.method=simclr pretrains without a teacher"),
    ("--label.interpreter=x.pt", "label.interpreter: ssl.method=simclr"),
    ("--data.share_targets=/tmp/x", "data.share_targets: ssl.method=simclr"),
    ("--ssl.momentum=1", "ssl.momentum: expected a momentum in [0, 1)"),
    ("--ssl.dense_stride=2", "ssl.dense_stride: expected 0 or one of model.reductions"),
])
def test_settings_a_baseline_cannot_use_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["--ssl.method=simclr", override])


def test_without_lightly_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly now fails as if it were not installed
    assert cli.main(run_options(tmp_path, tmp_path / "run", "simclr")) == 2
    err = capsys.readouterr().err
    assert "ssl.method: the self-supervised baselines need the lightly package" in err
    assert "dtkernels[baselines]" in err and "--no-deps lightly==1.6.0" in err and "Traceback" not in err
