import os
import sys
from pathlib import Path

# Triton kernels run in interpreter mode on CPU-only machines (set before triton imports).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
