"""Prints markdown tables of benchmark result files (the JSON the other benchmark scripts write).

    python benchmarks/summarize.py benchmarks/results/*.json
"""
import json
import sys

COLS = {
    'xla_cost': ['case', 'method', 'batch', 'flops_xla', 'flops_analytic', 'analytic_rel_err',
                 'flops_analytic_unpadded', 'flops_eq13', 'reduction_xla_vs_dense',
                 'reduction_analytic_unpadded_vs_dense', 'kv_cache_bytes'],
    'hf_reference': ['case', 'impl', 'batch', 'prefill_s', 'decode_ms_per_token', 'kv_cache_bytes',
                     'ours_prefill_speedup', 'ours_decode_speedup', 'token_agreement_first_m'],
    'default': ['case', 'method', 'batch', 'new_tokens', 'prefill_s', 'decode_ms_per_token', 'kv_cache_bytes',
                'kv_cache_bytes_prefill', 'kept_image_ratio', 'kept_text_ratio', 'flops_xla',
                'prefill_speedup_vs_dense', 'decode_speed_vs_dense', 'kv_bytes_vs_dense'],
}


def fmt(k, v):
  if v is None:
    return '—'
  if isinstance(v, float):
    if k.startswith('flops'):
      return f'{v / 1e12:.3f} T'
    if 'rel_err' in k or k.startswith('reduction'):
      return f'{100 * v:+.2f} %' if 'rel_err' in k else f'{100 * v:.1f} %'
    return f'{v:.4g}'
  if isinstance(v, int) and 'bytes' in k:
    return f'{v / 2**20:.1f} MiB'
  return str(v)


def table(path):
  with open(path) as f:
    d = json.load(f)
  rows = d.get('results', d.get('rows', []))
  kind = next((k for k in COLS if k in path), 'default')
  cols = COLS[kind]
  if kind == 'default' and rows and len(set(cols) & set(rows[0])) < len(cols) // 2:   # another script: its fields
    cols = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]
  meta = d.get('meta', {})
  lines = [f'`{path}` (jax {meta.get("jax")}, {meta.get("cpu_count")} CPUs, load avg '
           f'{meta.get("loadavg_1_5_15min_at_end", "n/a")}, args {meta.get("args")})', '',
           '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    lines.append('| ' + ' | '.join(fmt(c, r.get(c)) for c in cols) + ' |')
  return '\n'.join(lines)


def main():
  for p in sys.argv[1:]:
    print(table(p))
    print()


if __name__ == '__main__':
  main()
