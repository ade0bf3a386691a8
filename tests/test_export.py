"""Backbone export: timm's own names, strict loads into plain timm with the student's features bitwise, the head-ful
form's count, refusals (an export that would not load, plain ViTs), and loading exports back for evaluation."""

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamteacher import cli
from dreamteacher import student as student_module
from dreamteacher.config import PretrainConfig, config_to_dict
from dreamteacher.evaluate import load_backbone
from dreamteacher.export import export_backbone
from dreamteacher.student import StudentBackbone

#: One small model per family: a features_only FeatureListNet without renaming (resnet18, regnetx_002, resnest14d),
#: with renaming (convnext, stem.0 -> stem_0), and timm's own features classes (EfficientNetFeatures,
#: MobileNetV3Features); several drop layers after the last level (head norm, conv_head / bn2).
FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_050", "resnest14d",
            "convnextv2_atto"]
SIZE = 64


def randomise(student: StudentBackbone, seed: int) -> StudentBackbone:
    """Perturb every weight and buffer (BN statistics included), so that a tensor loaded from the wrong place or
    left at its initialisation changes the features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in student.body.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return student


def write_checkpoint(path, student: StudentBackbone):
    """A pretraining checkpoint as ``pretrain`` writes it (student and regressor weights, the config)."""
    cfg = PretrainConfig()
    cfg.model.student = student.name
    cfg.model.reductions = list(student.reductions)
    model = {f"student.{k}": v for k, v in student.state_dict().items()}
    model["regressor.proj.weight"] = torch.zeros(3, 3)  # not part of the export
    torch.save({"model": model, "config": config_to_dict(cfg), "step": 1}, path)
    return path


def student_features(student: StudentBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    student.eval()
    with torch.no_grad():
        return student(x)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_strictly_into_plain_timm_with_the_students_features(name, tmp_path):
    student = randomise(StudentBackbone(name), seed=len(name))
    path = export_backbone(write_checkpoint(tmp_path / "last.pt", student), tmp_path / "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == name and json.loads(meta["reductions"]) == [4, 8, 16, 32]
    indices = json.loads(meta["out_indices"])
    assert indices == list(student.out_indices)

    # the documented recipe, written out
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        theirs = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    ours = student_features(student, x)
    assert len(theirs) == len(ours) == 4
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.equal(a, b)

    # and back into a student for evaluation
    again = load_backbone(StudentBackbone(name), path)
    for a, b in zip(ours, student_features(again, x)):
        assert torch.equal(a, b)


def test_cli_export_default_safetensors_and_pth_print_a_recipe_that_runs(tmp_path, capsys):
    name = "convnext_atto"
    student = randomise(StudentBackbone(name), seed=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = write_checkpoint(run / "checkpoints" / "last.pt", student)
    assert cli.main(["export", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    default = run / "backbone.safetensors"
    assert default.is_file() and str(default) in printed
    assert "stem_0" not in "".join(load_file(str(default)))
    recipe = [line[4:] for line in printed.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    code = "\n".join(recipe[:recipe.index(next(r for r in recipe if r.startswith("feats = "))) + 1])
    x = torch.randn(1, 3, SIZE, SIZE)
    scope = {"x": x}
    exec(code, scope)  # the printed strict recipe, as a user would paste it
    scope["model"].eval()
    with torch.no_grad():
        theirs = scope["model"].forward_intermediates(x, indices=list(student.out_indices), intermediates_only=True)
    for a, b in zip(student_features(student, x), theirs):
        assert torch.equal(a, b)

    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "b.pth")]) == 0
    sd = torch.load(tmp_path / "b.pth", weights_only=True)
    assert type(sd) is dict and all(type(v) is torch.Tensor for v in sd.values())
    ref = load_file(str(default))
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)

    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "b.bin")]) == 2
    assert "out: expected a file name ending in .safetensors or .pth or .pt" in capsys.readouterr().err
    assert not (tmp_path / "b.bin").exists()


def test_headful_form_loads_every_tensor_and_reports_the_count(tmp_path, capsys):
    name = "convnext_atto"
    student = randomise(StudentBackbone(name), seed=4)
    ckpt = write_checkpoint(tmp_path / "last.pt", student)
    details: dict = {}
    path = export_backbone(ckpt, tmp_path / "b.safetensors", details=details)
    sd = load_file(str(path))
    headful = timm.create_model(name, pretrained=False, num_classes=7)
    missing, unexpected = headful.load_state_dict(sd, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(set(headful.state_dict()) - set(sd))
    assert {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"} == set(missing)
    default = timm.create_model(name, pretrained=False)
    assert details["tensors"] == details["headful_loaded"] == len(sd)
    assert details["headful_total"] == len(default.state_dict())
    assert sorted(details["headful_missing"]) == sorted(missing)
    for k, v in sd.items():
        assert torch.equal(headful.state_dict()[k], v), k
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "c.safetensors")]) == 0
    assert f"loads all {len(sd)} tensors (default head: {len(sd)} of {len(default.state_dict())})" \
        in capsys.readouterr().out


def test_an_export_that_would_not_load_is_refused_and_not_written(tmp_path, monkeypatch, capsys):
    student = randomise(StudentBackbone("convnext_atto"), seed=5)
    ckpt = write_checkpoint(tmp_path / "last.pt", student)
    # the defect of issue 15: features_only names, which plain timm loads 0 of with strict=False
    monkeypatch.setattr(StudentBackbone, "export_state_dict", lambda self: dict(self.body.state_dict()))
    out = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"export: timm.create_model\('convnext_atto'\).load_state_dict\(sd, "
                                         r"strict=False\) would load only 0 of the 124 backbone tensors"):
        export_backbone(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".bad*"))
    assert cli.main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "nothing written" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()

    # fewer than all tensors: every key present loads, but the last stage is missing
    sd = {k: v for k, v in student.export_state_dict().items() if not k.startswith("stages.3.")}
    with pytest.raises(ValueError, match=r"does not load the export strictly: \d+ missing keys \['stages.3.downsample"):
        student.check_export(sd, check_features=False)
    # a tensor loaded from the wrong place: the features differ
    sd = student.export_state_dict()
    sd["stages.0.blocks.0.conv_dw.weight"] = sd["stages.0.blocks.0.conv_dw.weight"] + 1
    with pytest.raises(ValueError, match=r"computes other features than the student"):
        student.check_export(sd)


def test_plain_vit_student_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"student: 'vit_tiny_patch16_224' is a plain ViT-style model, its "
                                         r"features_only levels are all at stride 16; plain ViTs \(one stride\) are "
                                         r"not supported"):
        StudentBackbone("vit_tiny_patch16_224", img_size=32, depth=4)


def test_load_backbone_is_strict_and_reads_checkpoints_and_features_only_names(tmp_path):
    student = randomise(StudentBackbone("convnext_atto"), seed=6)
    ckpt = write_checkpoint(tmp_path / "last.pt", student)
    x = torch.randn(1, 3, SIZE, SIZE)
    ref = student_features(student, x)
    # a pretraining checkpoint (features_only names) and an old export in features_only names
    old = tmp_path / "old.pth"
    torch.save(dict(student.body.state_dict()), old)
    for path in (ckpt, old):
        for a, b in zip(ref, student_features(load_backbone(StudentBackbone("convnext_atto"), path), x)):
            assert torch.equal(a, b)

    sd = student.export_state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("stages.3.")}, partial)
    with pytest.raises(ValueError, match=r"partial.pth does not match timm 'convnext_atto': \d+ missing keys "
                                         r"\['stages.3.blocks.0"):
        load_backbone(StudentBackbone("convnext_atto"), partial)
    extra = tmp_path / "extra.pth"
    torch.save({**sd, "head.fc.weight": torch.zeros(3, 320), "decoder.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match=r"0 missing keys \[\], 1 unexpected keys \['decoder.weight'\]"):
        load_backbone(StudentBackbone("convnext_atto"), extra)
    headful = tmp_path / "headful.pth"  # the head of a classification checkpoint is ignored
    torch.save({**sd, "head.fc.weight": torch.zeros(3, 320), "head.norm.weight": torch.ones(320)}, headful)
    load_backbone(StudentBackbone("convnext_atto"), headful)

    exported = export_backbone(ckpt, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"b.safetensors is an export of timm 'convnext_atto', not 'resnet18'"):
        load_backbone(StudentBackbone("resnet18"), exported)
    with pytest.raises(ValueError, match=r"does not match timm 'resnet18': 120 missing keys"):
        load_backbone(StudentBackbone("resnet18"), tmp_path / "extra.pth")


def test_mapping_and_checks_leave_the_global_rng_alone(monkeypatch):
    """Evaluation seeds each run before building its model and loading the backbone: loading must not draw."""
    student = StudentBackbone("regnetx_002")
    monkeypatch.setattr(student_module, "_KEY_MAPS", {})  # build the map here, not from an earlier test's cache
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    student.check_export(student.export_state_dict())
    assert torch.equal(torch.rand(4), want)
