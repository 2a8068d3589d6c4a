"""Cut a timm ViT into pipeline stages, export each to ONNX, verify against torch, build engines.

Modules: :mod:`~quantpipe.export.model` (create the model and load weights), :mod:`~quantpipe.export.split`
(the cut), :mod:`~quantpipe.export.onnx_export` (one stage -> one graph), :mod:`~quantpipe.export.data`
(verification inputs), :mod:`~quantpipe.export.verify` (checker and comparisons) and
:mod:`~quantpipe.export.command` (``quantpipe export``). They import torch, timm and onnx, so nothing
outside this package imports them.
"""
