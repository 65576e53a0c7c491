"""qmatmul: activations times a packed low-bit weight. `reference.py` is the spec."""
