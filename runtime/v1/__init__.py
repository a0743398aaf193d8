"""colaflow.v1: code generated from proto/colaflow/v1 by proto/generate.py. Never edit."""
