"""nvq's dequantization of one compressed-tensors module ({suffix: tensor}) per scheme, the value
compressed-tensors' decompression is compared with."""

from __future__ import annotations

from nvq.formats import e2m1, mxfp4, nvfp4

DEQUANT = {
    "nvfp4": lambda sd, dtype: nvfp4.dequantize(
        nvfp4.NVFP4Quantized(e2m1.unpack_pairs(sd["weight_packed"]), sd["weight_scale"], sd["weight_global_scale"]),
        dtype,
    ),
    "mxfp4": lambda sd, dtype: mxfp4.dequantize(
        mxfp4.MXFP4Quantized(e2m1.unpack_pairs(sd["weight_packed"]), sd["weight_scale"]), dtype
    ),
}


def ct_modules(tensors: dict) -> dict:
    """{module: {suffix: tensor}} of the quantized modules (tensors named `<module>.weight_*`)."""
    modules: dict = {}
    for name, t in tensors.items():
        module, _, local = name.rpartition(".")
        if local.startswith("weight_"):
            modules.setdefault(module, {})[local] = t
    return modules
