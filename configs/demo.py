"""The demo's staged toy LLaVA recipe (`make demo`, scripts/demo.py): one config per stage.

    configs/demo.py:stage=0      tower pretraining (CLIP's role): per-patch digit + cell classification
    configs/demo.py:stage=lm     the LLM's language pretraining (Vicuna's role): the conversations with the
                                 grid in words where the image goes, no image (dir stage0_lm)
    configs/demo.py:stage=1      alignment: projector only, on captions (LLaVA's pretrain stage)
    configs/demo.py:stage=2      instruction tuning: LLM + projector (the dense LLaVA)
    configs/demo.py:stage=3      Dynamic-LLaVA fine-tune from stage 2
    configs/demo.py:stage=2,smoke=True   2 steps, small data (the tests)

Each stage is the tiny preset (configs/dynllava.py:size=tiny) with the demo's geometry on top: a 2x2 grid
on the 64-px canvas, so each cell is a 4x4 block of the 8-px patches (16 image tokens per cell; at a 20 %
budget ~3 per cell), the 'tally' text (one token names a cell, a1..b2, in the questions; every answer puts
a cell's value right after its name, and every count after the cells it counts; the 31-token description
alone in its sample) and len_ot = 24. The geometry lives here and in
`data.digits`, not in the size preset. `train.init_from` is left empty: the runner
(`dynllava_jax/demo/stages.py`) points it at the previous stage's exported params.
"""
import ml_collections

from configs import common
from configs import dynllava

# In chain order; each stage starts from the previous one's params. 'lm' is the second half of stage 0 (the
# pretrained parts LLaVA starts from: a vision tower and an LLM), so its dir is stage0_lm.
STAGES = (0, 'lm', 1, 2, 3)
STAGE_NAMES = {0: 'tower', 'lm': 'lm', 1: 'align', 2: 'instruct', 3: 'dynamic'}
LM_STEPS = 800
# The toy's visual region: a quarter of the 4 LLM layers is one, and it is layer 0, where the lm stage
# taught the LLM to read its context (Block Influence of stage 2: 0.51 against <= 0.06 for the others).
# demo-more's region stages tune it (layer 3, the release's spread 'auto', answered 0.430 against layer
# 0's 0.767 on demo14); make demo's prune rows keep it (removing it answers nothing). docs/demo.md.
VISUAL_REGION = '0'


def stage_key(k):
  """The stage's name in `--set` and in the runners' dicts: 'stage2', 'lm'."""
  return k if isinstance(k, str) else f'stage{k}'


def _geometry(c):
  d = c.data.digits
  d.canvas_size = 64
  d.grid = 2
  # One token names the cell a question is about ("what digit is in cell b1 ?", "the sum of row a"), and
  # every answer puts a cell's value right after the cell's name ('echo': look-ups "b1 7", row sums
  # "a1 3 a2 empty sum 3", descriptions "... row a : a1 3 , a2 empty . ..."). The value is then predicted
  # at the position whose input is the name: one attention hop to that cell's image tokens. Answer-only
  # supervision does not teach a from-scratch tiny LLM the two-hop look-up of a bare "7" (carry the name
  # from the question to the answer position, then match it to the image): ~0.42 teacher-forced,
  # a visible digit rather than the asked one; 'echo' reached 0.86 in 400 look-up steps (docs/demo.md).
  # 'tally' is 'echo' with every count after the cells it counts (the count question cell by cell, "a1
  # digit a2 empty ... count 3"; the description's "... and 3 digits ." after its rows): with the count
  # first, dense answered 0.840 of the counts and 0.447 of the descriptions, most of them wrong only in
  # that count; after the cells, 1.000 and 0.702 (docs/demo.md, "Counts after the cells").
  d.describe_style = 'tally'
  # A description is a sample's only round: no look-up can copy its answer from a description earlier in
  # the conversation, a look-up's sample-mean CE is not diluted by a 51-token answer beside it, and every
  # description is the last answer (the one output-text sparsification acts on).
  d.describe_alone = True
  # The test split: one question per sample. Evaluation answers a sample's last question with the earlier
  # answers in the prompt, and an echoed look-up or row sum ("a1 3 a2 9 sum 12") earlier in the
  # conversation gave 112 of the 134 test look-ups their answer as text: every method scored the same.
  d.one_round_test = True
  # Up to 6 rounds per image (about 3 per sample; a round adds ~14 tokens to the ~100 of the prompt and
  # the image, in the same 256-token bucket): more grounded answers per forward pass, mostly look-ups.
  d.max_rounds = 6
  d.extra_round_prob = 0.8
  # Text-only additions answered 'a plus b sum c': the operands sit 3 and 1 tokens before the sum, as in an
  # echoed row sum ('a1 3 a2 9 sum 12'), so the additions train the row sums' adder on text alone; with
  # the bare answer ('c', two hops back to the question) they stayed at 0.14. 0.10 of the rounds.
  d.add_echo = True
  d.type_probs = (0.4, 0.1, 0.25, 0.15, 0.1)   # digit_at, count, row_sum, describe, text_add
  c.data.batch_size = 8
  # The tower is pretrained here (stage 0): a fixed 2-D sine-cosine position table lets its attention
  # find neighbouring patches from the first step (the random N(0, 0.02) table gives it almost nothing).
  c.model.vision.pos_init = 'sincos2d'
  # Output-text sparsification acts on answers of >= len_ot tokens: the 31-token descriptions (with </s>)
  # qualify, the <= 9-token look-ups and row sums do not (the released LEN_OT = 50 is for LLaVA's answers).
  c.model.sparse.len_ot = 24
  # Image tokens are dropped entering layer 0 (Dynamic-LLaVA's predictor reads the projected tokens;
  # random / uniform at the same place). The released layer 2 of 32 leaves the full image to 6 % of the
  # depth; here layer 1 of 4 left it to a quarter, and layer 0 did most of the work (Block Influence 0.49
  # vs <= 0.06 for the others): the one-hop look-ups were answered there, and the layer keeps every image
  # token in its KV cache for decoding too, so random keeping at 6 of 64 tokens still read the cells
  # (0.76, dense 0.79). FastV and PyramidDrop score with a layer's attention, so they start at layer 1.
  c.model.sparse.sparse_layer = 0
  # Generated tokens are decided entering layer 1 (not the released rule, which decides both at
  # sparse_layer): entering layer 0 a dropped token would leave every layer and the predictor would see only
  # its embedding; the row sums then lost the values they add (0.06-0.11 vs 0.42-0.48 with the text decided
  # at layer 1, same stage 3: docs/demo.md "Dynamic-LLaVA").
  c.model.sparse.text_layer = 1
  c.eval.max_new_tokens = 36     # the 31-token description + slack
  # One compiled shape per method in the demo's 21 evaluation runs: every prompt packs to 256 tokens and
  # every cache holds 512 slots (never grown). Only compile time changes: KV bytes count held tokens, and
  # the reported prefill FLOPs are counted at the real prompt length (dynllava_jax/demo/results.py).
  c.eval.prefill_bucket = 256
  c.eval.cache_bucket = 512
  c.train.log_every = 50
  c.train.save_every = 0
  c.train.keep_checkpoints = 1
  c.train.progress = False


def get_config(arg=None):
  arg = common.parse_arg(arg, stage='2', smoke=False)
  stage = int(arg.stage) if arg.stage.isdigit() else arg.stage
  arg = ml_collections.ConfigDict({'stage': stage, 'smoke': arg.smoke})
  if arg.stage not in STAGES:
    raise ValueError(f'configs/demo.py: stage={arg.stage} unknown; use one of {STAGES}')
  c = dynllava.get_config(f'size=tiny,dense={arg.stage != 3}')
  recipe = 2 if arg.stage == 'lm' else arg.stage
  _geometry(c)
  t = c.train
  t.dense_warmup_steps = 0
  t.restart_schedule = False
  t.freeze_vision = True
  if recipe == 0:
    from dynllava_jax.demo.tower import tower_defaults  # pylint: disable=g-import-not-at-top
    c.tower = tower_defaults()
  elif recipe == 1:
    # Captions only (one 'describe' round per image), projector only.
    c.data.digits.type_probs = (0.0, 0.0, 0.0, 1.0, 0.0)
    c.data.digits.max_rounds = 1
    c.data.digits.num_train, c.data.digits.num_val, c.data.digits.num_test = 1200, 50, 50
    t.freeze_llm = True
    # Short: stage 2 trains the projector again with the LLM (docs/demo.md, "Stage 1 in a toy").
    t.steps = 30
    t.lr = 2e-3
  elif recipe == 2:
    # 1200 steps from the lm stage's LLM (LM_STEPS 800): on demo24's stages 0-1 dense 0.907, row_sum 0.900
    # against 0.887, 0.850 at 800 (docs/demo.md, "A longer stage 2"; earlier lm-stage trials there too).
    t.steps = 1200
    t.lr = 1e-3
    # Each sample's own token-mean CE: the one-token look-up answers weigh as much as a 51-token
    # description (token-mean CE let the descriptions dominate and the look-ups stayed at chance).
    t.ce_weighting = 'sample'
  else:
    # From the dense LLaVA. The training masks are Gumbel samples, inference keeps the top k: until the
    # predictor is confident the LLM trains on masks unlike the ones it meets (teacher-forced validation
    # 0.53 vs 0.45 on look-ups at 600 steps; 0.49 vs 0.31 at 200). 600 steps at predictor lr 1e-2 took the
    # top-ranked keep probabilities from ~0.49 to ~0.79 and the test look-ups from 0.70 to 0.72-0.75;
    # predictor lr 5e-2 collapsed every token to one probability (docs/demo.md).
    t.steps = 600
    # LLM lr 3e-4 from the 1200-step stage 2: Dynamic-LLaVA@0.2 0.887 vs dense 0.907; 2e-4 (the rate for
    # the 800-step stage 2): 0.850. Earlier chains: 800 + 800 best at 2e-4 (1e-4: 0.840, 3e-4: 0.650),
    # 400 + 600 at 3e-4: the rate follows the stage 2 it starts from (docs/demo.md "Dynamic-LLaVA").
    t.lr = 3e-4
    t.predictor_lr = 1e-2
    # The last 400 steps keep the image tokens as inference does (the per-sample top k; the image
    # predictor, trained in the first 200, gets no gradient there): the LLM learns to answer from the
    # masks it meets at test time. 0.500 -> 0.550 on the test split (from step 100: 0.520, 400: 0.540;
    # docs/demo.md "Dynamic-LLaVA").
    c.model.sparse.hard_from_step = 200
    # Stage 2's weighting: with the token mean the 31-token descriptions outweighed the one-token counts,
    # which fell to 0.44 (dense 0.96); each sample's own mean took Dynamic-LLaVA@0.2 from 0.613 to 0.663
    # on the same stages 0-2 (docs/demo.md "Dynamic-LLaVA").
    t.ce_weighting = 'sample'
  if arg.stage == 'lm':
    # LLaVA starts from a pretrained LLM; the toy's had none (stage 1 started it random), and a random LLM
    # learned the row sums' adding slowly (dense row_sum 0.713, text_add 0.767 in 800 steps) and left
    # nothing to build on for the visual region (a quarter of a random LLM's layers could not learn the
    # sums: region_full 0.630 against dense's 0.827). This stage pretrains it on the same conversations
    # with the grid written out in words where the image goes ('text_grid': '... row a : a1 7 , a2 empty
    # ...'), so it learns the language, the look-ups, the sums and the descriptions by reading its context;
    # stage 1 then maps the image onto what it reads. Text only (the conversations alone, no grid) taught
    # no reading: region_full 0.333 (docs/demo.md). Stage 2's recipe (lr 1e-3, per-sample CE), LM_STEPS steps.
    c.data.digits.text_only = True
    c.data.digits.text_grid = True
    t.steps = LM_STEPS
  c.stage = ml_collections.ConfigDict({'index': 0 if arg.stage == 'lm' else arg.stage,
                                      'name': STAGE_NAMES[arg.stage]})
  if arg.smoke:
    d = c.data.digits
    d.num_train, d.num_val, d.num_test = 48, 16, 16
    if recipe == 0:
      c.tower.steps, c.tower.batch_size, c.tower.pool, c.tower.eval_canvases = 2, 8, 16, 8
    else:
      t.steps = 2
    c.eval.max_new_tokens = 8
  return c
