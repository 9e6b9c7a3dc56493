"""Input pipeline throughput against the decode ceiling and the PyTorch baseline's loader.

On the same files and cores:
  decode_ceiling_img_s  JPEG decoding alone (bytes already in memory), one core, tight loop
  pipeline_img_s        this project's grain pipeline, W decoding threads, training transforms,
                        batches of 32 (and, for comparison, W worker processes)
  pipeline_1_thread_img_s  the same with one decoding thread, against one core's ceiling:
                        the pipeline's rate per host core, `per_core_images_per_second`
  tfds_pipeline_img_s   the same pipeline reading the prepared TFDS (ArrayRecord) dataset
  torch_baseline_img_s  torch DataLoader, W workers, what the baseline does per image (PIL
                        open, RGB, resize 256, random 224 crop, flip, to float, normalise)
The pipeline's host part decodes and pads; resize, crop and flip run in the jitted step on
the accelerator. That device part is timed here too (`device_part_img_s`, on this machine's
JAX device) and reported apart.

The synthetic files are flat drawings (`--texture flat`) or the same drawings coded like
photographs (`--texture photo`, `synthetic.photographic`): DeepFashion's 10-25 KB. The JSON's
`per_core_images_per_second_realistic` is the one-thread rate on photo files, what a host
core feeds an accelerator. Either way the file costs of both kinds (bytes and decode time per
image, the same drawings, decoded interleaved) are printed first.

  python -m benchmarks.input_pipeline [--data_dir DIR] [--texture photo] [--workers 2]
      [--threads_only] [--json OUT]

It is a library caller of the pipeline, as a script or a notebook is: it parses no absl
flags, and the grain worker processes start all the same.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import pipeline
from deepfashion_jax.data import sources
from deepfashion_jax.data import synthetic
from deepfashion_jax.data import transforms

BATCH = 32


def decode_ceiling(files, seconds=3.0):
  """Images per second that one core decodes, bytes already in memory."""
  blobs = []
  for path in files:
    with open(path, 'rb') as f:
      blobs.append(f.read())
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    for blob in blobs:
      transforms.decode_image(blob)
    count += len(blobs)
  return count / (time.perf_counter() - start)


def file_costs(count=48, repeats=5):
  """Bytes and decode milliseconds per image of the same drawings written flat and as
  photos, decoded alternately (median of `repeats`), as the synthetic writer saves them."""
  blobs = {texture: [] for texture in synthetic.TEXTURES}
  for i in range(count):
    seed = np.random.SeedSequence(i)
    drawn = synthetic.draw_image(np.random.default_rng(seed), i % 46,
                                 synthetic.VISIBLE_TEXTURES[i % 5])
    for texture, texture_blobs in blobs.items():
      texture_blobs.append(synthetic.jpeg(drawn.image, seed, texture))
  times = {texture: [] for texture in blobs}
  for _ in range(repeats):
    for texture, texture_blobs in blobs.items():
      start = time.perf_counter()
      for blob in texture_blobs:
        transforms.decode_image(blob)
      times[texture].append((time.perf_counter() - start) / count)
  return {texture: dict(kb_per_image=float(np.median([len(b) for b in blobs[texture]])) / 1e3,
                        kb_p5_p95=[float(np.percentile([len(b) for b in blobs[texture]], q))
                                   / 1e3 for q in (5, 95)],
                        decode_ms_per_image=float(np.median(times[texture])) * 1e3)
          for texture in blobs}


def time_batches(iterator, batches, warmup=3):
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * BATCH / (time.perf_counter() - start)


def pipeline_rate(source, batches, threads, processes=0):
  dataset = pipeline.train_dataset(source, batch_size=BATCH, seed=0,
                                   options=pipeline.ImageOptions())
  iterator = pipeline.iterate(dataset, threads=threads, processes=processes)
  rate = time_batches(iterator, batches)
  batch = {key: np.array(value) for key, value in next(iterator).items()}
  iterator.close()  # stops the worker processes now, not at interpreter exit
  return rate, batch


def device_part_rate(batch, repeats=10):
  """The jitted resize-crop-flip on this machine's JAX device (an accelerator in training)."""
  import jax  # pylint: disable=g-import-not-at-top
  step = jax.jit(lambda b: device_transforms.batch_images(b, 224))
  arrays = {k: batch[k] for k in ('canvas', 'window', 'region', 'flip')}
  device_batch = jax.device_put(arrays)
  step(device_batch).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    step(device_batch).block_until_ready()
  return repeats * BATCH / (time.perf_counter() - start), str(jax.devices()[0])


class BaselineDataset:
  """What the baseline's dataset does per training image, without torchvision."""

  def __init__(self, files):
    self.files = files

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    import torch  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng()
    with Image.open(self.files[i]) as image:
      image = image.convert('RGB').resize((256, 256), Image.BILINEAR)
    top, left = rng.integers(0, 33, 2)
    image = image.crop((left, top, left + 224, top + 224))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    return (tensor - 0.5) / 0.5, i


def torch_rate(files, workers, batches):
  import torch  # pylint: disable=g-import-not-at-top
  dataset = BaselineDataset(files)
  sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                           num_samples=(batches + 3) * BATCH)
  loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler,
                                       num_workers=workers)
  return time_batches(iter(loader), batches)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='', help='a DeepFashion folder (default: write '
                      '--images synthetic images)')
  parser.add_argument('--images', type=int, default=512,
                      help='synthetic images to write without --data_dir')
  parser.add_argument('--texture', default='flat', choices=synthetic.TEXTURES,
                      help='the synthetic files: flat drawings or coded like photographs')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--threads_only', action='store_true',
                      help='only the ceiling and the threaded pipeline (no processes, TFDS, '
                      'torch or device rows)')
  parser.add_argument('--batches', type=int, default=80)
  parser.add_argument('--decode_seconds', type=float, default=3.0,
                      help='how long the decode ceiling is measured')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as scratch:
    root = args.data_dir
    if not root:
      root = os.path.join(scratch, 'deepfashion')
      synthetic.write_synthetic_deepfashion(root, num_images=args.images, seed=0,
                                            texture=args.texture)
    index = annotations.read_deepfashion(root)
    files = [os.path.join(index.image_dir(), p) for p in index.image_paths]
    cores = min(args.workers, os.cpu_count())
    figures = dict(images=len(files), workers=args.workers, cores_used=cores,
                   texture=args.texture if not args.data_dir else 'files',
                   file_costs=file_costs(count=min(48, args.images)))
    figures['kb_per_image'] = float(np.mean([os.path.getsize(f) for f in files])) / 1e3
    figures['decode_ceiling_img_s'] = decode_ceiling(files[:256], args.decode_seconds)
    # W workers: W decoding threads in one process (the default layout), and for
    # comparison W worker processes of one thread each.
    folder_source = sources.FolderSource(index, np.arange(len(index)))
    figures['pipeline_1_thread_img_s'], _ = pipeline_rate(folder_source, args.batches, 1)
    figures['pipeline_img_s'], batch = pipeline_rate(folder_source, args.batches, args.workers)
    figures['per_core_images_per_second'] = figures['pipeline_1_thread_img_s']
    if figures['texture'] == 'photo':
      figures['per_core_images_per_second_realistic'] = figures['pipeline_1_thread_img_s']
    if args.threads_only:
      report(figures, cores, args)
      return figures
    figures['pipeline_processes_img_s'], _ = pipeline_rate(folder_source, args.batches, 1,
                                                           args.workers)
    # The same pipeline reading the prepared TFDS dataset (ArrayRecord) instead of files.
    # Imported here: --threads_only runs where tensorflow-datasets is not installed (a GPU
    # machine's image with JAX alone).
    from deepfashion_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    tfds_dir = os.path.join(scratch, 'tfds')
    tfds_builder.prepare(index, tfds_dir)
    figures['tfds_pipeline_img_s'], _ = pipeline_rate(sources.TfdsSource(tfds_dir, 'train'),
                                                      args.batches, args.workers)
    figures['torch_baseline_img_s'] = torch_rate(files, args.workers, args.batches)
    figures['device_part_img_s'], figures['device'] = device_part_rate(batch)
  figures['pipeline_vs_torch'] = figures['pipeline_img_s'] / figures['torch_baseline_img_s']
  report(figures, cores, args)
  return figures


def report(figures, cores, args):
  """Prints the table (and writes the JSON): every row measured in this run."""
  ceiling = figures['decode_ceiling_img_s'] * cores
  figures['pipeline_vs_decode_ceiling'] = figures['pipeline_img_s'] / ceiling
  figures['pipeline_1_thread_vs_decode_ceiling'] = (figures['pipeline_1_thread_img_s']
                                                    / figures['decode_ceiling_img_s'])
  print(f'{"file cost (same drawings)":<34}{"KB/img":>10}{"p5-p95 KB":>14}{"decode ms/img":>15}')
  for texture, cost in figures['file_costs'].items():
    low, high = cost['kb_p5_p95']
    print(f'{texture + f" (JPEG quality {synthetic.JPEG_QUALITY[texture]})":<34}'
          f'{cost["kb_per_image"]:>10.1f}{f"{low:.0f}-{high:.0f}":>14}'
          f'{cost["decode_ms_per_image"]:>15.3f}')
  print()
  print(f'input pipeline, {figures["images"]} images ({figures["texture"]}, '
        f'{figures["kb_per_image"]:.1f} KB each), {args.workers} workers on {cores} cores, '
        f'batches of {BATCH}')
  print(f'{"measure":<34}{"img/s":>10}')
  print(f'{"decode ceiling, one core":<34}{figures["decode_ceiling_img_s"]:>10.0f}')
  print(f'{f"decode ceiling x {cores} cores":<34}{ceiling:>10.0f}')
  print(f'{"pipeline, 1 thread":<34}{figures["pipeline_1_thread_img_s"]:>10.0f}'
        f'   {figures["pipeline_1_thread_vs_decode_ceiling"]:.0%} of one core\'s ceiling')
  print(f'{f"pipeline, {args.workers} threads":<34}{figures["pipeline_img_s"]:>10.0f}'
        f'   {figures["pipeline_vs_decode_ceiling"]:.0%} of ceiling (target >= 45%)')
  if args.threads_only:
    write_json(figures, args)
    return
  print(f'{f"pipeline, {args.workers} processes":<34}{figures["pipeline_processes_img_s"]:>10.0f}'
        f'   (grain worker processes instead of threads)')
  print(f'{f"pipeline, TFDS source, {args.workers} threads":<34}'
        f'{figures["tfds_pipeline_img_s"]:>10.0f}   (ArrayRecord files instead of JPEG files)')
  print(f'{"torch baseline DataLoader":<34}{figures["torch_baseline_img_s"]:>10.0f}'
        f'   pipeline is {figures["pipeline_vs_torch"]:.1f}x (target >= 3x)')
  print(f'{"device part (resize/crop/flip)":<34}{figures["device_part_img_s"]:>10.0f}'
        f'   on {figures["device"]}, inside the jitted step')
  write_json(figures, args)


def write_json(figures, args):
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  main()
