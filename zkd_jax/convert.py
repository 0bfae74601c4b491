"""Public entry of teacher conversion, kept where users import it (``zkd_jax.convert``).

The functions live in ``zkd_jax.io.torch_weights``; ``run`` is the ``zkd-convert`` command line
(``zkd_jax.cli.convert``).
"""

from zkd_jax.cli.convert import run
from zkd_jax.io.torch_weights import (
    UnsafeCheckpointError,
    from_torch_state_dict,
    infer_num_classes,
    load_torch_checkpoint,
    load_variables,
    save_variables,
    torch_layout,
)

__all__ = [
    "UnsafeCheckpointError", "from_torch_state_dict", "infer_num_classes", "load_torch_checkpoint",
    "load_variables", "run", "save_variables", "torch_layout",
]
