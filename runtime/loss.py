"""`colaflow.loss`: the name scripts written before the package layout use; the code is `colaflow.engine.loss`.
Both names are the one module object, so a patch through either is seen through both."""
import sys

from .engine import loss

sys.modules[__name__] = loss
