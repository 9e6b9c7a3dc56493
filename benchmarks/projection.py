"""A roofline projection of the train step on a GPU (an H200 by default), and, beside it,
what benchmarks/gpu.sh measured.

For each backbone, the real train step (`steps.jit_steps`, the default recipe as
benchmarks/train_step.py and benchmarks/backbones.py time it) at --image_size px, batch
--batch_size, --dtype, on shapes only (no weight is drawn), compiled on this machine:
  GFLOP/img      XLA's FLOPs of the step (forward, backward, update) per image, counted
                 before compiling where XLA can (CPU): the step as written, the same on
                 every platform (XLA:CPU's compiled count adds its own rewrites, e.g. of
                 depthwise convolutions' gradients);
  GB/step        XLA's bytes accessed of the compiled step: after THIS machine's fusions. On
                 a CPU they are XLA:CPU's program's, not a GPU's (other fusions), so the
                 memory time below is no forecast of a GPU's: gpu.sh's side by side uses
                 the GPU's own count
                 (--cost lowered: before any fusion, every op's operands and result);
  compute ms     FLOPs / the device's dense peak (deepfashion_jax/throughput.py);
  memory ms      bytes / its HBM bandwidth;
  roofline img/s batch / max(compute, memory): no step on that device runs faster;
  bound          which of the two sets it;
  img/s @ MFU    batch at --mfu (0.4) of the peak: a well-fed step's rate;
  host cores     the img/s at --mfu over one host core's input-pipeline rate on realistic
                 (photographic) JPEGs: --pipeline_images_per_core_per_second, or the
                 `per_core_images_per_second_realistic` of benchmarks/input_pipeline.py's
                 --json (--pipeline_json); 'not measured' without either.
Under the table, the anchor (ANCHOR): NVIDIA's published PyTorch ResNet-50 rate, the MFU
it makes by our ResNet-50 count, and what that MFU would be on the projected device.

With --measured OUT_DIR, nothing is compiled: the rows come from the JSONs gpu.sh wrote
there (step_resnet18.json, step_resnet50.json, backbones.json), each projected from the
cost XLA counted for the very step that was timed, at its batch and side, on the device it
ran on (its own peaks where throughput.py lists them, else --device's), beside the
measured img/s, MFU and measured / roofline.

  python -m benchmarks.projection [--backbones resnet18,resnet50] [--image_size 224] \\
      [--batch_size 256] [--dtype bfloat16] [--device 'NVIDIA H200'] [--mfu 0.4] \\
      [--cost compiled|lowered] [--pipeline_json FILE | \\
      --pipeline_images_per_core_per_second R] [--measured OUT_DIR] [--json OUT]
"""

import argparse
import functools
import json
import os
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import train_step
from deepfashion_jax import errors
from deepfashion_jax import sharding
from deepfashion_jax import steps
from deepfashion_jax import throughput
from deepfashion_jax.models import backbones
from deepfashion_jax.models import xla_cpu

DEFAULT_BACKBONES = ('resnet18', 'resnet50', 'convnext_tiny', 'vit_s16', 'vit_b16',
                     'clip_vit_b16', 'siglip_b16')
DEFAULT_DEVICE = 'NVIDIA H200'
# The key of benchmarks/input_pipeline.py's JSON that holds one host core's rate on
# photographic JPEGs (its --texture photo).
PIPELINE_RATE_KEY = 'per_core_images_per_second_realistic'
NOT_MEASURED = 'not measured'
# A published rate to hold the table against.
ANCHOR = dict(
    what="NVIDIA's PyTorch ResNet-50 v1.5, mixed precision (AMP), one A100 80GB",
    img_s=2470.0, device_kind='NVIDIA A100-SXM4-80GB', dtype='bfloat16', image_size=224,
    source=('NVIDIA/DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/'
            'README.md, "Training performance: NVIDIA DGX A100 (8x A100 80GB)", 1 GPU '
            '(pytorch-21.03 NGC container)'))
# gpu.sh's JSONs with one train step each, and its backbone table.
MEASURED_STEPS = ('step_resnet18.json', 'step_resnet50.json')
MEASURED_TABLE = 'backbones.json'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbones', default=','.join(DEFAULT_BACKBONES),
                      help='comma-separated names of models/backbones.BACKBONES')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--dtype', default='bfloat16', choices=sorted(steps.DTYPES))
  parser.add_argument('--device', default=DEFAULT_DEVICE,
                      help="the device_kind projected for, as jax names it ('NVIDIA H200')")
  parser.add_argument('--mfu', type=float, default=0.4, help='the MFU of the img/s @ MFU column')
  parser.add_argument('--cost', default='compiled', choices=('compiled', 'lowered'),
                      help="XLA's count of the compiled step (after fusion) or of the lowered "
                           'one (no compile: seconds, but bytes before any fusion)')
  parser.add_argument('--pipeline_json', default='',
                      help=f"benchmarks/input_pipeline.py's --json, for its {PIPELINE_RATE_KEY}")
  parser.add_argument('--pipeline_images_per_core_per_second', type=float, default=None,
                      help='one host core\'s input-pipeline rate on realistic JPEGs')
  parser.add_argument('--measured', default='',
                      help="gpu.sh's OUT_DIR: project what it measured, side by side")
  parser.add_argument('--json', default='', help='write the figures to this file')
  return parser.parse_args(argv)


# --- the projection's arithmetic ------------------------------------------------------

def project(flops: float, bytes_accessed, batch_size: int, peak_flops: float,
            peak_bytes, mfu: float, per_core=None) -> dict:
  """The roofline of one step: compute_s = flops / peak_flops, memory_s = bytes / peak
  bandwidth (None without either), roofline_s their maximum, roofline_img_s, bound
  ('compute' or 'memory'), mfu_img_s (batch at `mfu` of the peak) and host_cores (mfu_img_s
  over one core's pipeline rate `per_core`; None without one)."""
  compute_s = flops / peak_flops
  memory_s = bytes_accessed / peak_bytes if bytes_accessed and peak_bytes else None
  roofline_s = max(compute_s, memory_s or 0.0)
  mfu_img_s = mfu * peak_flops * batch_size / flops
  return dict(compute_s=compute_s, memory_s=memory_s, roofline_s=roofline_s,
              bound='memory' if memory_s and memory_s > compute_s else 'compute',
              roofline_img_s=batch_size / roofline_s, mfu_img_s=mfu_img_s,
              host_cores=mfu_img_s / per_core if per_core else None)


def device_peaks(device_kind: str, dtype: str) -> tuple:
  """(peak FLOP/s, peak bytes/s) of one device of `device_kind`; SystemExit when either
  is not listed in deepfashion_jax/throughput.py."""
  peaks = (throughput.peak_flops_per_sec(device_kind, dtype),
           throughput.peak_bytes_per_sec(device_kind))
  if None in peaks:
    raise SystemExit(f'{device_kind!r}: no listed peak FLOP/s for {dtype} or HBM bandwidth '
                     '(deepfashion_jax/throughput.py: PEAK_TFLOPS, PEAK_HBM_TBPS)')
  return peaks


def pipeline_rate(args):
  """(one host core's pipeline rate on realistic JPEGs or None, where it came from)."""
  if args.pipeline_images_per_core_per_second:
    return args.pipeline_images_per_core_per_second, '--pipeline_images_per_core_per_second'
  if args.pipeline_json:
    with open(args.pipeline_json) as f:
      rate = json.load(f).get(PIPELINE_RATE_KEY)
    if rate:
      return float(rate), f'{args.pipeline_json} ({PIPELINE_RATE_KEY})'
    return None, f'{args.pipeline_json} has no {PIPELINE_RATE_KEY}'
  return None, 'no --pipeline_json or --pipeline_images_per_core_per_second'


def anchor(resnet50_flops_per_image, peak_flops: float) -> dict:
  """ANCHOR, with the MFU its rate makes at our ResNet-50 step's FLOPs per image at 224 px
  (None without them), and the img/s that MFU would give at `peak_flops`."""
  figures = dict(ANCHOR)
  if resnet50_flops_per_image:
    anchor_peak = throughput.peak_flops_per_sec(ANCHOR['device_kind'], ANCHOR['dtype'])
    figures['mfu'] = ANCHOR['img_s'] * resnet50_flops_per_image / anchor_peak
    figures['img_s_at_its_mfu'] = figures['mfu'] * peak_flops / resnet50_flops_per_image
  return figures


# --- the step's cost, counted here ----------------------------------------------------

def _shapes(tree, shardings):
  """jax.ShapeDtypeStructs of `tree`'s arrays, each with its sharding."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def step_cost(name: str, args) -> dict:
  """flops and bytes_accessed of the default recipe's train step with backbone `name`, and
  the seconds the count took. The FLOPs are counted before compiling where XLA can (the
  step as written, before XLA:CPU's rewrites), the bytes after compiling (--cost lowered:
  before, unfused). The state and batch are shapes: nothing is initialised."""
  start = time.perf_counter()
  config = train_step.training_config(name, args.batch_size, args.image_size, args.dtype)
  mesh = sharding.make_mesh()
  step_config = steps.create_step_config(config, train_step.attribute_facts())
  train = steps.jit_steps(step_config, mesh).train
  state = jax.eval_shape(functools.partial(steps.initial_state, config, step_config))
  state = _shapes(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))
  batch = train_step.make_batch(args.batch_size, args.image_size)
  split = NamedSharding(mesh, PartitionSpec('data'))  # as sharding.global_batch splits it
  batch = _shapes(batch, {key: split for key in batch})
  lowered = train.lower(state, batch)
  cost = dict(throughput.lowered_cost(lowered), flops=throughput.counted_flops(
      functools.partial(steps.train_step, step_config), state, batch, lowered=lowered))
  if args.cost == 'compiled':  # the FLOPs as written, the bytes after fusion
    cost['bytes_accessed'] = throughput.compiled_cost(lowered)['bytes_accessed']
  if not cost['flops']:
    raise RuntimeError("XLA's cost analysis gave no FLOPs")
  return dict(cost, count_s=time.perf_counter() - start)


def projected_row(name: str, args, peaks: tuple, per_core) -> dict:
  """One backbone's row: its step's cost and projection, or its error."""
  row = dict(name=name, batch_size=args.batch_size, image_size=args.image_size)
  try:
    row.update(step_cost(name, args))
  except Exception as error:  # pylint: disable=broad-except
    row['error'] = f'{type(error).__name__}: {(str(error).splitlines() or [""])[0]}'
    return row
  row.update(project(row['flops'], row['bytes_accessed'], args.batch_size, *peaks, args.mfu,
                     per_core))
  return row


# --- what gpu.sh measured -------------------------------------------------------------

def measured_rows(out_dir: str) -> tuple:
  """(device_kind, dtype, rows): gpu.sh's train-step JSONs, then its backbone table's rows,
  each with name, what, batch_size, image_size, img_s, mfu, flops, bytes_accessed (None
  where not measured); files that are not there are left out."""
  rows, device_kind, dtype = [], None, None
  for file_name in MEASURED_STEPS:
    path = os.path.join(out_dir, file_name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      result = json.load(f)
    device_kind, dtype = result['device'], result['dtype']
    rows.append(dict(name=result['backbone'], what='train_step.py',
                     batch_size=result['batch_size'], image_size=result['image_size'],
                     img_s=result.get('jax_img_s'), mfu=result.get('mfu'),
                     flops=result.get('flops_per_step'),
                     bytes_accessed=result.get('bytes_accessed_per_step')))
  path = os.path.join(out_dir, MEASURED_TABLE)
  if os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
    device_kind, dtype = device_kind or table['device'], dtype or table['dtype']
    for row in table['rows']:
      rows.append(dict(name=row['name'], what='backbones.py', batch_size=table['batch_size'],
                       image_size=table['image_size'], img_s=row.get('img_s'),
                       mfu=row.get('mfu'), flops=row.get('flops_per_step'),
                       bytes_accessed=row.get('bytes_accessed_per_step')))
  return device_kind, dtype, rows


def side_by_side(rows: list, peaks: tuple, mfu: float, per_core) -> list:
  """Each measured row with its projection (from its own cost) and measured / roofline."""
  for row in rows:
    if row['flops']:
      row.update(project(row['flops'], row['bytes_accessed'], row['batch_size'], *peaks,
                         mfu, per_core))
      if row['img_s']:
        row['measured_over_roofline'] = row['img_s'] / row['roofline_img_s']
  return rows


# --- printing -------------------------------------------------------------------------

def _cell(value, fmt: str, width: int, missing: str = '-') -> str:
  return f'{missing if value is None else fmt.format(value):>{width}}'


PROJECTION_COLUMNS = (  # (header, key, width, format, scale)
    ('GFLOP/img', 'flops_per_image', 10, '{:.1f}', 1e-9),
    ('GB/step', 'bytes_accessed', 9, '{:.1f}', 1e-9),
    ('compute ms', 'compute_s', 11, '{:.2f}', 1e3),
    ('memory ms', 'memory_s', 10, '{:.2f}', 1e3),
    ('bound', 'bound', 8, '{}', None),
    ('roofline img/s', 'roofline_img_s', 16, '{:,.0f}', 1),
)
SIDE_BY_SIDE_COLUMNS = (
    ('roofline img/s', 'roofline_img_s', 15, '{:,.0f}', 1),
    ('measured img/s', 'img_s', 15, '{:,.1f}', 1),
    ('measured MFU', 'mfu', 13, '{:.1%}', None),
    ('measured/roofline', 'measured_over_roofline', 18, '{:.2g}', None),
)


def _row_cells(row: dict, table: tuple) -> str:
  cells = []
  for _, key, width, fmt, scale in table:
    value = row.get(key)
    if key == 'flops_per_image' and row.get('flops'):
      value = row['flops'] / row['batch_size']
    cells.append(_cell(None if value is None else value * scale if scale else value, fmt,
                       width))
  return ''.join(cells)


def _mfu_img_s_cell(row: dict) -> str:
  return _cell(row.get('mfu_img_s'), '{:,.0f}', 16)


def _cores_cell(row: dict, per_core) -> str:
  return _cell(row.get('host_cores'), '{:.1f}', 14, '-' if per_core else NOT_MEASURED)


def _name_width(names) -> int:
  return max(len(name) for name in list(names) + ['backbone']) + 2


def _counted_how(result: dict) -> str:
  if result['cost'] == 'lowered':
    return (f"the lowered step (not compiled) on {result['counted_on']}; bytes before any "
            "fusion, far above what a GPU's fused program moves: memory ms is an upper bound")
  return (f"the step compiled on {result['counted_on']}"
          + ("; bytes: XLA:CPU's program's, not a GPU's (other fusions): memory ms is no "
             "forecast of a GPU's" if result['counted_on'] == 'cpu'
             else ''))


def _pipeline_line(result: dict) -> str:
  return (f"host cores at {result['mfu']:.0%} MFU: one core's pipeline rate on realistic "
          f"JPEGs from {result['pipeline_rate_from']}"
          + (f": {result['pipeline_rate']:.1f} img/s" if result['pipeline_rate'] else ''))


def print_projection_header(result: dict, names: list):
  print(f"projection: the train step at {result['image_size']} px, batch "
        f"{result['batch_size']}, {result['dtype']}, on one {result['device']} "
        f"({result['peak_tflops']:.0f} TFLOP/s dense, {result['peak_tbps']:.2f} TB/s HBM)")
  print(f"FLOPs and bytes: XLA's cost analysis of {_counted_how(result)}")
  print(_pipeline_line(result))
  header = ''.join(f'{h:>{w}}' for h, _, w, *_ in PROJECTION_COLUMNS)
  mfu_header = f"img/s @{result['mfu']:.0%} MFU"
  print(f"{'backbone':<{_name_width(names)}}{header}{mfu_header:>16}{'host cores':>14}"
        f"{'count s':>9}", flush=True)


def print_projection_row(row: dict, result: dict, names: list):
  name = f"{row['name']:<{_name_width(names)}}"
  if 'error' in row:
    print(f"{name}failed: {row['error']}", flush=True)
    return
  print(f"{name}{_row_cells(row, PROJECTION_COLUMNS)}"
        f"{_mfu_img_s_cell(row)}{_cores_cell(row, result['pipeline_rate'])}"
        f"{row['count_s']:>9.1f}", flush=True)


def print_anchor(figures: dict, device: str):
  print(f"anchor: {figures['what']}: {figures['img_s']:,.0f} img/s ({figures['source']})"
        + (f"; {figures['mfu']:.1%} MFU by our ResNet-50 step's FLOPs, which on one "
           f"{device} would be {figures['img_s_at_its_mfu']:,.0f} img/s"
           if 'mfu' in figures else ''))


def print_side_by_side(result: dict):
  name_width = _name_width(row['name'] for row in result['rows'])
  mfu_header = f"img/s @{result['mfu']:.0%} MFU"
  print(f"measured beside the projection for one {result['device']} "
        f"({result['peak_tflops']:.0f} TFLOP/s, {result['peak_tbps']:.2f} TB/s): measured on "
        f"{result['measured_device']}, {result['dtype']}; each row projected from XLA's cost "
        "of the step it timed (bytes: the compiled step's on the measuring device"
        + ("; XLA:CPU's, not a GPU's" if result['measured_device'] == 'cpu' else '')
        + ')')
  print(_pipeline_line(result))
  print(f"{'backbone':<{name_width}}{'from':<15}{'batch':>6}{'px':>5}"
        f"{SIDE_BY_SIDE_COLUMNS[0][0]:>15}{mfu_header:>16}"
        + ''.join(f'{h:>{w}}' for h, _, w, *_ in SIDE_BY_SIDE_COLUMNS[1:])
        + f"{'host cores':>14}")
  for row in result['rows']:
    print(f"{row['name']:<{name_width}}{row['what']:<15}{row['batch_size']:>6}"
          f"{row['image_size']:>5}{_row_cells(row, SIDE_BY_SIDE_COLUMNS[:1])}"
          f"{_mfu_img_s_cell(row)}{_row_cells(row, SIDE_BY_SIDE_COLUMNS[1:])}"
          f"{_cores_cell(row, result['pipeline_rate'])}")
  print_anchor(result['anchor'], result['device'])


# --- the command line -----------------------------------------------------------------

def _resnet50_flops_per_image(rows: list):
  """A ResNet-50 row's FLOPs per image at the anchor's side, or None."""
  for row in rows:
    if (row['name'], row['image_size']) == ('resnet50', ANCHOR['image_size']) and row.get(
        'flops'):
      return row['flops'] / row['batch_size']
  return None


def measured_projection(args, per_core, rate_from: str) -> dict:
  """gpu.sh's measurements, each beside its projection."""
  device_kind, dtype, rows = measured_rows(args.measured)
  if not rows:
    raise SystemExit(f'--measured {args.measured}: none of {MEASURED_STEPS + (MEASURED_TABLE,)}')
  listed = (throughput.peak_flops_per_sec(device_kind, dtype) is not None
            and throughput.peak_bytes_per_sec(device_kind) is not None)
  device = device_kind if listed else args.device
  peaks = device_peaks(device, dtype)
  return dict(device=device, measured_device=device_kind, dtype=dtype, mfu=args.mfu,
              peak_tflops=peaks[0] / 1e12, peak_tbps=peaks[1] / 1e12,
              pipeline_rate=per_core, pipeline_rate_from=rate_from,
              rows=side_by_side(rows, peaks, args.mfu, per_core),
              anchor=anchor(_resnet50_flops_per_image(rows), peaks[0]))


def counted_projection(args, per_core, rate_from: str) -> dict:
  """Every chosen backbone's step counted here and projected, each row printed as it is
  counted (a full-size step takes a minute or more to compile on a CPU)."""
  names = [name.strip() for name in args.backbones.split(',') if name.strip()]
  for name in names:
    try:
      backbones.check_name(name, field='--backbones')
    except errors.ConfigError as error:
      raise SystemExit(str(error)) from None
  peaks = device_peaks(args.device, args.dtype)
  result = dict(device=args.device, image_size=args.image_size, batch_size=args.batch_size,
                dtype=args.dtype, mfu=args.mfu, cost=args.cost,
                counted_on=jax.devices()[0].platform, peak_tflops=peaks[0] / 1e12,
                peak_tbps=peaks[1] / 1e12, pipeline_rate=per_core,
                pipeline_rate_from=rate_from, rows=[])
  print_projection_header(result, names)
  for name in names:
    result['rows'].append(projected_row(name, args, peaks, per_core))
    print_projection_row(result['rows'][-1], result, names)
  result['anchor'] = anchor(_resnet50_flops_per_image(result['rows']), peaks[0])
  print_anchor(result['anchor'], result['device'])
  return result


def main(argv=None) -> int:
  """0, or 1 when a backbone's step could not be counted."""
  args = parse_args(argv)
  per_core, rate_from = pipeline_rate(args)
  if args.measured:
    result = measured_projection(args, per_core, rate_from)
    print_side_by_side(result)
  else:
    # The GPU's program is the one projected: on a CPU too, without models/xla_cpu.py's
    # workarounds (with them, a ResNet's step counts 0.2-0.3% more FLOPs).
    os.environ[xla_cpu.SWITCH] = '0'
    result = counted_projection(args, per_core, rate_from)  # prints as it counts
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return 1 if any('error' in row for row in result['rows']) else 0


if __name__ == '__main__':
  raise SystemExit(main())
