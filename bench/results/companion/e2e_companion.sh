#!/bin/bash
# whale protocol through the CLI: export the split, build the zero-shot index (with/without --companion), query, score
cd /work/main
run() { # set root n seed flag tag
  set_=$1; root=$2; n=$3; seed=$4; flag=$5; tag=$6
  D=/work/probe/e2e/${set_}_s$seed
  [ -d $D ] || .venv/bin/python /work/probe/e2e_split.py $root $seed $D $n
  s0=$(date +%s)
  .venv/bin/python build_index.py --gallery $root --labels $D/gallery.csv $flag --out $D/idx_$tag --no-progress > $D/build_$tag.log 2>&1
  s1=$(date +%s)
  .venv/bin/python query.py $D/queries --index $D/idx_$tag --submission $D/sub_$tag.csv > /dev/null 2>&1
  m=$(.venv/bin/python -m retrieval.answering.submission $D/sub_$tag.csv $D/queries_truth.csv 2>&1 | grep -o "MAP@5 [0-9.]*" | head -1)
  share=$(grep -o "share [0-9.]* chosen" $D/build_$tag.log)
  echo "$set_ seed $seed $tag $m build_s $((s1-s0)) $share" | tee -a /work/probe/e2e/results.txt
}
mkdir -p /work/probe/e2e
for seed in 0 1 2 3 4; do
  run dogs /work/shared/data/dogfacenet 300 $seed --companion comp
  run omniglot /work/shared/data/omniglot/images_background_small1 0 $seed --companion comp
  run orl /work/shared/data/orl_faces 0 $seed --companion comp
done
for seed in 0 1 2 3 4; do
  run dogs /work/shared/data/dogfacenet 300 $seed "" plain
  run omniglot /work/shared/data/omniglot/images_background_small1 0 $seed "" plain
  run orl /work/shared/data/orl_faces 0 $seed "" plain
done
