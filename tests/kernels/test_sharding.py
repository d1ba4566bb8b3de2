"""attention() under jit on a data x fsdp x tensor mesh of 8 fake CPU devices.

Runs in a subprocess so the device count does not depend on the test process.
"""

import subprocess
import sys
import textwrap

from support import ROOT, subprocess_env

SCRIPT = textwrap.dedent('''
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pallas_kernels import block_sparse
    assert jax.device_count() == 8, jax.device_count()
    mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
    b, l, hq, hkv, d = 4, 48, 4, 2, 16
    ks = jax.random.split(jax.random.key(0), 4)
    q, do = (jax.random.normal(k, (b, l, hq, d)) for k in ks[:2])
    k, v = (jax.random.normal(kk, (b, l, hkv, d)) for kk in ks[2:])
    x_sh = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
    rng = np.random.default_rng(0)
    masks = {
        'shared': block_sparse.sliding_window(l, window=9, sinks=2, block_q=16, block_k=16),
        'per_batch_head': block_sparse.from_dense(rng.random((b, hq, l, l)) < 0.3,
                                                  block_q=16, block_k=16),
    }
    for impl, name in (('xla', 'shared'), ('xla', 'per_batch_head'), ('triton', 'per_batch_head')):
        mask = masks[name]
        @jax.jit
        def f(q, k, v, do, mask):
          out, vjp = jax.vjp(lambda *a: block_sparse.attention(
              *a, mask, implementation=impl, interpret=True, mesh=mesh), q, k, v)
          return out, vjp(do)
        args = [jax.device_put(x, x_sh) for x in (q, k, v, do)]
        out, grads = f(*args, mask)
        assert out.sharding.is_equivalent_to(x_sh, 4), out.sharding
        out_r, vjp_r = jax.vjp(lambda *a: block_sparse.attention_ref(*a, mask), q, k, v)
        np.testing.assert_allclose(out, out_r, atol=1e-4, err_msg=f'{impl} {name}')
        for g, g_r in zip(grads, vjp_r(do)):
          np.testing.assert_allclose(g, g_r, atol=2e-4, err_msg=f'{impl} {name}')
        hlo = f.lower(*args, mask).as_text()
        assert 'shard_map' in hlo or 'SPMDFullToShardShape' in hlo or 'sdy.manual_computation' in hlo
    # The context mesh (jax.set_mesh) is picked up when mesh= is omitted.
    with jax.set_mesh(mesh):
      out = jax.jit(lambda *a: block_sparse.attention(*a, masks['shared']))(
          *[jax.device_put(x, x_sh) for x in (q, k, v)])
    np.testing.assert_allclose(out, block_sparse.attention_ref(q, k, v, masks['shared']),
                               atol=1e-4)
    print('SHARDING_OK')
''')


def test_sharded_attention_on_8_fake_devices():
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=subprocess_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and 'SHARDING_OK' in proc.stdout, proc.stdout + proc.stderr
