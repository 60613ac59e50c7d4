"""``python -m bench all [--quick]``: every suite in turn, one thread, one summary at the end.

--quick (the whole CPU suite: 327 s measured on a fresh clone on the 2-core machine, well under 30 min):
  accuracy  orl, seeds 0-4, 64 px, 4 selection epochs, all four losses + softmax baseline
  open-set  orl, seed 0, 64 px, 4 epochs, all four losses + softmax baseline
  (both: + the peer libraries for the engine's ArcFace training time)
  speed     64 px; 128 images embedded, 96 trained; 10k-vector galleries; index types at 10k;
            the scale part at 100k vectors (flat and ivf); the Milvus backend at 10k
Without --quick each suite runs at its own defaults (omniglot, 96 px, the 1M-vector speed part: ~3 hours).
"""
from __future__ import annotations

import argparse
import time

from .common import Report, format_table


def _namespace(parser_defaults: dict, **overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**parser_defaults, **overrides})


def _defaults(module) -> dict:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return vars(p.parse_args([]))


def run_all(args) -> None:
    from . import accuracy, open_set, speed

    quick = args.quick
    data = args.data or ("orl" if quick else "omniglot")
    common = {"threads": args.threads, "out": args.out, "progress": args.progress, "device": args.device,
              "tag": "quick" if quick else None}
    plans = []
    if quick:
        plans = [
            ("accuracy", accuracy, dict(data=data, seeds=[0, 1, 2, 3, 4], image_size=64, epochs=4)),
            ("open-set", open_set, dict(data=data, seeds=[0], image_size=64, epochs=4)),
            ("speed", speed, dict(image_size=64, embed_images=128, train_images=96, gallery=[10_000],
                                  queries=500, query_runs=3, index_sizes=[10_000], repeats=3,
                                  scale_size=100_000, scale_types=["ivf"], serve_gallery=[1_000],
                                  serve_requests=50, serve_seconds=10, milvus_sizes=[10_000])),
        ]
    else:
        plans = [(name, module, dict(data=data) if name != "speed" else {})
                 for name, module in (("accuracy", accuracy), ("open-set", open_set),
                                      ("speed", speed))]
    report = Report("all", argparse.Namespace(**{**vars(args), "tag": None}))
    done = []
    for name, module, overrides in plans:
        sub_args = _namespace(_defaults(module), **common, **overrides)
        started = time.time()
        print(f"\n===== {name}: {overrides} =====", flush=True)
        try:
            module.run(sub_args)
            status = "ok"
        except Exception as err:  # one suite failing must not lose the others' results
            status = f"failed: {type(err).__name__}: {err}"
            print(status, flush=True)
        done.append([name, round(time.time() - started), status])
    table = format_table(["suite", "seconds", "status"], done,
                         f"python -m bench all{' --quick' if quick else ''} (data {data})")
    print(table)
    report.write("all_quick" if quick else "all", args.out, suites=done, table=table)
