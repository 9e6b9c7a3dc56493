"""--mode=export: the SavedModel, run by TensorFlow alone in a fresh process, answers what
--mode=predict answers (its photos, batch and `predict.photo_outputs`; unrounded).

Tolerances, from what differs and what it does (measured on a model trained two steps:
docs/command_line.md, export):
- The exported module runs predict's own function, `predict.photo_outputs`, but compiled
  by TensorFlow's XLA as one program: its float32 sums run in another order. The crops' bilinear resampling
  rounds to 8 bits, and where PIL's weights give a pixel exactly halfway (x.5) the two
  compilers can round it to neighbouring grey levels: 0.1-0.3% of a crop's pixels, one
  grey level. Photos whose crops have no such pixels agree to ~1e-7; others move
  probabilities by up to ~2e-4 and boxes by up to ~0.03 px. Hence 1e-3 and 0.1 px.
- A photo larger than the canvas is shrunk by PIL in predict (fixed-point weights, some
  sizes vertical pass first) and by the same bilinear weights in float32 here: one grey
  level on a few percent of pixels, ~5e-4 on probabilities: within the same bounds.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from benchmarks.hostile import images as hostile_images
from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import export
from deepfashion_jax import predict
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import device_transforms
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import photos as photos_lib
from deepfashion_jax.data import ten_crop as ten_crop_lib
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import transforms
from deepfashion_jax.data import vocabulary
from tests import helpers

# Run by TensorFlow alone: JAX, Flax and this package cannot even be imported.
SERVE = r'''
import os, sys
for name in ('jax', 'jaxlib', 'flax', 'deepfashion_jax'):
  sys.modules[name] = None
import numpy as np
import tensorflow as tf

for saved_model, folder in zip(sys.argv[1::2], sys.argv[2::2]):
  model = tf.saved_model.load(saved_model)
  for name in sorted(os.listdir(folder)):
    if name.startswith('images_'):
      signature = model.signatures['serving_default']
      outputs = signature(images=tf.constant(np.load(os.path.join(folder, name))))
    elif name.startswith('files_'):
      with open(os.path.join(folder, name)) as f:
        data = [tf.io.read_file(path.strip()) for path in f if path.strip()]
      outputs = model.signatures['encoded'](images=tf.stack(data))
    else:
      continue
    stem = os.path.splitext(name)[0]
    for key, value in outputs.items():
      np.save(os.path.join(folder, f'out_{stem}_{key}.npy'), value.numpy())
'''

PROBABILITY_TOLERANCE = 1e-3
PIXEL_TOLERANCE = 0.1
CANVAS = 160  # smaller than the test's largest photo, which is shrunk into it


def _config():
  """A model with every output: box, landmarks, the per-garment-type head."""
  config = test_config.get_config()
  config.data.canvas_size = CANVAS
  config.model.landmarks, config.model.category_head = 'heatmaps', 'per_garment_type'
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir holding the model's step-0 checkpoint (as --mode=convert writes one)."""
  workdir = str(tmp_path_factory.mktemp('export_run'))
  _, state = steps.create_train_state(_config(), sharding.make_mesh())
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, 0, state)
  manager.wait_until_finished()
  return workdir


def _photo(rng, height, width) -> np.ndarray:
  """A smooth garment-like blob on a textured background, uint8 (H, W, 3)."""
  y, x = np.mgrid[:height, :width] / max(height, width)
  blob = np.exp(-((x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2) * 12)
  colour = rng.uniform(0, 255, 3)
  image = blob[..., None] * colour + 60 * np.sin(40 * x + 30 * y)[..., None]
  return np.clip(image + rng.normal(0, 12, (height, width, 3)) + 80, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def photo_files(tmp_path_factory):
  """PNG files: five of 120 x 100 (within the canvas), one of 130 x 150, one of 200 x 170
  (shrunk into the canvas); a JPEG of 110 x 90."""
  rng = np.random.default_rng(0)
  folder = tmp_path_factory.mktemp('export_photos')
  files = dict(same=[])
  for i in range(5):
    files['same'].append(str(folder / f'same_{i}.png'))
    Image.fromarray(_photo(rng, 120, 100)).save(files['same'][-1])
  for name, (height, width) in dict(small=(130, 150), big=(200, 170)).items():
    files[name] = str(folder / f'{name}.png')
    Image.fromarray(_photo(rng, height, width)).save(files[name])
  files['jpeg'] = str(folder / 'photo.jpg')
  Image.fromarray(_photo(rng, 110, 90)).save(files['jpeg'], quality=90)
  return files


def _read(path):
  with open(path, 'rb') as f:
    return transforms.decode_image(f.read())


def _predict_results(config, workdir, paths, ten_crop) -> list:
  """predict's numbers for each photo, unrounded: its photos and batch (data/photos.py)
  through its `photo_outputs`."""
  mesh = sharding.make_mesh()
  config, _, step_config, state = checkpoints.restore_for_inference(config, workdir, mesh)
  # Only numbers are compared: no names (this workdir records none).
  photos = photos_lib.Photos(paths, None, config.data, images_per_batch=len(paths),
                             device_count=mesh.size)
  photo_batch = next(photos.batches())
  outputs = jax.device_get(predict.photo_outputs(
      ten_crop_lib.Options.from_config(config, ten_crop),
      steps.jit_steps(step_config, mesh).predict, state,
      sharding.global_batch(photo_batch.batch, mesh)))
  return [{k: v[i] for k, v in outputs.items()} for i in range(len(paths))]


@pytest.mark.parametrize('ten_crop', [False, True])
def test_export_runs_predicts_function(workdir, photo_files, monkeypatch, ten_crop):
  """export.serve (what jax2tf traces) answers predict's `photo_outputs` on the same
  photos within the canvas, and cuts them into the crops `ten_crop.crop_regions` gives:
  the same function, not a copy of it (compiled as one program here, so within the
  module's tolerances: its docstring)."""
  config = _config()
  config.export.ten_crop = ten_crop
  paths = photo_files['same'][:2]
  expected = _predict_results(config, workdir, paths, ten_crop)
  config, _, step_config, state = checkpoints.restore_for_inference(config, workdir,
                                                                    sharding.make_mesh())
  cut = []
  crop_regions = ten_crop_lib.crop_regions
  monkeypatch.setattr(ten_crop_lib, 'crop_regions',
                      lambda *args: cut.append(crop_regions(*args)) or cut[-1])
  images = np.stack([_read(p) for p in paths])
  serve = jax.jit(functools.partial(export.serve, step_config,
                                    export.Preprocessing.from_config(config)))
  served = serve((state.params, state.batch_stats), images,
                 np.array(images.shape[1:3], np.int32))
  assert len(cut) == 1 and len(cut[0][1]) == (10 if ten_crop else 1)
  assert set(served) == set(expected[0])
  for key, value in served.items():
    limit = (PROBABILITY_TOLERANCE if key.endswith(('probabilities', 'peaks'))
             else PIXEL_TOLERANCE)
    np.testing.assert_allclose(value, [e[key] for e in expected], rtol=0, atol=limit,
                               err_msg=key)


def _exif_jpeg(orientation, endian='<', ifd_offset=None) -> bytes:
  """A JPEG tagged with an EXIF orientation after two other tags, in either byte order;
  ifd_offset: overwrite the TIFF header's offset of the first IFD (damaged EXIF)."""
  exif = Image.Exif()
  exif[0x010F], exif[0x0110], exif[0x0112] = 'Maker', 'Model X', orientation
  exif.endian = endian
  data = hostile_images.encode(hostile_images.photo(), exif=exif.tobytes())
  if ifd_offset is not None:
    tiff = data.index(b'Exif\x00\x00') + 6
    data = data[:tiff + 4] + ifd_offset.to_bytes(4, 'little') + data[tiff + 8:]
  return data


@pytest.mark.filterwarnings('ignore:Corrupt EXIF')  # PIL, reading the damaged cases
def test_the_encoded_signature_decodes_as_predict_does():
  """In a graph, as the SavedModel's `encoded` signature decodes: each EXIF orientation, in
  either byte order, turns the photo as predict's reader turns it (the same pixels: both
  decoders are libjpeg's accurate DCT); damaged EXIF leaves the stored pixels; 16-bit
  grayscale and transparent PNGs give predict's pixels too."""
  decode = tf.function(lambda batch: tf.map_fn(export.decode, batch, fn_output_signature=
                                               tf.TensorSpec([None, None, 3], tf.uint8)),
                       input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
  cases = [(_exif_jpeg(o, endian), o) for o in range(1, 9) for endian in '<>']
  cases += [(_exif_jpeg(6, ifd_offset=0xFFFFFFF0), 1), (_exif_jpeg(6, ifd_offset=2), 1),
            (hostile_images.exif_rotated_jpeg(99), 1), (hostile_images.encode(
                hostile_images.photo()), 1)]
  cases += [(hostile_images.sixteen_bit_ramp(), None)]
  cases += [(hostile_images.transparent_png(mode), None) for mode in ('RGBA', 'LA', 'P')]
  for data, orientation in cases:
    np.testing.assert_array_equal(decode(tf.constant([data]))[0].numpy(),
                                  transforms.decode_image(data, upright=True))
    if orientation:  # a JPEG
      assert int(export.exif_orientation(tf.constant(data))) == orientation


def test_the_canvas_fit_in_the_graph_is_pils():
  """A photo within the canvas passes as it is; one larger is shrunk to the size the host
  shrinks it to, as PIL does (`transforms.fit_to_canvas`) but for rounding: measured, one
  grey level off on up to 4% of the values, two on 0.005%."""
  rng = np.random.default_rng(1)
  for height, width in ((120, 100), (200, 170), (170, 330)):
    photo = _photo(rng, height, width)
    host, _ = transforms.fit_to_canvas(photo, np.zeros(4, np.float32), CANVAS)
    fitted = np.array(host.shape[:2], np.int32)
    canvas = np.asarray(device_transforms.fit_to_canvas(photo[None], fitted, CANVAS))[0]
    assert not canvas[fitted[0]:].any() and not canvas[:, fitted[1]:].any()
    shrunk = canvas[:fitted[0], :fitted[1]].astype(int)
    if (height, width) == tuple(fitted):
      np.testing.assert_array_equal(shrunk, photo)
    else:
      off = np.abs(shrunk - host)
      assert off.max() <= 2 and (off > 0).mean() < 0.05 and (off > 1).mean() < 1e-3


def _serve_in_tensorflow(jobs):
  """jobs: (SavedModel folder, input folder) pairs; TensorFlow alone, in a fresh process."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  subprocess.run([sys.executable, '-c', SERVE, *[a for job in jobs for a in job]],
                 check=True, env=env, cwd=helpers.ROOT)


def _served(folder, stem) -> dict:
  prefix = f'out_{stem}_'
  return {name[len(prefix):-4]: np.load(os.path.join(folder, name))
          for name in os.listdir(folder) if name.startswith(prefix)}


def _differences(served: dict, expected: list) -> dict:
  """The largest difference of each output over the photos (the keys must agree)."""
  assert set(served) == set(expected[0]), (sorted(served), sorted(expected[0]))
  assert all(len(v) == len(expected) for v in served.values())
  return {k: max(float(np.abs(served[k][i] - e[k]).max()) for i, e in enumerate(expected))
          for k in served}


@pytest.mark.slow  # ~100 s: two exports and a TensorFlow process (make test-slow)
def test_the_saved_model_answers_what_predict_answers(workdir, photo_files, tmp_path):
  """One centre crop (the default): batches of 1 and 5 photos of two sizes, and one photo
  larger than the canvas, through the uint8 signature (one exported graph: batch and size
  polymorphic); a JPEG and a PNG of other sizes through the encoded one (decoded in
  TensorFlow). Ten crops (config.export.ten_crop): the batch of 5."""
  centre, ten = _config(), _config()
  ten.export.ten_crop = True
  jobs, cases = [], []
  for name, config, batches in (
      ('centre', centre, dict(one=[photo_files['small']], five=photo_files['same'],
                              big=[photo_files['big']],
                              files=[photo_files['jpeg'], photo_files['small']])),
      ('ten', ten, dict(five=photo_files['same']))):
    saved = export.export(config, workdir, str(tmp_path / f'{name}_saved_model'))
    assert os.path.isfile(os.path.join(saved, 'saved_model.pb'))
    folder = tmp_path / f'{name}_io'
    folder.mkdir()
    for stem, paths in batches.items():
      if stem == 'files':
        (folder / 'files_.txt').write_text('\n'.join(paths))
      else:
        np.save(folder / f'images_{stem}.npy', np.stack([_read(p) for p in paths]))
    jobs.append((saved, str(folder)))
    cases.append((config, batches, str(folder)))
  _serve_in_tensorflow(jobs)

  measured = {}
  for config, batches, folder in cases:
    for stem, paths in batches.items():
      served = _served(folder, 'files_' if stem == 'files' else f'images_{stem}')
      expected = _predict_results(config, workdir, paths, config.export.ten_crop)
      measured[config.export.ten_crop, stem] = _differences(served, expected)
  print('largest differences (ten_crop, batch): ', measured)
  for differences in measured.values():
    for key, difference in differences.items():
      limit = (PROBABILITY_TOLERANCE if key.endswith(('probabilities', 'peaks'))
               else PIXEL_TOLERANCE)
      assert difference < limit, (key, difference, measured)


def test_the_outputs_names_go_beside_the_saved_model(synthetic_folder, tmp_path, caplog):
  """assets.extra/output_names.json: the names the run recorded, one list per output, in
  output order; a workdir that records none: no file, and a warning saying what to pass."""
  workdir, config = str(tmp_path / 'run'), _config()
  os.makedirs(workdir)
  assert not export.write_output_names(config, workdir, str(tmp_path / 'unnamed'))
  assert any('config.data.data_dir' in r.getMessage() for r in caplog.records)
  words = trained_on.read_vocabulary(synthetic_folder[0])
  trained_on.write(workdir, trained_on.Record(words, None, 'baseline.pth'))
  path = export.write_output_names(config, workdir, str(tmp_path / 'named'))
  assert path == str(tmp_path / 'named' / 'assets.extra' / 'output_names.json')
  with open(path) as f:
    names = json.load(f)
  assert names['category_probabilities'] == list(words.category_names)
  assert names['attribute_probabilities'] == list(words.attribute_names)
  assert names['attribute_types'] == [vocabulary.ATTRIBUTE_TYPE_NAMES[t]
                                      for t in words.attribute_types]
  assert names['garment_type_probabilities'] == list(vocabulary.GARMENT_TYPE_NAMES)
  assert names['landmarks'] == list(landmark_slots.SLOT_NAMES)
