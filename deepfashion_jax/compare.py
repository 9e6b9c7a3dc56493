"""--mode=compare: the evaluations of two or more runs on one split, side by side.

  python main.py --config=configs/X.py --workdir=OUT --mode=compare --workdirs=A,B[,C]

reads each run's newest evaluation of config.eval.split with config.eval.weights' weights:
`eval_<named>_<step>.json` and its `examples_<named>_<step>.npz` (evaluate.py's docstring
says what they hold; `<named>` is `<split>` or `<split>_ema`). A run without one is
evaluated first, its newest checkpoint through `evaluate.evaluate_checkpoint`, with the
config saved in that checkpoint (its model, its crop; `run_config`), which writes the
evaluation's files into that run's workdir; a run with a newer checkpoint than its newest
evaluation gets a warning (`warn_if_stale`). Then it writes into OUT:
- `compare_<named>.json` (`comparison`): the runs (label A, B, ... in --workdirs order,
  workdir, step, files read, measured facts); `protocol_differences`; `images_compared`;
  `headline`: each of evaluate.HEADLINE_METRICS with every run's value and its difference
  to the first run's; `per_category`: each category's top-1 in every run and the
  differences; `pairs`: the first run against each other one, McNemar's test on category
  correctness (`mcnemar`), top-1 on the compared images, and the files shown in the two
  galleries;
- `compare_<named>.html` (`compare_page`): the same, with the per-category table sortable
  and, for each pair, two galleries of the images one run gets right and the other wrong
  (config.eval.report_examples each, `disagreements`), every image drawn as each run saw
  it (`report.draw_example`: true box and landmarks in green, predicted ones in red).

Runs measured another way are not compared: a different partition, split, crop protocol,
data folder (its lists' SHA-256 where the evaluations recorded it, else its path) or set
of images in the split (`protocol_differences`) stops the command with one ProtocolError
naming each field and both values. --allow_protocol_differences compares them anyway,
with a warning and a banner at the top of the page. The headline and per-category figures
are each run's own evaluation, over its whole split; the pairs' figures count the images
paired by their path (`image`, `align`): in every run's split and readable in each. The
page says how many.

McNemar's test asks whether two models that are right on different images are equally
accurate: of the b images only the first gets right and the c only the second does, each
would be either way with probability 1/2 if they were. Below EXACT_BELOW discordant images
the p-value is the exact two-sided binomial one, from there on the chi-square one with
continuity correction; the JSON holds both.
"""

import dataclasses
import functools
import json
import math
import os
import re
import string

from absl import logging
import jax
import numpy as np

from deepfashion_jax import checkpoints
from deepfashion_jax import errors
from deepfashion_jax import evaluate
from deepfashion_jax import report
from deepfashion_jax.data import annotations

escape, Figure = report.escape, report.Figure

LABELS = string.ascii_uppercase  # the runs' names on the page, in --workdirs order
# Below this many discordant images the exact binomial p-value, from it the chi-square
# approximation (the usual threshold: its error is small from about 25 on).
EXACT_BELOW = 25
# What an examples file must hold for a comparison (evaluate.write_examples writes them).
_EXAMPLE_ARRAYS = ('image', 'valid', 'category', 'category_logits', 'correct', 'region')


class ProtocolError(errors.DeepFashionError, ValueError):
  """Runs whose evaluations were measured another way: their figures do not compare."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run's evaluation, as compared."""
  label: str  # 'A', 'B', ...
  workdir: str
  evaluation_path: str
  evaluation: dict  # eval_<named>_<step>.json
  examples_path: str
  examples: dict  # examples_<named>_<step>.npz: name -> array


# ----------------------------------------------------------------------------- the runs


def parse_workdirs(text: str) -> list:
  """--workdirs: two or more existing, distinct folders, comma-separated."""
  workdirs = [part.strip() for part in (text or '').split(',') if part.strip()]
  if not 2 <= len(workdirs) <= len(LABELS):
    raise errors.ConfigError(f'--workdirs={text!r}: expected two to {len(LABELS)} run '
                             'folders, comma-separated (--workdirs=runs/a,runs/b)')
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      raise errors.ConfigError(f'--workdirs: {workdir} is not a folder')
  real = [os.path.realpath(workdir) for workdir in workdirs]
  for i, path in enumerate(real):
    if path in real[:i]:
      raise errors.ConfigError(f'--workdirs names {workdirs[i]} twice')
  return workdirs


def saved_evaluation(workdir: str, named: str):
  """(JSON path, examples path) of the newest step (highest) evaluated on `named` that
  has both files; None when there is none."""
  pattern = re.compile(rf'eval_{re.escape(named)}_(\d+)\.json')
  found = sorted((int(m.group(1)), name) for name in os.listdir(workdir)
                 if (m := pattern.fullmatch(name)))
  for step, name in reversed(found):
    examples = os.path.join(workdir, f'examples_{named}_{step}.npz')
    if os.path.isfile(examples):
      return os.path.join(workdir, name), examples
  return None


def run_config(config, workdir: str):
  """The config to evaluate `workdir`'s newest checkpoint with: the one saved in it (its
  model, its data protocol), with `config`'s eval section, and config.data.data_dir when
  that is set (else the folder the run names)."""
  manager = checkpoints.create_manager(workdir, read_only=True)
  saved = checkpoints.read_metadata(manager, checkpoints.checkpoint_step(manager, '')).config
  evaluated = config.copy_and_resolve_references()
  unknown = []
  for name, value in (saved or {}).items():
    if name.startswith('eval.') or (name == 'data.data_dir' and config.data.data_dir):
      continue
    *sections, field = name.split('.')
    try:
      target = functools.reduce(lambda section, key: section[key], sections, evaluated)
      if field not in target:
        raise KeyError(field)
    except KeyError:
      unknown.append(name)
      continue
    target[field] = value
  if unknown:
    logging.warning('%s: its checkpoint names config fields this version does not have, '
                    'left out: %s', workdir, ', '.join(unknown))
  return evaluated


def warn_if_stale(workdir: str, evaluated_step: int):
  """A warning when the run holds a newer checkpoint than the evaluation compared: the
  comparison is of the step evaluated, and says how to compare the newer one."""
  if not os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_FOLDER)):
    return
  newest = checkpoints.create_manager(workdir, read_only=True).latest_step()
  if newest is not None and newest > evaluated_step:
    logging.warning('%s: comparing its evaluation of step %d; its newest checkpoint is of '
                    'step %d (run --mode=evaluate there first to compare that one).',
                    workdir, evaluated_step, newest)


def ensure_evaluated(config, workdir: str):
  """Evaluates `workdir`'s newest checkpoint (`run_config`) when it has no saved
  evaluation of the configured split and weights. Every process: evaluation is collective."""
  named = evaluate.split_name(config.eval.split, config.eval.weights)
  if saved_evaluation(workdir, named) is None:
    logging.info('%s has no evaluation of %s (eval_%s_<step>.json with its examples): '
                 'evaluating its newest checkpoint.', workdir, named, named)
    evaluate.evaluate_checkpoint(run_config(config, workdir), workdir)


def load_run(config, workdir: str, label: str) -> Run:
  """The run's newest saved evaluation of the configured split and weights (its JSON and
  examples), each checked for what a comparison reads."""
  named = evaluate.split_name(config.eval.split, config.eval.weights)
  found = saved_evaluation(workdir, named)
  if found is None:
    raise errors.ConfigError(f'{workdir}: no eval_{named}_<step>.json with its '
                             f'examples_{named}_<step>.npz; run --mode=evaluate there')
  evaluation_path, examples_path = found
  try:
    with open(evaluation_path, encoding='utf-8') as f:
      evaluation = json.load(f)
    with np.load(examples_path, allow_pickle=False) as arrays:
      examples = {name: arrays[name] for name in arrays.files}
  except (OSError, ValueError) as e:
    raise errors.DeepFashionError(f'{evaluation_path} or {examples_path} cannot be read: '
                                  f'{e}') from e
  for field in ('measured', 'per_category'):
    if not isinstance(evaluation, dict) or field not in evaluation:
      raise errors.DeepFashionError(f'{evaluation_path}: no {field!r}; evaluate the run again '
                                    'with --mode=evaluate')
  missing = [name for name in _EXAMPLE_ARRAYS if name not in examples]
  if missing:
    raise errors.DeepFashionError(f'{examples_path}: no {", ".join(missing)}; evaluate the '
                                  'run again with --mode=evaluate')
  warn_if_stale(workdir, int(evaluation['measured']['step']))
  return Run(label, workdir, evaluation_path, evaluation, examples_path, examples)


# ---------------------------------------------------------------------------- protocols


def _data_folder(run: Run) -> tuple:
  """(what tells the run's data folder from another's, how the message shows it): its
  lists' SHA-256 where the evaluation recorded it (the same lists at another path are the
  same data), else its path."""
  path = run.evaluation['measured'].get('data_dir')
  digest = (run.evaluation.get('data') or {}).get('lists_sha256')
  if digest:
    return digest, f'{path} (lists SHA-256 {digest[:12]})'
  return path, str(path)


def _where(run: Run) -> str:
  return f'{run.label} ({run.workdir})'


def _image_set_difference(first: Run, other: Run) -> str:
  """'' when both splits hold the same files, else their counts and how many each lacks."""
  mine, theirs = set(first.examples['image'].tolist()), set(other.examples['image'].tolist())
  if mine == theirs:
    return ''
  return (f'images (the examples\' files): {len(mine):,} in {_where(first)}, {len(theirs):,} '
          f'in {_where(other)}; {len(mine - theirs):,} only in {first.label}\'s, '
          f'{len(theirs - mine):,} only in {other.label}\'s')


def protocol_differences(runs: list) -> list:
  """One line per fact in which a run's evaluation differs from the first run's: the
  field, and both values with their runs."""
  first, lines = runs[0], []
  for other in runs[1:]:
    for field in ('partition', 'split', 'crop_protocol'):
      mine, theirs = (run.evaluation['measured'].get(field) for run in (first, other))
      if mine != theirs:
        lines.append(f'measured.{field}: {mine!r} in {_where(first)}, {theirs!r} in '
                     f'{_where(other)}')
    (mine, shown_mine), (theirs, shown_theirs) = _data_folder(first), _data_folder(other)
    if mine != theirs:
      lines.append(f'data folder: {shown_mine} in {_where(first)}, {shown_theirs} in '
                   f'{_where(other)}')
    if images := _image_set_difference(first, other):
      lines.append(images)
  return lines


def check_protocols(runs: list, allow_differences: bool) -> list:
  """`protocol_differences`, refused (ProtocolError) unless `allow_differences`, when they
  are said in a warning and returned for the page's banner."""
  differences = protocol_differences(runs)
  if differences and not allow_differences:
    raise ProtocolError(
        '--workdirs: these runs were not measured the same way, so their figures do not '
        'compare: ' + '; '.join(differences) + '. Evaluate them alike (--mode=evaluate with '
        'the same data folder, partition, split and crop), or pass '
        '--allow_protocol_differences to compare them anyway.')
  for line in differences:
    logging.warning('COMPARED DESPITE A DIFFERENT PROTOCOL: %s', line)
  return differences


# ---------------------------------------------------------------------------- alignment


def align(image_lists: list, valid_lists: list) -> tuple:
  """(paths, rows): the files that every run's examples hold and every run could read, in
  the first run's order; rows[k][i] is the row of paths[i] in run k's examples (its first,
  should a split list a file twice)."""
  uniques = [np.unique(np.asarray(images), return_index=True) for images in image_lists]
  common = functools.reduce(np.intersect1d, (unique for unique, _ in uniques))
  rows = [first[np.searchsorted(unique, common)] for unique, first in uniques]
  readable = np.logical_and.reduce([np.asarray(valid, bool)[r]
                                    for valid, r in zip(valid_lists, rows)])
  rows = [r[readable] for r in rows]
  order = np.argsort(rows[0], kind='stable')
  return common[readable][order], [r[order] for r in rows]


def aligned_examples(runs: list) -> tuple:
  """(paths, [each run's examples at those paths' rows]): `align` applied."""
  paths, rows = align([run.examples['image'] for run in runs],
                      [run.examples['valid'] for run in runs])
  return paths, [{name: array[r] for name, array in run.examples.items()}
                 for run, r in zip(runs, rows)]


# -------------------------------------------------------------------------- the figures


def binomial_two_sided_p(k: int, n: int) -> float:
  """2 P(K <= min(k, n - k)) for K ~ Binomial(n, 1/2), at most 1: the exact two-sided
  p-value of k successes in n fair trials. Summed in logarithms (log C(n, i) grows by
  log((n - i) / (i + 1)) a term), so that a split's n of tens of thousands neither
  overflows nor loses the small terms."""
  if n == 0:
    return 1.0
  k = min(k, n - k)
  i = np.arange(k, dtype=np.float64)
  log_terms = np.concatenate([[0.0], np.cumsum(np.log(n - i) - np.log(i + 1))]) - n * math.log(2)
  top = log_terms.max()
  return min(1.0, 2 * math.exp(top) * float(np.exp(log_terms - top).sum()))


def mcnemar(first_correct, second_correct) -> dict:
  """McNemar's test on two runs' correctness over the same images: the discordant counts
  (b: the first right and the second wrong; c: the other way), the exact two-sided
  binomial p-value, the chi-square statistic with continuity correction
  ((|b - c| - 1)^2 / (b + c), the bracket taken as 0 below 0) and its p-value (one degree
  of freedom: erfc(sqrt(x / 2))), and `p_value`, the one `test` names (exact below
  EXACT_BELOW discordant images)."""
  first, second = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
  b, c = int(np.sum(first & ~second)), int(np.sum(~first & second))
  chi_square = max(abs(b - c) - 1, 0) ** 2 / (b + c) if b + c else 0.0
  figures = dict(images=int(first.size), first_right_second_wrong=b,
                 first_wrong_second_right=c, exact_p_value=binomial_two_sided_p(b, b + c),
                 chi_square=chi_square, chi_square_p_value=math.erfc(math.sqrt(chi_square / 2)))
  exact = b + c < EXACT_BELOW
  figures.update(test='exact binomial' if exact else 'chi-square, continuity corrected',
                 p_value=figures['exact_p_value' if exact else 'chi_square_p_value'])
  return figures


def _beaten(right: np.ndarray, wrong_logits: np.ndarray, wrong_correct: np.ndarray,
            n: int) -> np.ndarray:
  """Rows that one run gets right (`right`) and the other not, by the other's probability
  of its wrong category, highest first (equal ones in row order), at most n."""
  chosen = np.flatnonzero(np.asarray(right, bool) & ~np.asarray(wrong_correct, bool))
  confidence = report.softmax(wrong_logits[chosen]).max(axis=1)
  return chosen[np.argsort(-confidence, kind='stable')[:n]]


def disagreements(first: dict, second: dict, n: int) -> tuple:
  """(first right and second wrong, second right and first wrong): rows of two runs'
  aligned examples, each at most n, those the wrong run was surest of first."""
  return (_beaten(first['correct'], second['category_logits'], second['correct'], n),
          _beaten(second['correct'], first['category_logits'], first['correct'], n))


def _difference(value, reference):
  return None if value is None or reference is None else value - reference


def headline(runs: list) -> dict:
  """{metric: {values, differences_to_first}} for evaluate.HEADLINE_METRICS that a run
  measured (None where one did not: no box branch, say)."""
  figures = {}
  for metric in evaluate.HEADLINE_METRICS:
    values = [run.evaluation.get(metric) for run in runs]
    if any(value is not None for value in values):
      figures[metric] = dict(values=values,
                             differences_to_first=[_difference(v, values[0]) for v in values])
  return figures


def per_category(runs: list) -> list:
  """Each category of the first run's evaluation (paired with the others' by name): its
  images and top-1 in every run and the difference to the first run's, sorted by the second
  run's difference, largest first (categories without a figure last)."""
  by_name = [{c['name']: c for c in run.evaluation['per_category']} for run in runs]
  rows = []
  for category in runs[0].evaluation['per_category']:
    entries = [named.get(category['name'], {}) for named in by_name]
    top1 = [entry.get('top1') for entry in entries]
    rows.append(dict(name=category['name'], images=[entry.get('images') for entry in entries],
                     top1=top1, differences_to_first=[_difference(v, top1[0]) for v in top1]))
  key = lambda row: (row['differences_to_first'][1] is None,
                     -(row['differences_to_first'][1] or 0))
  return sorted(rows, key=key)


def _pair(first: dict, second: dict, paths: np.ndarray, n: int) -> tuple:
  """(the pair's JSON, the galleries' rows): McNemar's figures, top-1 of each on the
  compared images, and the files of the two galleries."""
  figures = mcnemar(first['correct'], second['correct'])
  shown = disagreements(first, second, n)
  figures.update(top1_on_compared=[float(np.mean(e['correct'])) if len(paths) else None
                                   for e in (first, second)],
                 shown_first_right=paths[shown[0]].tolist(),
                 shown_second_right=paths[shown[1]].tolist())
  return figures, shown


def _run_entry(run: Run) -> dict:
  return dict(label=run.label, workdir=os.path.abspath(run.workdir),
              step=run.evaluation.get('step'), weights=run.evaluation.get('weights'),
              evaluation=os.path.abspath(run.evaluation_path),
              examples=os.path.abspath(run.examples_path),
              measured=run.evaluation['measured'], data=run.evaluation.get('data'))


def comparison(runs: list, differences: list, paths: np.ndarray, aligned: list,
               n: int) -> tuple:
  """(compare_<named>.json's content, each pair's gallery rows into `aligned`)."""
  pairs, shown = [], []
  for other in range(1, len(runs)):
    figures, rows = _pair(aligned[0], aligned[other], paths, n)
    pairs.append(dict(runs=[runs[0].label, runs[other].label], **figures))
    shown.append(rows)
  content = dict(split=runs[0].evaluation['measured'].get('split'),
                 weights=runs[0].evaluation.get('weights'),
                 runs=[_run_entry(run) for run in runs], protocol_differences=differences,
                 images_compared=int(len(paths)), headline=headline(runs),
                 per_category=per_category(runs), pairs=pairs)
  return content, shown


# ------------------------------------------------------------------------------ the page


def _image_dir(run: Run):
  """Where the run's evaluated files are (`annotations.find_image_dir`), None when its
  data folder is not here (thumbnails then say the file cannot be read)."""
  try:
    return annotations.find_image_dir(run.evaluation['measured']['data_dir'])
  except (annotations.AnnotationError, TypeError, KeyError):
    return None


# The runs' table, one row each: (label, what of a run's JSON entry (`_run_entry`) it shows).
_RUN_ROWS = (
    ('workdir', lambda entry: entry['workdir']),
    ('evaluation', lambda entry: os.path.basename(entry['evaluation'])),
    ('checkpoint step', lambda entry: entry['step']),
    ('weights', lambda entry: entry['weights']),
    ('images scored', lambda entry: entry['measured'].get('images_scored')),
    ('unreadable images left out', lambda entry: entry['measured'].get('skipped_images')),
    ('partition', lambda entry: entry['measured'].get('partition')),
    ('split', lambda entry: entry['measured'].get('split')),
    ('crop protocol', lambda entry: entry['measured'].get('crop_protocol')),
)


def _runs_section(runs: list, content: dict) -> str:
  """What each run is and how it was measured, a column per run."""
  rows = [[escape(label)] + [escape(shown(entry)) for entry in content['runs']]
          for label, shown in _RUN_ROWS]
  rows.append(['data folder'] + [escape(_data_folder(run)[1]) for run in runs])
  return ('<h2>The runs</h2>'
          + report.table(['', *(run.label for run in runs)], rows, sortable=False)
          + f'<p class="note"><b>{content["images_compared"]:,} images compared</b> image by '
          'image (paired by file: in every run\'s split and readable in each). The metrics '
          'below are each run\'s own evaluation over its whole split.</p>')


def _change_style(metric: str) -> str:
  return 'ratio_change' if report.metric_style(metric) == 'ratio' else 'number_change'


def _headline_section(runs: list, figures: dict) -> str:
  columns = ['metric', runs[0].label]
  for run in runs[1:]:
    columns += [run.label, f'{run.label} − {runs[0].label}']
  rows = []
  for metric, entry in figures.items():
    row = [escape(metric), Figure(entry['values'][0], report.metric_style(metric))]
    for value, change in zip(entry['values'][1:], entry['differences_to_first'][1:]):
      row += [Figure(value, report.metric_style(metric)), Figure(change, _change_style(metric))]
    rows.append(row)
  return '<h2>Metrics</h2>' + report.table(columns, rows, sortable=False)


def _mcnemar_section(pairs: list) -> str:
  rows = [[escape(' vs '.join(p['runs'])), Figure(p['images'], 'count'),
           Figure(p['top1_on_compared'][0]), Figure(p['top1_on_compared'][1]),
           Figure(p['first_right_second_wrong'], 'count'),
           Figure(p['first_wrong_second_right'], 'count'), escape(p['test']),
           Figure(p['p_value'], 'number')] for p in pairs]
  return ('<h2>Is the difference in top-1 more than chance?</h2>'
          f'<p class="note">McNemar\'s test on the compared images: b images only the first '
          'run gets right, c only the second; were both equally accurate, each of these '
          f'b + c would go either way with probability 1/2. Below {EXACT_BELOW} of them the '
          'exact binomial p-value, from there on the chi-square one with continuity '
          'correction. A small p-value: one run is right more often than chance explains.</p>'
          + report.table(['runs', 'images', 'top-1 first', 'top-1 second',
                          'b: first right only', 'c: second right only', 'test', 'p-value'],
                         rows, sortable=False))


def _category_section(runs: list, rows: list) -> str:
  columns = ['category', 'images', f'{runs[0].label} top-1']
  for run in runs[1:]:
    columns += [f'{run.label} top-1', f'{run.label} − {runs[0].label}']
  cells = []
  for row in rows:
    cell = [escape(row['name']), Figure(row['images'][0], 'count'), Figure(row['top1'][0])]
    for value, change in zip(row['top1'][1:], row['differences_to_first'][1:]):
      cell += [Figure(value), Figure(change, 'ratio_change')]
    cells.append(cell)
  return ('<h2>Categories</h2><p class="note">Top-1 of each category\'s images in each run, '
          f'sorted by {runs[1].label} − {runs[0].label}; click a column header to sort.</p>'
          + report.table(columns, cells, caption='per category'))


def _example_image(run: Run, image_dir, examples: dict, row: int, path: str) -> str:
  if image_dir is None:
    return report.missing_image(path)
  return report.thumbnail(image_dir, path, run.evaluation['measured']['canvas_size'],
                          examples['region'][row], **report.drawn_arrays(examples, row))


def _predicted_line(run: Run, examples: dict, row: int) -> str:
  logits = examples['category_logits'][row]
  predicted = int(np.argmax(logits))
  probability = report.softmax(logits[None])[0, predicted]
  verdict = 'right' if examples['correct'][row] else 'wrong'
  return (f'<span class="{verdict}">{escape(run.label)}: '
          f'{escape(_category_name(run, predicted))} ({probability:.0%})</span>')


def _category_name(run: Run, category: int) -> str:
  categories = run.evaluation['per_category']
  return categories[category]['name'] if 0 <= category < len(categories) else str(category)


def _pair_card(pair_runs: tuple, image_dirs: tuple, pair_examples: tuple, row: int,
               path: str) -> str:
  """One image as both runs saw it, side by side, with the true category and each run's."""
  images = [(run.label, _example_image(run, image_dir, examples, row, path))
            for run, image_dir, examples in zip(pair_runs, image_dirs, pair_examples)]
  true = int(pair_examples[0]['category'][row])
  return report.gallery_card(report.side_by_side(images), [
      f'<b>{escape(os.path.dirname(path).split("/")[-1])}</b> '
      f'<span class="muted">{escape(os.path.basename(path))}</span>',
      f'true: {escape(_category_name(pair_runs[0], true))}',
      *(_predicted_line(run, examples, row) for run, examples in zip(pair_runs, pair_examples))],
                             wide=True)


def _gallery_section(runs: list, aligned: list, paths: np.ndarray, pairs: list,
                     shown: list) -> str:
  parts = ['<h2>Images one run gets right and the other wrong</h2>', report.colour_key(),
           '<p class="note">Each image drawn as each run saw it; those the wrong run was '
           'surest of first.</p>']
  image_dirs = [_image_dir(run) for run in runs]  # looked up once, not per image
  for other, (pair, (first_right, second_right)) in enumerate(zip(pairs, shown), start=1):
    pair_runs, pair_examples = (runs[0], runs[other]), (aligned[0], aligned[other])
    pair_dirs = (image_dirs[0], image_dirs[other])
    for (right, wrong), rows, total in (
        ((runs[0], runs[other]), first_right, pair['first_right_second_wrong']),
        ((runs[other], runs[0]), second_right, pair['first_wrong_second_right'])):
      cards = [_pair_card(pair_runs, pair_dirs, pair_examples, int(row), str(paths[row]))
               for row in rows]
      heading = (f'{right.label} right, {wrong.label} wrong: '
                 + (f'{len(cards)} of {total:,}' if total else 'none'))
      parts.append(f'<h3>{escape(heading)}</h3><div class="gallery">' + '\n'.join(cards)
                   + '</div>')
  return '\n'.join(parts)


def compare_page(runs: list, content: dict, aligned: list, paths: np.ndarray,
                 shown: list) -> str:
  """compare_<named>.html: the runs and what was compared, a banner for each protocol
  difference allowed, the headline metrics, McNemar's test per pair, the categories, and
  both directions' galleries per pair."""
  weights = '' if content['weights'] == 'raw' else ', moving average of the weights'
  title = (f'Comparison: {content["split"]} split{weights}, '
           + ' vs '.join(run.label for run in runs))
  banners = [report.banner('Compared although measured differently: ' + line
                           + ' — these figures may not compare.')
             for line in content['protocol_differences']]
  body = [f'<h1>{escape(title)}</h1>', *banners, _runs_section(runs, content),
          _headline_section(runs, content['headline']), _mcnemar_section(content['pairs']),
          _category_section(runs, content['per_category']),
          _gallery_section(runs, aligned, paths, content['pairs'], shown)]
  return report.page(title, '\n'.join(body))


# ------------------------------------------------------------------------------ the mode


def _summary(content: dict) -> str:
  """The printed lines: the headline figures side by side, and each pair's test."""
  labels = [run['label'] for run in content['runs']]
  lines = [f'{content["images_compared"]:,} images compared; ' + ', '.join(
      f'{run["label"]}: {run["workdir"]} (step {run["step"]})' for run in content['runs'])]
  width = max(map(len, content['headline']), default=0)
  lines.append(f'  {"":<{width}}  ' + '  '.join(f'{label:>8}' for label in labels))
  for metric, entry in content['headline'].items():
    lines.append(f'  {metric:<{width}}  ' + '  '.join(
        f'{"–" if value is None else f"{value:.4f}":>8}' for value in entry['values']))
  for pair in content['pairs']:
    first, second = pair['runs']
    lines.append(f'McNemar {first} vs {second}: {pair["first_right_second_wrong"]} only {first} '
                 f'right, {pair["first_wrong_second_right"]} only {second} right, p = '
                 f'{pair["p_value"]:.4g} ({pair["test"]})')
  return '\n'.join(lines)


def compare_runs(config, workdir: str, run_dirs: list,
                 allow_protocol_differences: bool = False):
  """--mode=compare: writes compare_<named>.json and .html into `workdir` (the module's
  docstring says what they hold) and returns the HTML's path (None on processes other than
  the first, which only help evaluate)."""
  if config.eval.checkpoint:
    raise errors.ConfigError(f'config.eval.checkpoint={config.eval.checkpoint!r}: '
                             '--mode=compare reads each run\'s newest evaluation (evaluate '
                             'another checkpoint with --mode=evaluate first); leave it empty')
  for run_dir in run_dirs:
    ensure_evaluated(config, run_dir)
  if jax.process_index() > 0:
    return None
  runs = [load_run(config, run_dir, label) for run_dir, label in zip(run_dirs, LABELS)]
  differences = check_protocols(runs, allow_protocol_differences)
  paths, aligned = aligned_examples(runs)
  content, shown = comparison(runs, differences, paths, aligned, config.eval.report_examples)
  named = evaluate.split_name(config.eval.split, config.eval.weights)
  os.makedirs(workdir, exist_ok=True)
  json_path = os.path.join(workdir, f'compare_{named}.json')
  with open(json_path, 'w', encoding='utf-8') as f:
    json.dump(content, f, indent=2, allow_nan=False)
  page_path = os.path.join(workdir, f'compare_{named}.html')
  with open(page_path, 'w', encoding='utf-8') as f:
    f.write(compare_page(runs, content, aligned, paths, shown))
  print(_summary(content))
  print('written to', json_path, 'and', page_path)
  return page_path
