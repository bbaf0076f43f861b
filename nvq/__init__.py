"""nvq: quantize Hugging Face checkpoints to NVFP4, MXFP4 and GPTQ-int4 and certify them."""

__version__ = "0.1.0"
