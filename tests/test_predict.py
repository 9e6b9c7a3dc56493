"""--mode=predict: JSON lines, figures, boxes in the original image's pixels, bad files."""

import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from benchmarks.hostile import run_record
from configs import test as test_config
from deepfashion_jax import checkpoints
from deepfashion_jax import errors
from deepfashion_jax import predict
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax.data import annotations
from deepfashion_jax.data import photos as photos_lib
from deepfashion_jax.data import ten_crop as ten_crop_lib
from deepfashion_jax.data import trained_on
from deepfashion_jax.data import transforms
from deepfashion_jax.data import vocabulary
from tests import helpers


def _config(data_dir):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.predict.batch_size = 2
  config.predict.top_k_attributes = 3
  return config


@pytest.fixture(scope='module')
def photos(synthetic_folder, tmp_path_factory):
  """Two of the folder's photos, one of them also at twice its size (larger than the
  canvas), in a nested folder; a text file called .jpg; a README the folder walk skips."""
  root = synthetic_folder[0]
  index = annotations.read_deepfashion(root)
  folder = tmp_path_factory.mktemp('photos')
  nested = folder / 'more' / 'nested'
  nested.mkdir(parents=True)
  small = [os.path.join(index.image_dir(), p) for p in index.image_paths[:2]]
  with Image.open(small[0]) as image:
    image.resize((image.width * 2, image.height * 2), Image.BILINEAR).save(nested / 'big.png')
  (folder / 'not_an_image.jpg').write_text('hello')
  (folder / 'README.txt').write_text('not a photo')
  return dict(small=small, big=str(nested / 'big.png'), folder=str(folder),
              text=str(folder / 'not_an_image.jpg'))


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_finds_files_and_recurses_folders(photos):
  found = photos_lib.find_images(f"{photos['small'][0]}, {photos['folder']}")
  assert found == [photos['small'][0], photos['big'], photos['text']]
  with pytest.raises(ValueError, match='names no image'):
    photos_lib.find_images(' , ')


@pytest.mark.parametrize('ten_crop', [True, False])
def test_a_box_maps_back_to_the_original_pixels(ten_crop):
  """The crop's [0, 1] box of a pixel box, mapped back, is that pixel box: for every crop
  (mirrored ones too) of an image that was shrunk 2x into the canvas."""
  config = _config('')
  options = ten_crop_lib.Options.from_config(config, ten_crop)
  original = np.array([150.0, 120.0, 420.0, 500.0])  # in a 600 x 540 photo
  scale = 2.0  # the photo's canvas copy is 300 x 270
  regions, flips = ten_crop_lib.crop_regions(np.array([[270, 300]]), options)
  assert regions.shape == (1, len(flips), 4) and len(flips) == (10 if ten_crop else 1)
  crops = [transforms.Crop(np.asarray(r), bool(f)) for r, f in zip(regions[0], flips)]
  inside = np.array([[*np.maximum(crop.region[:2], original[:2] / scale),
                      *np.minimum(crop.region[2:], original[2:] / scale)] for crop in crops])
  in_crops = np.array([transforms.crop_box(box, crop) for box, crop in zip(inside, crops)])
  back = ten_crop_lib.boxes_in_photo(in_crops[None], regions, flips, np.array([scale]))
  np.testing.assert_allclose(back[0], inside * scale, rtol=1e-5, atol=1e-3)


def test_the_ten_crops_are_the_baselines():
  """Resize to img_size, then the four corners and the centre of crop_size, and their
  mirror images, as regions of the photo: the centre one is evaluation's centre crop."""
  config = _config('')
  img, crop = config.data.img_size, config.data.crop_size
  regions, flips = ten_crop_lib.crop_regions(
      np.array([[270, 300]]), ten_crop_lib.Options.from_config(config, True))
  far, to_photo = img - crop, np.array([300 / img, 270 / img] * 2)
  corners = [np.array([x, y, x + crop, y + crop]) * to_photo
             for x, y in ((0, 0), (far, 0), (0, far), (far, far))]
  centre = transforms.eval_crop(270, 300, img, crop, 'center_crop').region
  np.testing.assert_allclose(regions[0], corners + [centre] + corners + [centre], rtol=1e-6)
  assert list(flips) == [False] * 5 + [True] * 5


def test_predictions_and_figures(trained_workdir, photos, synthetic_folder, tmp_path,
                                 monkeypatch):
  config = _config(synthetic_folder[0])
  compiled = []
  jit_steps = steps.jit_steps

  def capture(*args):
    jitted = jit_steps(*args)
    compiled.append(jitted.predict)
    return jitted

  monkeypatch.setattr(steps, 'jit_steps', capture)
  images = ','.join(photos['small'] + [photos['folder']])
  path = predict.predict(config, trained_workdir, images, str(tmp_path))
  lines = _lines(path)
  assert [line['path'] for line in lines] == photos['small'] + [photos['big'], photos['text']]
  assert 'error' in lines[3] and 'figure' not in lines[3]

  names = set(annotations.read_category_cloth(synthetic_folder[0])[0])
  for line in lines[:3]:
    probabilities = [c['probability'] for c in line['categories']]
    assert len(probabilities) == 5 and {c['name'] for c in line['categories']} <= names
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    assert list(line['attributes']) == list(vocabulary.ATTRIBUTE_TYPE_NAMES)
    assert all(len(entries) == 3 for entries in line['attributes'].values())
    x1, y1, x2, y2 = line['box']
    assert 0 <= x1 <= x2 <= line['width'] and 0 <= y1 <= y2 <= line['height']
    with Image.open(line['figure']) as figure:
      assert figure.size == (1120, 560)
  # The photo at twice its size (shrunk into the canvas): the same box, in its own pixels.
  assert (lines[2]['width'], lines[2]['height']) == (2 * lines[0]['width'],
                                                     2 * lines[0]['height'])
  np.testing.assert_allclose(lines[2]['box'], 2 * np.array(lines[0]['box']), atol=4.0)
  # Two batches (2 photos, then 1 photo and 1 unreadable file), one compiled step.
  assert compiled[0]._cache_size() == 1  # pylint: disable=protected-access


def test_every_photo_gets_its_line_whatever_the_others_are(trained_workdir, photos,
                                                           synthetic_folder, tmp_path,
                                                           monkeypatch):
  """A legal 250-character name (its figure's name shortened), a photo stored sideways with
  EXIF orientation 6 (predicted upright: its size and box those of the upright photo), a
  FIFO called pipe.jpg and /dev/zero (error lines, never opened)."""
  folder = tmp_path / 'hostile'
  folder.mkdir()
  long_name = folder / ('a' * 246 + '.jpg')
  shutil.copy(photos['small'][0], long_name)
  with Image.open(photos['small'][1]) as image:
    upright = np.asarray(image.convert('RGB'))
  exif = Image.Exif()
  exif[0x0112] = 6  # turn a quarter clockwise to show
  Image.fromarray(np.rot90(upright)).save(folder / 'sideways.jpg', quality=95,
                                          exif=exif.tobytes())
  os.mkfifo(folder / 'pipe.jpg')
  helpers.forbid_opening(monkeypatch, folder / 'pipe.jpg', '/dev/zero')
  images = f"{folder},{photos['small'][1]},/dev/zero"
  lines = _lines(predict.predict(_config(synthetic_folder[0]), trained_workdir, images,
                                 str(tmp_path / 'out')))
  assert [line['path'] for line in lines] == [str(long_name), str(folder / 'pipe.jpg'),
                                              str(folder / 'sideways.jpg'),
                                              photos['small'][1], '/dev/zero']
  long_line, fifo, sideways, original, zero = lines
  assert 'a FIFO' in fifo['error'] and 'a character device' in zero['error']
  assert os.path.isfile(long_line['figure']) and 'categories' in long_line
  assert (sideways['height'], sideways['width']) == upright.shape[:2]
  np.testing.assert_allclose(sideways['box'], original['box'], atol=4.0)


@pytest.mark.slow
def test_centre_crop_temperature_and_the_per_garment_type_head(synthetic_folder, photos,
                                                               tmp_path):
  """A step-0 checkpoint with the per-garment-type head (as --mode=convert writes)."""
  config = _config(synthetic_folder[0])
  config.model.category_head = 'per_garment_type'
  config.predict.ten_crop = False
  workdir = str(tmp_path / 'run')
  mesh = sharding.make_mesh()
  _, state = steps.create_train_state(config, mesh)
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, 0, state)
  manager.wait_until_finished()

  top = []
  for temperature in (1.0, 100.0):
    config.predict.temperature = temperature
    line = _lines(predict.predict(config, workdir, photos['small'][0],
                                  str(tmp_path / f'out_{temperature}')))[0]
    assert line['garment_type']['name'] in vocabulary.GARMENT_TYPE_NAMES
    top.append(line['categories'][0]['probability'])
  assert top[1] < top[0]  # a high temperature flattens the distribution


def test_the_run_names_its_outputs_without_a_data_folder(trained_workdir, photos,
                                                        synthetic_folder, tmp_path):
  """Trained on a folder, predicting with none at all: the names the run recorded, each
  attribute under its type, not numbered ones in one group."""
  with open(os.path.join(trained_workdir, trained_on.RECORD_NAME)) as f:
    recorded = json.load(f)['data']
  assert recorded == dict(path=os.path.abspath(synthetic_folder[0]), synthetic=False,
                          lists_sha256=trained_on.lists_sha256(synthetic_folder[0]))
  config = _config('')
  config.data.synthetic_images = 0  # no data folder at all
  line = _lines(predict.predict(config, trained_workdir, photos['small'][0], str(tmp_path)))[0]
  names, types = annotations.read_attr_cloth(synthetic_folder[0])
  assert list(line['attributes']) == list(vocabulary.ATTRIBUTE_TYPE_NAMES)
  for t, entries in enumerate(line['attributes'].values()):
    assert entries and {e['name'] for e in entries} <= set(names[types == t])
  categories = set(annotations.read_category_cloth(synthetic_folder[0])[0])
  assert {c['name'] for c in line['categories']} <= categories


def test_without_a_record_or_a_data_folder_it_says_what_to_pass(tmp_path):
  """A workdir that names no outputs (trained before runs recorded them, or converted
  without a data folder): no invented names, an error saying what to set."""
  config = _config('')
  config.data.synthetic_images = 0
  with pytest.raises(errors.DeepFashionError, match='config.data.data_dir'):
    photos_lib.load_output_names(config.data, str(tmp_path))


@pytest.mark.parametrize('damage', ['not json', '[]', '{"version": 1}', 'bool types',
                                    'short types', 'huge'])
def test_a_damaged_record_is_named(tmp_path, damage):
  """A record that does not read back: the project's error naming the file (more damage:
  tests/test_trained_on.py, benchmarks/hostile/run_record.py)."""
  contents = run_record.valid_record()
  words = contents['vocabulary']
  text = {'not json': '{"version": 1, ', '[]': '[]', '{"version": 1}': '{"version": 1}',
          'huge': ' ' * (17 << 20)}.get(damage)
  if damage == 'bool types':
    words['category_types'] = [True] * len(words['category_types'])
  elif damage == 'short types':
    words['attribute_types'] = words['attribute_types'][:-1]
  path = tmp_path / trained_on.RECORD_NAME
  path.write_text(text if text is not None else json.dumps(contents))
  with pytest.raises(errors.DeepFashionError, match=str(path)):
    photos_lib.load_output_names(_config('').data, str(tmp_path))


def test_a_gt_box_model_reads_each_photo_whole_and_says_so(synthetic_folder, photos,
                                                         tmp_path, monkeypatch, caplog):
  """config.data.crop='gt_box': the photo is taken as cut to its garment already (the model
  cannot cut it: predict.py), read whole in one pass, with a warning saying so."""
  config = _config(synthetic_folder[0])
  config.data.crop = 'gt_box'
  config.predict.ten_crop = False
  workdir = str(tmp_path / 'run')
  _, state = steps.create_train_state(config, sharding.make_mesh())
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, 0, state)
  manager.wait_until_finished()
  batches = []
  global_batch = sharding.global_batch
  monkeypatch.setattr(sharding, 'global_batch',
                      lambda batch, mesh: batches.append(batch) or global_batch(batch, mesh))
  lines = _lines(predict.predict(config, workdir, photos['small'][0], str(tmp_path / 'out')))
  assert len(lines) == 1 and len(batches) == 1
  size = [lines[0]['height'], lines[0]['width']]  # within the canvas: not shrunk
  np.testing.assert_array_equal(batches[0]['fitted'][0], size)
  regions, flips = ten_crop_lib.crop_regions(
      batches[0]['fitted'], ten_crop_lib.Options.from_config(config, False))
  crops = ten_crop_lib.crop_batch(batches[0]['canvas'], batches[0]['fitted'], regions, flips)
  np.testing.assert_array_equal(crops['window'][0], [0, 0, size[1], size[0]])
  assert any("config.data.crop='gt_box'" in r.getMessage() for r in caplog.records)
