"""Every numeric-format constant nvq uses, named, with its value and source.

References are to the spec formats.md ("§" below).
"""

# --- E2M1 (FP4) element, §0.1 ------------------------------------------------------------
E2M1_MAX = 6.0  # largest magnitude, code 0x7 / 0xF
E2M1_SIGN_BIT = 0x8  # bit 3 of the nibble
NIBBLE_MASK = 0x0F  # one 4-bit code
NIBBLE_SHIFT = 4  # the second code of a byte sits in bits 7..4

# Magnitudes of codes 0..7; codes 8..15 are the same values negated.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0).
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Midpoints where round-to-nearest-even goes UP: the upper neighbour has the even code
# (0.75 -> code 2, 1.75 -> code 4, 3.5 -> code 6). At the others the lower code is even.
E2M1_RNE_TIES_UP = (0.75, 1.75, 3.5)

# --- FP8 E4M3FN scale, §0.3 ----------------------------------------------------------------
FP8_E4M3_MAX = 448.0  # byte 0x7E
FP8_E4M3_MIN_SUBNORMAL = 2.0**-9  # 0.001953125, byte 0x01

# --- UE4M3 (GGUF NVFP4 sub-block scale), §0.3 / §3.4 ----------------------------------------
UE4M3_BIAS = 7
UE4M3_EXPONENT_MASK = 0xF  # bits 6..3
UE4M3_MANTISSA_MASK = 0x7  # bits 2..0
UE4M3_MAX_BYTE = 0x7E  # 448.0, where gguf-py's encoder saturates
UE4M3_ZERO_ALIAS = 0x7F  # gguf-py decodes this NaN pattern as 0.0
UE4M3_SIGN_MASK = 0x7F  # E4M3 bits -> UE4M3 bits: force the sign bit to 0

# --- E8M0 (MX scale), §0.3 / §2 -------------------------------------------------------------
E8M0_BIAS = 127  # value = 2^(byte - 127)
E8M0_MAX_BYTE = 255  # 0xFF is NaN in OCP MX v1.0
E8M0_NAN_BYTE = 0xFF
E2M1_MAX_EXPONENT = 2  # floor(log2(E2M1_MAX)), the "-2" of §2a step 3 and §2c step 1

# --- NVFP4, §1 and §3 -----------------------------------------------------------------------
NVFP4_BLOCK = 16  # elements per FP8 block scale
NVFP4_GLOBAL_NUMERATOR = 2688.0  # FP8_E4M3_MAX * E2M1_MAX = 448 * 6
CT_ZERO_BLOCK_SCALE = 0.125  # §1.2 step 4: CT's FP8 "eps" for s == 0, byte 0x20
MODELOPT_ZERO_BLOCK_SCALE = 1.0  # §3.2 step 2: ModelOpt's s_b == 0 replacement, byte 0x38
MODELOPT_MIN_BLOCK_SCALE = FP8_E4M3_MIN_SUBNORMAL  # §3.2 step 2: clamp(2^-9, 448)
GLOBAL_SCALE_FALLBACK = 1.0  # §1.2 step 3: nan_to_num(g, nan=1, +-inf=1)

# --- MXFP4, §2 ------------------------------------------------------------------------------
MXFP4_BLOCK = 32  # elements per E8M0 scale

# --- GGUF block layouts (ggml types), §2c and §3.4 ----------------------------------------------
GGUF_MXFP4_BLOCK = (32, 17)  # (elements, bytes): [e8m0][16 bytes of nibbles]
GGUF_NVFP4_BLOCK = (64, 36)  # (elements, bytes): [4 x ue4m3][32 bytes of nibbles]
GGUF_NVFP4_SUB_BLOCKS = 4  # 16-element sub-blocks per 64-element super-block
GGUF_NVFP4_HALF_SUB_BLOCK = 8  # qs[8s+j] = code(16s+j) | code(16s+8+j) << 4
GGUF_MXFP4_HALF_BLOCK = 16  # qs[j] = code(j) | code(j+16) << 4

# --- GPTQ int4, §4 --------------------------------------------------------------------------
INT4_MAXQ = 15  # codes 0..15
INT4_SYM_ZERO = 8  # symmetric zero point: W = s·(q − 8)
GPTQ_DEFAULT_GROUP = 128  # GPTQModel / llm-compressor default group size
GPTQ_V1_ZERO_OFFSET = 1  # v1 files store z − 1 (§4.1): symmetric qzeros words are 0x77777777
GPTQ_PACK = 8  # int4 codes per int32 word
FP16_MIN_SUBNORMAL = 2.0**-24  # smallest positive fp16: floor of a stored int4 scale
