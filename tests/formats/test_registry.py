"""The nvq.formats table: block sizes, storage cost, and lookup errors."""

import pytest
import torch

from nvq.formats import FORMATS, get_format, mxfp4, nvfp4


def test_table_lists_nvfp4_and_mxfp4_with_their_modules():
    assert set(FORMATS) == {"nvfp4", "mxfp4"}
    assert FORMATS["nvfp4"].module is nvfp4 and FORMATS["mxfp4"].module is mxfp4
    assert (FORMATS["nvfp4"].block_size, FORMATS["mxfp4"].block_size) == (16, 32)


def test_bits_per_weight():
    assert FORMATS["nvfp4"].bits_per_weight == 4.5  # 4 + 8/16, global scale excluded
    assert FORMATS["mxfp4"].bits_per_weight == 4.25  # 4 + 8/32


def test_tensor_bits_include_the_global_scale():
    assert FORMATS["nvfp4"].tensor_bits(4096) == 4096 * 4 + 256 * 8 + 32
    assert FORMATS["mxfp4"].tensor_bits(4096) == 4096 * 4 + 128 * 8


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_module_round_trips_through_quantize_and_dequantize(name):
    info = get_format(name)
    w = torch.randn(3, 4 * info.block_size, generator=torch.Generator().manual_seed(0))
    out = info.module.dequantize(info.module.quantize(w), torch.float32)
    assert out.shape == w.shape and torch.isfinite(out).all()


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown format 'int4'; known formats: nvfp4, mxfp4"):
        get_format("int4")
