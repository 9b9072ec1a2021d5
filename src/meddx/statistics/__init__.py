"""Statistics for clinical evaluation, independent of models and data: metrics, bootstrap
confidence intervals, calibration, conformal prediction sets, operating points, subgroups and
paired tests (DeLong, McNemar).

Everything here works on arrays of targets and probabilities. The predictor applies the fitted
parts (temperature, thresholds, conformal quantiles) at prediction time, training fits them on
the calibration split, and evaluation reports them with confidence intervals.
"""
