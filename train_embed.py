"""Train an embedding model on a labelled gallery.

  python train_embed.py --gallery DIR [--labels train.csv] --out runs/model
  python train_embed.py --gallery DIR --config run.yaml --epochs 20   # file, then flags override
  python train_embed.py --gallery ../shared/data/omniglot/images_background_small1 \
      --whale-protocol 0 --out runs/omniglot      # split, train, score MAP@5 vs references

Under ``torchrun --nproc_per_node=N train_embed.py ...`` it trains with DDP.
"""
from __future__ import annotations

import argparse
import logging

from retrieval.cli import add_companion_arguments, add_gallery_arguments
from retrieval.config import (COMPANION_BACKBONE, DEFAULT_BACKBONE, LOSS_NAMES,
                              NEW_IDENTITY_CHOICES, TrainConfig, read_config_file)
from retrieval.errors import run_cli

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_gallery_arguments(p, required=True)
    data.add_argument("--whale-protocol", type=int, nargs="+", metavar="SEED",
                      help="instead of training on the whole gallery, run the whale protocol for "
                           "these seeds: train on the split's gallery, score MAP@5 on its queries "
                           "beside the reference points (table + protocol.json in --out); each "
                           "seed's split is written to --out/seedN (gallery.csv, queries/, "
                           "queries_truth.csv) for build_index.py and query.py")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default=DEFAULTS.backbone,
                       help=f"timm model name (default {DEFAULT_BACKBONE}, whose ImageNet weights "
                            "ship offline; others download from timm's hub)")
    model.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                       help="start from random weights instead of ImageNet")
    model.add_argument("--embedding-dim", type=int, default=DEFAULTS.embedding_dim,
                       help="size of the embedding (default %(default)s)")
    model.add_argument("--pool-stages", type=int, default=DEFAULTS.pool_stages, metavar="N",
                       help="the neck sees GeM of the backbone's last N feature stages before its "
                            "final map beside the final map's, each normalised (default "
                            "%(default)s, as the untrained features; 0: the final map only)")
    model.add_argument("--image-size", type=int,
                       help="input side in pixels (default: chosen on the training images: the "
                            "backbone's native size, 224 for the default, or 5/7 of it, whichever "
                            "the untrained features answer better by leave-one-out, as "
                            "build_index.py chooses for a zero-shot index); smaller trains faster "
                            "on a CPU")
    train = p.add_argument_group("training")
    train.add_argument("--loss", choices=list(LOSS_NAMES), default=DEFAULTS.loss,
                       help="metric-learning loss (default %(default)s)")
    train.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                       help="epochs of the selection stage (default %(default)s)")
    train.add_argument("--warmup-epochs", type=int, default=DEFAULTS.warmup_epochs,
                       help="first epochs with the backbone frozen (default %(default)s)")
    train.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                       help="images per batch per process (default %(default)s)")
    train.add_argument("--m-per-identity", type=int, default=DEFAULTS.m_per_identity,
                       help="images per identity in a batch, pair-based losses (default %(default)s)")
    train.add_argument("--lr", type=float, default=DEFAULTS.lr,
                       help="backbone learning rate (default %(default)s)")
    train.add_argument("--head-lr", type=float, default=DEFAULTS.head_lr,
                       help="GeM + neck learning rate (default %(default)s)")
    train.add_argument("--loss-lr", type=float, default=DEFAULTS.loss_lr,
                       help="learning rate of the loss's class weights (default %(default)s)")
    train.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                       help="AdamW weight decay (default %(default)s)")
    train.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.freeze_bn,
                       help="keep the backbone's BatchNorm statistics (ImageNet's) after the "
                            "frozen warm-up too; its weights still train (default on: re-estimating "
                            "them from small batches destroyed the features on colour photos)")
    train.add_argument("--blend-pretrained", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.blend_pretrained,
                       help="ship the trained embedding blended with the untrained ImageNet "
                            "features (a frozen second backbone: twice the embedding time), at "
                            "the share of the similarity (0, 1/4, 1/2, 3/4, 1) that scores best "
                            "on the validation carve-out; 0 ships the trained model alone "
                            "(default: %(default)s)")
    train.add_argument("--whiten-pretrained", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.whiten_pretrained,
                       help="with --blend-pretrained: pass the untrained features through a "
                            "whitening fitted in closed form on the training images' identities "
                            "(it damps the directions in which photos of one identity differ; "
                            "stored in the checkpoint, nothing to tune); off by default: it "
                            "helped faces and lost on characters and dog photos once trained "
                            "(bench/README.md) (default: %(default)s)")
    train.add_argument("--interpolate-pretrained", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.interpolate_pretrained,
                       help="after training, move the backbone's weights back towards its "
                            "ImageNet weights by the share (0, 1/4, 1/2, 3/4, 1) that scores best "
                            "on the validation carve-out (WiSE-FT: one network, so embedding "
                            "costs the same); 0 ships the model as trained (default: %(default)s)")
    train.add_argument("--hubness", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.hubness,
                       help="search with the hubness correction: each gallery image's similarity "
                            "minus a weight times its mean similarity to its 10 nearest gallery "
                            "images, so images close to everything stop crowding answers; the "
                            "weight (0, 1/4, 1/2) that scores best on the validation carve-out is "
                            "stored in the checkpoint and the index (0: plain cosine; where "
                            "validation ties, 1/4) "
                            "(default: %(default)s)")
    train.add_argument("--whiten-output", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.whiten_output,
                       help="let validation decide whether an index of the model whitens its "
                            "gallery and queries within identities (a map fitted on the index's "
                            "own labelled gallery damps how photos of one identity differ); kept "
                            "only where the validation queries score strictly better whitened, "
                            "each answered through a map fitted without it; stored in the "
                            "checkpoint (default: %(default)s)")
    train.add_argument("--local-match", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.local_match,
                       help="let validation decide whether an index of the model re-scores each "
                            "query's 50 nearest gallery images by local matching (stride-16 "
                            "descriptors compared location by location, blended with the cosine "
                            "at a share of 1/4 to 1: the untrained ImageNet backbone's where the "
                            "model blends its features in, else the trained backbone's), kept "
                            "only where the validation queries score strictly better; the share "
                            "is stored in the checkpoint and the index keeps the descriptors "
                            "(default: %(default)s)")
    add_companion_arguments(
        train, DEFAULTS.companion,
        help="let validation decide whether the shipped model carries a second network's "
             f"untrained ImageNet features beside its vector (default {COMPANION_BACKBONE}, whose "
             "weights ship with the package; any timm name with weights), at the share of the "
             "cosine (0, 1/4, 1/2, 3/4) that scores strictly best on the validation carve-out "
             "(where the model ships the ImageNet features alone: by leave-one-out over the "
             "training images, as the zero-shot index chooses it); costs that network's time on "
             "every image where a share is kept (default: on, %(default)s)",
        off_help="ship the model without a second network (none tried)")
    train.add_argument("--layer-decay", type=float, default=DEFAULTS.layer_decay,
                       help="layer-wise learning-rate decay: the backbone's last block learns at "
                            "--lr, each block below at this factor times the one above, so early, "
                            "generic features move least (default %(default)s = off)")
    train.add_argument("--l2-sp", type=float, default=DEFAULTS.l2_sp, metavar="STRENGTH",
                       help="L2-SP: the backbone's weight decay pulls towards its ImageNet weights "
                            "at this strength instead of towards zero (each step moves a weight "
                            "by lr x STRENGTH x its distance from the start; e.g. 10-1000), so "
                            "fine-tuning on few images keeps more of the pretrained features; "
                            "at 100 it lost on line drawings and was mixed on faces and dog "
                            "photos (bench/README.md, \"L2-SP\") (default %(default)s = off)")
    train.add_argument("--trainable-blocks", type=int, nargs="+", metavar="N",
                       default=DEFAULTS.trainable_blocks,
                       help="after the frozen warm-up, train only the backbone's last N blocks "
                            "(timm's fine-grained groups; for EfficientNet the last holds the "
                            "head convolution) and keep the rest at its ImageNet weights; 0 = the "
                            "whole backbone. Several values (e.g. 0 1) run selection once per "
                            "depth and keep the one that scores best on the validation "
                            "carve-out (default: 0 1, the whole backbone or its last block; "
                            "0 alone trains the whole backbone in one selection run)")
    train.add_argument("--partial-epochs", type=int, default=DEFAULTS.partial_epochs,
                       help="with --trainable-blocks: train only those blocks for this many epochs "
                            "after the warm-up, then the whole backbone (gradual unfreezing; "
                            "validation picks the best epoch; default %(default)s = partial to the end)")
    train.add_argument("--ema-decay", type=float, default=DEFAULTS.ema_decay,
                       help="validate and ship an exponential moving average of the weights with "
                            "this decay, e.g. 0.999 (its decay warms up over the first steps; "
                            "default %(default)s = off)")
    train.add_argument("--arcface-margin", type=float, default=DEFAULTS.arcface_margin,
                       help="ArcFace / sub-center ArcFace angular margin in degrees "
                            "(default %(default)s = 0.5 rad)")
    train.add_argument("--arcface-scale", type=float, default=DEFAULTS.arcface_scale,
                       help="ArcFace / sub-center ArcFace logit scale (default %(default)s)")
    train.add_argument("--sub-centers", type=int, default=DEFAULTS.sub_centers,
                       help="sub-center ArcFace: centres per identity (default %(default)s)")
    train.add_argument("--triplet-margin", type=float, default=DEFAULTS.triplet_margin,
                       help="triplet loss and its miner: margin (default %(default)s)")
    train.add_argument("--flip", action="store_true",
                       help="augment with horizontal flips (only if a mirror image shows the same "
                            "identity: not for whale flukes or characters)")
    train.add_argument("--new-identities", choices=list(NEW_IDENTITY_CHOICES),
                       default=DEFAULTS.new_identities,
                       help="train also on transformed images as extra identities, where the "
                            "transform shows another identity: 'mirror' (characters, whale "
                            "flukes), 'rotations' by 90/180/270 degrees (characters), or both; "
                            "doubles (x4, x5) the images per epoch. Never for faces or animals "
                            "whose mirror image is the same one: use --flip there (default "
                            "%(default)s)")
    train.add_argument("--augment", type=float, default=DEFAULTS.augment,
                       help="augmentation strength: scales the ranges of the random scale, shift, "
                            "rotation, brightness and contrast (0 = none, 2 = twice the default "
                            "ranges; default %(default)s)")
    train.add_argument("--stroke-augment", action="store_true",
                       help="line drawings or handwriting (characters, signatures, sketches): "
                            "strokes also thicken or thin and warp elastically while training, "
                            "as two drawings of one character differ. Not for photos (default: "
                            "off)")
    train.add_argument("--val-new-fraction", type=float, default=DEFAULTS.val_new_fraction,
                       help="share of training identities held back as pseudo-new validation "
                            "queries (default %(default)s)")
    train.add_argument("--no-refit", dest="refit", action="store_false",
                       help="keep the best validation model instead of retraining on all data "
                            "(where it ships the ImageNet features alone, their threshold is "
                            "still calibrated on all training images, as with the refit)")
    train.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default 0)")
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="FILE",
                     help="YAML or JSON file setting any training option by its field name "
                          "(e.g. 'epochs: 20', 'arcface_margin: 20'; a run's config.json works); "
                          "flags given on the command line override it")
    run.add_argument("--out", default=DEFAULTS.out,
                     help="output folder: model.pt, best.pt, last.pt, log.csv (default %(default)s)")
    run.add_argument("--resume", help="continue from a last.pt written by an interrupted run")
    run.add_argument("--workers", dest="num_workers", type=int, default=DEFAULTS.num_workers,
                     help="DataLoader worker processes (default %(default)s)")
    run.add_argument("--device", choices=["cpu", "cuda"],
                     help="force a device (default: cuda when available)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, over the --config file's values, over the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config_file(args.config))
        args = parser.parse_args(argv)
    return args


def main() -> int:
    args = parse_args()
    from retrieval.data import drop_unreadable, read_gallery  # cheap checks before torch loads

    config = TrainConfig.from_dict(vars(args))
    samples = read_gallery(args.gallery, args.labels, allow_outside=args.allow_outside)
    from retrieval.training import protocol
    from retrieval.training.train import train

    if args.whale_protocol:
        protocol.check_exportable(samples, args.gallery)
    samples = drop_unreadable(samples, strict=args.strict)
    if args.whale_protocol:
        protocol.run(config, samples, args.whale_protocol, data_root=args.gallery)
    else:
        path = train(config, samples, resume=args.resume)
        logging.getLogger("train_embed").info("model written to %s", path)
    return 0


if __name__ == "__main__":
    run_cli(main)
