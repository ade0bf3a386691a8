"""The teachers' former single module, kept so ``from dreamteacher.teacher import ...`` still works.

The code lives in :mod:`dreamteacher.teachers`, one module per family (``taps``, ``diffusion``, ``adm``,
``generator``); import from there. Patch functions where they are defined (``dreamteacher.teachers.diffusion``):
a patch of this module's names does not reach the code that calls them.
"""

from __future__ import annotations

from .teachers import *  # noqa: F403 -- the public names, re-exported
from .teachers import __all__  # noqa: F401
from .teachers.diffusion import _load_embedding  # noqa: F401 -- used by tests and scripts of the single-module era
from .teachers.taps import _first_tensor, _StopForward  # noqa: F401
