"""Everything a run reads or writes: checkpoints, the teacher/variables format and its conversion
from PyTorch (with the safe unpickler), the offline top-k teacher cache (``teacher_cache``), metric
writers, paths. Knows no training loop."""
