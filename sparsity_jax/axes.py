"""Logical axis names: the only names model code uses for sharding.

Model code never mentions mesh axes ("data", "fsdp", "tensor"). Every parameter
declares the logical axes of its dimensions (``nnx.Param(..., logical_axes=...)``)
and activations are constrained with :func:`sparsity_jax.parallel.constrain`.
``config.logical_axis_rules`` maps each logical name to mesh axes, so the same model
runs on one CPU, an 8-device fake mesh or a TPU pod.

Glossary (the letters are the einsum legend used in docstrings):

  b  BATCH       examples in a batch (activations)
  t  LENGTH      query / sequence positions (activations)
  s  KV_LENGTH   key / value positions (activations)
  e  EMBED       model width d_model; on parameters it is the FSDP-sharded axis
  e  ACT_EMBED   model width of activations (usually replicated)
  f  MLP         hidden width of the feed-forward block
  n  HEADS       query heads
  k  KV_HEADS    key/value heads (GQA: n % k == 0; g = n // k query heads per group)
  h  HEAD_DIM    width of one head
  v  VOCAB       vocabulary entries
  l  LAYERS      stacked layers when the layer stack is scanned
"""

BATCH = "batch"
LENGTH = "length"
KV_LENGTH = "kv_length"
EMBED = "embed"
ACT_EMBED = "act_embed"
MLP = "mlp"
ACT_MLP = "act_mlp"
HEADS = "heads"
ACT_HEADS = "act_heads"
KV_HEADS = "kv_heads"
ACT_KV_HEADS = "act_kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
ACT_VOCAB = "act_vocab"
LAYERS = "layers"

# Mesh axes, outermost first. Any of them may have size 1.
MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data x fsdp, weights FSDP-sharded along embed, Megatron-style
# tensor parallelism over heads / mlp / vocab. A logical name may map to several mesh axes.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (KV_LENGTH, None),
    (EMBED, "fsdp"),
    (ACT_EMBED, None),
    (MLP, "tensor"),
    (ACT_MLP, "tensor"),
    (HEADS, "tensor"),
    (ACT_HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (VOCAB, "tensor"),
    (ACT_VOCAB, "tensor"),
    (LAYERS, None),
)
