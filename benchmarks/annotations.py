"""Parse time, cache-load time and peak memory of the annotation reader at full size.

Writes a synthetic annotation set of the real release's size (289,222 images x 1,000
attributes, ~870 MB of list_attr_img.txt; no images), then, each in a fresh process pinned
to one CPU core: parses it (and writes the cache), and loads it from the cache.

  python -m benchmarks.annotations [--num_images 289222] [--root DIR] [--json OUT]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import synthetic
from deepfashion_jax.data import vocabulary

TARGETS = dict(parse_s=60.0, parse_peak_mb=3072.0, cache_load_s=2.0)


def full_size_contents(n: int, seed: int = 0) -> synthetic.ListContents:
  """Random list contents shaped like the real release: sparse positives, a few unknowns."""
  rng = np.random.default_rng(seed)
  category = np.sort(rng.integers(0, vocabulary.NUM_CATEGORIES, n))
  paths = [f'img/Benchmark_Product_{i // 8:06d}_{vocabulary.CATEGORY_NAMES[c]}/img_{i % 8 + 1:08d}.jpg'
           for i, c in enumerate(category.tolist())]
  values = np.full((n, vocabulary.NUM_ATTRIBUTES), -1, np.int8)
  rows = rng.integers(0, n, 3 * n)
  values[rows, rng.integers(0, vocabulary.NUM_ATTRIBUTES, 3 * n)] = 1
  values[rng.integers(0, n, n), rng.integers(0, vocabulary.NUM_ATTRIBUTES, n)] = 0
  x1, y1 = rng.integers(0, 150, n), rng.integers(0, 150, n)
  bbox = np.stack([x1, y1, x1 + rng.integers(1, 150, n), y1 + rng.integers(1, 150, n)], 1)
  garment_types = np.array(vocabulary.CATEGORY_TYPES)[category]
  counts = np.array(vocabulary.LANDMARKS_PER_GARMENT_TYPE)[garment_types]
  points = np.concatenate([rng.integers(0, 3, (n, 8, 1)), rng.integers(0, 300, (n, 8, 2))], 2)
  landmarks = [points[i, :k] for i, k in enumerate(counts.tolist())]
  split = rng.permutation(np.resize(np.array([0] * 72 + [1] * 14 + [2] * 14, np.int8), n))
  return synthetic.ListContents(paths, category, values, bbox, split, landmarks)


def _child(root: str, cache_dir: str):
  """Runs in a fresh process on one core: one timed load_deepfashion, as JSON on stdout."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  start = time.perf_counter()
  index = annotations.load_deepfashion(root, cache_dir)
  seconds = time.perf_counter() - start
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(dict(seconds=seconds, peak_mb=peak_mb, images=len(index),
                        positives=int(index.attribute_positive.sum()))))


def _timed_load(root: str, cache_dir: str) -> dict:
  # This module again, from the repository root (where `benchmarks` and the package are).
  repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  output = subprocess.run([sys.executable, '-m', 'benchmarks.annotations', '--child',
                           os.path.abspath(root), os.path.abspath(cache_dir)],
                          cwd=repository, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=289222)
  parser.add_argument('--root', default='', help='where to write the lists (default: a temp dir)')
  parser.add_argument('--json', default='', help='write the figures here too')
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return _child(*args.child)

  with tempfile.TemporaryDirectory() as scratch:
    root = args.root or os.path.join(scratch, 'deepfashion')
    cache_dir = os.path.join(scratch, 'cache')
    start = time.perf_counter()
    contents = full_size_contents(args.num_images)
    names, types = synthetic.attribute_vocabulary()
    synthetic.write_lists(root, contents, names, types)
    write_s = time.perf_counter() - start
    attr_mb = os.path.getsize(os.path.join(root, annotations.ATTR_IMG)) / 2**20
    expected_positives = int((contents.attribute_values == 1).sum())
    del contents
    parse = _timed_load(root, cache_dir)
    cached = _timed_load(root, cache_dir)
    cache_mb = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
    cache_mb /= 2**20
  assert parse['positives'] == cached['positives'] == expected_positives

  figures = dict(num_images=args.num_images, list_attr_img_mb=round(attr_mb, 1),
                 write_s=round(write_s, 2), parse_s=round(parse['seconds'], 2),
                 parse_peak_mb=round(parse['peak_mb']), cache_load_s=round(cached['seconds'], 3),
                 cache_load_peak_mb=round(cached['peak_mb']), cache_mb=round(cache_mb, 1))
  print(f'annotation reader, {args.num_images:,} images, list_attr_img.txt {attr_mb:,.0f} MB, '
        f'one CPU core')
  print(f'{"measure":<22}{"measured":>12}{"target":>12}')
  for key, unit in (('parse_s', 's'), ('parse_peak_mb', 'MB'), ('cache_load_s', 's'),
                    ('cache_load_peak_mb', 'MB'), ('cache_mb', 'MB'), ('write_s', 's')):
    target = f'< {TARGETS[key]:g} {unit}' if key in TARGETS else ''
    print(f'{key:<22}{figures[key]:>10} {unit:<2}{target:>12}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  main()
