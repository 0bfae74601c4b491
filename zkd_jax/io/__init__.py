"""Everything a run reads or writes: checkpoints, the teacher/variables format and its conversion
from PyTorch (with the safe unpickler), metric writers, paths. Knows no training loop."""
