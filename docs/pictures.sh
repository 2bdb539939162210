#!/usr/bin/env bash
# Regenerates the pictures of README.md and docs/visualize.md from real runs: the README's first command (a search on
# the embedded digits), a short training of the cell it found, and visualize.py on both.
# About 4 minutes on 2 cores; the run folders go to runs/pictures-*, the pictures to docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
search=runs/pictures-search eval=runs/pictures-eval
rm -rf "$search" "$eval"
python train_search.py --dataset digits --image_size 16 --epochs 10 --layers 3 --init_channels 4 --batch_size 64 \
  --learning_rate 0.1 --nodes 3 --primitives none,max_pool_3x3,skip_connect,sep_conv_3x3 \
  --arch_learning_rate 3e-2 --arch_learning_rate_schedule cosine --save "$search"
python train.py --genotype_file "$search/genotype.json" --dataset digits --image_size 16 --epochs 10 \
  --layers 6 --init_channels 8 --batch_size 64 --save "$eval"
python visualize.py --run "$search" --out docs/search
python visualize.py --run "$eval" --out docs/eval
python visualize.py "$search/genotype.json" --out docs/search          # genotype_normal.png, genotype_reduce.png
python visualize.py DARTS_PADDLE --out docs                              # DARTS_PADDLE_normal.png, ..._reduce.png
ls -l docs/search docs/eval docs/DARTS_PADDLE_*.png
