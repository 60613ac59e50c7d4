"""Benchmarks (not tests: nothing passes or fails). From the repository root:

  python -m bench all --quick          # every suite, small settings, < ~30 min on 2 cores
  python -m bench accuracy --data omniglot --seeds 0 1 2 3 4 --image-size 96 --epochs 15
  python -m bench open-set --data orl --seeds 0 1 2 --image-size 96 --epochs 10
  python -m bench speed
  python -m bench peers --data orl     # the peer libraries alone, open-set, one seed
  python -m bench audit                # the gallery audit against injected label swaps / duplicates
  python -m bench classification       # grocery classes: kNN over the embedding vs a softmax classifier
  python -m bench kept --data orl --keep runs/   # re-score runs kept by ablation --keep
  python -m bench blend-ties --data orl --keep runs/   # the blend's tie rule on kept runs
  python -m bench rerank --data orl --keep runs/       # k-reciprocal re-ranking on kept runs
  python -m bench local-match --data orl --keep runs/  # pooled + local (chamfer) similarity
  python -m bench zero-shot-index --data omniglot     # build_index + query.py on the protocol
  python -m bench multi-scale --data omniglot         # zero-shot features of two sizes, concatenated
  python -m bench ablation --data dogfacenet --max-identities 300 --variants base "fbn=freeze_bn:true"

Each suite prints a table and writes bench/results/<name>.json (+ .txt with the table). By default
everything runs on ONE thread (--threads), so a shared 2-core machine stays usable.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def suites() -> dict:
    """Each suite's command name and its module (``add_arguments`` and ``run``): the one list
    the parser and ``main`` both read."""
    from . import (ablation, accuracy, audit_bench, blend_ties, classification, kept,
                   local_match, multi_scale, open_set, peers_suite, rerank, speed,
                   zero_shot_index)

    return {"accuracy": accuracy, "open-set": open_set, "speed": speed, "peers": peers_suite,
            "ablation": ablation, "audit": audit_bench, "classification": classification,
            "kept": kept, "blend-ties": blend_ties, "rerank": rerank,
            "local-match": local_match, "zero-shot-index": zero_shot_index,
            "multi-scale": multi_scale}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=1,
                        help="torch / FAISS / BLAS threads (default %(default)s)")
    common.add_argument("--out", help="results folder (default bench/results)")
    common.add_argument("--device", default=None,
                        help="torch device for training and embedding: cpu, cuda, cuda:1 "
                             "(default: cuda where torch sees a GPU, else cpu)")
    common.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    sub = p.add_subparsers(dest="suite", required=True)
    for name, module in suites().items():
        sp = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], parents=[common],
                            description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
    sp = sub.add_parser("all", help="every suite in turn", parents=[common])
    sp.add_argument("--quick", action="store_true",
                    help="small settings for the whole CPU suite (< ~30 min on 2 cores)")
    sp.add_argument("--data", default=None, help="data set for the trained suites "
                                                  "(default: orl with --quick, else omniglot)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # thread caps must be in the environment before numpy / torch / faiss load
    threads = "1"
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif a.startswith("--threads="):
            threads = a.split("=", 1)[1]
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = threads
    args = build_parser().parse_args(argv)
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"
    from .common import quiet_logs, set_threads

    set_threads(args.threads)
    quiet_logs(args.progress)
    if args.suite == "all":
        from .suite import run_all
        run_all(args)
        return 0
    module = suites()[args.suite]
    started = time.time()
    module.run(args)
    print(f"({args.suite}: {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
