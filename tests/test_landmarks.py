"""The landmark branch's pieces: heatmap targets, the loss, the read-out of points, the
metric (against a NumPy transcription of Liu & Lu's evaluator), Liu & Lu's two-way
attribute loss, and the model's options. The parity of the whole network with Liu & Lu's
PyTorch one is in test_liu_lu_parity.py."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from deepfashion_jax import config_checks
from deepfashion_jax import losses
from deepfashion_jax import metrics
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import ten_crop
from deepfashion_jax.data import transforms
from deepfashion_jax.models import fashion_net
from deepfashion_jax.models import landmarks

SLOTS = landmark_slots.NUM_SLOTS


def test_landmark_positions_read_each_maps_highest_pixel_centre():
  heatmaps = np.zeros((2, 16, 8, SLOTS), np.float32)  # H 16, W 8
  peaks = [(r % 16, (3 * r) % 8) for r in range(SLOTS)]
  for s, (row, col) in enumerate(peaks):
    heatmaps[0, row, col, s] = 2.0
    heatmaps[1, 15 - row, 7 - col, s] = 1.0
  points = np.asarray(landmarks.landmark_positions(jnp.asarray(heatmaps)))
  for s, (row, col) in enumerate(peaks):
    np.testing.assert_allclose(points[0, s], [(col + 0.5) / 8, (row + 0.5) / 16])
    np.testing.assert_allclose(points[1, s], [(7 - col + 0.5) / 8, (15 - row + 0.5) / 16])


def _numpy_heatmap(x, y, height, width, radius, shape):
  rows, cols = np.mgrid[0:height, 0:width] + 0.5
  distance = np.hypot(cols - x * width, rows - y * height)
  if shape == 'gaussian':
    return np.exp(-distance ** 2 / (2 * radius ** 2))
  return np.exp(-0.5 * distance / radius)  # Liu & Lu's gaussian_map


@pytest.mark.parametrize('shape', losses.LANDMARK_HEATMAPS)
def test_heatmap_targets_peak_at_visible_landmarks_only(shape):
  rng = np.random.default_rng(0)
  points = rng.uniform(0, 1, (2, SLOTS, 2)).astype(np.float32)
  visible = rng.uniform(size=(2, SLOTS)) < 0.6
  target = np.asarray(losses.landmark_heatmaps(jnp.asarray(points), jnp.asarray(visible),
                                               12, 20, 3.0, shape))
  assert target.shape == (2, 12, 20, SLOTS)
  for b in range(2):
    for s in range(SLOTS):
      expected = (_numpy_heatmap(*points[b, s], 12, 20, 3.0, shape) if visible[b, s]
                  else np.zeros((12, 20)))
      np.testing.assert_allclose(target[b, :, :, s], expected, atol=1e-6)
  # A landmark at a pixel's centre: the target is 1 there.
  centre = np.array([[[(4 + 0.5) / 20, (7 + 0.5) / 12]] * SLOTS], np.float32)
  one = losses.landmark_heatmaps(jnp.asarray(centre), jnp.ones((1, SLOTS), bool), 12, 20,
                                 3.0, shape)
  assert float(one[0, 7, 4, 0]) == pytest.approx(1.0)


def test_landmark_loss_is_liu_lu_masked_mean_and_ignores_hidden_slots():
  rng = np.random.default_rng(1)
  heatmaps = rng.normal(size=(3, 8, 8, SLOTS)).astype(np.float32)
  points = rng.uniform(0, 1, (3, SLOTS, 2)).astype(np.float32)
  visible = rng.uniform(size=(3, SLOTS)) < 0.5
  loss = np.asarray(losses.landmark_loss(jnp.asarray(heatmaps), jnp.asarray(points),
                                         jnp.asarray(visible), 2.0))
  target = np.asarray(losses.landmark_heatmaps(jnp.asarray(points), jnp.asarray(visible),
                                               8, 8, 2.0))
  # Liu & Lu: torch.pow(mask * (output - target), 2).mean() over (B * 8, H * W).
  mask = np.broadcast_to(visible[:, None, None, :], heatmaps.shape)
  reference = ((mask * (heatmaps - target)) ** 2).mean()
  np.testing.assert_allclose(loss.mean(), reference, rtol=1e-6)
  changed = heatmaps.copy()
  changed[~mask] += 5.0  # what the model says where nothing is visible does not count
  again = losses.landmark_loss(jnp.asarray(changed), jnp.asarray(points),
                               jnp.asarray(visible), 2.0)
  np.testing.assert_allclose(np.asarray(again), loss, rtol=1e-6)


def test_two_way_attribute_loss_is_torch_weighted_cross_entropy():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 2, 30)).astype(np.float32)
  positive = rng.uniform(size=(4, 30)) < 0.2
  valid = np.array([True, True, True, False])
  ours = losses.two_way_attribute_loss(jnp.asarray(logits), jnp.asarray(positive),
                                       jnp.asarray(valid), 0.1)
  reference = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.1, 1.0]))(
      torch.tensor(logits[valid]), torch.tensor(positive[valid].astype(np.int64)))
  np.testing.assert_allclose(float(ours), float(reference), rtol=1e-5)


def _liu_lu_evaluator(predicted, true, visible):
  """Their utils.Evaluator.landmark_count / evaluate, transcribed to NumPy."""
  mask = np.repeat(visible[:, :, None].astype(np.float64), 2, axis=2)
  distances = np.sqrt(np.sum(np.square(mask * predicted - mask * true), axis=2))
  per_slot = distances.sum(axis=0) / visible.sum(axis=0)
  return per_slot, per_slot.mean()


def _metric_batch(rng, size):
  batch = dict(landmarks=rng.uniform(0, 1, (size, SLOTS, 2)).astype(np.float32),
               landmark_visible=rng.uniform(size=(size, SLOTS)) < 0.7,
               valid=np.ones(size, bool))
  batch['landmark_visible'][0] = True  # every slot seen at least once
  predicted = np.clip(batch['landmarks'] + rng.normal(0, 0.08, (size, SLOTS, 2)), 0, 1)
  return batch, predicted.astype(np.float32)


def _landmark_metrics(batches):
  merged = None
  for batch, predicted in batches:
    values = metrics.landmark_values(jnp.asarray(predicted),
                                     jax.tree.map(jnp.asarray, batch))
    one = metrics.collection_class(tuple(values)).single_from_model_output(**values)
    merged = one if merged is None else merged.merge(one)
  return {k: float(v) for k, v in merged.compute().items()}


def test_landmark_metrics_match_liu_lu_evaluator_over_merged_batches():
  rng = np.random.default_rng(3)
  batches = [_metric_batch(rng, 6), _metric_batch(rng, 5)]
  padded, padded_prediction = _metric_batch(rng, 3)
  padded['valid'][:] = False  # padding: counts nowhere, whatever it holds
  ours = _landmark_metrics(batches + [(padded, padded_prediction)])
  predicted = np.concatenate([p for _, p in batches])
  true = np.concatenate([b['landmarks'] for b, _ in batches])
  visible = np.concatenate([b['landmark_visible'] for b, _ in batches])
  per_slot, mean = _liu_lu_evaluator(predicted, true, visible)
  for s, slot in enumerate(landmark_slots.SLOT_NAMES):
    assert ours[f'landmark_error_{slot}'] == pytest.approx(per_slot[s], rel=1e-5)
  assert ours['landmark_error'] == pytest.approx(mean, rel=1e-5)
  distances = np.hypot(*(predicted - true).transpose(2, 0, 1))
  assert ours['landmark_detection_rate'] == pytest.approx(
      (distances[visible] <= 0.1).mean(), rel=1e-6)
  # The mean of the slots' means, not the mean over landmarks: they differ here.
  assert abs(ours['landmark_error'] - distances[visible].mean()) > 1e-4


def test_landmark_error_by_hand():
  true = np.zeros((2, SLOTS, 2), np.float32)
  predicted = true.copy()
  predicted[0, 0] = (0.3, 0.4)  # distance 0.5
  predicted[1, 0] = (0.06, 0.08)  # distance 0.1: detected
  predicted[0, 1] = (0.0, 0.2)  # distance 0.2
  visible = np.zeros((2, SLOTS), bool)
  visible[:, 0] = True
  visible[0, 1] = True
  batch = dict(landmarks=true, landmark_visible=visible, valid=np.ones(2, bool))
  ours = _landmark_metrics([(batch, predicted)])
  assert ours['landmark_error_left_collar'] == pytest.approx(0.3)
  assert ours['landmark_error_right_collar'] == pytest.approx(0.2)
  assert np.isnan(ours['landmark_error_left_sleeve'])  # never visible: no figure
  assert ours['landmark_error'] == pytest.approx(0.25)  # over the slots seen
  assert ours['landmark_detection_rate'] == pytest.approx(1 / 3)


def test_predicted_points_map_back_through_the_crop_flips_included():
  rng = np.random.default_rng(4)
  xy = rng.uniform(20, 180, (SLOTS, 2)).astype(np.float32)
  visibility = np.zeros(SLOTS, np.int8)
  for flip in (False, True):
    crop = transforms.Crop(np.array([10.0, 15.0, 190.0, 200.0], np.float32), flip)
    points, visible = transforms.crop_landmarks(xy, visibility, crop)
    assert visible.all()
    back = ten_crop.landmarks_in_photo(points[None, None], crop.region[None, None],
                                       np.array([flip]), np.ones(1))
    np.testing.assert_allclose(back[0, 0], xy, atol=1e-3)


def _model(**options):
  return fashion_net.FashionNet(backbone='resnet18', image_size=64, rngs=nnx.Rngs(0),
                                **options)


@pytest.mark.slow
def test_model_options_outputs():
  images = jnp.asarray(np.random.default_rng(5).integers(0, 255, (2, 64, 64, 3), np.uint8))
  plain = _model()(images)
  assert 'landmarks' not in plain and 'box' in plain
  heatmaps = _model(landmarks='heatmaps')(images)
  assert heatmaps['landmark_heatmaps'].shape == (2, 64, 64, SLOTS)
  assert heatmaps['landmarks'].shape == (2, SLOTS, 2)
  # The branch sits beside the heads: same initial weights, same category logits.
  np.testing.assert_allclose(heatmaps['category_logits'], plain['category_logits'],
                             atol=1e-5)
  attention = _model(landmarks='attention')(images)
  assert attention['landmark_heatmaps'].shape == (2, 64, 64, SLOTS)
  liu_lu = _model(heads='liu_lu', landmarks='heatmaps')(images)
  assert 'box' not in liu_lu
  np.testing.assert_allclose(liu_lu['attribute_logits'],
                             liu_lu['attribute_two_way_logits'][:, 1]
                             - liu_lu['attribute_two_way_logits'][:, 0], atol=1e-6)


def test_attention_reweights_the_landmark_map():
  """(1 + A) * features at the stride-8 map, A the U-Net's tanh over [max of the
  heatmaps, features]: recomputed here from the model's own parts."""
  model = _model(landmarks='attention')
  model.eval()
  images = jnp.asarray(np.random.default_rng(6).normal(size=(1, 64, 64, 3)), jnp.float32)
  stages = model.backbone(images)
  features = stages['layer2']
  heatmaps = model.landmark_branch(features)
  merged = jax.image.resize(heatmaps.max(-1, keepdims=True), (1, 8, 8, 1), 'linear',
                            antialias=False)
  attention = model.landmark_attention.unet(jnp.concatenate([merged, features], -1))
  assert float(jnp.abs(attention).max()) < 1.0  # tanh
  reweighted, _ = model.landmark_attention(features, heatmaps)
  np.testing.assert_allclose(reweighted, (1 + attention) * features, atol=1e-5)
  rest = reweighted
  for block in model.backbone.layer3:
    rest = block(rest)
  for block in model.backbone.layer4:
    rest = block(rest)
  outputs = model(images)
  np.testing.assert_allclose(outputs['landmark_heatmaps'], heatmaps, atol=1e-5)
  np.testing.assert_allclose(outputs['category_logits'],
                             _heads_on(model, rest)['category_logits'], atol=1e-4)


def _heads_on(model, features):
  box = model.predict_box(features)
  joined = jnp.concatenate([features.mean(axis=(1, 2)), model.local_features(features, box)],
                           axis=-1)
  return {'category_logits': model.category_classifier(joined)}


@pytest.mark.parametrize('changes, message', [
    (dict(attribute='two_way'), "heads='liu_lu'"),
    (dict(landmarks='attention', crop_size=72), 'multiple of 32'),
    (dict(landmarks='heatmaps', crop_size=68), 'multiple of 8'),
    (dict(heads='liu_lu', category_head='per_garment_type'), "category_head='single'"),
    (dict(landmark_radius=0.0), 'config.loss.landmark_radius'),
    (dict(landmark_heatmap='square'), 'config.loss.landmark_heatmap'),
])
def test_config_checks_of_liu_lu_parts(changes, message):
  config = test_config.get_config()
  where = dict(attribute='loss', landmark_radius='loss', landmark_heatmap='loss',
               crop_size='data', landmarks='model', heads='model', category_head='model')
  for name, value in changes.items():
    config[where[name]][name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    config_checks.check(config)
