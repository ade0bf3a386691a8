"""Train a torchdistill distillation box from ``at_kd_fused.yaml``: its losses run on dtkernels.

The YAML is torchdistill's attention-transfer sample at a tiny size; its ``dependencies`` line imports
``dtkernels.integrations.torchdistill``, which registers ``FusedATLoss`` / ``FusedKDLoss`` with torchdistill. With
``--torchdistill-losses`` the same config runs torchdistill's own ``ATLoss`` / ``KDLoss`` instead, for comparison.

Run: ``python examples/torchdistill/train_tiny.py [--steps 4] [--at-mode paper] [--torchdistill-losses]``
(needs ``pip install 'dtkernels[torchdistill]'``). ``tests/test_integrations_torchdistill_run.py`` and
``benchmarks/bench_torchdistill.py`` use the functions below.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies
from torchdistill.core.distillation import DistillationBox, get_distillation_box

CONFIG = Path(__file__).with_name("at_kd_fused.yaml")
#: The fused losses and the torchdistill losses they replace, as the config names them.
FUSED_TO_TORCHDISTILL = {"FusedATLoss": "ATLoss", "FusedKDLoss": "KDLoss"}


def load_config(path: str | Path = CONFIG, *, fused: bool = True, at_mode: str | None = None,
                seed: int = 0) -> dict:
    """Load the YAML as torchdistill does (its constructors, then ``import_dependencies``).

    Args:
        path: the config file.
        fused: keep the fused losses; False swaps in torchdistill's ``ATLoss`` / ``KDLoss`` (same kwargs).
        at_mode: replace the AT loss's ``mode`` (``'code'`` or ``'paper'``).
        seed: ``torch.manual_seed`` before loading: the ``!import_call`` models are initialised while it loads,
            so two loads with one seed hold the same weights.
    """
    text = Path(path).read_text()
    if not fused:
        for ours, theirs in FUSED_TO_TORCHDISTILL.items():
            text = text.replace(f"key: '{ours}'", f"key: '{theirs}'")
    if at_mode is not None:
        text = text.replace("mode: 'code'", f"mode: '{at_mode}'")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:  # load_yaml_file reads a path
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(text)
        config = yaml_util.load_yaml_file(str(config_file))
    import_dependencies(config.get("dependencies"))
    return config


def build_box(config: dict) -> DistillationBox:
    """torchdistill's distillation box on the CPU, single process (as its example script builds it)."""
    models = config["models"]
    return get_distillation_box(models["teacher_model"], models["student_model"], config["datasets"],
                                config["train"], torch.device("cpu"), None, False, 1)


def train_steps(box: DistillationBox, steps: int, *, seed: int = 0) -> list[float]:
    """``steps`` optimizer steps of torchdistill's own loop body; the loss of each step."""
    box.pre_epoch_process(epoch=0)
    torch.manual_seed(seed)  # the RandomSampler draws its order from the default generator
    losses: list[float] = []
    while len(losses) < steps:
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--at-mode", choices=["code", "paper"], default=None)
    parser.add_argument("--torchdistill-losses", action="store_true", help="run ATLoss / KDLoss instead")
    args = parser.parse_args(argv)
    box = build_box(load_config(args.config, fused=not args.torchdistill_losses, at_mode=args.at_mode))
    print(box.criterion)
    losses = train_steps(box, args.steps)
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: loss {loss:.6f}")
    return losses


if __name__ == "__main__":
    main()
