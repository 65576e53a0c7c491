"""jaxpr passes (installed as ``lowbit_jax.passes``): interpreter, weight-origin analysis, capture, rewrite.

Populated by the jaxpr-passes issue; this package exists so the install mapping is in place from the start.
"""
