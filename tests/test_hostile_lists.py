"""Hostile list files, drawn at random: whatever happens to the seven lists of a valid
folder (lines dropped or repeated, fields made huge, negative, non-numeric or not UTF-8,
header counts changed, bytes flipped, files cut short, unsafe image paths), loading the
folder as a run does either succeeds, with every image path safe to open, or raises the
project's own error naming the file; never another exception, and never more memory than
a small multiple of the lists' size. The mutations are benchmarks/hostile/list_files.py's.
"""

import os
import tracemalloc

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest

from benchmarks.hostile import list_files
from deepfashion_jax import errors
from deepfashion_jax.data import annotations

# Traced memory a load may take: this multiple of the lists' bytes, plus a constant for
# the parser's own tables (a valid load of the 12-image folder peaks near 0.5 MB). The
# vectorised reader of list_attr_img.txt holds about a dozen arrays of a byte per byte of
# its chunk (at most 32 MB): 1 MB inserted there peaks near 14 MB.
MEMORY_PER_LIST_BYTE = 16
MEMORY_CONSTANT = 4 << 20

numbers = st.integers(-2**70, 2**70).map(lambda n: str(n).encode())
values = st.one_of(st.sampled_from(list_files.HOSTILE_VALUES + list_files.HOSTILE_PATHS +
                                   list_files.HEADER_COUNTS), numbers, st.binary(max_size=12))
mutations = st.builds(
    list_files.Mutation, kind=st.sampled_from(list_files.MUTATIONS),
    file_name=st.sampled_from(annotations.ALL_FILES), line=st.integers(0, 60),
    field=st.integers(0, 1100), value=values, position=st.integers(0, 2**20))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """A valid folder, written once; each example restores its lists, then mutates them."""
  root = str(tmp_path_factory.mktemp('hostile') / 'DeepFashion')
  return root, list_files.write_valid_folder(root), str(tmp_path_factory.mktemp('run'))


def _check_one(folder, mutation, strict):
  root, valid, workdir = folder
  list_files.apply(root, valid, mutation)
  list_bytes = sum(os.path.getsize(os.path.join(root, name)) for name in annotations.ALL_FILES)
  tracemalloc.start()
  try:
    index, summary = list_files.load(root, workdir, strict)
  except errors.DeepFashionError as e:
    message = str(e)
    assert root in message, message[:300]  # names the file
    assert len(message) < 2000, message[:300]
    index = None
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  assert peak < MEMORY_PER_LIST_BYTE * list_bytes + MEMORY_CONSTANT, (peak, list_bytes)
  if index is not None:
    assert all(annotations.path_problem(p) is None for p in index.image_paths.tolist())
    assert 'rows left out for an unsafe image path' in summary
    if strict:
      assert not index.odd_paths


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(mutation=mutations, strict=st.booleans())
def test_a_mutated_folder_loads_or_is_refused_cleanly(folder, mutation, strict):
  _check_one(folder, mutation, strict)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, database=None)
@given(mutation=mutations, strict=st.booleans())
def test_a_mutated_folder_loads_or_is_refused_cleanly_at_length(folder, mutation, strict):
  _check_one(folder, mutation, strict)


@pytest.mark.parametrize('mutation', list_files.named_mutations(),
                         ids=lambda m: m.describe()[:60])
def test_each_named_hostile_case_is_clean(folder, mutation):
  """The benchmark's named cases: unsafe paths (accepted without their rows), numbers
  too large for their arrays, impossible header counts, non-UTF-8 bytes, 10 MB tokens."""
  _check_one(folder, mutation, strict=False)


path_texts = st.text(alphabet=st.sampled_from(['a', 'b', '/', '.', '\x00', '\x1f', '\x85',
                                               '\u00e9', ' ']), max_size=12)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(paths=st.lists(st.one_of(path_texts, st.sampled_from(
    ['img/a.jpg', 'a' * 256, 'img/' + 'a' * 1021, '\u00e9' * 128])), max_size=4))
def test_the_whole_list_check_agrees_with_path_problem(paths):
  """The parser checks a list's paths at once (`_odd_paths`) when they are plain."""
  at_once = annotations._odd_paths(paths).tolist()  # pylint: disable=protected-access
  assert at_once == [annotations.path_problem(p) is not None for p in paths]
