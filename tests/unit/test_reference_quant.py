"""Hand-computed cases for the pure-PyTorch NVFP4 / MXFP4 reference (pipeline/quant/reference.py).

Expected values are literal numbers worked out by hand in the comments, never computed by the code
under test. The last tests compare against ModelOpt 0.47's own CPU export quantizers.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.quant.reference import (
    dequantize_mxfp4_export,
    dequantize_nvfp4_export,
    e2m1_codes,
    e2m1_values,
    mxfp4_quantize_dequantize,
    mxfp4_scale_exponents,
    nvfp4_block_scales,
    nvfp4_quantize_dequantize,
    pack_fp4,
    round_to_e2m1,
    unpack_fp4,
)

# global_amax 2688 = 6 * 448 makes the FP32 global scale exactly 1.0, so block scales are
# block_amax / 6 cast to E4M3.
UNIT_GLOBAL_AMAX = 2688.0


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def assert_same(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=0, atol=0)


# ---------------------------------------------------------------- E2M1 rounding


def test_every_grid_value_maps_to_itself_with_sign():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    for ties in ("even", "zero"):
        assert_same(round_to_e2m1(t(grid), ties), grid)
        assert_same(round_to_e2m1(-t(grid), ties), [-v for v in grid])


def test_midpoints_ties_to_even_grid_index():
    midpoints = t([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    # Grid indices 0..7 are 0, .5, 1, 1.5, 2, 3, 4, 6; a tie goes to the even index.
    assert_same(round_to_e2m1(midpoints, "even"), [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert_same(round_to_e2m1(-midpoints, "even"), [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0])


def test_midpoints_ties_toward_zero():
    midpoints = t([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert_same(round_to_e2m1(midpoints, "zero"), [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    assert_same(round_to_e2m1(-midpoints, "zero"), [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0])


def test_values_next_to_midpoints_round_to_nearest():
    x = t([0.2499, 0.2501, 0.7499, 0.7501, 3.4999, 3.5001, 4.9999, 5.0001])
    expected = [0.0, 0.5, 0.5, 1.0, 3.0, 4.0, 4.0, 6.0]
    assert_same(round_to_e2m1(x, "even"), expected)
    assert_same(round_to_e2m1(x, "zero"), expected)


def test_saturates_at_six_and_keeps_zero_and_nan():
    x = t([6.0, 6.5, 100.0, float("inf"), -7.0, float("-inf"), 0.0, -0.0])
    assert_same(round_to_e2m1(x), [6.0, 6.0, 6.0, 6.0, -6.0, -6.0, 0.0, 0.0])
    assert torch.isnan(round_to_e2m1(t([float("nan")]))).all()


def test_codes_and_packing_low_nibble_first():
    # 0.5 -> index 1; -6 -> sign 8 | index 7 = 15; 0 -> 0; 3 -> index 5; -0 -> 0 (no sign bit)
    codes = e2m1_codes(t([0.5, -6.0, 0.0, 3.0, -0.0, 1.0]))
    assert codes.tolist() == [1, 15, 0, 5, 0, 2]
    packed = pack_fp4(codes)
    # byte = second << 4 | first: 15 << 4 | 1 = 241, 5 << 4 | 0 = 80, 2 << 4 | 0 = 32
    assert packed.tolist() == [241, 80, 32]
    assert unpack_fp4(packed).tolist() == [1, 15, 0, 5, 0, 2]


def test_bad_arguments_are_refused_with_their_value():
    with pytest.raises(ValueError, match="ties must be 'even' or 'zero', got 'up'"):
        round_to_e2m1(t([1.0]), "up")
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        mxfp4_quantize_dequantize(t([1.0]), block_size=0)
    with pytest.raises(ValueError, match="global_amax must be positive and finite, got 0.0"):
        nvfp4_quantize_dequantize(t([0.0, 0.0]), 0.0)
    with pytest.raises(ValueError, match="scale_rule must be 'modelopt' or 'ocp', got 'floor'"):
        mxfp4_scale_exponents(t([1.0]), scale_rule="floor")


# ---------------------------------------------------------------- NVFP4


def test_nvfp4_unit_scale_block_rounds_on_the_grid_with_both_tie_rules():
    # block amax 6 -> block scale 6/6 = 1 (exact in E4M3), global scale 1 -> x is rounded as is.
    x = t([6.0, 0.75, 0.25, 2.5, -3.5, 5.0, 1.75, 1.25, -0.74] + [0.0] * 7)
    even = nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX)
    zero = nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX, ties="zero")
    assert_same(even, [6.0, 1.0, 0.0, 2.0, -4.0, 4.0, 2.0, 1.0, -0.5] + [0.0] * 7)
    assert_same(zero, [6.0, 0.5, 0.0, 2.0, -3.0, 4.0, 1.5, 1.0, -0.5] + [0.0] * 7)


def test_nvfp4_block_scale_is_rounded_to_e4m3():
    # amax 6.5 -> 6.5/6 = 1.0833; E4M3 near 1 has steps of 1/8: 1.0833 -> 1.125.
    # 6.5 / 1.125 = 5.78 -> 6 -> 6.75; 2 / 1.125 = 1.78 -> 2 -> 2.25; 1 / 1.125 = 0.89 -> 1 -> 1.125
    x = t([6.5, 2.0, 1.0] + [0.0] * 13)
    assert nvfp4_block_scales(x, UNIT_GLOBAL_AMAX).float().tolist() == [1.125]
    assert_same(nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX), [6.75, 2.25, 1.125] + [0.0] * 13)


def test_nvfp4_global_scale_divides_the_block_scale():
    # global_amax 5376 -> global scale 2; block amax 12 -> 12 / (6 * 2) = 1 -> effective scale 2.
    # 12 / 2 = 6 -> 12; 5 / 2 = 2.5 (tie) -> 2 -> 4; 7 / 2 = 3.5 (tie) -> 4 -> 8
    x = t([12.0, 5.0, 7.0] + [0.0] * 13)
    assert_same(nvfp4_quantize_dequantize(x, 5376.0), [12.0, 4.0, 8.0] + [0.0] * 13)


def test_nvfp4_values_beyond_six_times_the_saturated_scale_clip():
    # global scale 1, block amax 6000 -> 1000 -> E4M3 saturates at 448 -> 6000/448 = 13.4 -> 6
    # -> 6 * 448 = 2688; -900 / 448 = -2.01 -> -2 -> -896
    x = t([6000.0, -900.0] + [0.0] * 14)
    assert nvfp4_block_scales(x, UNIT_GLOBAL_AMAX).float().tolist() == [448.0]
    assert_same(nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX), [2688.0, -896.0] + [0.0] * 14)


def test_nvfp4_subnormal_e4m3_block_scale():
    # block amax 0.03046875 = 6 * 2.6 * 2**-9 -> raw scale 2.6 * 2**-9; E4M3 subnormals are
    # k * 2**-9 -> 3 * 2**-9 = 0.005859375.  0.03046875 / 0.005859375 = 5.2 -> 6 -> 0.03515625;
    # 0.01 / 0.005859375 = 1.707 -> 1.5 -> 0.0087890625
    x = t([0.03046875, 0.01] + [0.0] * 14)
    assert nvfp4_block_scales(x, UNIT_GLOBAL_AMAX).float().tolist() == [0.005859375]
    assert_same(nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX), [0.03515625, 0.0087890625] + [0.0] * 14)


def test_nvfp4_scale_underflow_clamp_versus_flush():
    # block amax 6 * 2**-11 -> raw scale 2**-11, below E4M3's smallest subnormal 2**-9.
    # clamp (export): scale 2**-9 -> x / 2**-9 = 1.5 -> 1.5 * 2**-9 = 0.0029296875 (kept)
    # flush (Triton kernel): E4M3(2**-11) = 0 -> effective scale 0 < 1e-5 -> 1.0 -> 0.0029 -> 0
    x = t([0.0029296875] + [0.0] * 15)
    assert nvfp4_block_scales(x, UNIT_GLOBAL_AMAX, scale_underflow="clamp").float().tolist() == [2**-9]
    assert nvfp4_block_scales(x, UNIT_GLOBAL_AMAX, scale_underflow="flush").float().tolist() == [0.0]
    assert_same(nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX), [0.0029296875] + [0.0] * 15)
    assert_same(nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX, scale_underflow="flush"), [0.0] * 16)


def test_nvfp4_flush_uses_unit_scale_below_kernel_threshold():
    # global_amax 2688 * 2**-20 -> global scale 2**-20; block amax 24 * 2**-20 -> block scale 4
    # -> effective 4 * 2**-20 = 3.8e-6 < 1e-5: the kernel uses 1.0 and the block becomes 0;
    # the export keeps 24 * 2**-20 / (4 * 2**-20) = 6 -> 24 * 2**-20.
    x = t([24 * 2**-20] + [0.0] * 15)
    assert_same(nvfp4_quantize_dequantize(x, 2688 * 2**-20), [24 * 2**-20] + [0.0] * 15)
    assert_same(nvfp4_quantize_dequantize(x, 2688 * 2**-20, scale_underflow="flush"), [0.0] * 16)


def test_nvfp4_zero_blocks_stay_zero_and_export_scale_is_one():
    x = t([[0.0] * 16 + [3.0] + [0.0] * 15])
    # first block all zero -> scale 1.0 (export convention); second: 3/6 = 0.5 -> 3/0.5 = 6 -> 3
    assert nvfp4_block_scales(x, UNIT_GLOBAL_AMAX).float().tolist() == [[1.0, 0.5]]
    for mode in ("clamp", "flush"):
        assert_same(
            nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX, scale_underflow=mode),
            [[0.0] * 16 + [3.0] + [0.0] * 15],
        )


def test_nvfp4_pads_a_partial_last_block_with_zeros():
    # 20 values, block 16: block 1 amax 6 -> scale 1; block 2 = [3, 1.4, -0.2, 0.9] + 12 zero pads,
    # amax 3 -> scale 0.5: 3 -> 6 -> 3; 1.4 -> 2.8 -> 3 -> 1.5; -0.2 -> -0.4 -> -0.5 -> -0.25;
    # 0.9 -> 1.8 -> 2 -> 1.0
    x = t([6.0] + [0.0] * 15 + [3.0, 1.4, -0.2, 0.9])
    out = nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX)
    assert out.shape == (20,)
    assert_same(out, [6.0] + [0.0] * 15 + [3.0, 1.5, -0.25, 1.0])


def test_nvfp4_keeps_dtype_and_blocks_along_last_dim_only():
    x = torch.tensor([[6.0, 1.2] + [0.0] * 14, [0.6, 0.12] + [0.0] * 14], dtype=torch.bfloat16)
    out = nvfp4_quantize_dequantize(x, UNIT_GLOBAL_AMAX)
    assert out.dtype == torch.bfloat16
    # row 0: scale 1: 1.2 -> 1; row 1: amax 0.6 (bf16 0.6015625) / 6 = 0.10026 -> E4M3 0.1015625
    # (steps of 2**-7 between 2**-4 and 2**-3); 0.6015625 / 0.1015625 = 5.92 -> 6 -> 0.609375;
    # 0.12 (bf16 0.12011719) / 0.1015625 = 1.18 -> 1 -> 0.1015625
    assert out.float().tolist() == [
        [6.0, 1.0] + [0.0] * 14,
        [0.609375, 0.1015625] + [0.0] * 14,
    ]


# ---------------------------------------------------------------- MXFP4


def test_mxfp4_scale_exponent_for_powers_of_two_and_just_below():
    # Each row is one block of 32 whose amax is the first value.
    amaxes = [4.0, 3.99, 8.0, 7.99, 6.0, 6.01, 1.0]
    x = torch.zeros(len(amaxes), 32)
    x[:, 0] = t(amaxes)
    # ModelOpt: ceil(log2(amax / 6)): 4 -> ceil(-0.58) = 0; 3.99 -> 0; 8 -> ceil(0.42) = 1;
    # 7.99 -> 1; 6 -> 0; 6.01 -> ceil(0.0024) = 1; 1 -> ceil(-2.58) = -2
    assert mxfp4_scale_exponents(x).flatten().tolist() == [0, 0, 1, 1, 0, 1, -2]
    # OCP: floor(log2(amax)) - 2: 4 -> 0; 3.99 -> -1; 8 -> 1; 7.99 -> 0; 6 -> 0; 6.01 -> 0; 1 -> -2
    assert mxfp4_scale_exponents(x, scale_rule="ocp").flatten().tolist() == [0, -1, 1, 0, 0, 0, -2]


def test_mxfp4_rules_differ_on_amax_just_below_a_power_of_two():
    x = torch.zeros(2, 32)
    x[0, 0], x[1, 0] = 7.99, 3.99
    # ModelOpt: X = 2 -> 7.99 / 2 = 3.995 -> 4 -> 8;  X = 1 -> 3.99 -> 4
    # OCP:      X = 1 -> 7.99 -> 6 (saturated) -> 6; X = 0.5 -> 7.98 -> 6 -> 3
    assert mxfp4_quantize_dequantize(x)[:, 0].tolist() == [8.0, 4.0]
    assert mxfp4_quantize_dequantize(x, scale_rule="ocp")[:, 0].tolist() == [6.0, 3.0]


def test_mxfp4_ties_even_and_toward_zero():
    # amax 6 -> X = 1, so x is rounded as is.
    x = t([6.0, 0.75, -1.75, 3.5, 5.0, 2.5, 0.25] + [0.0] * 25)
    assert_same(mxfp4_quantize_dequantize(x), [6.0, 1.0, -2.0, 4.0, 4.0, 2.0, 0.0] + [0.0] * 25)
    assert_same(
        mxfp4_quantize_dequantize(x, ties="zero"),
        [6.0, 0.5, -1.5, 3.0, 4.0, 2.0, 0.0] + [0.0] * 25,
    )


def test_mxfp4_scale_exponent_clamps_at_minus_127():
    x = torch.zeros(3, 32)
    x[0, 0] = 2.0**-126  # ceil(log2(2**-126 / 6)) = -128 -> -127; 2**-126 / 2**-127 = 2 -> kept
    x[1, 0] = 2.0**-140  # -> -127; 2**-140 / 2**-127 = 2**-13 -> 0
    # row 2 all zero -> -127 (ModelOpt's export writes E8M0 byte 0 for it)
    assert mxfp4_scale_exponents(x).flatten().tolist() == [-127, -127, -127]
    out = mxfp4_quantize_dequantize(x)
    assert out[:, 0].tolist() == [2.0**-126, 0.0, 0.0]
    assert int(torch.count_nonzero(out)) == 1


def test_mxfp4_pads_a_partial_last_block_with_zeros():
    # 40 values, block 32: block 2 = [1.2, -0.3] + 30 zero pads, amax 1.2 -> ceil(log2(0.2)) = -2
    # -> X = 0.25: 1.2 / 0.25 = 4.8 -> 4 -> 1.0; -0.3 / 0.25 = -1.2 -> -1 -> -0.25
    x = t([6.0] + [0.0] * 31 + [1.2, -0.3] + [0.0] * 6)
    out = mxfp4_quantize_dequantize(x)
    assert out.shape == (40,)
    assert_same(out, [6.0] + [0.0] * 31 + [1.0, -0.25] + [0.0] * 6)


# ---------------------------------------------------------------- export unpackers


def test_dequantize_nvfp4_export_by_hand():
    # bytes 241 = 15 << 4 | 1 and 210 = 13 << 4 | 2: codes 1 (0.5), 15 (-6), 2 (1.0), 13 (-3);
    # block scale E4M3 2.0 times global 0.25 = 0.5
    packed = torch.tensor([[241, 210] + [0] * 6], dtype=torch.uint8)
    scales = torch.tensor([[2.0]]).to(torch.float8_e4m3fn)
    out = dequantize_nvfp4_export(packed, scales, torch.tensor(0.25), (1, 16))
    assert_same(out, [[0.25, -3.0, 0.5, -1.5] + [0.0] * 12])


def test_dequantize_mxfp4_export_by_hand():
    # E8M0 byte 128 -> 2**1, byte 126 -> 2**-1, byte 255 -> NaN
    packed = torch.zeros(3, 16, dtype=torch.uint8)
    packed[:, 0] = 241  # element 0: 0.5, element 1: -6
    scales = torch.tensor([[128], [126], [255]], dtype=torch.uint8)
    out = dequantize_mxfp4_export(packed, scales, (3, 32))
    assert out[0, :2].tolist() == [1.0, -12.0]
    assert out[1, :2].tolist() == [0.25, -3.0]
    assert torch.isnan(out[2]).all()


def test_export_unpackers_refuse_inconsistent_shapes():
    packed = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"packed data has shape \(2, 8\), expected \(2, 16\)"):
        dequantize_mxfp4_export(packed, torch.zeros(2, 1, dtype=torch.uint8), (2, 32))
    with pytest.raises(ValueError, match="do not tile a tensor of shape"):
        dequantize_mxfp4_export(packed, torch.zeros(2, 3, dtype=torch.uint8), (2, 16))
    with pytest.raises(ValueError, match="NVFP4 block scales must be float8_e4m3fn"):
        dequantize_nvfp4_export(packed, torch.ones(2, 1), 1.0, (2, 16))


def test_pack_roundtrip_reproduces_reference_qdq():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=gen)
    amax = float(x.abs().max())
    global_scale = torch.tensor(amax / 2688.0, dtype=torch.float32)
    scales = nvfp4_block_scales(x, amax)
    scaled = x.reshape(4, 4, 16) / (scales.float() * global_scale).unsqueeze(-1)
    packed = pack_fp4(e2m1_codes(scaled.reshape(4, 64)))
    unpacked = dequantize_nvfp4_export(packed, scales, global_scale, (4, 64))
    assert torch.equal(unpacked, nvfp4_quantize_dequantize(x, amax))


# ---------------------------------------------------------------- against ModelOpt's CPU export code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_modelopt_export_quantizers(dtype):
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.exp(2 * torch.randn(64, 1, generator=gen))
    w[0, :32] = 0.0  # zero blocks
    w[1, :16] *= 1e-7  # blocks whose E4M3 scale underflows
    w = w.to(dtype)

    q, scale, scale_2 = qtensor.NVFP4QTensor.quantize(
        w.clone(), 16, None, qtensor.NVFP4QTensor.get_weights_scaling_factor_2(w)
    )
    exported = dequantize_nvfp4_export(q._quantized_data, scale, scale_2, w.shape)
    reference = nvfp4_quantize_dequantize(w.float(), w.float().abs().amax())
    assert int((exported != reference).sum()) == 0
    assert torch.equal(nvfp4_block_scales(w, w.float().abs().amax()).view(torch.uint8), scale.view(torch.uint8))

    qm, e8m0 = qtensor.MXFP4QTensor.quantize(w.clone(), 32)
    exported = dequantize_mxfp4_export(qm._quantized_data, e8m0.reshape(64, -1), w.shape)
    assert torch.equal(mxfp4_scale_exponents(w) + 127, e8m0.reshape(64, -1).int())
    assert int((exported != mxfp4_quantize_dequantize(w.float(), ties="zero")).sum()) == 0
    # With ties to even, only exact ties differ; bf16 has few mantissa bits so ties do occur.
    even = mxfp4_quantize_dequantize(w.float(), ties="even")
    differs = exported != even
    if dtype == torch.bfloat16:
        assert int(differs.sum()) > 0
    scale = torch.ldexp(torch.ones(64, 8), mxfp4_scale_exponents(w)).repeat_interleave(32, dim=-1)
    ratio = (w.float() / scale)[differs].abs()
    assert torch.isin(ratio, t([0.75, 1.75, 3.5])).all()


def _float32_neighbours(value: float, count: int) -> torch.Tensor:
    """`count` consecutive float32 values on each side of `value`, and `value` itself."""
    centre = t([value])
    below, above, out = centre.clone(), centre.clone(), [centre]
    for _ in range(count):
        below = torch.nextafter(below, t([-1e30]))
        above = torch.nextafter(above, t([1e30]))
        out += [below, above]
    return torch.cat(out)


def test_fast_ties_even_rounding_equals_the_midpoint_count_bit_for_bit():
    # round_to_e2m1(x, "even") takes an arithmetic shortcut (_round_to_e2m1_even); the midpoint
    # count (e2m1_codes -> e2m1_values) is the definition it must reproduce, sign of zero included.
    edges = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 2.0**-126, 0.0)
    near = torch.cat([_float32_neighbours(v, 300) for v in edges])
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([
        near, -near,
        torch.randn(200_000, generator=generator) * 4,
        torch.rand(200_000, generator=generator) * 7,
        torch.randn(10_000, generator=generator) * 1e-39,  # float32 subnormals
        t([float("inf"), -float("inf"), 6.5, -7.0, 1e30, -1e30, -0.0]),
    ])
    definition = e2m1_values(e2m1_codes(samples, "even"))
    fast = round_to_e2m1(samples, "even")
    assert torch.equal(fast.view(torch.int32), definition.view(torch.int32))
    nan = round_to_e2m1(t([float("nan"), -float("nan")]), "even")
    assert torch.isnan(nan).all()
