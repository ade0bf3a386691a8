"""Adapters that put the dtkernels ops where distillation code already lives.

* :mod:`dtkernels.integrations.losses`: framework-free ``soft_kl_div`` (KD's KL divergence on ``soft_ce``) and
  ``at_teacher_like`` (a wider AT teacher as a view with the student's shape); the adapters and examples use them.
* :mod:`dtkernels.integrations.torchdistill`: importing it registers ``FusedATLoss``, ``FusedKDLoss``,
  ``FusedLogitStdKDLoss`` and ``DreamTeacherFeatLoss`` with torchdistill's loss registry, so a YAML config names
  them after ``dependencies: [{name: dtkernels.integrations.torchdistill}]``
  (needs ``pip install 'dtkernels[torchdistill]'``).

Nothing here is imported by ``import dtkernels``: each adapter needs its framework installed, and only its own.
"""
