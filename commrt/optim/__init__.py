# DeMo, FlexDeMo, EDiT, A-EDiT and the 2-D hybrid mesh (issue 7)
from .acco import ACCO, DPU, ZeRO1  # noqa: F401
from .cdp import CDP  # noqa: F401
from .demo import DeMo  # noqa: F401,E402
from .edit import AEDiT, EDiT  # noqa: F401,E402
from .flexdemo import FlexDeMo  # noqa: F401,E402
from .mesh import HybridMesh  # noqa: F401,E402
