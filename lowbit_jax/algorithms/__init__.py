"""Quantization algorithms: pure-array cores (`*_core.py`) and thin pytree transforms over them."""
