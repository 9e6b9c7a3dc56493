"""The input pipeline: grain datasets of DeepFashion batches, for training and evaluation.

Why grain's `MapDataset` (and not `DataLoader` with an `IndexSampler`): each step of the
chain is a small, separately testable dataset (source -> process shard -> per-epoch shuffle
-> per-example random transform -> batch); randomness comes from `random_map`, which seeds
each element from the pipeline seed and the element's position, so the batches do not
depend on the number of worker threads or processes; and the resulting iterator's state (a position)
is what orbax saves with the model, through `grain.checkpoint`.

Host work per image is decoding and copying into a fixed canvas; the crop's window (the
whole image, or the ground-truth box with config.data.crop='gt_box'), the random crop and
the flip are drawn here but applied to the pixels on the device
(`device_transforms.batch_images`): a box crop costs no second decode and no copy.

A batch is a dict of NumPy arrays, B = the per-process batch size:
  canvas (B, S, S, 3) uint8: each decoded image at the top-left of an S x S canvas
  window (B, 4) int32: (x0, y0, x1, y1), the canvas pixels the crop reads: the image, or
    its enlarged ground-truth box (see transforms.py)
  region (B, 4) float32, flip (B,) bool: what to resample (see transforms.py)
  bbox (B, 4) float32: the ground-truth box in [0, 1] coordinates of the crop, clipped to
    the image and to the crop (with 'gt_box' crops: about the whole frame, less the margin)
  landmarks (B, 8, 2) float32: each slot's landmark (x, y) in [0, 1] coordinates of the
    crop (`landmark_slots.SLOT_NAMES`; a flipped crop's left slots hold the landmarks
    that were on the right), clipped to the crop; 0 for slots the garment type lacks
  landmark_visible (B, 8) bool: the landmark is there, visible in the list (not occluded
    or truncated) and inside the crop; False for every slot where valid is False
  category, category_type (B,) int32; attribute_positive, attribute_unknown (B, 1000) bool
  index (B,) int32: the example's row in the annotation index (-1 for padding)
  valid (B,) bool: False for evaluation padding and for unreadable evaluation images
  box_valid (B,) bool: False where valid is, and where no box is left once the list's box
    is clipped to the image (an empty box, or one outside the image): the box loss and
    the box metrics leave those examples out; their labels still count. (A crop that
    misses a good box keeps it, as an edge of the crop, like the baseline.)
  skipped (B,) int32: unreadable files met for this example (replaced in training,
    masked out in evaluation)
"""

import dataclasses
import math
import numbers
from typing import NamedTuple

from absl import flags
from absl import logging
import grain
import numpy as np

from deepfashion_jax import errors
from deepfashion_jax.data import image_files
from deepfashion_jax.data import transforms

# Give up on a training example after this many unreadable files in a row.
_MAX_CONSECUTIVE_BAD_FILES = 100
# grain seeds NumPy's generators, which take seeds in [0, 2**32).
_MAX_SEED = 2**32 - 1


def _check_count(value, field: str, minimum: int = 1, maximum: int = None):
  """Raises ConfigError naming the field unless the value is an int (not a bool, not a
  float that happens to be whole) in [minimum, maximum].

  The pipeline is a library too: a script or a notebook reaches it without main.py's
  start-up checks, and a wrong count would otherwise fail inside grain or NumPy without
  naming the field, or (a bool, a negative number of processes) run silently as another.
  """
  if (not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_))
      or value < minimum or (maximum is not None and value > maximum)):
    expected = f'an integer >= {minimum}' if maximum is None else (
        f'an integer in [{minimum}, {maximum}]')
    raise errors.ConfigError(f'{field}={value!r}: expected {expected}')


def _check_flag(value, field: str):
  if not isinstance(value, (bool, np.bool_)):
    raise errors.ConfigError(f'{field}={value!r}: expected True or False')


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  canvas_size: int = 300  # side of the canvas the host sends (DeepFashion's long side)
  img_size: int = 256  # training: resize to img_size x img_size, then
  crop_size: int = 224  # a random crop_size crop; the model's input side
  random_flip: bool = True  # training: mirror half the crops
  eval_crop: str = 'resize'  # 'resize' to crop_size (baseline) or 'center_crop'
  crop: str = 'none'  # the window crops are drawn from: 'none' (the image) or 'gt_box'
  crop_margin: float = 10.0  # 'gt_box': pixels added to each side of the box
  strict: bool = False  # raise on an unreadable image instead of skipping it
  max_image_pixels: int = image_files.DEFAULT_MAX_PIXELS  # larger: refused from the header

  def __post_init__(self):
    """Each option is checked here, where the pipeline takes it, naming its config.data
    field (the fields have the options' names)."""
    for name in ('canvas_size', 'img_size', 'crop_size'):
      _check_count(getattr(self, name), f'config.data.{name}')
    if self.crop_size > self.img_size:
      raise errors.ConfigError(f'config.data.crop_size={self.crop_size} is larger than '
                               f'config.data.img_size={self.img_size}')
    for name in ('random_flip', 'strict'):
      _check_flag(getattr(self, name), f'config.data.{name}')
    for name, choices in (('eval_crop', transforms.EVAL_CROPS), ('crop', transforms.CROPS)):
      if getattr(self, name) not in choices:
        raise errors.ConfigError(f'config.data.{name}={getattr(self, name)!r}: expected one '
                                 f'of {choices}')
    margin = self.crop_margin
    if (not isinstance(margin, numbers.Real) or isinstance(margin, (bool, np.bool_))
        or not 0 <= margin < math.inf):
      raise errors.ConfigError(f'config.data.crop_margin={margin!r}: expected pixels >= 0')


def image_options(data_config) -> ImageOptions:
  """The image options of a config's `data` section."""
  return ImageOptions(canvas_size=data_config.canvas_size, img_size=data_config.img_size,
                      crop_size=data_config.crop_size, random_flip=data_config.random_flip,
                      eval_crop=data_config.eval_crop, crop=data_config.crop,
                      crop_margin=data_config.crop_margin, strict=data_config.strict,
                      max_image_pixels=data_config.max_image_pixels)


def _decode(record: dict, options: ImageOptions):
  """The decoded image, or None (logged, or raised when strict) when it cannot be read: a
  file missing, refused by the source (`image_files`), not decodable, or of more pixels than
  options.max_image_pixels."""
  try:
    if record['image_bytes'] is None:
      raise transforms.ImageDecodeError(record.get('image_error') or 'file not found')
    return transforms.decode_image(record['image_bytes'], options.max_image_pixels)
  except transforms.ImageDecodeError as e:
    if options.strict:
      raise transforms.ImageDecodeError(f'{record["path"]}: {e}') from None
    logging.warning('Skipping unreadable image %s: %s', record['path'], e)
    return None


class Fitted(NamedTuple):
  """An example's image as it fits in the canvas (`_fit`)."""
  image: np.ndarray  # (h, w, 3) uint8, at most canvas_size on each side
  bbox: np.ndarray  # the record's box, clipped to the image, in the canvas's pixels
  window: np.ndarray  # the pixels the crops read (transforms.whole_image or box_window)
  scale: np.ndarray  # (x, y) canvas pixels per file pixel, for the landmarks


def _fit(record: dict, image: np.ndarray, options: ImageOptions) -> Fitted:
  """The decoded image, the record's box and the crops' window, as they fit in the canvas,
  and the (x, y) scale from the file's pixels to the canvas's (for the landmarks).

  The box is clipped to the image first: the decoded image is the one place that knows
  its size, and a list's box may be empty or run past its image. A 'gt_box' window is
  measured (its margin counted) in the file's pixels and shrinks with an image larger than
  the canvas, out to whole pixels again.
  """
  height, width = image.shape[:2]
  bbox = transforms.clip_box_to_image(record['bbox'], height, width)
  if options.crop == 'gt_box':
    window = transforms.box_window(bbox, options.crop_margin, height, width)
  else:
    window = transforms.whole_image(height, width)
  image, boxes = transforms.fit_to_canvas(image, np.stack([bbox, window.astype(np.float32)]),
                                          options.canvas_size)
  if image.shape[:2] != (height, width):
    x0, y0, x1, y1 = boxes[1]
    window = np.array([np.floor(x0), np.floor(y0), min(np.ceil(x1), image.shape[1]),
                       min(np.ceil(y1), image.shape[0])], np.int32)
  scale = np.array([image.shape[1] / width, image.shape[0] / height])
  return Fitted(image, boxes[0], window, scale)


def _example(record: dict, fitted: Fitted, crop: transforms.Crop, valid: bool,
             skipped: int) -> dict:
  """One example of the image as it fits in the canvas, cut by `crop` (in its pixels).

  Its box and landmarks stay in the canvas's pixels here: `Collate` converts a whole
  batch's into its crops' coordinates at once.
  """
  return dict(image=fitted.image, window=fitted.window, region=crop.region, flip=crop.flip,
              canvas_bbox=fitted.bbox, scale=fitted.scale, landmark_xy=record['landmark_xy'],
              landmark_visibility=record['landmark_visibility'],
              category=record['category'], category_type=record['category_type'],
              attribute_positive_bits=record['attribute_positive_bits'],
              attribute_unknown_bits=record['attribute_unknown_bits'],
              index=record['index'], valid=valid, skipped=skipped)


class TrainExample(grain.transforms.RandomMap):
  """Decodes a record and draws its crop; an unreadable image is replaced by the next
  readable one of the source (and counted in `skipped`)."""

  def __init__(self, source, options: ImageOptions):
    self.source, self.options = source, options

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    for skipped in range(_MAX_CONSECUTIVE_BAD_FILES):
      if skipped:
        record = self.source[(record['position'] + 1) % len(self.source)]
      image = _decode(record, self.options)
      if image is not None:
        break
    else:
      raise transforms.ImageDecodeError(
          f'{_MAX_CONSECUTIVE_BAD_FILES} unreadable images in a row, the last '
          f'{record["path"]}: is the image folder complete?')
    fitted = _fit(record, image, self.options)
    crop = transforms.random_train_crop(rng, *transforms.window_size(fitted.window),
                                        self.options.img_size, self.options.crop_size,
                                        self.options.random_flip)
    return _example(record, fitted, transforms.in_window(crop, fitted.window), valid=True,
                    skipped=skipped)


class EvalExample(grain.transforms.Map):
  """Position p of the padded evaluation set: a real example, or padding (valid False)."""

  def __init__(self, source, positions: np.ndarray, options: ImageOptions):
    self.source, self.positions, self.options = source, positions, options

  def map(self, p: int) -> dict:
    if p >= len(self.positions):
      return self._invalid(self.source[int(self.positions[0])], skipped=0)
    record = self.source[int(self.positions[p])]
    image = _decode(record, self.options)
    if image is None:
      return self._invalid(record, skipped=1)
    fitted = _fit(record, image, self.options)
    crop = transforms.eval_crop(*transforms.window_size(fitted.window), self.options.img_size,
                                self.options.crop_size, self.options.eval_crop)
    return _example(record, fitted, transforms.in_window(crop, fitted.window), valid=True,
                    skipped=0)

  def _invalid(self, record: dict, skipped: int) -> dict:
    """A masked-out example: a 1-pixel black image; its labels are never counted."""
    crop = transforms.eval_crop(1, 1, self.options.img_size, self.options.crop_size, 'resize')
    blank = Fitted(np.zeros((1, 1, 3), np.uint8), np.array([0, 0, 1, 1], np.float32),
                   transforms.whole_image(1, 1), np.ones(2))
    example = _example(record, blank, crop, valid=False, skipped=skipped)
    example['index'] = -1  # Collate zeroes the landmarks of examples not valid
    return example


class Collate:
  """Stacks examples into a batch; images go straight into one canvas array.

  Copying each image once into the batch's canvas, rather than padding it to a canvas of
  its own and then stacking, saves two full-canvas copies per image on the host; only the
  canvas around each image is zeroed (not the whole canvas first, then the image over it);
  labels are converted, and boxes and landmarks taken into their crops' coordinates, once
  per batch rather than once per example.
  """

  def __init__(self, canvas_size: int, num_attributes: int):
    self.canvas_size, self.num_attributes = canvas_size, num_attributes

  def __call__(self, examples: list) -> dict:
    canvas = np.empty((len(examples), self.canvas_size, self.canvas_size, 3), np.uint8)
    for i, example in enumerate(examples):
      height, width = example['image'].shape[:2]
      canvas[i, :height, :width] = example['image']
      canvas[i, :height, width:] = 0
      canvas[i, height:] = 0
    stack = lambda key, dtype=None: np.array([e[key] for e in examples], dtype)
    unpack = lambda key: np.unpackbits(stack(key + '_bits'), axis=1,
                                       count=self.num_attributes).view(bool)
    region, flip, valid = stack('region'), stack('flip', bool), stack('valid', bool)
    canvas_bbox = stack('canvas_bbox')
    landmarks, landmark_visible = transforms.crop_landmarks_batch(
        stack('landmark_xy'), stack('landmark_visibility'), region, flip, stack('scale'))
    landmarks[~valid] = 0.0
    box_area = (np.maximum(canvas_bbox[:, 2] - canvas_bbox[:, 0], 0)
                * np.maximum(canvas_bbox[:, 3] - canvas_bbox[:, 1], 0))
    return dict(canvas=canvas, window=stack('window', np.int32), region=region,
                flip=flip, bbox=transforms.crop_boxes(canvas_bbox, region, flip),
                box_valid=valid & (box_area > 0),
                landmarks=landmarks, landmark_visible=landmark_visible & valid[:, None],
                category=stack('category', np.int32),
                category_type=stack('category_type', np.int32),
                attribute_positive=unpack('attribute_positive'),
                attribute_unknown=unpack('attribute_unknown'),
                index=stack('index', np.int32), valid=valid,
                skipped=stack('skipped', np.int32))


def per_process_batch_size(global_batch_size: int, process_count: int,
                           field: str = 'config.batch_size') -> int:
  """Each process loads its share of the global batch (`field`); it must divide evenly."""
  _check_count(global_batch_size, field)
  if global_batch_size % process_count:
    raise errors.ConfigError(f'{field}={global_batch_size} must be a multiple of the number '
                             f'of processes ({process_count})')
  return global_batch_size // process_count


class _ShareOfGlobalBatches(grain.transforms.Map):
  """Element j of process p's sequence -> its element of the global sequence: rows
  [p * b, (p + 1) * b) of each global batch of process_count * b."""

  def __init__(self, examples: grain.MapDataset, batch_size: int, process_index: int,
               process_count: int):
    self.examples, self.batch_size = examples, batch_size
    self.process_index, self.process_count = process_index, process_count

  def map(self, j: int) -> dict:
    batch, row = divmod(j, self.batch_size)
    return self.examples[(batch * self.process_count + self.process_index) * self.batch_size
                         + row]


def train_dataset(source, *, batch_size: int, seed: int, options: ImageOptions,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Endless training batches: this process's share of each global batch.

  The global sequence (a new permutation of the split every epoch, each example's crop and
  flip drawn from its position in it) is the same whatever the number of processes, and
  each process decodes only its own rows of each global batch: P processes train on
  exactly the batches one process would. batch_size is the per-process batch (the global
  batch / process count).
  """
  _check_count(batch_size, 'config.batch_size (per process)')
  _check_count(seed, 'config.seed', minimum=0, maximum=_MAX_SEED)
  if len(source) < batch_size * process_count:
    raise errors.ConfigError(
        f'config.batch_size={batch_size * process_count}: the training split has only '
        f'{len(source)} images, fewer than one batch')
  examples = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  examples = examples.random_map(TrainExample(source, options), seed=seed)
  share = grain.MapDataset.range(len(examples) // process_count)
  share = share.map(_ShareOfGlobalBatches(examples, batch_size, process_index, process_count))
  return share.batch(batch_size, drop_remainder=True,
                     batch_fn=Collate(options.canvas_size, source.num_attributes))


def eval_dataset(source, *, batch_size: int, options: ImageOptions, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """One pass over this process's shard, padded to whole batches.

  Every process gets the same number of batches (the most any shard needs), so that the
  processes step together; across processes every example is seen exactly once.
  """
  _check_count(batch_size, 'config.eval.batch_size (per process)')
  positions = np.arange(len(source))[process_index::process_count]
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  dataset = grain.MapDataset.range(num_batches * batch_size)
  dataset = dataset.map(EvalExample(source, positions, options))
  return dataset.batch(batch_size,
                       batch_fn=Collate(options.canvas_size, source.num_attributes))


def iterate(dataset: grain.MapDataset, threads: int = 2, processes: int = 0,
            prefetch: int = 4):
  """A checkpointable iterator over a dataset's batches.

  `threads` decode in parallel within a process: libjpeg-turbo releases the GIL, and with
  no copy between processes this is the fastest layout on a few cores
  (benchmarks/RESULTS.md).
  `processes` > 0 adds grain worker processes, each with `threads` threads, for hosts with
  many cores, where the Python work per image would otherwise contend for one GIL.
  `prefetch`: batches read ahead, at least one per thread.
  """
  _check_count(threads, 'config.data.threads')
  _check_count(processes, 'config.data.processes', minimum=0)
  _check_count(prefetch, 'prefetch')
  # grain reads at most prefetch_buffer_size elements (batches) at once, whatever
  # num_threads says: a smaller buffer would leave threads idle.
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
  if processes > 0:
    _make_grain_flags_readable()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=processes, per_worker_buffer_size=prefetch),
        worker_init_fn=_make_grain_flags_readable_in_worker)
  return iter(iter_dataset)


def _make_grain_flags_readable():
  """Lets grain read its own absl flags (`--grain_*`) in a process that never parsed flags.

  grain keeps its options in absl flags, and its worker processes read some of them
  unguarded (whether to profile the workers, in the process that starts them): an unparsed
  flag raises UnparsedFlagAccessError there. main.py parses the flags; a script, a notebook
  or a benchmark that calls the pipeline never does, and must not have to. Each grain flag
  that cannot be read yet is marked present at its current value (its default, or what
  `grain.config.update` set), the mark grain itself puts on the flags it hands its workers.
  Nothing else changes: the caller's own flags stay unparsed, `FLAGS.is_parsed()` stays
  False, and a later parse (absl.app.run) still reads the command line, grain's flags
  included.
  """
  if flags.FLAGS.is_parsed():
    return
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if name.startswith('grain_') and not flag.present:
      flag.present = 1


def _make_grain_flags_readable_in_worker(worker_index: int, worker_count: int):
  """The same in each worker process, which starts afresh (spawned) with no parsed flags."""
  del worker_index, worker_count
  _make_grain_flags_readable()
