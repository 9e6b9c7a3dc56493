"""Liu & Lu 2018's published recipe ("A Deep Fashion Model with Landmark-Driven Attention",
category top-3 / top-5 91.16 / 96.12, attribute recall@3 / @5 54.69 / 63.74 on the test
split), on top of the published protocol (published_protocol.py: VGG-16, ImageNet pixel
scaling, ground-truth-box crops resized to 224 x 224 without random crop or flip, Adam at
1e-4 x 0.8 per epoch, batch 16, 20 epochs, the test split).

Taken from their public code (src/networks.py, src/lm_networks.py, src/base_networks.py,
src/const.py, src/dataset.py, src/conf/whole.py):
- the landmark branch on conv4_3 and the attention U-Net over it, (1 + A) * conv4_3 going
  on through pool4 and conv5 (config.model.landmarks='attention');
- their heads: conv5_3 max-pooled to 7 x 7, flattened, and per task 25,088 -> 1,024 ->
  outputs, two logits per attribute (config.model.heads='liu_lu'), no box branch;
- their losses: category cross-entropy x 1, the attributes' two-way cross-entropy with
  negatives weighted 0.1 x 20, the landmark heatmaps' masked squared error x 100, the
  target exp(-d / (2 r)) with r = 16 px.

Where this differs from their code: 50 categories (their last layer has 48 outputs); the
landmark heatmaps' points are read at the highest pixel's centre, (i + 0.5) / 224, where
theirs divide the index by 223; a slot the garment type has no landmark for counts as
absent here, where their table marks it visible at (0, 0) (it then drops out after the
box crop unless the box starts at the image's corner); attributes are ranked by their
log-odds (positive minus negative logit), where their evaluator ranked them by the
positive logit alone; Adam's moments carry over between epochs (they built a new
optimiser each epoch). Start from torchvision's ImageNet VGG-16
(--config.init_from=vgg16-397923af.pth), as they did; their own trained
WholeNetwork state dicts load through the same field (docs/landmarks.md).
"""

from configs import published_protocol


def get_config():
  config = published_protocol.get_config()
  config.model.landmarks = 'attention'
  config.model.heads = 'liu_lu'
  config.loss.attribute = 'two_way'
  config.loss.two_way_negative_weight = 0.1
  config.loss.reduce_sum = False  # no meaning for 'two_way'; said plainly
  config.loss.category_weight = 1.0
  config.loss.attribute_weight = 20.0
  config.loss.landmark_weight = 100.0
  config.loss.landmark_heatmap = 'liu_lu'
  config.loss.landmark_radius = 16.0
  config.best_metric = 'category_top3'
  return config
