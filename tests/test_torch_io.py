"""The shape of torch_io, which the next families build on: the torch.save reader stands
alone, every family offers the same small interface, and `load_into` refuses a file that no
family takes. (What each family loads, and its parity with PyTorch: test_convert_torch.py,
test_liu_lu_parity.py.)"""

import ast
import pickle
import struct
import zipfile

import pytest

from deepfashion_jax import errors as project_errors
from deepfashion_jax import torch_io
from deepfashion_jax.torch_io import errors
from deepfashion_jax.torch_io import reader


def _project_imports(module) -> set:
  """The modules of this project (or relative imports) that `module`'s source imports."""
  with open(module.__file__) as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add('.' * node.level + (node.module or ''))
  return {name for name in imported
          if name.startswith(('.', 'deepfashion_jax', 'configs', 'benchmarks', 'tests'))}


def test_the_reader_imports_nothing_from_the_project_but_its_error_type():
  assert _project_imports(reader) == {'deepfashion_jax.torch_io.errors'}
  # The error type imports only the project's common error type, which imports nothing.
  assert _project_imports(errors) == {'deepfashion_jax'}
  assert not _project_imports(project_errors)


def test_every_family_has_the_interface_load_into_uses():
  names = [family.NAME for family in torch_io.FAMILIES]
  assert len(set(names)) == len(names) == 7, names
  assert names[-1] == 'torchvision'  # the plain state dict takes what the others leave
  for family in torch_io.FAMILIES:
    assert callable(family.matches) and callable(family.load), family.NAME


@pytest.mark.parametrize('content', [
    None, 3, 'text', [], [1, 2], {}, {1: 2}, {'model': 3}, {'model': {1: 2}},
    {'state_dict': None}, {'lm_branch.conv1.weight': 0}])
def test_matches_answers_for_anything_the_reader_returns(content):
  """A family's `matches` sees whatever the file held: it answers, it does not raise."""
  for family in torch_io.FAMILIES:
    assert isinstance(family.matches(content), bool), family.NAME


def test_a_file_no_family_takes_is_refused_saying_what_it_holds(tmp_path):
  """A torch.save zip archive whose object is a list, not a state dict."""
  path = tmp_path / 'list.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps([1, 2], protocol=2))
  assert reader.read_pth(str(path)) == [1, 2]
  with pytest.raises(torch_io.CheckpointError,
                     match=f'{path}: expected a state dict, found list'):
    torch_io.load_into(None, str(path))


def _code_payloads(marker) -> dict:
  """Pickles naming os.system or eval through each opcode that can name a callable:
  GLOBAL + REDUCE, STACK_GLOBAL (protocol 4), INST (protocol 0), OBJ; all of these run
  `touch marker` under plain pickle.loads. And one whose BUILD state names os.system, for
  an allowed class's __init__."""
  command = f'touch {marker}'.encode()
  text = b'X' + struct.pack('<I', len(command)) + command  # BINUNICODE
  source = b"__import__('os').system('" + command + b"')"
  return {
      'global': b'\x80\x02cos\nsystem\n' + text + b'\x85R.',
      'builtins.eval': (b'\x80\x02cbuiltins\neval\nX' + struct.pack('<I', len(source))
                        + source + b'\x85R.'),
      'stack_global': (b'\x80\x04\x8c\x02os\x8c\x06system\x93' + text + b'\x85R.'),
      'inst': b"(S'" + command + b"'\nios\nsystem\n.",
      'obj': b'\x80\x02(cos\nsystem\n' + text + b'o.',
      'build': (b'\x80\x02ccollections\nOrderedDict\n}X\x08\x00\x00\x00__init__'
                b'cos\nsystem\nsb.'),
  }


def _legacy_file(obj_pickle: bytes) -> bytes:
  """torch.save's legacy format around one object pickle: magic number, protocol version,
  sys info, the object, its (no) storage keys."""
  header = b''.join(pickle.dumps(x, protocol=2) for x in (0x1950a86a20f9469cfc6c, 1001, {}))
  return header + obj_pickle + pickle.dumps([], protocol=2)


@pytest.mark.parametrize('file_format', ['zip', 'legacy'])
@pytest.mark.parametrize('payload', sorted(_code_payloads('m')))
def test_no_opcode_runs_code_from_a_file(tmp_path, payload, file_format):
  """Every way a pickle names a callable goes through the allow-list, in both formats."""
  marker = tmp_path / 'ran'
  data = _code_payloads(marker)[payload]
  path = tmp_path / 'evil.pth'
  if file_format == 'zip':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', data)
  else:
    path.write_bytes(_legacy_file(data))
  with pytest.raises(torch_io.CheckpointError, match=r'\.(system|eval) is not allowed'):
    reader.read_pth(str(path))
  assert not marker.exists()
