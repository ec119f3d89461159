"""Triton implementations of the attention and selection kernels (CUDA; CPU under ``TRITON_INTERPRET=1``).

Importing this package imports ``triton``; without it the import raises ``ImportError``, which the
dispatcher in :mod:`spotattn.kernels` turns into one loud warning and the reference path.
"""

import triton  # noqa: F401  (fail early and with ImportError when triton is absent)
