"""MQT-LLaVA (Matryoshka query projector, docs/methods.md §MQT-LLaVA): the two training stages.

    python train.py --config configs/mqt.py:size=tiny,stage=1 --workdir runs/mqt1      # projector only, m = M
    python train.py --config configs/mqt.py:size=tiny,stage=2 --workdir runs/mqt2 \
        --config.train.init_from=<stage-1 params>                                    # projector + LLM,
                                                                                      # m ~ U{2, 4, …, M}
    python eval.py --config configs/mqt.py:size=tiny,stage=2 --workdir runs/mqt2 --mqt_tokens 2,4,8,16

Arguments: size (tiny | bench | 7b | 13b), stage (1 | 2). Stage 1 trains the projector (its sin-cos
position table included) with the LLM and the tower frozen; stage 2 trains projector + LLM with the table
frozen again (the release's `requires_grad_(False)` at construction) and m drawn on every forward.
"""
from configs.dynllava import get_config as base_config
from dynllava_jax.presets import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size='tiny', stage=2)
  if arg.stage not in (1, 2):
    raise ValueError(f'config argument stage={arg.stage} is unknown: use 1 or 2')
  c = base_config(f'size={arg.size},dense=True')
  c.model.projector = 'mqt'
  c.model.mqt.sample_m = arg.stage == 2
  t = c.train
  t.freeze_vision = True
  t.freeze_projector = False
  t.dense_warmup_steps = 0
  if arg.stage == 1:
    t.freeze_llm = True
    t.frozen = ''
  else:
    t.freeze_llm = False
    t.frozen = '^projector/pos_embed$'
  return c
