"""``quantpipe serve``: the pipeline as a KServe v2 inference service (what Triton's clients speak).

Modules, one concept each:

* :mod:`~quantpipe.serve.protocol`: KServe v2 tensors, JSON + binary tensor extension, errors.
* :mod:`~quantpipe.serve.model`: the served model: inputs (FP32 / UINT8 pixels / encoded images),
  preprocessing as calibration's, the ``logits`` output and the classification extension.
* :mod:`~quantpipe.serve.batcher`: requests and the bounded queue that dynamic batching cuts.
* :mod:`~quantpipe.serve.bridge`: the ZeroMQ thread: source and sink of the pipeline in one.
* :mod:`~quantpipe.serve.service`: request -> queue -> result or one error within the timeout.
* :mod:`~quantpipe.serve.http_front` (aiohttp), :mod:`~quantpipe.serve.grpc_front` (grpcio).
* :mod:`~quantpipe.serve.observe`: Prometheus metrics, rate-limited access log, bearer token.
* :mod:`~quantpipe.serve.command`: the subcommand and :class:`~quantpipe.serve.command.Server`.

Needs the ``serve`` extra (``pip install 'quantpipe[serve]'``); the stage daemons do not.
"""
