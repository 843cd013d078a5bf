"""Packaging: `pip install -e .` works, every module imports outside the repository root with no circular
import, and nothing under dynllava_jax/ imports `configs` (the size presets live in dynllava_jax/presets.py).

The install goes into a throwaway prefix (--no-deps: the dependencies are this venv's), never into the
venv itself. The import check runs one fresh interpreter whose working directory is outside the repository
and whose sys.path lacks the repository (it finds the package only through the editable install); it
imports the third-party dependencies once, then forks one child per package module, so each module is the
first of the package to be imported in its child, which is what exposes an import circle.
"""
import ast
import os
import subprocess
import sys
import sysconfig
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'dynllava_jax')

CHECK = textwrap.dedent('''
    import ast, importlib, importlib.util, os, site, sys, time, traceback
    site.addsitedir(sys.argv[1])
    spec = importlib.util.find_spec('dynllava_jax')            # finds it; runs nothing of the package
    pkg_dir = list(spec.submodule_search_locations)[0]
    assert os.path.realpath(pkg_dir) == os.path.realpath(sys.argv[2]), pkg_dir
    assert importlib.util.find_spec('configs') is None, 'configs/ is importable: the check would not show it'
    mods, third = [], set()
    for d, _, files in os.walk(pkg_dir):
      for f in sorted(files):
        if not f.endswith('.py'):
          continue
        rel = os.path.relpath(os.path.join(d, f), os.path.dirname(pkg_dir))[:-3].replace(os.sep, '.')
        mods.append(rel[:-len('.__init__')] if rel.endswith('.__init__') else rel)
        for node in ast.parse(open(os.path.join(d, f)).read()).body:     # module-level imports
          names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
              [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
          third.update(n.split('.')[0] for n in names if not n.startswith('dynllava_jax'))
    t0 = time.time()
    for name in sorted(third):          # the heavy dependencies once, before forking
      try:
        importlib.import_module(name)
      except Exception:
        pass
    t1 = time.time()
    assert not [m for m in sys.modules if m.startswith('dynllava_jax')]
    failed, pending, running = [], sorted(mods), {}
    while pending or running:
      while pending and len(running) < 4:      # a few children at a time
        m = pending.pop()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
          os.close(r)
          try:
            importlib.import_module(m)
            os._exit(0)
          except BaseException:
            os.write(w, traceback.format_exc().encode()[-3000:])   # < a pipe buffer: never blocks
            os._exit(1)
        os.close(w)
        running[pid] = (m, r)
      pid, status = os.wait()
      m, r = running.pop(pid)
      err = os.read(r, 65536)
      os.close(r)
      if status != 0:
        failed.append(m + ': ' + err.decode())
    print(f'{len(mods)} modules; dependencies {t1 - t0:.1f} s, package modules {time.time() - t1:.1f} s')
    print('\\n'.join(failed))
    sys.exit(1 if failed else 0)
''')


def test_pip_install_editable_and_import_every_module_outside_the_repo(tmp_path):
  prefix = tmp_path / 'prefix'
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSTARTUP')}
  env.update(PYTHONNOUSERSITE='1', PIP_DISABLE_PIP_VERSION_CHECK='1', JAX_PLATFORMS='cpu',
             XLA_FLAGS='', PYTHONWARNINGS='ignore')
  pip = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--no-index',
       '--prefix', str(prefix), '-e', ROOT], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300)
  assert pip.returncode == 0, pip.stderr[-3000:]
  site_dir = sysconfig.get_path('purelib', vars={'base': str(prefix), 'platbase': str(prefix)})
  assert os.path.isdir(site_dir), os.listdir(prefix)
  out = subprocess.run([sys.executable, '-c', CHECK, site_dir, PKG], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, (out.stdout[-6000:], out.stderr[-3000:])
  assert int(out.stdout.split()[0]) > 50


def _imports(path):
  """(module names imported anywhere in the file, function-level included) for a package file."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{a.name}' for a in node.names)


def _modules():
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(d, f)
  return out


def test_no_configs_import_under_the_package():
  bad = [f'{m}: {n}' for m, p in _modules().items() for n in _imports(p)
         if n == 'configs' or n.startswith('configs.')]
  assert not bad, bad
  grep = subprocess.run(['grep', '-rnE', r'^\s*(from|import)\s+configs\b', PKG], capture_output=True, text=True)
  assert grep.returncode == 1, grep.stdout


def test_no_import_circles_even_through_function_level_imports():
  """Edges: module -> each package module it imports, anywhere in the file (a lazy import inside a function
  hides a circle from import-time checks). `from pkg import sub` is an edge to pkg.sub, not to pkg's
  __init__ (which re-exports submodules by design)."""
  mods = _modules()
  graph = {}
  for m, p in mods.items():
    deps = {n for n in _imports(p) if n in mods and n != m and not m.startswith(n + '.')}
    # `from a.b import c` names both a.b and a.b.c: keep the submodule only.
    graph[m] = {d for d in deps if not any(e.startswith(d + '.') for e in deps)}
  cycles = []
  state = {}

  def visit(m, path):
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        cycles.append(path[path.index(d):] + [d])
      elif d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles
