import sys
from pathlib import Path
from retrieval.data import read_folder_gallery, whale_split
from retrieval.training.protocol import export_split
root = Path(sys.argv[1]); seed = int(sys.argv[2]); out = Path(sys.argv[3]); n = int(sys.argv[4]) if len(sys.argv) > 4 else 0
samples = read_folder_gallery(root)
if n:
    keep = sorted({s.identity for s in samples})[:n]
    samples = [s for s in samples if s.identity in set(keep)]
export_split(whale_split(samples, seed), root, out)
