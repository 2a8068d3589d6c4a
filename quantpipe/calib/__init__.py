"""Calibration and evaluation of boundary quantization (no torch, no timm: runs wherever an engine runs).

* :mod:`quantpipe.calib.data`: datasets (ImageNet folder or flat validation layout, any folder,
  synthetic) and timm's eval preprocessing in PIL + numpy.
* :mod:`quantpipe.calib.chain`: the stage engines of an export run in order, and a boundary crossing
  done exactly as the stage daemons do it (one wire frame encoded and decoded with the clip table).
* :mod:`quantpipe.calib.calibrate`: ``quantpipe calibrate``, one streaming pass -> clip table.
* :mod:`quantpipe.calib.evaluate`: ``quantpipe evaluate``, accuracy per method x bitwidth.
* :mod:`quantpipe.calib.report`: the Markdown / CSV / PNG report of an evaluation.

Submodules are imported on demand; nothing is imported here.
"""
