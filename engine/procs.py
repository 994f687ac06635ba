"""Child processes of a coordinator: vCPUs and multifd workers.

Two rules hold for every one of them.  Ctrl-C belongs to the coordinator
(it cancels the migration and cleans up), so children ignore SIGINT; and a
child never outlives its coordinator, so it asks the kernel for SIGKILL when
its parent goes away.

Children are forked from a template process (multiprocessing's
``forkserver``), started once per coordinator with the worker modules
already imported: a fresh interpreter importing numpy, zmq and the codecs
costs ~0.3 s of CPU per child, a fork a few milliseconds.  The template is
itself a fresh interpreter, so no zmq context, numpy state or lock of the
coordinator is inherited.  It leaves when the coordinator does (its pipe
from the coordinator closes), and then the children's parent-death signal
fires; a child also checks on the coordinator itself (:func:`parent_alive`),
for the moment between a coordinator's death and the template's.
:func:`warm_up` starts the template early, so that its imports overlap the
rest of a command's start-up.

A child (the template, so every child) also starts with
``OPENBLAS_NUM_THREADS=1`` unless the caller had set it.
No child does linear algebra, but numpy's OpenBLAS starts a thread per core
at import, and each busy-waits for work for about 0.1 s of CPU before it
sleeps: on a small host that is CPU taken from the migration the child was
started for.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The only way to give a spawned child an environment is os.environ at
# start(); the lock keeps two spawning threads from restoring it out of order.
_ENV_LOCK = threading.Lock()
_CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1"}


#: the modules every child runs from: the template process imports them once
_TEMPLATE_PRELOAD = ["engine.multifd.sender", "engine.multifd.receiver", "engine.ram.vcpu",
                     "engine.postcopy.handler"]


def parent_alive(parent_pid: int) -> bool:
    """Whether the coordinator ``parent_pid`` still runs (a child's parent is the
    template process, so ``getppid`` does not say).  A zombie counts as gone:
    a coordinator killed under a parent that has not reaped it yet."""
    try:
        with open(f"/proc/{parent_pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True         # no /proc to look at: assume it runs
    # pid (comm) state ...: the state follows the last ')'.
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")


def _drop_template_link() -> None:
    """Close the template's liveness pipe that multiprocessing hands every child.

    The template leaves when the last holder of that pipe's write end has
    gone, and multiprocessing gives one to each child (so that children could
    use the template too).  Then the template waits for the children, and the
    children, whose death signal is the template's exit, wait for it.
    """
    from multiprocessing import forkserver
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        setattr(server, "_forkserver_alive_fd", None)   # CPython's private, as read above


def child_setup(parent_pid: int) -> None:
    """First thing a child does: ignore SIGINT, die with the parent, keep its heap."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # PR_SET_PDEATHSIG fires when the template process exits, which it does
    # when the coordinator goes; the check covers a coordinator that died
    # before prctl took effect.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _drop_template_link()
    if not parent_alive(parent_pid):
        os._exit(1)
    keep_heap(libc)
    # A child runs one loop whose garbage is acyclic (buffers, views, small
    # arrays): the cycle collector would only rescan numpy's and zmq's objects.
    gc.freeze()
    gc.disable()
    from engine.trace import enable_from_env
    enable_from_env()


def keep_heap(libc) -> None:
    """Stop glibc handing the heap back to the kernel after every packet.

    A worker allocates and frees a few hundred KiB per packet (codec output,
    numpy temporaries).  With glibc's defaults the free shrinks the heap
    (brk) and the next packet grows it again, so the kernel zeroes and maps
    those pages anew each time: measured, about 5% of a zstd sender's CPU.
    Blocks up to 32 MiB now come from the heap, which keeps what it had.
    Elsewhere than glibc ``mallopt`` may be missing or ignore these.
    """
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def _template_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_TEMPLATE_PRELOAD)
    return ctx


@contextlib.contextmanager
def _child_environment():
    """os.environ as a new child (or the template) should get it, SIGINT held."""
    with _ENV_LOCK:
        added = [key for key in _CHILD_ENV if key not in os.environ]
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for key in added:
                os.environ[key] = _CHILD_ENV[key]
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def warm_up() -> None:
    """Start the template process now, if it is not running (returns at once;
    its imports go on in the background)."""
    from multiprocessing import forkserver
    _template_context()
    with _child_environment():
        forkserver.ensure_running()


#: variables a child takes from the coordinator as they are when it starts (the
#: template's environment is the coordinator's when the template started)
_FORWARDED_ENV = ("ENGINE_TRACE",)


def _child_main(env: dict, target, args: tuple) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    target(*args)


def spawn(target, args: tuple, name: str) -> multiprocessing.Process:
    """Start ``target(*args)`` in a new process (a daemon) forked from the template.

    SIGINT is blocked while the child starts, so a Ctrl-C during its start-up
    cannot kill it half-way; it stays pending for us until the mask returns.
    The child's environment is the template's, with :data:`_FORWARDED_ENV` as
    they are now.
    """
    ctx = _template_context()
    env = {key: os.environ.get(key) for key in _FORWARDED_ENV}
    with _child_environment():
        proc = ctx.Process(target=_child_main, args=(env, target, args), name=name,
                           daemon=True)
        proc.start()
    return proc


@contextlib.contextmanager
def no_cycle_collection():
    """The cycle collector off for a migration's loop, as it was afterwards.

    A batch makes thousands of short-lived objects (two views per page): the
    collector ran a generation scan every few hundred of them, and now and
    then a full one over every object of the process, about 5% of a source's
    CPU.  Nothing in these loops makes reference cycles worth collecting
    meanwhile.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def template_pid() -> int | None:
    """The template process's pid, if it runs."""
    from multiprocessing import forkserver
    return getattr(forkserver._forkserver, "_forkserver_pid", None)


class CpuMeter:
    """CPU seconds (user + system) one side of a migration spends from
    :meth:`start` to :meth:`stop`: this process and its helper processes
    (multifd workers, the fault handler), not the guest's vCPUs, whose time
    is the guest's own.

    ``helpers()`` lists the helpers' pids when asked.  One that exits and is
    reaped in between still counts: its parent is the template process, and
    a reaped child's time moves to its parent's ``children`` times, which are
    counted, as are this process's own (which is also why vCPUs reaped
    meanwhile, rare, would count).
    """

    def __init__(self, helpers):
        self._helpers = helpers
        self._start: float | None = None
        self.seconds: float | None = None

    def _now(self) -> float:
        import psutil
        t = psutil.Process().cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        template = template_pid()
        pids = [pid for pid in self._helpers()]
        for pid in pids + ([template] if template else []):
            try:
                h = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue            # reaped: counted in its parent's children_*
            total += h.children_user + h.children_system if pid == template \
                else h.user + h.system
        return total

    def start(self) -> None:
        self._start = self._now()
        self.seconds = None

    def stop(self) -> float | None:
        """The CPU seconds since :meth:`start` (None if it never started)."""
        if self._start is not None and self.seconds is None:
            self.seconds = max(0.0, self._now() - self._start)
        return self.seconds
