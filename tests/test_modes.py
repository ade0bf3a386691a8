"""The named modes (dtkernels/modes.py) and their one mapping to integers, shared by Python, Triton and C++."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dtkernels
from dtkernels.modes import AtMode, Reduction, Whitening

ROOT = Path(__file__).resolve().parents[1]
MODES = (Whitening, AtMode, Reduction)


def _cpp_enum(name: str) -> dict[str, int]:
    """``{member: value}`` of ``enum class <name>`` in csrc/utils.h, with kCamelCase names as UPPER_SNAKE."""
    text = (ROOT / "csrc" / "utils.h").read_text()
    m = re.search(rf"enum class {name}\s*:\s*int64_t\s*\{{([^}}]*)\}}", text)
    assert m, f"csrc/utils.h has no `enum class {name} : int64_t {{...}}`"
    out = {}
    for item in m.group(1).split(","):
        key, value = (p.strip() for p in item.split("="))
        out[re.sub(r"(?<!^)(?=[A-Z])", "_", key.removeprefix("k")).upper()] = int(value)
    return out


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
def test_cpp_enum_matches_python(mode):
    assert _cpp_enum(mode.__name__) == {m.name: int(m) for m in mode}


def _code_lines(paths, comment: str):
    for path in paths:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split(comment, 1)[0]
            yield f"{path.relative_to(ROOT)}:{i}: {line.strip()}", code


# A mode variable compared with (or selected by) a bare number, e.g. `whiten == 1`, `P.at_mode != 0`,
# `REDUCTION == 2`. Names: the op arguments, their C++ locals and the Triton constexprs.
_MODE_NAMES = r"(?:whiten|at_mode|reduction|WHITEN|AT_MODE|REDUCTION|wh|at_m|red)"
_BARE = re.compile(rf"(?:\b{_MODE_NAMES}\s*[!=<>]=?\s*\d|\b\d\s*[!=<>]=?\s*(?:[\w.]*\.)?{_MODE_NAMES}\b)")


def test_no_bare_mode_literals_in_cpp():
    bad = [where for where, code in _code_lines(sorted((ROOT / "csrc").glob("*.cpp")), "//") if _BARE.search(code)]
    assert not bad, "compare the enum class members (csrc/utils.h), not integers:\n" + "\n".join(bad)


def test_no_bare_mode_literals_in_python_and_triton():
    files = [p for p in sorted((ROOT / "dtkernels").rglob("*.py")) if p.name != "modes.py"]
    bad = [where for where, code in _code_lines(files, "#") if _BARE.search(code)]
    # Tables that give a mode name a number (the job of modes.py), e.g. {"channel": 1} or {0: "paper"}.
    table = re.compile(r"""(?:["'](?:channel|sample|paper|mean_sq|none|mean|sum)["']|None)\s*:\s*\d\b"""
                       r"""|\b\d\s*:\s*(?:["'](?:channel|sample|paper|mean_sq|none|mean|sum)["']|None)""")
    tests = sorted(p for pattern in ("test_feat_loss*.py", "test_soft_ce*.py", "test_q_sample*.py")
                   for p in (ROOT / "tests").glob(pattern))
    bad += [where for where, code in _code_lines(files + tests, "#") if table.search(code)]
    assert not bad, "use dtkernels.modes members, not integers:\n" + "\n".join(bad)


def test_the_checks_above_can_fail():
    assert _BARE.search("if (P.whiten == 1) {") and _BARE.search("    if REDUCTION == 0:")
    assert _BARE.search("atv[l] = at_mode == 0 ? a : b;") and not _BARE.search("P.whiten == Whitening::kSample")


def test_from_arg_names_the_argument():
    assert Whitening.from_arg(None) is Whitening.NONE and Whitening.from_arg("sample") is Whitening.SAMPLE
    assert AtMode.from_arg("mean_sq") is AtMode.MEAN_SQ and Reduction.from_arg("none") is Reduction.NONE
    assert Whitening.args() == (None, "channel", "sample") and Reduction.args() == ("none", "mean", "sum")
    with pytest.raises(ValueError, match="whiten: expected one of 'channel', 'sample' or None, got 'none'"):
        Whitening.from_arg("none")
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum' or 'none', got None"):
        Reduction.from_arg(None)
    with pytest.raises(ValueError, match="at_mode"):
        AtMode.from_arg(0)  # the integer is the op's business, not the public API's


def test_triton_constants_come_from_the_enums():
    pytest.importorskip("triton")
    from dtkernels.triton import feat_loss as fl
    from dtkernels.triton import soft_ce as sc

    assert [fl.WHITEN_NONE.value, fl.WHITEN_CHANNEL.value, fl.WHITEN_SAMPLE.value] == [int(w) for w in Whitening]
    assert [fl.AT_PAPER.value, fl.AT_MEAN_SQ.value] == [int(m) for m in AtMode]
    assert [sc.RED_NONE.value, sc.RED_MEAN.value, sc.RED_SUM.value] == [int(r) for r in Reduction]


def test_cpp_rejects_an_unknown_mode_naming_it():
    if not dtkernels.backends()["cpp"]["available"]:
        pytest.skip("the C++ library is not built")  # test_feat_loss.py fails loudly when it should be
    s = [torch.randn(1, 2, 3, 3)]
    with pytest.raises(RuntimeError, match="whiten must be a Whitening"):
        torch.ops.dtkernels.feat_loss(s, s, [1.0], 1.0, 1.0, 2.0, int(AtMode.PAPER), 3, 1e-5, False)
    with pytest.raises(RuntimeError, match="at_mode must be a AtMode"):
        torch.ops.dtkernels.feat_loss(s, s, [1.0], 1.0, 1.0, 2.0, 2, int(Whitening.NONE), 1e-5, False)
    x = torch.randn(1, 3, 4)
    with pytest.raises(RuntimeError, match="reduction must be a Reduction"):
        torch.ops.dtkernels.soft_ce(x, x, None, 1.0, 1.0, 3, False)
