"""CUDA kernel sources (*.cu, *.cuh), shipped as data and built by nvq.ops."""
