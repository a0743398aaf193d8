"""`colaflow.evaluate`: the name scripts written before the package layout use; the code is `colaflow.engine.evaluate`.
Both names are the one module object, so a patch through either is seen through both."""
import sys

from .engine import evaluate

sys.modules[__name__] = evaluate
