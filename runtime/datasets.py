"""`colaflow.datasets`: the name scripts written before the package layout use; the code is `colaflow.data.sources`.
Both names are the one module object, so a patch through either is seen through both."""
import sys

from .data import sources

sys.modules[__name__] = sources
