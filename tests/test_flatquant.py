"""FlatQuant: Kronecker affine transforms, learnable clipping, layer-wise calibration, QAT, export and reload."""

import pytest
import torch

from rqat_sdk.ops.affine_transform import (
    clamp_to_clipped_range,
    clip_activation,
    clipped_weight_qparams,
    fold_into_weight,
    kronecker_apply,
    kronecker_inverse,
    kronecker_sizes,
    random_orthogonal,
    transform_activation,
)
from rqat_sdk.recipe.scheme import QuantScheme


def random_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Well-conditioned but not orthogonal factors and a positive smoothing scale, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    n1, n2 = kronecker_sizes(n)
    left = torch.eye(n1) + 0.2 * torch.randn(n1, n1, generator=generator)
    right = torch.eye(n2) + 0.2 * torch.randn(n2, n2, generator=generator)
    smooth = torch.rand(n, generator=generator) + 0.5
    return left, right, smooth


@pytest.mark.parametrize(("width", "sizes"), [(256, (16, 16)), (512, (16, 32)), (96, (8, 12)), (7, (1, 7)), (1, (1, 1))])
def test_kronecker_sizes_are_as_square_as_the_width_allows(width, sizes):
    assert kronecker_sizes(width) == sizes


def test_kronecker_apply_is_multiplication_by_the_kronecker_product():
    left, right, _ = random_factors(96, seed=0)
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    expected = x @ torch.kron(left.double(), right.double())
    torch.testing.assert_close(kronecker_apply(x, left.double(), right.double()), expected)


def test_the_inverse_of_a_transform_undoes_it_to_1e4_in_float32():
    left, right, smooth = random_factors(512, seed=1)
    inverse_left, inverse_right = kronecker_inverse(left, right)
    x = torch.randn(64, 512)
    round_trip = kronecker_apply(transform_activation(x, left, right, smooth), inverse_left, inverse_right) / smooth
    assert (round_trip - x).abs().max() <= 1e-4 * x.abs().max()


@pytest.mark.parametrize("smoothing", [True, False])
def test_a_folded_weight_reads_the_transformed_input_as_the_weight_reads_the_input(smoothing):
    left, right, smooth = random_factors(256, seed=2)
    smooth = smooth if smoothing else None
    weight, x = torch.randn(128, 256), torch.randn(32, 256)
    expected = x @ weight.T
    actual = transform_activation(x, left, right, smooth) @ fold_into_weight(weight, left, right, smooth).T
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(16), atol=1e-5, rtol=0)


def test_activation_clipping_clamps_each_token_to_its_clipped_range():
    args = QuantScheme.model_validate("W4A4").input_activations.to_args()
    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -0.125]])
    clipped = clip_activation(x, torch.tensor(0.5), args)
    torch.testing.assert_close(clipped, torch.tensor([[1.0, -2.0, 2.0], [0.25, 0.25, -0.125]]))


@pytest.mark.parametrize("preset", ["W4A4", "W4G128"])
def test_min_max_scales_of_the_clamped_weight_are_the_clipped_scales(preset):
    """What lets learned weight clipping survive RTN: its observer reads the clipped range from the weight."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantScheme.model_validate(preset).weights.to_args()
    weight = torch.randn(8, 256)
    groups = 256 // (args.group_size or 256)
    factor = torch.rand(8, groups) * 0.5 + 0.5
    scale, zero_point = clipped_weight_qparams(weight, factor, args)
    grouped = clamp_to_clipped_range(weight, factor, args).unflatten(-1, (groups, -1))
    observed_scale, observed_zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    torch.testing.assert_close(scale, observed_scale)
    if zero_point is not None:
        torch.testing.assert_close(zero_point, observed_zero.round().float())
