r"""The Sparse Frontier grid on SmolLM2-135M-Instruct (the embedded real model), CPU-sized.

  python launch/frontier.py --config=configs/frontier.py --out=runs/frontier
  python launch/frontier.py --config=configs/frontier.py --out=runs/frontier --report_only

Arguments (``--config=configs/frontier.py:ARG``, several joined by commas): ``runlocal``
shrinks the grid to a minutes-long smoke run (2 samples, 1 task, 3 settings, 1024 tokens);
``moa`` adds MoA plans (docs/results/moa_smollm2/, found by launch/moa.py) and uniform
sink + window plans at 50% and 25% KV (run them into the same --out with
--only=moa_50,...; MoA needs plan paths relative to the repository root: run from there);
``windows`` adds Vertical-Slash and SnapKV with short observation windows (the last 64 /
32 prompt queries instead of the official 256, which at 1k-2k tokens are mostly filler
after a short question).

Settings are ``config.model.attention`` dicts by name (exactly one dense: the baseline);
prefill kinds (vertical_slash, flexprefill, block_topk, pbs, anchor) sparsify the prefill,
decode kinds (quest, snapkv, ada_snapkv) what each decode step reads. Budgets are scaled
from the paper's 16k-128k settings to 2k-token prompts (docs/frontier.md).
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.model = "smollm2"  # smollm2, a .gguf file or a Hugging Face directory.
  c.lengths = (2048,)
  # passkey / kv_retrieval are ours (evals/frontier/needles.py): SmolLM2-135M scores 0 on
  # every task of the paper at 1k-2k tokens, dense included (docs/results/frontier.md), so
  # they alone cannot rank the methods on it. Add the paper's tasks for larger models.
  c.tasks = ("passkey", "kv_retrieval")
  c.num_samples = 30
  c.seed = 43
  # Plain text: SmolLM2-135M answers the passkey in plain text, not inside its chat
  # template (docs/results/moa.md); 'auto' uses the template when the tokenizer has one.
  c.chat = False
  # Task options (official defaults unless set): fewer queries and chains than the paper's
  # 16k+ prompts, so that they fit 2k tokens.
  c.task_options = ml_collections.ConfigDict({
      "ruler_niah": {"num_queries": 2},
      "story_retrieval": {"num_queries": 4},
      "story_multihop": {},
      "story_filtering": {},
      "ruler_vt": {"num_chains": 2, "num_hops": 2},
      "ruler_cwe": {"num_common_words": 4, "common_word_frequency": 6,
                    "rare_word_frequency": 2},
      "passkey": {},
      "kv_retrieval": {"num_needles": 4},
  })
  c.settings = ml_collections.ConfigDict({
      "dense": {"kind": "dense"},
      "vertical_slash_256_128": {"kind": "vertical_slash", "vertical_size": 256,
                                 "slash_size": 128},
      "vertical_slash_64_64": {"kind": "vertical_slash", "vertical_size": 64, "slash_size": 64},
      "flexprefill_g90": {"kind": "flexprefill", "gamma": 0.9, "min_budget": 128},
      "block_topk_32": {"kind": "block_topk", "block_size": 16, "top_k": 32},
      "quest_512": {"kind": "quest", "token_budget": 512},
      "quest_128": {"kind": "quest", "token_budget": 128},
      "snapkv_512": {"kind": "snapkv", "token_capacity": 512},
      "snapkv_192": {"kind": "snapkv", "token_capacity": 192, "local_window": 64},
      "ada_snapkv_192": {"kind": "ada_snapkv", "token_capacity": 192, "local_window": 64},
  })
  extras = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(extras - {"moa", "windows", "runlocal"})
  if unknown:
    raise ValueError(f"configs/frontier.py takes 'moa', 'windows', 'runlocal' (comma-joined) or "
                     f"nothing, got {unknown}")
  if "runlocal" in extras and len(extras) > 1:  # runlocal replaces every setting.
    raise ValueError("configs/frontier.py: 'runlocal' is a smoke grid of its own; do not join "
                     f"it with {sorted(extras - {'runlocal'})}")
  if "windows" in extras:  # The estimate's window, the official 256 queries vs a few.
    c.settings.update({
        "vertical_slash_256_128_q64": {"kind": "vertical_slash", "vertical_size": 256,
                                       "slash_size": 128, "last_q": 64},
        "snapkv_512_w32": {"kind": "snapkv", "token_capacity": 512, "window": 32},
    })
  if "moa" in extras:  # MoA plans found by launch/moa.py for SmolLM2, and uniform windows.
    plans = "docs/results/moa_smollm2"
    c.settings.update({
        "moa_50": {"kind": "moa", "plan": f"{plans}/plan_50.json"},
        "moa_rh15_50": {"kind": "moa", "plan": f"{plans}/plan_50_rh15.json"},
        "uniform_50": {"kind": "moa", "plan": f"{plans}/uniform_50.json"},
        "moa_25": {"kind": "moa", "plan": f"{plans}/plan_25.json"},
        "uniform_25": {"kind": "moa", "plan": f"{plans}/uniform_25.json"},
    })
  if "runlocal" in extras:
    c.lengths = (1024,)
    c.tasks = ("passkey",)
    c.num_samples = 2
    c.settings = ml_collections.ConfigDict({
        "dense": {"kind": "dense"},
        "vertical_slash_64_64": {"kind": "vertical_slash", "vertical_size": 64,
                                 "slash_size": 64},
        "quest_128": {"kind": "quest", "token_budget": 128},
    })
  return c
