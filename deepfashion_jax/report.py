"""HTML pages of evaluations: --mode=evaluate's report_<split>_<step>.html, and the pieces
any other page of evaluations builds from (`page`, `table`, `thumbnail`, `gallery_card`,
`side_by_side`, `banner`), such as --mode=compare's (compare.py).

A page is one self-contained file: plain HTML, its CSS, a few lines of JavaScript that sort
a table when its column header is clicked (numbers from the cells' `data-value`, largest
first on the first click; empty figures always last), and its images embedded as data
URIs (JPEG thumbnails, the confusion matrix's PNG). No framework, no network: it opens from
disk in any browser, and a copy of the file alone shows everything.

The report of one evaluation (`evaluation_page`) holds, in order: what was measured (the
folder, partition, split, crop protocol, step, weights, images scored) and the run's
config; the headline metrics grouped as the printed table groups them (`metric_groups`),
beside the published figures when the run measured them the published way
(`comparable_published`); the per-category table with each category's most confused other
categories (`most_confused_with`) and the per-garment-type one; the confusion matrix;
attribute recall per type and each type's best and worst attributes by average precision
(`attribute_extremes`); landmark error per slot (a model with landmarks); and two
galleries: the most confidently wrong images and, for balance, the most confidently right
(`confidently_wrong`, `confidently_right`), each image drawn again from its file with the
true (green) and predicted (red) box and landmarks.
"""

import base64
import html
import io
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from deepfashion_jax.data import image_files
from deepfashion_jax.data import landmark_slots
from deepfashion_jax.data import transforms
from deepfashion_jax.data import vocabulary

TRUE_COLOUR, PREDICTED_COLOUR = (0, 220, 0), (230, 0, 0)  # also training's figures
CROP_COLOUR = (120, 120, 255)  # the part of the image the model saw, when not all of it
THUMBNAIL_SIDE = 180  # pixels, the long side
THUMBNAIL_QUALITY = 85
EXTREME_ATTRIBUTES = 20
TOP_ATTRIBUTES_SHOWN = 5
CONFUSED_WITH_SHOWN = 3

# The published figures (docs/protocols.md): the official partition's test split, every
# image cut to its ground-truth box. {method: {metric: value}}.
PUBLISHED = {
    'FashionNet (Liu et al. 2016)': dict(category_top3=0.8258, category_top5=0.9017,
                                         attr_recall_top3=0.4552, attr_recall_top5=0.5461),
    'Liu & Lu 2018 (landmark-driven attention)': dict(
        category_top3=0.9116, category_top5=0.9612, attr_recall_top3=0.5469,
        attr_recall_top5=0.6374),
}

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { padding: 2px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:hover { background: #e2e8f5; }
th[aria-sort=descending]::after { content: ' \\25BC'; }
th[aria-sort=ascending]::after { content: ' \\25B2'; }
.muted { color: #777; } .note { color: #555; max-width: 70em; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 6px; width: 200px;
        font-size: 12px; background: #fafafa; }
.card img { display: block; margin: 0 auto 4px; }
.card .wrong { color: #b00; } .card .right { color: #070; }
.card.wide { width: auto; max-width: 600px; }
.side-by-side { display: flex; gap: 6px; } .side-by-side figure { margin: 0; }
.side-by-side figcaption { text-align: center; font-weight: bold; }
.banner { border: 3px solid #c00; background: #fde8e8; color: #800; padding: 0.6em 1em;
          font-weight: bold; }
.missing { width: 180px; height: 120px; display: flex; align-items: center;
           justify-content: center; background: #eee; color: #777; }
.key span { display: inline-block; width: 1em; height: 0.6em; margin: 0 0.3em 0 1em; }
details { margin: 0.4em 0; } summary { cursor: pointer; }
pre { background: #f6f6f6; padding: 0.6em; overflow: auto; max-height: 30em; }
"""

# Sorts a table.sortable by the clicked column: numbers by data-value (largest first on
# the first click), text alphabetically; cells without a figure (data-value="") stay last.
_SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (header) {
  header.addEventListener('click', function () {
    var table = header.closest('table'), column = header.cellIndex;
    var numeric = header.dataset.numeric === '1';
    var current = header.getAttribute('aria-sort');
    var descending = current ? current === 'ascending' : numeric;
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    header.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
    var key = function (row) {
      var cell = row.cells[column];
      if (!numeric) return cell.textContent;
      return cell.dataset.value === '' ? null : parseFloat(cell.dataset.value);
    };
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      var order = numeric ? x - y : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { table.tBodies[0].appendChild(row); });
  });
});
"""


def escape(value) -> str:
  return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
  """A whole HTML document: the title, the house CSS, `body` (HTML), the sorting script."""
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n'
          f'<script>{_SORT_SCRIPT}</script>\n</body></html>\n')


def figure_text(value, style: str = 'ratio') -> str:
  """A figure as the pages show it: 'ratio' as a percentage, 'count' whole, 'number' with
  four decimals; a difference of two with its sign, 'ratio_change' in percentage points,
  'number_change' with four decimals; None (no figure: nothing to measure it on) as a
  dash."""
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return '–'
  if style == 'ratio':
    return f'{100 * value:.1f}%'
  if style == 'ratio_change':
    return f'{100 * value:+.1f} pp'
  if style == 'number_change':
    return f'{value:+.4f}'
  if style == 'count':
    return f'{int(value):,}'
  return f'{value:.4f}'


class Figure:
  """A table cell holding a figure: shown by `figure_text`, sorted by its value."""

  def __init__(self, value, style: str = 'ratio'):
    self.value, self.style = value, style


def _cell(value) -> str:
  if isinstance(value, Figure):
    missing = value.value is None or (isinstance(value.value, float) and np.isnan(value.value))
    sort_key = '' if missing else repr(float(value.value))
    return (f'<td class="n" data-value="{sort_key}">'
            f'{figure_text(value.value, value.style)}</td>')
  return f'<td>{value}</td>'  # HTML already: escape text before


def table(columns: list, rows: list, sortable: bool = True, caption: str = '') -> str:
  """An HTML table: `columns` the header texts, `rows` lists of cells, each a `Figure` or
  HTML. A sortable table sorts on a click on a header (numbers where its first row holds a
  `Figure`)."""
  numeric = [bool(rows) and isinstance(rows[0][i], Figure) for i in range(len(columns))]
  header = ''.join(f'<th data-numeric="{int(n)}">{escape(c)}</th>'
                   for c, n in zip(columns, numeric))
  body = '\n'.join('<tr>' + ''.join(_cell(value) for value in row) + '</tr>' for row in rows)
  kind = ' class="sortable"' if sortable else ''
  caption = f'<caption>{escape(caption)}</caption>' if caption else ''
  return (f'<table{kind}>{caption}<thead><tr>{header}</tr></thead>\n'
          f'<tbody>\n{body}\n</tbody></table>')


def data_uri(picture: Image.Image, image_format: str = 'JPEG') -> str:
  """The picture encoded (JPEG at THUMBNAIL_QUALITY, or PNG) as a data: URI."""
  buffer = io.BytesIO()
  if image_format == 'JPEG':
    picture.convert('RGB').save(buffer, 'JPEG', quality=THUMBNAIL_QUALITY)
  else:
    picture.save(buffer, image_format)
  encoded = base64.b64encode(buffer.getvalue()).decode('ascii')
  return f'data:image/{image_format.lower()};base64,{encoded}'


def read_fitted_image(image_dir: str, path: str, canvas_size: int):
  """The image at `path` (as the lists write it) in `image_dir`, as the pipeline fits it
  into its canvas (the pixels a crop region counts in), or None when it cannot be read."""
  try:
    data = image_files.read(os.path.join(image_dir, path), image_files.DEFAULT_MAX_BYTES,
                            image_files.resolved_folders(image_dir,
                                                         os.path.join(image_dir, 'img')))
    image = transforms.decode_image(data)
  except (image_files.ImageFileError, transforms.ImageDecodeError, OSError):
    return None
  fitted, _ = transforms.fit_to_canvas(image, np.zeros((1, 4), np.float32), canvas_size)
  return fitted


def _to_pixels(points: np.ndarray, region: np.ndarray) -> np.ndarray:
  """(..., 2) points in [0, 1] coordinates of a crop -> pixels of the image it was cut from
  (an evaluation crop is never flipped)."""
  x0, y0, x1, y1 = (float(v) for v in region)
  return np.asarray(points, np.float64) * [x1 - x0, y1 - y0] + [x0, y0]


def draw_example(image: np.ndarray, region, true_box=None, predicted_box=None,
                 true_landmarks=None, landmark_visible=None, predicted_landmarks=None,
                 side: int = THUMBNAIL_SIDE) -> Image.Image:
  """The canvas-fitted image shrunk to `side` on its long side, with the crop region (when
  it is not the whole image), the true (green) and predicted (red) box, the visible true
  landmarks and every predicted one drawn on it; boxes and landmarks in crop coordinates,
  `region` in the image's pixels."""
  height, width = image.shape[:2]
  scale = side / max(height, width)
  picture = Image.fromarray(image).resize((max(1, round(width * scale)),
                                           max(1, round(height * scale))), Image.BILINEAR)
  draw = ImageDraw.Draw(picture)
  region = np.asarray(region, np.float64)
  if np.any(np.abs(region - [0, 0, width, height]) > 1):
    draw.rectangle(tuple(region * scale), outline=CROP_COLOUR, width=1)
  for box, colour in ((true_box, TRUE_COLOUR), (predicted_box, PREDICTED_COLOUR)):
    if box is not None:
      (x0, y0), (x1, y1) = _to_pixels(np.reshape(box, (2, 2)), region) * scale
      draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=2)
  if true_landmarks is not None:
    true_landmarks = np.asarray(true_landmarks)[np.asarray(landmark_visible, bool)]
  for points, colour in ((true_landmarks, TRUE_COLOUR), (predicted_landmarks, PREDICTED_COLOUR)):
    if points is not None:
      for x, y in _to_pixels(np.reshape(points, (-1, 2)), region) * scale:
        draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
  return picture


def thumbnail(image_dir: str, path: str, canvas_size: int, region, **drawn) -> str:
  """An <img> of the example's file with its boxes and landmarks (`draw_example`'s keyword
  arguments), embedded; a grey placeholder saying so when the file cannot be read."""
  image = read_fitted_image(image_dir, path, canvas_size)
  if image is None:
    return missing_image(path)
  picture = draw_example(image, region, **drawn)
  return (f'<img src="{data_uri(picture)}" width="{picture.width}" height="{picture.height}" '
          f'alt="{escape(path)}" title="{escape(path)}">')


def missing_image(path: str) -> str:
  """A grey placeholder in an image's place, naming the file that could not be read."""
  return f'<div class="missing">{escape(path)}<br>not readable</div>'


def gallery_card(image_html: str, lines: list, wide: bool = False) -> str:
  """A gallery card: an image (`thumbnail`) over lines of HTML; a wide one as wide as its
  images (`side_by_side`)."""
  kind = 'card wide' if wide else 'card'
  return (f'<div class="{kind}">' + image_html
          + ''.join(f'<div>{line}</div>' for line in lines) + '</div>')


def side_by_side(labelled_images: list) -> str:
  """[(label, image HTML), ...] in a row, each captioned by its label: one example as
  several models saw it, for a wide `gallery_card`."""
  return ('<div class="side-by-side">'
          + ''.join(f'<figure>{image}<figcaption>{escape(label)}</figcaption></figure>'
                    for label, image in labelled_images) + '</div>')


def banner(text: str) -> str:
  """A warning the reader cannot miss, at the top of a page (text, escaped here)."""
  return f'<p class="banner" role="alert">{escape(text)}</p>'


def drawn_arrays(examples: dict, row: int) -> dict:
  """What `draw_example` draws of one example (`thumbnail`'s keyword arguments): the true
  and predicted box and, only beside predicted ones, the true landmarks (a model without
  landmarks gets no dots)."""
  names = ['true_box', 'predicted_box'] + (
      ['true_landmarks', 'landmark_visible', 'predicted_landmarks']
      if 'predicted_landmarks' in examples else [])
  return {name: examples[name][row] for name in names if name in examples}


def colour_key() -> str:
  """The line saying which colour is what, for a gallery."""
  swatch = lambda colour: f'<span style="background: rgb{colour}"></span>'
  return (f'<p class="key">{swatch(TRUE_COLOUR)}true box and landmarks'
          f'{swatch(PREDICTED_COLOUR)}predicted{swatch(CROP_COLOUR)}the crop the model saw '
          '(where not the whole image)</p>')


# Selection.

def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
  return shifted / shifted.sum(axis=1, keepdims=True)


def _by_confidence(category_logits, category, valid, wrong: bool, n: int) -> np.ndarray:
  """Rows of valid examples whose top-1 is wrong (or right), by the probability of their
  predicted category, highest first (equal ones in row order), at most n."""
  predicted = np.argmax(category_logits, axis=1)
  chosen = np.flatnonzero(np.asarray(valid, bool) & ((predicted != category) == wrong))
  confidence = softmax(category_logits[chosen]).max(axis=1)
  return chosen[np.argsort(-confidence, kind='stable')[:n]]


def confidently_wrong(category_logits, category, valid, n: int) -> np.ndarray:
  """The n valid examples (row numbers) predicted wrong with the highest probability."""
  return _by_confidence(category_logits, category, valid, True, n)


def confidently_right(category_logits, category, valid, n: int) -> np.ndarray:
  """The n valid examples (row numbers) predicted right with the highest probability."""
  return _by_confidence(category_logits, category, valid, False, n)


def most_confused_with(counts: np.ndarray, names, top: int = CONFUSED_WITH_SHOWN) -> list:
  """Per true category (a confusion matrix's row), its `top` most frequent wrong
  predictions as (name, count), most first (equal counts: the lower index); never-made
  ones left out."""
  confused = np.array(counts)
  np.fill_diagonal(confused, 0)
  order = np.argsort(-confused, axis=1, kind='stable')[:, :top]
  return [[(names[j], int(confused[i, j])) for j in row if confused[i, j] > 0]
          for i, row in enumerate(order)]


def attribute_extremes(per_attribute: list, type_name: str,
                       n: int = EXTREME_ATTRIBUTES) -> tuple:
  """(best, worst): the n attributes of the type with the highest average precision, highest
  first, and the n with the lowest that are not among those, lowest first; of the
  attributes with a positive (breakdown.per_attribute's objects). Equal ones keep their
  index order."""
  ranked = sorted((a for a in per_attribute
                   if a['type'] == type_name and a['average_precision'] is not None),
                  key=lambda a: -a['average_precision'])
  return ranked[:n], ranked[n:][::-1][:n]


def comparable_published(measured: dict) -> dict:
  """PUBLISHED when the run measured the published way (the official partition's test
  split, images cut to their box); else {}."""
  published_way = (measured.get('partition') == 'official' and measured.get('split') == 'test'
                   and measured.get('crop') == 'gt_box')
  return PUBLISHED if published_way else {}


# What the printed table and the page group the metrics under, in order; a metric goes to
# the first group whose test takes it.
_GROUPS = (
    ('category', lambda name: name.startswith('category_top')),
    ('attributes, over all 1,000 (published protocol)',
     lambda name: name.startswith('attr_recall_top') and name.count('_') == 2),
    ('attributes per type (top k within the type)', lambda name: name.startswith('attr_')),
    ('attributes, ranking', lambda name: name == 'mean_attribute_average_precision'),
    ('box', lambda name: name.startswith('bbox_')),
    ('landmarks', lambda name: name.startswith('landmark_') and name != 'landmark_loss'),
    ("the baseline's formulas", lambda name: name.startswith('baseline_')),
    ('losses', lambda name: name.endswith('loss')),
    ('other', lambda name: True),
)


def metric_groups(results: dict) -> list:
  """[(group title, [(name, value), ...]), ...]: the metrics in _GROUPS' order, empty
  groups left out."""
  groups = {title: [] for title, _ in _GROUPS}
  for name, value in results.items():
    title = next(title for title, takes in _GROUPS if takes(name))
    groups[title].append((name, value))
  return [(title, members) for title, members in groups.items() if members]


# The report of one evaluation.

_MEASURED_ROWS = (('data folder', 'data_dir'), ('partition', 'partition'), ('split', 'split'),
                  ('crop protocol', 'crop_protocol'), ('checkpoint step', 'step'),
                  ('weights', 'weights'), ('images scored', 'images_scored'),
                  ('unreadable images left out', 'skipped_images'))


def _measured_section(measured: dict, config_text: str) -> str:
  rows = [[escape(label), escape(measured[key])] for label, key in _MEASURED_ROWS]
  return ('<h2>What was measured</h2>' + table(['what', 'value'], rows, sortable=False)
          + '<details><summary>the run\'s config</summary><pre>' + escape(config_text)
          + '</pre></details>')


def metric_style(name: str) -> str:
  """How `figure_text` shows the metric `name`: losses and distances as numbers, counts
  whole, the rest as percentages."""
  return 'number' if 'loss' in name or name.startswith(('bbox_l1', 'landmark_error')) else (
      'count' if name.startswith('skipped') else 'ratio')


def _headline_section(results: dict, measured: dict, headline: tuple) -> str:
  """The headline metrics beside the published figures (when comparable), then every
  metric grouped, folded."""
  published = comparable_published(measured)
  methods = list(published)
  figures = lambda name, value: ([escape(name), Figure(value, metric_style(name))]
                                 + [Figure(published[m].get(name)) for m in methods])
  parts = ['<h2>Metrics</h2>',
           table(['metric', 'this run', *methods],
                 [figures(name, results[name]) for name in headline if name in results],
                 sortable=False)]
  if published:
    parts.append('<p class="note">Measured the published way (official partition, test split, '
                 'images cut to their box): the published figures stand beside this run\'s '
                 '(docs/protocols.md).</p>')
  else:
    parts.append(f'<p class="note">No published figure was measured this way (partition '
                 f'{escape(measured["partition"])}, split {escape(measured["split"])}, crop '
                 f'{escape(measured["crop"])}); the published table counts the official '
                 'partition\'s test split with images cut to their box '
                 '(configs/published_protocol.py, docs/protocols.md).</p>')
  parts.append('<details><summary>every metric, grouped as the printed table</summary>'
               '<div class="row">')
  metrics = {k: v for k, v in results.items() if k != 'skipped_images_eval'}  # measured's
  for title, members in metric_groups(metrics):
    parts.append('<div>' + f'<h3>{escape(title)}</h3>'
                 + table(['metric', 'this run', *methods],
                         [figures(name, value) for name, value in members],
                         sortable=False) + '</div>')
  return '\n'.join(parts + ['</div></details>'])


def _category_section(details: dict, category_names) -> str:
  counts = np.array(details['confusion_matrix'])
  confused = most_confused_with(counts, category_names)
  rows = [[escape(c['name']), Figure(c['images'], 'count'), Figure(c['top1']),
           Figure(c['top3']), Figure(c['top5']),
           escape(', '.join(f'{name} ({n})' for name, n in confused[i])) or
           '<span class="muted">–</span>']
          for i, c in enumerate(details['per_category'])]
  types = [[escape(t['name']), Figure(t['images'], 'count'), Figure(t['top1']),
            Figure(t['top3']), Figure(t['top5'])] for t in details['per_garment_type']]
  return ('<h2>Categories</h2><p class="note">Click a column header to sort. '
          '"Most often taken for": the wrong top-1 predictions of the category\'s images, '
          'with their counts.</p>'
          + table(['category', 'images', 'top-1', 'top-3', 'top-5', 'most often taken for'],
                  rows, caption='per category')
          + table(['garment type', 'images', 'top-1', 'top-3', 'top-5'], types,
                  caption='per garment type'))


def _confusion_section(confusion_png: bytes) -> str:
  encoded = base64.b64encode(confusion_png).decode('ascii')
  return ('<h2>Confusion matrix</h2><p class="note">Rows: the true category, divided by its '
          'images; columns: the predicted one.</p>'
          f'<img src="data:image/png;base64,{encoded}" width="800" height="800" '
          'alt="confusion matrix">')


def _attribute_section(results: dict, per_attribute: list) -> str:
  type_names = vocabulary.ATTRIBUTE_TYPE_NAMES
  rows = [[escape(t), Figure(results.get(f'attr_recall_top3_{t}')),
           Figure(results.get(f'attr_recall_top5_{t}')),
           Figure(sum(a['positives'] for a in per_attribute if a['type'] == t), 'count')]
          for t in type_names]
  parts = ['<h2>Attributes</h2>',
           table(['type', 'recall@3', 'recall@5', 'positives'], rows, caption='per type'),
           f'<p class="note">Per type, the {EXTREME_ATTRIBUTES} best and worst attributes by '
           'average precision (ranking the split\'s images by the attribute\'s score), of '
           'those with a positive in the split.</p>']
  columns = ['attribute', 'AP', 'positives', 'recall@3', 'recall@5']
  row = lambda a: [escape(a['name']), Figure(a['average_precision']),
                   Figure(a['positives'], 'count'), Figure(a['recall_top3']),
                   Figure(a['recall_top5'])]
  extremes = [(t, *attribute_extremes(per_attribute, t)) for t in type_names]
  for shown, (t, best, worst) in enumerate(e for e in extremes if e[1]):
    tables = table(columns, [row(a) for a in best], caption='best')
    if worst:
      tables += table(columns, [row(a) for a in worst], caption='worst')
    opened = '' if shown else ' open'  # the first type's; a click opens the others
    parts.append(f'<details{opened}><summary><b>{escape(t)}</b>: the {len(best)} best and '
                 f'{len(worst)} worst</summary><div class="row">{tables}</div></details>')
  return '\n'.join(parts)


def _landmark_section(results: dict) -> str:
  rows = [[escape(slot), Figure(results[f'landmark_error_{slot}'], 'number')]
          for slot in landmark_slots.SLOT_NAMES if f'landmark_error_{slot}' in results]
  if not rows:
    return ''
  return ('<h2>Landmarks</h2><p class="note">Mean distance of each slot\'s visible landmarks '
          'from the predicted point, in [0, 1] coordinates of the input.</p>'
          + table(['slot', 'error'], rows))


def _card(examples: dict, row: int, gallery: dict) -> str:
  """One example's gallery card: its thumbnail, its true and predicted category, its top
  attributes (a true one marked)."""
  logits = examples['category_logits'][row]
  probabilities = softmax(logits[None])[0]
  true, predicted = int(examples['category'][row]), int(np.argmax(logits))
  names = gallery['category_names']
  path = str(gallery['image_paths'][int(examples['index'][row])])
  image = thumbnail(gallery['image_dir'], path, gallery['canvas_size'],
                    examples['region'][row], **drawn_arrays(examples, row))
  attribute_scores = examples['attribute_logits'][row]
  top = np.argsort(-attribute_scores, kind='stable')[:TOP_ATTRIBUTES_SHOWN]
  positive = examples['attribute_positive'][row]
  attributes = ', '.join(escape(gallery['attribute_names'][a]) + (' ✓' if positive[a] else '')
                         for a in top)
  verdict = 'right' if true == predicted else 'wrong'
  return gallery_card(image, [
      f'<b>{escape(os.path.dirname(path).split("/")[-1])}</b> '
      f'<span class="muted">{escape(os.path.basename(path))}</span>',
      f'true: {escape(names[true])} ({probabilities[true]:.0%})',
      f'<span class="{verdict}">predicted: {escape(names[predicted])} '
      f'({probabilities[predicted]:.0%})</span>',
      f'<span class="muted">attributes:</span> {attributes}'])


def _gallery_section(examples: dict, gallery: dict) -> str:
  n = gallery['count']
  if not n:
    return ''
  arguments = (examples['category_logits'], examples['category'], examples['valid'], n)
  parts = ['<h2>Examples</h2>', colour_key()]
  for title, rows in (('most confidently wrong', confidently_wrong(*arguments)),
                      ('most confidently right', confidently_right(*arguments))):
    cards = [_card(examples, int(row), gallery) for row in rows]
    heading = f'The {len(cards)} {title}' if cards else f'{title}: none'
    parts.append(f'<h3>{heading}</h3><div class="gallery">' + '\n'.join(cards) + '</div>')
  return '\n'.join(parts)


def evaluation_page(*, measured: dict, results: dict, details: dict, config_text: str,
                    confusion_png: bytes, examples: dict, gallery: dict,
                    headline: tuple) -> str:
  """The report of one evaluation (the module's docstring lists what it holds).

  measured: what `_MEASURED_ROWS` names, and `crop`; results, details: the metrics and the
  breakdowns (breakdown.py); examples: the split's examples (steps.eval_step's);
  gallery: {count (examples per gallery), image_dir, image_paths (the index's), canvas_size,
  category_names, attribute_names}; headline: the metrics shown first, beside the
  published figures.
  """
  of_what = '' if measured['weights'] == 'raw' else ', moving average of the weights'
  title = f'Evaluation: {measured["split"]} split, step {measured["step"]}{of_what}'
  body = [f'<h1>{escape(title)}</h1>',
          _measured_section(measured, config_text),
          _headline_section(results, measured, headline),
          _category_section(details, gallery['category_names']),
          _confusion_section(confusion_png),
          _attribute_section(results, details['per_attribute']),
          _landmark_section(results),
          _gallery_section(examples, gallery)]
  return page(title, '\n'.join(part for part in body if part))
