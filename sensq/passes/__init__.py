"""Graph passes that change a built QDQ model after onnxruntime's quantizer wrote it, one module each behind one
function, each a field of the plan (PrecisionPlan) so that the same plan always builds the same model; and one that
changes the float model before calibration (equalization.py, a config option: the statistics follow it)."""
