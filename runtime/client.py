"""`colaflow.client`: the name scripts written before the package layout use; the code is `colaflow.wire.client`.
Both names are the one module object, so a patch through either is seen through both."""
import sys

from .wire import client

sys.modules[__name__] = client
