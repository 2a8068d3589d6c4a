"""quantpipe: pipeline a vision transformer across edge devices with adaptive boundary quantization.

Implements QuantPipe (Wang et al., 2022): only the activations that cross a stage boundary are
quantized (post-training), clipped with DS-ACIQ, and each stage picks its bitwidth at run time from
the bandwidth it measures.

Importing this package is cheap on purpose: it pulls in nothing heavy. The stage daemon's modules
(``quantpipe.quant``, ``quantpipe.wire``, ``quantpipe.runtime``, ``quantpipe.engines``) need only
numpy, pyzmq, numba and an engine runtime; torch and timm are needed only by ``quantpipe.export``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
