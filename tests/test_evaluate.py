"""Downstream evaluation: metrics against hand-computed values, data pairing, backbone loading, a tiny run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamteacher import cli
from dreamteacher.data import ProceduralShapes
from dreamteacher.evaluate import (
    SegmentationFolder,
    SegmentationModel,
    confusion_matrix,
    evaluate_backbones,
    finetune,
    iou_from_confusion,
    load_backbone,
    load_segmentation_model,
    markdown_table,
    write_results,
)
from dreamteacher.student import StudentBackbone

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]



def test_miou_matches_a_hand_computed_confusion_matrix():
    # 4 classes; class 3 appears in neither truth nor prediction; one pixel is ignored (255).
    truth = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 3]])  # the ignored pixel's prediction (3) must not count
    cm = confusion_matrix(pred, truth, 4, ignore_index=255)
    want = torch.tensor([[1, 1, 0, 0],   # truth 0: predicted 0, 1
                         [0, 2, 1, 0],   # truth 1: predicted 1, 1, 2
                         [1, 0, 1, 0],   # truth 2: predicted 2, 0
                         [0, 0, 0, 0]])
    assert torch.equal(cm, want)
    iou, miou = iou_from_confusion(cm)
    # class 0: TP 1, FP 1 (truth 2 -> 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 1, FP 1, FN 1
    assert iou[:3] == pytest.approx([1 / 3, 2 / 4, 1 / 3]) and math.isnan(iou[3])
    assert miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"target: class ids must be in \[0, 3\)"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 2]), 3)
    with pytest.raises(ValueError, match="pred: expected the shape of target"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3)


def _write_pair(images, masks, name, size, rng):
    img = (rng.uniform(0, 255, (size[1], size[0], 3))).astype(np.uint8)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[: size[1] // 2] = 3
    mask[size[1] // 2:, : size[0] // 3] = 255
    (images / name).parent.mkdir(parents=True, exist_ok=True)
    (masks / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(images / f"{name}.jpg")
    Image.fromarray(mask, mode="L").save(masks / f"{name}.png")


def test_segmentation_folder_pairs_and_resizes_masks_with_nearest(tmp_path):
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    _write_pair(images, masks, "a", (48, 40), rng)
    _write_pair(images, masks, "sub/b", (40, 40), rng)
    ds = SegmentationFolder(images, masks, 20)
    assert len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y.shape == (20, 20) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {0, 3, 255}  # nearest: no blended class ids
    (images / "c.png").write_bytes((images / "a.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"masks: no mask c.png .* for image"):
        SegmentationFolder(images, masks, 20)


def test_load_backbone_accepts_an_export_and_rejects_another_model(tmp_path):
    torch.manual_seed(0)
    source = StudentBackbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({**source.backbone_state_dict(), "fc.weight": torch.zeros(2, 512)}, path)  # a head is allowed
    target = load_backbone(StudentBackbone("resnet18"), path)
    for k, v in source.body.state_dict().items():
        assert torch.equal(v, target.body.state_dict()[k]), k
    other = tmp_path / "r34.pth"
    torch.save(StudentBackbone("resnet34").backbone_state_dict(), other)
    with pytest.raises(ValueError, match=r"backbone: .*r34.pth does not match timm 'resnet18': 0 missing keys .* "
                                         r"unexpected keys \['layer1.2"):
        load_backbone(StudentBackbone("resnet18"), other)
    with pytest.raises(FileNotFoundError, match="backbone: .*nope.pth: no such file"):
        load_backbone(StudentBackbone("resnet18"), tmp_path / "nope.pth")


def test_finetune_reduces_the_training_loss_on_a_fixed_batch():
    ds = ProceduralShapes(4, 32, seed=5)
    images = torch.stack([ds[i][0] for i in range(4)])
    masks = torch.stack([ds[i][1] for i in range(4)])
    torch.manual_seed(0)
    losses = finetune(SegmentationModel("resnet18", 6, width=16), images, masks, steps=25, batch_size=4, lr=3e-3)
    assert all(map(math.isfinite, losses)) and sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def test_evaluate_backbones_writes_json_and_markdown(tmp_path):
    torch.manual_seed(1)
    exported = tmp_path / "pre.pth"
    torch.save(StudentBackbone("resnet18").backbone_state_dict(), exported)
    train, test = ProceduralShapes(64, 32, seed=1), ProceduralShapes(6, 32, seed=2)
    results = evaluate_backbones({"scratch": None, "pre": exported}, train, test, budgets=[3], seeds=[0, 1],
                                 steps=2, batch_size=2, width=8, class_names=[f"c{k}" for k in range(6)],
                                 save_models=tmp_path / "models", progress=False)
    assert [(r["backbone"], r["seed"]) for r in results["runs"]] == [("scratch", 0), ("scratch", 1), ("pre", 0),
                                                                      ("pre", 1)]
    for run in results["runs"]:
        assert 0.0 <= run["miou"] <= 1.0 and len(run["iou"]) == 6 and run["seconds"] > 0
    summary = {s["backbone"]: s for s in results["summary"]}
    mious = [r["miou"] for r in results["runs"] if r["backbone"] == "pre"]
    assert summary["pre"]["miou_mean"] == pytest.approx(sum(mious) / 2)
    assert summary["pre"]["miou_std"] == pytest.approx(abs(mious[0] - mious[1]) / math.sqrt(2))
    json_path, md_path = write_results(results, tmp_path / "out")
    data = json.loads(json_path.read_text())  # strict JSON: NaN IoUs are null
    assert len(data["runs"]) == 4 and data["config"]["budgets"] == [3]
    md = md_path.read_text()
    assert md == markdown_table(results) and "| scratch |" in md and "| pre |" in md and "3 labels" in md
    model = load_segmentation_model(results["runs"][0]["model"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6, 32, 32) and not model.training


def test_evaluate_cli_runs_and_rejects_bad_arguments(tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--backbone", "scratch", "--labels", "2", "--seeds", "0", "--image-size", "32",
                     "--n-test", "4", "--steps", "1", "--batch-size", "2", "--width", "8", "--out", str(out),
                     "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| scratch |" in printed and str(out / "results.json") in printed
    assert (out / "results.md").is_file()
    assert cli.main(["evaluate", "--backbone", "x=/no/such/file.pth", "--out", str(out), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["evaluate", "--backbone", "scratch", "--train-images", str(tmp_path), "--out", str(out)]) == 2
    assert "--train-masks" in capsys.readouterr().err


def test_validation_split_is_disjoint_from_label_budgets_and_the_test_split():
    """Choices are made on the validation split: it shares no image with any label budget (any seed, up to the
    whole usable pool) nor with the test split."""
    from dreamteacher.data import LABELLED_POOL_SIZE, VALIDATION_SIZE, labelled_indices, validation_indices
    from dreamteacher.evaluate import builtin_splits, builtin_validation_split

    val = set(validation_indices())
    assert len(val) == VALIDATION_SIZE and max(val) == LABELLED_POOL_SIZE - 1
    for seed in range(5):
        assert not val & set(labelled_indices(LABELLED_POOL_SIZE - VALIDATION_SIZE, seed))
    train, test = builtin_splits(16, n_test=64)
    val_set = builtin_validation_split(16)
    assert len(train) == LABELLED_POOL_SIZE - VALIDATION_SIZE and len(val_set) == VALIDATION_SIZE
    # the budgets index into `train`, whose images are the pool's first images: none is a validation image
    assert train.indices[-1] < min(val)
    test_images = {bytes(test[i][0].numpy().tobytes()) for i in range(len(test))}
    val_images = {bytes(val_set[i][0].numpy().tobytes()) for i in range(64)}
    train_images = {bytes(train[i][0].numpy().tobytes()) for i in labelled_indices(32, 0, len(train))}
    assert not test_images & val_images and not test_images & train_images and not val_images & train_images


def test_probe_trains_only_the_head_and_matches_finetune_draws():
    """The frozen-backbone probe leaves every backbone weight and BN statistic as it was, and trains the head."""
    from dreamteacher.evaluate import SegmentationModel, finetune

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 3, (4, 32, 32))
    model = SegmentationModel("resnet18", 3, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = finetune(model, x, y, steps=3, batch_size=2, lr=1e-2, protocol="probe")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("backbone."):
            assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in before.items() if not k.startswith("backbone."))
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for whoever uses the model next
    with pytest.raises(ValueError, match="protocol"):
        finetune(model, x, y, steps=1, protocol="linear")


def test_foreground_miou_leaves_out_the_background_and_empty_classes():
    from dreamteacher.evaluate import foreground_miou

    assert foreground_miou([0.9, 0.2, math.nan, 0.4]) == pytest.approx(0.3)
    assert foreground_miou([0.9, 0.2, 0.4], background_index=None) == pytest.approx(0.5)
    assert math.isnan(foreground_miou([0.9, math.nan]))


def test_parallel_groups_give_the_runs_of_one_process(tmp_path, monkeypatch):
    """workers=2 runs the (protocol, backbone, budget) groups in two spawned processes of one thread each: the same
    runs, in the same order, with the same numbers as one process on one thread (this module's fixture), the grid's
    choice and the saved models included."""
    train, test = ProceduralShapes(64, 32, seed=1), ProceduralShapes(6, 32, seed=2)
    val = ProceduralShapes(6, 32, seed=3)
    # one budget: the 2 protocols x 2 backbones are 4 groups for 2 workers (a second budget only doubled the work)
    # timm's test_resnet: what is compared is the scheduling, which any backbone shows
    kwargs = dict(budgets=[3], seeds=[0, 1], steps=3, batch_size=2, width=8, lr=[1e-3, 3e-3], val_set=val,
                  student="test_resnet", protocols=["finetune", "probe"], progress=False, save_seeds=[0])
    one = evaluate_backbones({"scratch": None, "other": None}, train, test, save_models=tmp_path / "a", **kwargs)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two cores' worth, split over two workers
    two = evaluate_backbones({"scratch": None, "other": None}, train, test, save_models=tmp_path / "b", workers=2,
                             **kwargs)
    keys = ("protocol", "backbone", "labels", "seed", "lr", "miou", "val_miou", "final_loss", "iou")
    assert [[r[k] for k in keys] for r in two["runs"]] == [[r[k] for k in keys] for r in one["runs"]]
    assert two["selection"] == one["selection"] and len(one["runs"]) == 2 * 2 * 1 * 2
    saved = [r for r in two["runs"] if "model" in r]
    assert len(saved) == 4 and all(Path(r["model"]).is_file() for r in saved)
    with pytest.raises(ValueError, match="workers"):
        evaluate_backbones({"scratch": None}, train, test, budgets=[3], seeds=[0], workers=0)


def test_probe_runs_share_the_frozen_backbones_test_maps_and_give_the_same_numbers(tmp_path, monkeypatch):
    """A probe group computes its frozen backbone's maps of the test and validation images once per backbone weights
    (once for a pretrained backbone, once per seed for scratch) and every run's numbers are bit for bit those of
    running the whole model on the images, as before; fine-tuning (the backbone trains) never reuses them."""
    import dreamteacher.evaluate as ev

    torch.manual_seed(3)
    path = tmp_path / "pre.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in StudentBackbone("resnet18").backbone_state_dict().items()}, str(path))
    train, test = ProceduralShapes(64, 32, seed=1), ProceduralShapes(70, 32, seed=2)  # 70: two test batches
    val = ProceduralShapes(6, 32, seed=3)
    kwargs = dict(budgets=[5], seeds=[0, 1], steps=3, batch_size=2, width=8, lr=[1e-3, 3e-3], val_set=val,
                  protocols=["probe", "finetune"], progress=False)
    calls = []
    real = ev.backbone_batches
    monkeypatch.setattr(ev, "backbone_batches", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    shared = evaluate_backbones({"scratch": None, "pretrained": str(path)}, train, test, **kwargs)
    # probe: pretrained once (test + val), scratch once per seed (2 x (test + val)); finetune: never
    assert sorted(calls) == sorted([70, 6] * 3)
    monkeypatch.setattr(ev, "backbone_batches", lambda *a, **k: None)  # every run through the whole model
    alone = evaluate_backbones({"scratch": None, "pretrained": str(path)}, train, test, **kwargs)
    keys = ("protocol", "backbone", "labels", "seed", "lr", "miou", "val_miou", "final_loss", "iou")
    assert [[r[k] for k in keys] for r in shared["runs"]] == [[r[k] for k in keys] for r in alone["runs"]]
    assert len(shared["runs"]) == 2 * 2 * 2  # protocols x backbones x seeds (the grid's other value not kept)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_processes_do_not_outlive_a_killed_parent(tmp_path):
    """A demo killed outright (SIGKILL, no chance to shut its pool down) takes its worker processes with it."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from unittest import mock
        import torch
        from dreamteacher.evaluate import parallel_map, worker_pool

        def job(seconds):
            return os.getpid() if seconds == 0 else time.sleep(seconds)

        if __name__ == "__main__":
            with mock.patch.object(torch, "get_num_threads", lambda: 2), worker_pool(2):
                pids = set(parallel_map(job, [(0,), (0,), (0,), (0,)], 2))
                print(" ".join(map(str, sorted(pids))), flush=True)
                parallel_map(job, [(600,), (600,)], 2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), pids
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_diverged_run_gets_no_score_is_never_chosen_and_is_counted(tmp_path):
    """A learning rate that makes fine-tuning diverge leaves NaN weights that still predict (the argmax of NaN
    logits): that run gets no score, is never chosen by the grid, is not saved, and the table says how many seeds
    diverged instead of averaging fewer silently."""
    train, test = ProceduralShapes(64, 32, seed=1), ProceduralShapes(6, 32, seed=2)
    val = ProceduralShapes(6, 32, seed=3)
    kwargs = dict(budgets=[3], seeds=[0, 1], steps=3, batch_size=2, width=8, val_set=val, protocols=["probe"],
                  progress=False, save_models=tmp_path / "models")
    results = evaluate_backbones({"scratch": None}, train, test, lr=[1e30, 1e-3], **kwargs)
    trial = results["runs"]
    assert results["selection"][0]["lr"] == 1e-3 and math.isnan(results["selection"][0]["val_miou"]["1e+30"])
    assert all(r["lr"] == 1e-3 and not r.get("diverged") for r in trial)
    results = evaluate_backbones({"scratch": None}, train, test, lr=[1e30], **kwargs)
    assert all(r["diverged"] and math.isnan(r["miou"]) and "model" not in r for r in results["runs"])
    summary = results["summary"][0]
    assert summary["n_diverged"] == 2 and math.isnan(summary["miou_mean"])
    assert "– (2/2 seeds diverged)" in markdown_table(results)
    json_text = (write_results(results, tmp_path / "out")[0]).read_text()
    assert json.loads(json_text, parse_constant=lambda c: pytest.fail(c))["runs"][0]["miou"] is None
