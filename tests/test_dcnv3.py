"""DCNv3 core and layer (uniperc.ops.dcnv3): sampling convention, conv equivalences, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from uniperc.ops import DCNv3, dcnv3_core


def _naive_dcnv3(x, offset, mask, k, stride, pad, dilation, group, offset_scale):
    """Loop-by-loop DCNv3 written from InternImage's definition: tap p = kx*k + ky (x-major),
    offsets are (x, y) pairs, bilinear sampling with zeros outside the image."""
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    cg = c // group
    half = dilation * (k - 1) // 2
    out = torch.zeros(n, ho, wo, c, dtype=x.dtype)

    def pixel(b, yy, xx, g):
        if 0 <= yy < h and 0 <= xx < w:
            return x[b, yy, xx, g * cg:(g + 1) * cg]
        return torch.zeros(cg, dtype=x.dtype)

    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                cy, cx = i * stride - pad + half, j * stride - pad + half
                for g in range(group):
                    acc = torch.zeros(cg, dtype=x.dtype)
                    for p in range(k * k):
                        kx, ky = divmod(p, k)
                        ox, oy = offset[b, i, j, (g * k * k + p) * 2:(g * k * k + p) * 2 + 2].tolist()
                        px = cx + offset_scale * (kx * dilation - half + ox)
                        py = cy + offset_scale * (ky * dilation - half + oy)
                        x0, y0 = math.floor(px), math.floor(py)
                        fx, fy = px - x0, py - y0
                        val = ((1 - fy) * (1 - fx) * pixel(b, y0, x0, g) + (1 - fy) * fx * pixel(b, y0, x0 + 1, g)
                               + fy * (1 - fx) * pixel(b, y0 + 1, x0, g) + fy * fx * pixel(b, y0 + 1, x0 + 1, g))
                        acc += mask[b, i, j, g * k * k + p] * val
                    out[b, i, j, g * cg:(g + 1) * cg] = acc
    return out


def _out_size(size, k, stride, pad, dilation):
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


@pytest.mark.parametrize("k,stride,pad,dilation,offset_scale", [(3, 1, 1, 1, 1.0), (3, 2, 1, 2, 0.5)])
def test_core_matches_naive_definition(k, stride, pad, dilation, offset_scale):
    g = torch.Generator().manual_seed(0)
    n, h, w, c, group = 1, 5, 6, 4, 2
    ho, wo = _out_size(h, k, stride, pad, dilation), _out_size(w, k, stride, pad, dilation)
    x = torch.randn(n, h, w, c, generator=g, dtype=torch.float64)
    offset = 1.5 * torch.randn(n, ho, wo, group * k * k * 2, generator=g, dtype=torch.float64)
    mask = torch.randn(n, ho, wo, group * k * k, generator=g, dtype=torch.float64)
    got = dcnv3_core(x, offset, mask, kernel_size=k, stride=stride, pad=pad, dilation=dilation,
                     group=group, offset_scale=offset_scale)
    want = _naive_dcnv3(x, offset, mask, k, stride, pad, dilation, group, offset_scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _per_tap_mask(m, n, ho, wo):
    """A mask that is m[g, p] at every pixel, laid out (N, Ho, Wo, G*P)."""
    return m.reshape(1, 1, 1, -1).expand(n, ho, wo, m.numel())


def _depthwise_weight(m, channels, k):
    """Depthwise weight equal to DCNv3 with zero offsets and per-tap mask m (G, k*k):
    w[c, 0, ky, kx] = m[c // (C/G), kx*k + ky] -- a transpose, because the taps are x-major."""
    group = m.shape[0]
    return m.reshape(group, k, k).transpose(1, 2).repeat_interleave(channels // group, dim=0)[:, None]


@pytest.mark.parametrize("stride,pad,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
def test_zero_offsets_equal_depthwise_conv_with_mask_taps(stride, pad, dilation):
    g = torch.Generator().manual_seed(1)
    n, h, w, c, group, k = 2, 7, 6, 8, 4, 3
    ho, wo = _out_size(h, k, stride, pad, dilation), _out_size(w, k, stride, pad, dilation)
    x = torch.randn(n, h, w, c, generator=g, dtype=torch.float64)
    m = torch.randn(group, k * k, generator=g, dtype=torch.float64)
    got = dcnv3_core(x, torch.zeros(n, ho, wo, group * k * k * 2, dtype=torch.float64), _per_tap_mask(m, n, ho, wo),
                     kernel_size=k, stride=stride, pad=pad, dilation=dilation, group=group)
    want = F.conv2d(x.permute(0, 3, 1, 2), _depthwise_weight(m, c, k), stride=stride, padding=pad,
                    dilation=dilation, groups=c).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_tap_order_is_x_major():
    """Only tap p=1 (kx=0, ky=1: dx=-1, dy=0) on: output(i, j) = x(i, j-1), zero in column 0."""
    x = torch.randn(1, 4, 5, 2, dtype=torch.float64)
    mask = torch.zeros(1, 4, 5, 9, dtype=torch.float64)
    mask[..., 1] = 1
    y = dcnv3_core(x, torch.zeros(1, 4, 5, 18, dtype=torch.float64), mask, group=1)
    torch.testing.assert_close(y[:, :, 1:], x[:, :, :-1])
    torch.testing.assert_close(y[:, :, 0], torch.zeros_like(y[:, :, 0]))


def test_offsets_are_xy_pairs():
    """An offset of (+1, 0) on every tap moves sampling one pixel right; (0, +1) one pixel down."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, 6, 4, generator=g, dtype=torch.float64)
    m = torch.randn(2, 9, generator=g, dtype=torch.float64)
    mask = _per_tap_mask(m, 1, 5, 6)
    zero = torch.zeros(1, 5, 6, 2, 9, 2, dtype=torch.float64)
    right, down = zero.clone(), zero.clone()
    right[..., 0] = 1
    down[..., 1] = 1
    ref = lambda img: dcnv3_core(img, zero.flatten(3), mask, group=2)  # noqa: E731
    x_right = F.pad(x[:, :, 1:], (0, 0, 0, 1))  # x_right(i, j) = x(i, j+1)
    x_down = F.pad(x[:, 1:], (0, 0, 0, 0, 0, 1))  # x_down(i, j) = x(i+1, j)
    # compared away from the left / top border, where the shifted image lost a column / row
    torch.testing.assert_close(dcnv3_core(x, right.flatten(3), mask, group=2)[:, :, 1:], ref(x_right)[:, :, 1:])
    torch.testing.assert_close(dcnv3_core(x, down.flatten(3), mask, group=2)[:, 1:], ref(x_down)[:, 1:])


def test_offset_scale_scales_the_tap_grid():
    """InternImage scales the fixed tap grid by offset_scale too: scale 2 with zero offsets and
    pad=1 samples like a dilation-2, padding-2 conv."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 7, 7, 4, generator=g, dtype=torch.float64)
    m = torch.randn(1, 9, generator=g, dtype=torch.float64)
    got = dcnv3_core(x, torch.zeros(1, 7, 7, 18, dtype=torch.float64), _per_tap_mask(m, 1, 7, 7),
                     group=1, offset_scale=2.0)
    want = F.conv2d(x.permute(0, 3, 1, 2), _depthwise_weight(m, 4, 3), padding=2, dilation=2,
                    groups=4).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    # keep sampling points away from integer pixel positions, where bilinear is not differentiable
    offset = (torch.rand(1, 3, 4, 2 * 9 * 2, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    mask = torch.randn(1, 3, 4, 2 * 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: dcnv3_core(a, b, c, group=2), (x, offset, mask),
                                    eps=1e-6, atol=1e-5)


def test_layer_with_zero_offsets_is_projected_depthwise_conv():
    """The layer: output_proj(core(input_proj(x), offset(dw(x)), mask(dw(x)))); with the offset
    predictor zeroed and the mask predictor reduced to its bias, the core is a depthwise conv."""
    torch.manual_seed(5)
    layer = DCNv3(8, group=2).double()
    with torch.no_grad():
        layer.mask.bias.normal_()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    weight = _depthwise_weight(layer.mask.bias.view(2, 9), 8, 3)
    inner = F.conv2d(layer.input_proj(x).permute(0, 3, 1, 2), weight, padding=1, groups=8).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer(x), layer.output_proj(inner))


def test_layer_init_and_keys():
    layer = DCNv3(24, group=3)
    assert torch.all(layer.offset.weight == 0) and torch.all(layer.mask.weight == 0)
    assert torch.all(layer(torch.randn(1, 4, 4, 24)) == 0)  # zero mask: no taps yet, zero output bias
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"dw_conv.weight": (24, 1, 3, 3), "dw_conv.bias": (24,), "offset.weight": (54, 24),
                      "offset.bias": (54,), "mask.weight": (27, 24), "mask.bias": (27,),
                      "input_proj.weight": (24, 24), "input_proj.bias": (24,),
                      "output_proj.weight": (24, 24), "output_proj.bias": (24,)}


def test_layer_backward_reaches_offset_and_mask_predictors():
    """From the zero init, the offset and mask predictors receive gradient (dw_conv only once they
    are non-zero, as its output reaches the loss only through them)."""
    layer = DCNv3(8, group=2)
    with torch.no_grad():
        layer.mask.bias.fill_(1.0)
    layer(torch.randn(1, 5, 5, 8)).square().sum().backward()
    assert layer.offset.weight.grad.abs().sum() > 0 and layer.mask.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,name", [(dict(channels=24, group=5), "group"), (dict(channels=24, kernel_size=4), "kernel_size"),
                                         (dict(channels=24, group=3, dw_kernel_size=2), "dw_kernel_size")])
def test_layer_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DCNv3(**kwargs)


def test_core_bad_arguments():
    x = torch.randn(1, 4, 4, 6)
    with pytest.raises(ValueError, match="group"):
        dcnv3_core(x, torch.zeros(1, 4, 4, 72), torch.zeros(1, 4, 4, 36), group=4)
    with pytest.raises(ValueError, match="offset"):
        dcnv3_core(x, torch.zeros(1, 4, 4, 17), torch.zeros(1, 4, 4, 9), group=1)
    with pytest.raises(ValueError, match="mask"):
        dcnv3_core(x, torch.zeros(1, 4, 4, 18), torch.zeros(1, 4, 4, 8), group=1)
    with pytest.raises(ValueError, match="channels-last"):
        DCNv3(6, group=1)(torch.randn(1, 6, 4, 4))
