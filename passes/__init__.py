"""jaxpr passes (installed as ``lowbit_jax.passes``): quantization as compiler passes over traced functions.

    calib = calibrate(apply_fn, params, batches)      # statistics of every weight-consuming dot_general
    qapply = quantized(apply_fn)                      # the same function, QArray leaves run through qmatmul
    analyze(apply_fn, params, x).sites                # which leaf feeds which dot, through which views

Modules: `interpreter` (jaxpr evaluation with per-primitive rules and rebuilt control flow), `origin` (leaf
coordinates of views), `qdot` (packed dots and ragged dots), `values` (the special values and their rules),
`capture` (statistics), `rewrite` (`quantized`), `calibration` (public API), `trace` (tracing entry point),
`fold` (which per-channel parameter, e.g. a norm's scale, feeds exactly a group of linears: AWQ/SmoothQuant fold
their scales into it), `segments` + `streamed` (a function cut into blocks, quantized one block at a time on
quantized inputs).
"""
from lowbit_jax.passes.analysis import Analysis, analyze
from lowbit_jax.passes.calibration import Calibration, CalibrationOptions, WeightCalibration, WeightUse, calibrate
from lowbit_jax.passes.capture import ALL_STATS, Stat, Stats, collect
from lowbit_jax.passes.origin import DotSite, Note, Side, SiteKind
from lowbit_jax.passes.fold import FoldTarget, fold, fold_scales, fold_targets, group_target
from lowbit_jax.passes.rewrite import QuantizedFn, RunReport, WeightRun, quantized
from lowbit_jax.passes.values import DequantizedWarning, Impl, SiteRun
from lowbit_jax.passes.streamed import Objective, streamed

__all__ = [
    "calibrate", "Calibration", "WeightCalibration", "analyze", "Analysis", "quantized", "QuantizedFn",
    "Stat", "Stats", "ALL_STATS", "collect", "DotSite", "Note", "Side", "SiteKind", "WeightUse",
    "CalibrationOptions", "RunReport", "WeightRun", "SiteRun", "Impl", "DequantizedWarning",
    "fold_targets", "fold_scales", "fold", "group_target", "FoldTarget", "streamed", "Objective",
]
