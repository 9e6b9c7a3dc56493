"""The roofline projection (benchmarks/projection.py) and the bytes and bandwidths it
reads (deepfashion_jax/throughput.py): its arithmetic by hand, the counted rows on a shrunk
backbone, and the side-by-side of gpu.sh's JSONs (tests/test_benchmarks.py runs gpu.sh)."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import projection
from deepfashion_jax import throughput


def test_the_cost_of_a_matmul_is_its_hand_count():
  # float32 (8, 16) @ (16, 4): 2 x 8 x 16 x 4 FLOPs; both operands read, the result written.
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  cost = throughput.compiled_cost(jax.jit(jnp.matmul).lower(a, b))
  assert cost == dict(flops=2 * 8 * 16 * 4, bytes_accessed=4 * (8 * 16 + 16 * 4 + 8 * 4))


@pytest.mark.parametrize('device_kind, tbps', [
    ('NVIDIA H200', 4.8), ('NVIDIA H100 80GB HBM3', 3.35), ('NVIDIA H100 PCIe', 2.0),
    ('NVIDIA A100-SXM4-80GB', 2.039), ('NVIDIA A100 80GB PCIe', 1.935),
    ('NVIDIA A100-SXM4-40GB', 1.555), ('NVIDIA H200 NVL', None), ('cpu', None)])
def test_bandwidths_are_looked_up_by_device_kind(device_kind, tbps):
  assert throughput.peak_bytes_per_sec(device_kind) == (None if tbps is None else tbps * 1e12)


def test_the_roofline_is_the_slower_of_compute_and_memory():
  # 2e12 FLOPs at 1e15 FLOP/s: 2 ms; 6e9 bytes at 3e12 B/s: 2 ms, 9e9 bytes: 3 ms.
  balanced = projection.project(2e12, 6e9, 100, 1e15, 3e12, 0.4, per_core=250.0)
  assert balanced['compute_s'] == pytest.approx(2e-3)
  assert balanced['memory_s'] == pytest.approx(2e-3)
  memory = projection.project(2e12, 9e9, 100, 1e15, 3e12, 0.4, per_core=250.0)
  assert memory['bound'] == 'memory' and memory['roofline_s'] == pytest.approx(3e-3)
  assert memory['roofline_img_s'] == pytest.approx(100 / 3e-3)
  # 40% of 1e15 FLOP/s at 2e10 FLOPs an image: 20,000 img/s, 80 cores of 250 img/s.
  assert memory['mfu_img_s'] == pytest.approx(20_000)
  assert memory['host_cores'] == pytest.approx(80)
  compute = projection.project(2e12, None, 100, 1e15, 3e12, 0.4)
  assert compute['bound'] == 'compute' and compute['memory_s'] is None
  assert compute['roofline_img_s'] == pytest.approx(50_000) and compute['host_cores'] is None


def test_the_anchor_mfu_is_its_rate_at_our_flops_over_the_a100_peak():
  figures = projection.anchor(2.4e10, 989e12)
  assert figures['mfu'] == pytest.approx(2470 * 2.4e10 / 312e12)
  assert figures['img_s_at_its_mfu'] == pytest.approx(2470 * 989 / 312)
  assert 'DeepLearningExamples' in figures['source']
  assert 'mfu' not in projection.anchor(None, 989e12)


def test_the_pipeline_rate_comes_from_the_flag_or_the_json_or_is_not_measured(tmp_path):
  pipeline_json = tmp_path / 'input_pipeline.json'
  pipeline_json.write_text(json.dumps({projection.PIPELINE_RATE_KEY: 123.0,
                                       'per_core_images_per_second': 999.0}))
  rate = lambda *argv: projection.pipeline_rate(projection.parse_args(list(argv)))[0]
  assert rate('--pipeline_json', str(pipeline_json)) == 123.0
  assert rate('--pipeline_images_per_core_per_second', '77') == 77.0
  assert rate() is None
  flat_only = tmp_path / 'flat.json'  # the flat drawings' rate is not the photos'
  flat_only.write_text(json.dumps({'per_core_images_per_second': 999.0}))
  assert rate('--pipeline_json', str(flat_only)) is None


def test_a_shrunk_backbone_is_counted_and_projected(tmp_path, capsys):
  # Lowered, not compiled: the compiled count runs in gpu.sh's test.
  out = tmp_path / 'projection.json'
  assert projection.main(['--backbones', 'vit_test', '--image_size', '32', '--batch_size',
                          '2', '--cost', 'lowered', '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  (row,) = result['rows']
  assert (row['name'], row['batch_size'], result['device']) == ('vit_test', 2, 'NVIDIA H200')
  assert row['flops'] > 0 and row['bytes_accessed'] > 0 and row['host_cores'] is None
  assert row['roofline_img_s'] == pytest.approx(2 / max(row['compute_s'], row['memory_s']))
  printed = capsys.readouterr().out
  assert 'vit_test' in printed and projection.NOT_MEASURED in printed
  assert 'before any fusion' in printed and 'anchor: ' in printed


def _write(path, figures):
  path.write_text(json.dumps(figures))


def test_gpu_sh_results_are_put_beside_their_projection(tmp_path, capsys):
  step = dict(batch_size=512, image_size=224, dtype='bfloat16', device='NVIDIA H100 80GB HBM3')
  _write(tmp_path / 'step_resnet18.json', dict(step, backbone='resnet18', jax_img_s=9000.0,
                                               flops_per_step=5.6e12,
                                               bytes_accessed_per_step=6.7e10, mfu=0.1))
  _write(tmp_path / 'backbones.json', dict(
      batch_size=64, image_size=224, dtype='bfloat16', device='NVIDIA H100 80GB HBM3',
      rows=[dict(name='vit_b16', img_s=1000.0, flops_per_step=3.5e12, mfu=0.2),
            dict(name='siglip_b16', errors=['train step: failed'])]))
  assert projection.main(['--measured', str(tmp_path), '--pipeline_images_per_core_per_second',
                          '100', '--json', str(tmp_path / 'projection.json')]) == 0
  result = json.loads((tmp_path / 'projection.json').read_text())
  assert result['device'] == 'NVIDIA H100 80GB HBM3'  # its own peaks: listed
  resnet, vit, siglip = result['rows']
  # 6.7e10 bytes at 3.35 TB/s: 20 ms, above 5.6e12 FLOPs at 989 TFLOP/s (5.7 ms).
  assert resnet['roofline_img_s'] == pytest.approx(512 / 0.02)
  assert resnet['measured_over_roofline'] == pytest.approx(9000 / (512 / 0.02))
  assert resnet['host_cores'] == pytest.approx(0.4 * 989e12 * 512 / 5.6e12 / 100)
  assert vit['bound'] == 'compute' and vit['measured_over_roofline'] > 0
  assert 'roofline_img_s' not in siglip  # failed: its row stays, projected from nothing
  printed = capsys.readouterr().out
  for column in ('roofline img/s', 'img/s @40% MFU', 'measured img/s', 'measured MFU',
                 'measured/roofline', 'host cores'):
    assert column in printed
  assert '10.0%' in printed and 'siglip_b16' in printed


def test_an_unlisted_measuring_device_is_projected_on_an_h200(tmp_path):
  _write(tmp_path / 'step_resnet50.json', dict(
      backbone='resnet50', batch_size=8, image_size=64, dtype='bfloat16', device='cpu',
      jax_img_s=10.0, flops_per_step=1e11, bytes_accessed_per_step=1e10))
  assert projection.main(['--measured', str(tmp_path), '--json',
                          str(tmp_path / 'p.json')]) == 0
  result = json.loads((tmp_path / 'p.json').read_text())
  assert (result['device'], result['measured_device']) == ('NVIDIA H200', 'cpu')
  (row,) = result['rows']
  assert row['host_cores'] is None and row['mfu'] is None
  assert 'mfu' not in result['anchor']  # 64 px: not the anchor's side, no MFU made up


def test_the_anchor_mfu_is_made_at_our_resnet50_at_224_px(tmp_path):
  _write(tmp_path / 'step_resnet50.json', dict(
      backbone='resnet50', batch_size=256, image_size=224, dtype='bfloat16',
      device='NVIDIA H200', jax_img_s=5000.0, flops_per_step=6.2e12))
  assert projection.main(['--measured', str(tmp_path)]) == 0
  mfu = projection.measured_projection(projection.parse_args(['--measured', str(tmp_path)]),
                                       None, '')['anchor']['mfu']
  assert mfu == pytest.approx(2470 * 6.2e12 / 256 / 312e12)
