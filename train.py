"""Train uniperc on one modality or several jointly (a shared backbone, a stem and a head per modality).

    accelerate launch train.py --modality audio                      # configs/audio.yaml, offline demo data
    accelerate launch train.py --modality audio,image,point_cloud    # joint training (configs/multitask.yaml)
    accelerate launch --config_file configs/accelerate/cpu.yaml train.py --modality image --set train.lr=1e-3
    accelerate launch train.py --modality audio --resume             # continue from the last complete checkpoint

Any config key can be overridden with ``--set dotted.key=value`` (value parsed as YAML, repeatable);
``--backbone`` / ``--mixer`` / ``--output-dir`` / ``--epochs`` are shortcuts for the common ones.
Plain ``python train.py ...`` runs one process. The work is done by :func:`uniperc.train.run`.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--modality", help="modality name, or several separated by commas for joint training")
    p.add_argument("--config", help="YAML config (default: configs/<modality>.yaml, or configs/multitask.yaml)")
    p.add_argument("--backbone", help="any registered uniperc timm variant, e.g. unireplknet_a (model.backbone)")
    p.add_argument("--mixer", help="token mixer for every block, e.g. dilated_reparam, rfa, peripheral, lka")
    p.add_argument("--output-dir", help="run folder (output_dir)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-3 --set model.kwargs.dims=[16,32,64,128]")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in output_dir (or from CHECKPOINT)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even if the model, data or task settings differ from the checkpoint's")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from uniperc.train import compose, run

    args = parse_args(argv)
    modalities = [m.strip() for m in args.modality.split(",") if m.strip()] if args.modality else None
    shortcuts = [f"{key}={value}" for key, value in (("model.backbone", args.backbone), ("model.mixer", args.mixer),
                                                     ("output_dir", args.output_dir), ("train.epochs", args.epochs))
                 if value is not None]
    config = compose(modalities, args.config, shortcuts + args.overrides)
    if args.force and not args.resume:
        raise ValueError("--force only applies to --resume")
    return run(config, resume=args.resume, force=args.force)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # configuration errors: a clear message, no traceback
        sys.exit(f"error: {e}")
