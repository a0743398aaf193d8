"""`colaflow.plot`: the name scripts written before the package layout use; the code is `colaflow.studies.plot`.
Both names are the one module object, so a patch through either is seen through both."""
import sys

from .studies import plot

sys.modules[__name__] = plot
