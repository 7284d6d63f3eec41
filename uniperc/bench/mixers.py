"""The same backbone with each spatial mixer: parameters, FLOPs and CPU/GPU throughput side by side.

``python -m uniperc.bench mixers`` builds :class:`~uniperc.backbone.UniPercNet` with one frame (stem,
downsamples, head), one set of depths and dims and one block shell (``--block``, default the ConvNeXt block
``"peripheral"``: no spatial operation outside the mixer), and swaps only the spatial mixer inside it, so the
norms, MLP and layer scales are the same for every row. FLOPs are counted by ``torch.utils.flop_counter``
(convolutions and matmuls; DCNv3's bilinear sampling is not counted).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

import uniperc
from uniperc.backbone import UniPercNet
from uniperc.blocks import list_blocks
from ._timing import median_seconds, train_images_per_second

# Each mixer's own kernel schedule (stage 1 small as in UniRepLKNet; PeLK's published large kernels).
KERNELS = {
    "dilated_reparam": (3, 13, 13, 13),
    "rfa": (0, 0, 0, 0),           # fixed 7/9/11 inside the RFA
    "peripheral": (51, 49, 47, 13),
    "lka": (0, 0, 0, 0),           # fixed 5x5 + 7x7 dilation-3
}
SHELL = "peripheral"  # the ConvNeXt block: mixer -> LN -> MLP -> layer scale


def build(mixer: str, depths, dims, in_chans: int = 3, num_classes: int = 1000, block: str = SHELL) -> UniPercNet:
    """The benchmark model: ``block``'s shell with ``mixer`` as its spatial mixer in every block."""
    return UniPercNet(in_chans=in_chans, num_classes=num_classes, depths=depths, dims=dims, block=block,
                      mixer=mixer, kernel_sizes=KERNELS[mixer])


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on ``x`` (parameters frozen on a copy: no autograd hooks to trace)."""
    model = copy.deepcopy(model).requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def measure(mixer: str, depths, dims, batch: int, size: int, repeats: int, device: str, block: str = SHELL) -> dict:
    torch.manual_seed(0)
    model = build(mixer, depths, dims, block=block).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    row = {"mixer": mixer, "block": block, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "train_img_s": train_images_per_second(model, x, repeats, device)}
    model.eval()
    uniperc.reparameterize(model)
    row["deploy_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["gflops"] = count_flops(model, x[:1]) / 2e9  # multiply-adds per image, as papers report
    with torch.inference_mode():
        row["deploy_img_s"] = batch / median_seconds(lambda: model(x), repeats, device=device)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m uniperc.bench mixers", description=__doc__)
    parser.add_argument("--mixers", default=",".join(KERNELS))
    parser.add_argument("--block", default=SHELL, choices=list_blocks(),
                        help="the shell every mixer sits in (default: %(default)s, the ConvNeXt block)")
    parser.add_argument("--depths", default="2,2,6,2")
    parser.add_argument("--dims", default="64,128,256,512")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    depths = tuple(int(v) for v in args.depths.split(","))
    dims = tuple(int(v) for v in args.dims.split(","))
    mixers = args.mixers.split(",")
    unknown = sorted(set(mixers) - set(KERNELS))
    if unknown:
        raise ValueError(f"--mixers: unknown {unknown}; choose from {sorted(KERNELS)}")
    rows = [measure(m, depths, dims, args.batch, args.size, args.repeats, args.device, args.block) for m in mixers]
    print(f"block={args.block} depths={depths} dims={dims} input={args.batch}x3x{args.size}x{args.size} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print("| mixer | kernels | params (M) | deploy params (M) | GMACs/img | train img/s | deploy img/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mixer']} | {KERNELS[r['mixer']]} | {r['params_M']:.2f} | {r['deploy_params_M']:.2f} | "
              f"{r['gflops']:.2f} | {r['train_img_s']:.1f} | {r['deploy_img_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
