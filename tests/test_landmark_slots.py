"""The eight landmark slots: the list's per-type order mapped onto them, and the flip's swap."""

import os

import numpy as np

from deepfashion_jax.data import annotations
from deepfashion_jax.data import landmark_slots

# Rows as the release writes them: upper-body 6 triples, lower-body 4, full-body 8. Each
# landmark's x is 10 * (its place in the row, from 1), its y x + 1.
_ROWS = """3
image_name  clothes_type  landmark_visibility_1  landmark_location_x_1  landmark_location_y_1
img/A_Tee/img_00000001.jpg      1  0 010 011  1 020 021  0 030 031  0 040 041  2 050 051  0 060 061
img/A_Skirt/img_00000001.jpg    2  0 010 011  0 020 021  1 030 031  0 040 041
img/A_Dress/img_00000001.jpg    3  0 010 011  0 020 021  0 030 031  0 040 041  0 050 051  0 060 061  0 070 071  0 080 081
"""


def _read_rows(tmp_path):
  os.makedirs(tmp_path / 'Anno')
  with open(tmp_path / annotations.LANDMARKS, 'w') as f:
    f.write(_ROWS)
  # pylint: disable-next=protected-access
  _, garment_type, visibility, xy = annotations._read_landmarks(str(tmp_path))
  return landmark_slots.to_slots(garment_type, visibility, xy)


def test_each_types_order_maps_onto_the_named_slots(tmp_path):
  visibility, xy = _read_rows(tmp_path)
  by_name = lambda row: {name: (int(v), tuple(int(c) for c in p))
                         for name, v, p in zip(landmark_slots.SLOT_NAMES, visibility[row],
                                               xy[row])}
  absent = (-1, (0, 0))
  assert by_name(0) == dict(  # upper-body: collars, sleeves, hems
      left_collar=(0, (10, 11)), right_collar=(1, (20, 21)), left_sleeve=(0, (30, 31)),
      right_sleeve=(0, (40, 41)), left_waistline=absent, right_waistline=absent,
      left_hem=(2, (50, 51)), right_hem=(0, (60, 61)))
  assert by_name(1) == dict(  # lower-body: waistline, hems
      left_collar=absent, right_collar=absent, left_sleeve=absent, right_sleeve=absent,
      left_waistline=(0, (10, 11)), right_waistline=(0, (20, 21)), left_hem=(1, (30, 31)),
      right_hem=(0, (40, 41)))
  assert by_name(2) == {name: (0, (10 * (k + 1), 10 * (k + 1) + 1))  # full-body: all, in order
                        for k, name in enumerate(landmark_slots.SLOT_NAMES)}
  assert visibility.dtype == np.int8 and xy.dtype == np.float32


def test_a_row_without_landmarks_has_every_slot_absent():
  visibility, xy = landmark_slots.to_slots(np.array([-1]), np.full((1, 8), -1, np.int8),
                                           np.full((1, 8, 2), 7, np.int16))
  assert (visibility == landmark_slots.ABSENT).all() and (xy == 0).all()


def test_the_flip_order_swaps_every_left_right_pair():
  for slot, other in enumerate(landmark_slots.FLIP_ORDER):
    name = landmark_slots.SLOT_NAMES[slot]
    side, part = name.split('_')
    mirrored = {'left': 'right', 'right': 'left'}[side]
    assert landmark_slots.SLOT_NAMES[other] == f'{mirrored}_{part}'
