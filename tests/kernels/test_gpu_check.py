"""benchmarks/gpu_check.py runs end to end on CPU (--smoke), so a GPU session
never spends its minutes on a broken script; its bar verdicts are computed right."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def gpu_check():
  spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'benchmarks' / 'gpu_check.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_run_writes_checks_timings_and_bars(gpu_check, tmp_path):
  assert gpu_check.main(['--smoke', '--out', str(tmp_path)]) == 0
  rows = json.loads((tmp_path / 'gpu_check.json').read_text())
  checks = [r for r in rows if r['check'] == 'correctness']
  timings = [r for r in rows if r['check'] == 'timing']
  assert checks and all(r['passed'] for r in checks)
  assert {r['dtype'] for r in checks} == {'float32', 'bfloat16'}
  assert {r['impl'] for r in timings} >= {'xla dense causal', 'triton causal', 'triton random 10%'}
  assert all(r['fwd'] > 0 and r['fwd_bwd'] > 0 for r in timings)
  md = (tmp_path / 'gpu_check.md').read_text()
  assert '(--smoke)' in md and 'Bars:' in md and 'dense causal fwd+bwd within 1.5x' in md


def test_bar_verdicts(gpu_check):
  def row(impl, fwd, fwd_bwd, **kw):
    return dict(check='timing', L=8192, impl=impl, fwd=fwd, fwd_bwd=fwd_bwd, **kw)
  rows = [row('cudnn dense causal', 1.0, 3.0),
          row('triton causal', 1.4, 4.6),  # 1.53x of cuDNN: misses
          row('triton random 10%', 0.2, 0.7, flex_fwd=0.3, flex_fwd_bwd=0.6)]  # 4.3x
  verdicts = {what.split(': ', 1)[1]: ok for what, _, ok in gpu_check.bar_verdicts(rows)}
  assert verdicts == {'dense causal fwd+bwd within 1.5x of cudnn dense causal': False,
                      '10% density >= 4x faster than dense causal fwd+bwd': True,
                      'triton random 10% no slower than flex_attention (fwd+bwd)': False}
