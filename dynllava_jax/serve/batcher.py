"""Request batching for the server: one worker thread runs the jitted generate loop on batches of jobs.

    b = Batcher(engine, slots=8, wait_s=0.01, max_queue=64)
    job = b.submit(prompt, params, on_text=None)     # QueueFull when max_queue jobs wait; Closed when stopping
    job.wait() -> Result                              # or job.on_done(callback) from asyncio
    b.close()                                         # queued jobs fail with Closed; the running batch ends

Jobs with equal `params` (method, overrides, max_new_tokens, temperature, top_p, seed) share a batch: the
oldest job waits up to `wait_s` for company (up to `slots`), and the batch runs padded to exactly `slots`
rows with the streaming loop (one compiled program per prompt bucket; docs/serving.md, "Batching").
"""
import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Optional


class QueueFull(Exception):
  pass


class Closed(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Params:
  """What must be equal for jobs to share a batch (overrides as a sorted tuple of (key, value))."""
  method: str
  overrides: tuple
  max_new_tokens: int
  temperature: float
  top_p: float
  seed: int


class Job:
  """One request in the queue. on_text(piece) streams (called on the worker's threads)."""

  def __init__(self, prompt, params: Params, on_text: Optional[Callable[[str], Any]] = None):
    self.prompt, self.params, self.on_text = prompt, params, on_text
    self.result, self.error = None, None
    self._done = threading.Event()
    self._callbacks = []
    self.queued_at = time.perf_counter()

  def on_done(self, fn):
    """fn(job) once the job has a result or an error (at once if it already has)."""
    self._callbacks.append(fn)
    if self._done.is_set():
      fn(self)

  def finish(self, result=None, error=None):
    self.result, self.error = result, error
    self._done.set()
    for fn in list(self._callbacks):
      fn(self)

  def wait(self, timeout=None):
    if not self._done.wait(timeout):
      raise TimeoutError('job not done')
    if self.error is not None:
      raise self.error
    return self.result


class Batcher:
  """See the module docstring."""

  def __init__(self, engine, slots=8, wait_s=0.01, max_queue=64):
    self.engine, self.slots, self.wait_s, self.max_queue = engine, int(slots), float(wait_s), int(max_queue)
    self._queue = collections.deque()
    self._cv = threading.Condition()
    self._closed = False
    self.batches = 0            # batches run (for logs and tests)
    self.running = 0            # jobs in the batch running now
    self._thread = threading.Thread(target=self._work, name='dynllava-batcher', daemon=True)
    self._thread.start()

  def submit(self, prompt, params, on_text=None):
    job = Job(prompt, params, on_text)
    with self._cv:
      if self._closed:
        raise Closed('the server is shutting down')
      if len(self._queue) >= self.max_queue:
        raise QueueFull(f'{len(self._queue)} requests are waiting (max_queue={self.max_queue}); retry later')
      self._queue.append(job)
      self._cv.notify_all()
    return job

  def queued(self):
    with self._cv:
      return len(self._queue)

  def close(self, timeout=None):
    """Stops taking jobs; queued ones fail with Closed; waits for the running batch (up to timeout)."""
    with self._cv:
      self._closed = True
      left = list(self._queue)
      self._queue.clear()
      self._cv.notify_all()
    for job in left:
      job.finish(error=Closed('the server is shutting down'))
    self._thread.join(timeout)

  # ------------------------------------------------------------ the worker

  def _take_batch(self):
    with self._cv:
      while not self._queue and not self._closed:
        self._cv.wait()
      if self._closed:
        return []
      first = self._queue.popleft()
      batch = [first]
      deadline = time.perf_counter() + self.wait_s
      while len(batch) < self.slots:
        for job in list(self._queue):
          if job.params == first.params and len(batch) < self.slots:
            self._queue.remove(job)
            batch.append(job)
        left = deadline - time.perf_counter()
        if len(batch) >= self.slots or left <= 0 or self._closed:
          break
        self._cv.wait(left)
      self.running = len(batch)
      return batch

  def _work(self):
    while True:
      batch = self._take_batch()
      if not batch:
        return
      p = batch[0].params
      streams = {i: j.on_text for i, j in enumerate(batch) if j.on_text is not None}
      # Always the streaming loop (one compiled loop for streamed and plain requests alike).
      on_text = lambda i, piece, s=streams: s[i](piece) if i in s else None
      try:
        results = self.engine.run([j.prompt for j in batch], method=p.method, overrides=dict(p.overrides),
                                  max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                  seed=p.seed, slots=self.slots, on_text=on_text)
      except Exception as e:  # pylint: disable=broad-except  (reported to every request of the batch)
        for j in batch:
          j.finish(error=e)
      else:
        for j, r in zip(batch, results):
          j.finish(result=r)
      self.batches += 1
      self.running = 0
