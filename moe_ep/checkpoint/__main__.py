"""``python -m moe_ep.checkpoint convert``: moe_ep checkpoints to and from DeepSpeed files, and to transformers.

    python -m moe_ep.checkpoint convert --to deepspeed runs/tiny/ckpt/step_0300 runs/tiny-ds [--tag step_0300]
    python -m moe_ep.checkpoint convert --to moe_ep runs/tiny-ds runs/tiny/from-ds [--tag TAG]
    python -m moe_ep.checkpoint convert --to hf runs/tiny/ckpt/step_0300 runs/tiny/moe_blocks.safetensors

A target that exists and is not empty is refused unless ``--overwrite``, and
even then only one of its kind is replaced (a moe_ep checkpoint with a valid
manifest, a DeepSpeed tag folder of model-state files, a file); nothing else
is removed.

``--to moe_ep`` reads a DeepSpeed checkpoint folder (``latest`` names the
tag unless ``--tag``); its model config comes from the client state
launch/ds_train.py writes, or from ``--model-config FILE.json``
(``ModelConfig.to_dict()``). moe_ep/training/convert.py has the layouts.

This entry point sits above the application it calls (``moe_ep.training``), as
the launchers do; nothing of the library imports it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training.convert import from_deepspeed, to_deepspeed, to_hf
from .manifest import CheckpointError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_ep.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a checkpoint's weights to another layout")
    convert.add_argument("--to", required=True, choices=["deepspeed", "moe_ep", "hf"], help="target layout")
    convert.add_argument("src", type=Path, help="source checkpoint folder (moe_ep step folder or DeepSpeed save dir)")
    convert.add_argument("dst", type=Path, help="target folder (deepspeed, moe_ep) or .safetensors file (hf)")
    convert.add_argument("--tag", default=None, help="DeepSpeed tag (default: the source folder's name / latest)")
    convert.add_argument("--model-config", type=Path, default=None,
                         help="JSON ModelConfig for --to moe_ep when the DeepSpeed checkpoint holds none")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing target of the same kind (never any other folder or file)")
    args = parser.parse_args(argv)
    try:
        if args.to == "deepspeed":
            print(f"wrote {to_deepspeed(args.src, args.dst, args.tag, args.overwrite)}")
        elif args.to == "moe_ep":
            config = json.loads(args.model_config.read_text()) if args.model_config else None
            print(f"wrote {from_deepspeed(args.src, args.dst, args.tag, config, args.overwrite)}")
        else:
            keys = to_hf(args.src, args.dst, args.overwrite)
            print(f"wrote {args.dst}: {len(keys)} tensors of the MoE blocks (attention, norms and embeddings "
                  f"have no DeepSeek counterpart and are not included)")
    except CheckpointError as exc:
        raise SystemExit(f"convert: {exc}") from exc


if __name__ == "__main__":
    main()
