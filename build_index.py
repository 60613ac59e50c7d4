"""Embed a labelled gallery and write a searchable index folder for query.py.

  python build_index.py --gallery DIR [--labels train.csv] [--model runs/model/model.pt] --out runs/index
  python build_index.py --gallery NEW_DIR --out runs/index --append      # embed only new images
  python build_index.py --out runs/index --remove-identity w_123abc       # drop one identity
  torchrun --nproc_per_node=N build_index.py --gallery DIR ...           # N processes embed shards

Without --model the index uses the zero-shot model (pretrained backbone + GeM of its final map and
last two feature stages, no fine-tuning); its image size (224 or 160 px), new_whale threshold,
hubness weight, whitening and local re-scoring are then chosen on the gallery itself (leave-one-out
queries). The folder holds the FAISS index, the gallery table, the raw vectors and
manifest.json (model fingerprint and preprocessing, TTA, threshold); it is replaced atomically.
"""
from __future__ import annotations

import argparse

from index.store import DEFAULT_INDEX_DIR
from index.types import CHOICES as INDEX_TYPES
from retrieval.cli import add_companion_arguments, add_gallery_arguments
from retrieval.config import COMPANION_BACKBONE
from retrieval.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gallery_arguments(p, required=False)
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="CKPT",
                       help="model.pt written by train_embed.py (its preprocessing and new_whale "
                            "threshold go into the index); default: the zero-shot pretrained model")
    model.add_argument("--image-size", type=int,
                       help="input side in pixels for the zero-shot model only; a checkpoint "
                            "brings its own (default: the gallery chooses between the backbone's "
                            "native size and 5/7 of it, 224 or 160 px, by leave-one-out MAP@5 on "
                            "up to 2,000 of its images, the native size on ties; the native size "
                            "with --threshold; an appended index keeps its own)")
    model.add_argument("--tta", choices=["none", "flip"],
                       help="test-time augmentation: 'flip' averages each image with its mirror "
                            "(only where a mirror shows the same identity); recorded in the index "
                            "and applied to queries too (default: none, or the index's own with --append)")
    model.add_argument("--threshold", type=float,
                       help="new_whale threshold to record in the index (default: the checkpoint's; "
                            "for the zero-shot model, one calibrated on the gallery's own images by "
                            "leave-one-out MAP@5; an edited index keeps its own)")
    model.add_argument("--hubness", action=argparse.BooleanOptionalAction, default=True,
                       help="zero-shot model: choose, with the calibrated threshold, the weight "
                            "(0, 1/4, 1/2) of the hubness correction (each gallery image's "
                            "similarity minus the weight times its mean similarity to its 10 "
                            "nearest gallery images) on the same leave-one-out queries; "
                            "--no-hubness searches plain cosine. A checkpoint brings its own "
                            "weight (default: %(default)s)")
    model.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True,
                       help="zero-shot model: whiten the gallery and every query within identities "
                            "(a linear map fitted on the gallery's labelled images damps the ways "
                            "photos of one identity differ), where leave-one-out MAP@5 on the "
                            "gallery says it beats plain cosine, each query answered by a map "
                            "fitted without it; the map is stored with the index and appends go "
                            "through it (up to 20,000 images; FAISS backend). With --model: the "
                            "checkpoint's own choice, made on its validation carve-out "
                            "(train_embed.py --whiten-output); --no-whiten searches its index "
                            "plain (default: %(default)s)")
    model.add_argument("--local", action=argparse.BooleanOptionalAction, default=True,
                       help="zero-shot model: re-score each query's 50 nearest gallery images by "
                            "local matching (the backbone's stride-16 descriptors compared "
                            "location by location, blended with the pooled cosine), where "
                            "leave-one-out MAP@5 on the gallery says it helps, with the blend "
                            "share chosen there; the index then keeps 20-45 KB of descriptors "
                            "per image (up to 20,000 images; FAISS backend). It lifts line "
                            "drawings most; --no-local searches the pooled vectors alone "
                            "(default: %(default)s)")
    add_companion_arguments(
        model, None,
        help="zero-shot model: the second network whose untrained ImageNet "
             f"features go beside the first's (default {COMPANION_BACKBONE}, whose weights ship "
             "with the package; any timm name with weights), at the share of the cosine (0, 1/4, "
             "1/2, 3/4) chosen by leave-one-out MAP@5 on the gallery, 0 on ties; where a share is "
             "kept, every image also goes through that network (about 2.5x the embedding time). "
             "On dog photos it lifted MAP@5 0.782 -> 0.806, characters and faces level "
             "(bench/README.md, \"Two networks side by side\"). On by default for a fresh "
             "zero-shot index",
        off_help="zero-shot model: one network only (no second one tried)")
    index = p.add_argument_group("index")
    index.add_argument("--out", default=DEFAULT_INDEX_DIR,
                       help="index folder to write, replaced atomically (default %(default)s)")
    index.add_argument("--index-type", choices=INDEX_TYPES,
                       help="flat: exact (default); hnsw / ivf: faster approximate search for big "
                            "galleries; ivfpq: compressed codes shortlist, the raw vectors re-score "
                            "exactly (FAISS only); auto: exact below 100k vectors, ivfpq above (ivf "
                            "with GPUs), tuned to --target-recall, and exact instead where tuning "
                            "cannot reach it (with --append: the index's own unless given)")
    index.add_argument("--target-recall", type=float, metavar="R",
                       help="approximate types (ivf, hnsw, ivfpq, and auto when it picks one): "
                            "after building, tune nprobe / efSearch to the smallest value whose "
                            "recall@5 against exact search reaches R on 500 of the gallery's own "
                            "images held out as queries; the value and the measured recall go into "
                            "the manifest (default 0.95, or the index's own with --append)")
    index.add_argument("--gpu-float16", action=argparse.BooleanOptionalAction, default=None,
                       help="where the index is searched on GPUs, store flat / ivf vectors there in "
                            "float16: half the GPU memory, similarities off by ~1e-3 (recorded in "
                            "the manifest; no effect on a CPU; default: off, or the index's own "
                            "with --append)")
    index.add_argument("--append", action="store_true",
                       help="add the gallery's images that the index does not hold yet, embedded "
                            "with the index's own model; nothing already there is re-embedded")
    index.add_argument("--remove-identity", dest="remove", action="append", default=[], metavar="ID",
                       help="drop every image of this identity from the index at --out (repeatable; "
                            "nothing is re-embedded)")
    backend = p.add_argument_group("backend (where the vectors live)")
    backend.add_argument("--backend", choices=["faiss", "milvus"],
                         help="faiss: files in the --out folder (default); milvus: a Milvus "
                              "collection, for galleries beyond one machine or several writers "
                              "(the folder then holds the manifest naming it; query.py is "
                              "unchanged). An edit keeps the index's own backend")
    backend.add_argument("--milvus-uri", metavar="URI",
                         help="with --backend milvus: a file path runs milvus-lite in this process "
                              "(pip install --no-deps milvus-lite), http://host:19530 a Milvus "
                              "server or cluster; credentials only from MILVUS_TOKEN or "
                              "MILVUS_USER + MILVUS_PASSWORD, never in the URI")
    backend.add_argument("--milvus-collection", metavar="NAME",
                         help="with --backend milvus: the collection (default whale_gallery); an "
                              "existing one is refused unless --out is already its index folder")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64,
                     help="images per batch per process (default %(default)s)")
    run.add_argument("--workers", type=int,
                     help="DataLoader worker processes per process (default: none on a machine of "
                          "2 cores or fewer, where they only compete with the model; else up to 4)")
    run.add_argument("--device", choices=["cpu", "cuda"],
                     help="force a device for embedding (default: cuda when available)")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars (for logs)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    from retrieval.answering.indexing import BuildOptions, run

    run(BuildOptions(**vars(args)))
    return 0


if __name__ == "__main__":
    run_cli(main)
