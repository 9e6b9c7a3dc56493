"""DeepFashion's landmarks in one layout of eight named slots, whatever the garment.

`list_landmarks.txt` gives each image up to 8 (visibility, x, y) triples, in an order that
depends on its clothes type (as Liu & Lu 2018 read the release, scripts/create_info.py):

  upper-body (type 1), 6: left collar, right collar, left sleeve, right sleeve,
                          left hem, right hem -> slots 0, 1, 2, 3, 6, 7
  lower-body (type 2), 4: left waistline, right waistline, left hem, right hem
                          -> slots 4, 5, 6, 7
  full-body (type 3), 8:  collar, sleeve, waistline and hem pairs, left first
                          -> slots 0 to 7

Every example here carries all eight slots of the full-body order (`SLOT_NAMES`); a slot
its type does not have is *absent* (visibility `ABSENT`, coordinates 0). Left and right
always come in pairs (left at even slots), so a horizontal flip, which turns a left
landmark into a right one, swaps each pair (`FLIP_ORDER`) as well as mirroring x.

Visibility keeps the file's values, 0 visible, 1 occluded, 2 truncated (outside the
image), plus ABSENT. Like Liu & Lu's training and evaluation ('vis'), only 0 counts as a
landmark a model should find (`VISIBLE`): an occluded point is a guess of the annotator's.
"""

import numpy as np

from deepfashion_jax.data import vocabulary

SLOT_NAMES = ('left_collar', 'right_collar', 'left_sleeve', 'right_sleeve',
              'left_waistline', 'right_waistline', 'left_hem', 'right_hem')
NUM_SLOTS = len(SLOT_NAMES)
# The slot of each of the file's landmarks, in the file's order, per garment type
# (0 upper-body, 1 lower-body, 2 full-body: the file's clothes type minus one).
FILE_ORDER_SLOTS = ((0, 1, 2, 3, 6, 7), (4, 5, 6, 7), (0, 1, 2, 3, 4, 5, 6, 7))
# Slot i of a flipped example holds what slot FLIP_ORDER[i] held before the flip.
FLIP_ORDER = (1, 0, 3, 2, 5, 4, 7, 6)
VISIBLE = 0  # the file's visibility of a landmark in sight
ABSENT = -1  # visibility of a slot the garment type does not have

assert NUM_SLOTS == vocabulary.MAX_LANDMARKS
assert tuple(map(len, FILE_ORDER_SLOTS)) == vocabulary.LANDMARKS_PER_GARMENT_TYPE


def to_slots(garment_type: np.ndarray, visibility: np.ndarray, xy: np.ndarray):
  """Landmarks in the file's order -> the same in slot order.

  garment_type (N,): the landmark file's clothes type, 0-based (-1: no landmarks);
  visibility (N, 8) with -1 past the file's last triple, xy (N, 8, 2) pixels, both in the
  file's order (as `DeepFashionIndex` holds them). Returns visibility (N, 8) int8 and xy
  (N, 8, 2) float32 in slot order, absent slots (ABSENT, 0, 0). Triples past the type's
  count are ignored.
  """
  garment_type = np.asarray(garment_type)
  slot_visibility = np.full((len(garment_type), NUM_SLOTS), ABSENT, np.int8)
  slot_xy = np.zeros((len(garment_type), NUM_SLOTS, 2), np.float32)
  for t, slots in enumerate(FILE_ORDER_SLOTS):
    rows = np.flatnonzero(garment_type == t)
    slot_visibility[rows[:, None], slots] = visibility[rows, :len(slots)]
    slot_xy[rows[:, None], slots] = xy[rows, :len(slots)]
  slot_xy[slot_visibility == ABSENT] = 0  # a type's triple missing from its row
  return slot_visibility, slot_xy
