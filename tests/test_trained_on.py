"""A workdir's record of what its run was trained on (data/trained_on.py): the folder's
fingerprint, a moved folder, edited lists, a converted model's names. The modes that use
it are tested with them: test_predict.py, test_evaluate.py, test_export.py."""

import dataclasses
import json
import os
import shutil
import tempfile

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies
import pytest

from benchmarks.hostile import run_record
from deepfashion_jax import errors
from deepfashion_jax.data import annotations
from deepfashion_jax.data import trained_on
from tests import helpers


def _trained_workdir(tmp_path) -> str:
  """A workdir that holds a trained checkpoint (only its folder: nothing reads it here)."""
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  return str(workdir)


def test_the_fingerprint_is_the_lists_content_kept_by_their_cache_key(synthetic_folder,
                                                                      tmp_path):
  """Another copy of the lists has the same digest; an edited list another; the digest is
  kept beside the annotation cache, and a damaged kept digest is computed again."""
  copy = str(tmp_path / 'copy')
  shutil.copytree(synthetic_folder[0], copy)
  cache = str(tmp_path / 'cache')
  digest = trained_on.lists_sha256(copy, cache)
  assert digest == trained_on.lists_sha256(synthetic_folder[0]) and len(digest) == 64
  (kept,) = os.listdir(cache)
  with open(os.path.join(cache, kept), 'w') as f:
    f.write('not a digest')
  assert trained_on.lists_sha256(copy, cache) == digest
  with open(os.path.join(copy, annotations.BBOX), 'a') as f:
    f.write('\n')
  edited = trained_on.lists_sha256(copy, cache)
  assert edited != digest and edited == trained_on.lists_sha256(copy)  # not the kept one
  assert len(os.listdir(cache)) == 1  # the stale digest is gone


def test_resuming_on_the_same_lists_elsewhere_and_not_on_edited_ones(synthetic_folder,
                                                                     tmp_path):
  """A moved folder (same lists, another path): accepted, and recorded there. Edited
  lists: refused, naming both folders, the record kept; without a trained checkpoint
  (nothing to resume), recorded anew."""
  workdir = _trained_workdir(tmp_path)
  trained_on.check_and_record_training_data(
      helpers.tiny_config(synthetic_folder[0]).data, workdir)
  first = trained_on.read(workdir)
  assert first.data.path == os.path.abspath(synthetic_folder[0]) and not first.data.synthetic
  assert first.vocabulary == trained_on.read_vocabulary(synthetic_folder[0])
  moved = str(tmp_path / 'moved')
  shutil.copytree(synthetic_folder[0], moved)
  trained_on.check_and_record_training_data(helpers.tiny_config(moved).data, workdir)
  assert trained_on.read(workdir) == dataclasses.replace(
      first, data=dataclasses.replace(first.data, path=moved))

  with open(os.path.join(moved, annotations.CATEGORY_IMG), 'a') as f:
    f.write('\n')
  with pytest.raises(trained_on.TrainedOnError, match='lists differ') as raised:
    trained_on.check_and_record_training_data(helpers.tiny_config(moved).data, workdir)
  assert moved in str(raised.value) and 'trained_on.json' in str(raised.value)
  assert trained_on.read(workdir).data.path == moved  # unchanged by the refusal
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  trained_on.check_and_record_training_data(helpers.tiny_config(moved).data, workdir)
  assert trained_on.read(workdir).data.lists_sha256 == trained_on.lists_sha256(moved)


def test_a_converted_model_is_named_by_the_folder_given(synthetic_folder, tmp_path):
  """--mode=convert with config.data.data_dir records its names (no training folder);
  without one, nothing; and never over the record of a trained run."""
  record = trained_on.conversion_record(helpers.tiny_config(synthetic_folder[0]).data,
                                        'epoch_200.pth')
  assert record.data is None and record.converted_from == os.path.abspath('epoch_200.pth')
  assert record.vocabulary == trained_on.read_vocabulary(synthetic_folder[0])
  assert trained_on.conversion_record(helpers.tiny_config('').data, 'epoch_200.pth') is None
  fresh = str(tmp_path / 'converted')
  os.makedirs(fresh)
  trained_on.record_conversion(fresh, record)
  assert trained_on.read(fresh) == record
  trained = _trained_workdir(tmp_path)
  trained_on.check_and_record_training_data(
      helpers.tiny_config(synthetic_folder[0]).data, trained)
  before = trained_on.read(trained)
  trained_on.record_conversion(trained, record)
  assert trained_on.read(trained) == before


def test_an_unrecorded_workdir_is_not_evaluated_on_a_stand_in(synthetic_folder, tmp_path):
  """A workdir that does not say what it was trained on (an older run, or converted) and
  holds no synthetic folder: config.data.data_dir empty is refused, naming the field (and
  the PyTorch file of a converted one); with the synthetic folder its training wrote, or
  for training a new run, it is not (test_evaluate.py runs evaluate itself)."""
  config = helpers.tiny_config('')
  workdir = str(tmp_path / 'older_run')
  os.makedirs(os.path.join(workdir, 'checkpoints', '6'))
  with pytest.raises(errors.DeepFashionError, match='config.data.data_dir') as raised:
    trained_on.refuse_synthetic_stand_in(config.data, workdir, training=False)
  assert trained_on.RECORD_NAME in str(raised.value)
  trained_on.refuse_synthetic_stand_in(config.data, workdir, training=True)
  trained_on.write(workdir, trained_on.conversion_record(
      helpers.tiny_config(synthetic_folder[0]).data, 'epoch_200.pth'))
  with pytest.raises(errors.DeepFashionError, match='converted from .*epoch_200.pth'):
    trained_on.refuse_synthetic_stand_in(config.data, workdir, training=False)
  os.remove(trained_on.record_path(workdir))
  shutil.copytree(synthetic_folder[0], os.path.join(workdir, 'synthetic_deepfashion'))
  trained_on.refuse_synthetic_stand_in(config.data, workdir, training=False)


_VALID = json.dumps(run_record.valid_record()).encode()


def _damaged_record_is_clean(data: strategies.DataObject):
  """A randomly damaged record: its names, or the project's error naming the file."""
  damaged = run_record.mutated(
      _VALID, lambda n: data.draw(strategies.integers(0, n - 1), label='draw'))
  with tempfile.TemporaryDirectory() as workdir:
    with open(trained_on.record_path(workdir), 'wb') as f:
      f.write(damaged)
    try:
      names = run_record.names_of_record(workdir)
    except errors.DeepFashionError as e:
      assert trained_on.RECORD_NAME in str(e)
      return
  assert all(isinstance(name, str) for name in names.category_names + names.attribute_names)
  assert sum(len(indices) for _, indices in names.attribute_groups) == len(
      names.attribute_names)


@settings(max_examples=100, deadline=None)
@given(strategies.data())
def test_a_damaged_record_is_read_or_refused_cleanly(data):
  _damaged_record_is_clean(data)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None)
@given(strategies.data())
def test_a_damaged_record_is_read_or_refused_cleanly_at_length(data):
  _damaged_record_is_clean(data)
