"""Adapters that put the dtkernels ops where distillation code already lives.

* :mod:`dtkernels.integrations.torchdistill`: importing it registers ``FusedATLoss``, ``FusedKDLoss``,
  ``FusedLogitStdKDLoss`` and ``DreamTeacherFeatLoss`` with torchdistill's loss registry, so a YAML config names
  them after ``dependencies: [{name: dtkernels.integrations.torchdistill}]``
  (needs ``pip install 'dtkernels[torchdistill]'``).

Nothing here is imported by ``import dtkernels``: each adapter needs its framework installed, and only its own.
"""
