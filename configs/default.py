"""The embedded default (digits as a tiny text-to-image task); see scflow_jax/default_config.py.

Usage: python -m scflow_jax.main --config=configs/default.py[:tiny] --workdir=DIR
"""

from scflow_jax.default_config import get_config  # noqa: F401
