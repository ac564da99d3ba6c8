"""One run per workdir: an OS lock that dies with the process that holds it.

Each process of a run takes `fcntl.flock` on `W/.lock-<process index>` and
writes who it is (host, pid, start time) into it. The kernel drops the lock
when the process ends however it ends (SIGKILL included), so a killed run
never leaves a stale lock; the file stays behind as a note and is reused.

Why one file per process index: the processes of one multi-process run must
not collide with each other, while a second run must collide with the first
whichever process it reaches. Process i of any second run (single- or
multi-process) finds `.lock-i` held by process i of the first on a shared
disk, and on hosts with their own disks each host's process guards its copy.
The processes then agree (`process_allgather`) so that all of a second run
stop together.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """The lock of one process on a workdir; keep the object alive for the whole run.

  Args:
    workdir: the run's directory (must exist).
    process_index: this process's JAX process index.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(workdir, f".lock-{process_index}")
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusy naming the holder; never waits."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise
      raise WorkdirBusy(f"workdir {os.path.dirname(self.path)} is in use by another run "
                        f"({self.holder()}); wait for it to end, stop it, or pick another "
                        "--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"host={socket.gethostname()} pid={os.getpid()} "
                 f"since={time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    os.fsync(fd)
    self._fd = fd

  def holder(self) -> str:
    """Who holds (or last held) the lock, as written in the lock file."""
    try:
      with open(self.path) as f:
        return f.read().strip() or "holder unknown"
    except OSError:
      return "holder unknown"

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def lock_workdir(workdir: str) -> WorkdirLock:
  """Locks `workdir` for this run (all of its processes); raises WorkdirBusy if it is in use.

  Every process tries its own lock file; if any of them fails, every process of
  the run raises, so a multi-process run never half-starts.
  """
  import jax

  lock = WorkdirLock(workdir, jax.process_index())
  err = None
  try:
    lock.acquire()
  except WorkdirBusy as e:
    err = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    busy = multihost_utils.process_allgather(np.int32(err is not None))
    if err is None and np.any(busy):
      lock.release()
      first = int(np.argmax(busy))
      err = WorkdirBusy(f"workdir {workdir} is in use by another run (process {first} of this "
                        f"run found {os.path.join(workdir, f'.lock-{first}')} held)")
  if err is not None:
    raise err
  return lock
