"""Signals end a stage cleanly. SIGTERM, SIGHUP and SIGINT become an `Interrupted` (a KeyboardInterrupt, what Ctrl-C
already raises): the training loop tells its watchers (MLflow marks the run KILLED), temporary files are removed on
the way out, the last checkpoint stays, and `cli.entry_point` says one line (`interrupted (SIGTERM): <what was kept
and how to resume>`) and exits with 128 + the signal's number. A second signal while the first is being handled
ends the process at once (the default action): a way out of a clean-up that hangs.

A stage also ends when the process that started it is gone: DVC killed by SIGTERM leaves its `python pipeline/...`
child running (DVC forwards nothing), and a grid driver killed with SIGKILL leaves its worker processes running.
`handled` watches that process from a thread and, when it has ended, interrupts the main thread exactly as a
SIGTERM would (`_ParentWatch`), so what a stage keeps and says is the same however it was stopped.

Why a watching thread and not prctl(PR_SET_PDEATHSIG), the kernel's own parent-death signal:
- it fires when the *thread* that started this process ends, not the process: a parent that starts its children
  from a worker thread (a thread pool, Ray's or DVC's helpers) would kill them when that thread exits;
- it sees only the direct parent, and DVC runs a stage as `$SHELL -c '<cmd>'`: when the shell does not exec the
  command, the shell is the parent, and it stays alive (waiting for us) after DVC is gone;
- it is set by the child after it starts, so a parent that dies before that is missed unless the child also checks
  getppid() (a race every user of it must close by hand), and it is cleared across a setuid exec.
A thread that looks, twice a second, whether the nearest ancestor that is not a `sh -c` wrapper (identified by pid
*and* start time, so a reused pid is not mistaken for it) still runs, and whether our parent changed, has none of
these pitfalls and costs a /proc read per look. It then signals the main thread (pthread_kill), which also breaks
a blocking system call there.

Not watched: a process whose SIGHUP is ignored (started with `nohup`: meant to outlive what started it), unless DVC
runs it (DVC_STAGE is set: DVC waits for its stages, and one outliving it is the fault this module fixes); a
process whose parent is already init (`setsid`, a container's entry point).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
POLL_S = 0.5  # how often the parent watch looks
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish"}


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (`signum`), or by the end of the process that started this one (`cause`).
    A KeyboardInterrupt, so that everything that already treats Ctrl-C as a stop (the training loop, the MLflow
    callback's KILLED status, the grid's workers) treats it alike."""

    def __init__(self, signum: int, cause: str = ""):
        super().__init__(cause or signal.Signals(signum).name)
        self.signum, self.cause = signum, cause


def _origin(error: BaseException) -> tuple[int, str]:
    if isinstance(error, Interrupted):
        return error.signum, error.cause
    if _received is not None:  # ours, re-raised as a bare KeyboardInterrupt (Ray's ray.get and ray.wait do so)
        return _received
    return signal.SIGINT, ""  # Python's own Ctrl-C handler


def signal_name(error: BaseException) -> str:
    """What stopped a process, for its one line: `SIGTERM`, or what ended its parent."""
    signum, cause = _origin(error)
    return cause or signal.Signals(signum).name


def exit_status(error: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended (143 for SIGTERM)."""
    return 128 + _origin(error)[0]


KEPT = "no output was left half-written (a re-run removes what it was writing); run it again to finish"


def interruption_line(error: BaseException) -> str:
    """The one line an interrupted command says: what stopped it, what it kept and how to go on."""
    return f"interrupted ({signal_name(error)}): {getattr(error, 'kept', None) or KEPT}"


@contextmanager
def keeping(describe: Callable[[], str]) -> Iterator[None]:
    """Inside this block an interruption's line says `describe()`: what was kept and how to resume (the innermost
    block's word counts). `describe` runs only when the interruption passes through."""
    try:
        yield
    except KeyboardInterrupt as error:
        if not getattr(error, "kept", None):
            try:
                error.kept = describe()
            except Exception as exc:  # the line is said anyway, with what could not be learnt
                error.kept = f"{KEPT} ({type(exc).__name__} while looking at what was kept)"
        raise


# ---- the handlers -----------------------------------------------------------------------------------------------

_lock = threading.Lock()
_active = 0  # nesting depth of `handled`
_stopping = False  # an interruption was raised: a second signal ends the process at once
_cause = ""  # set by the parent watch before it signals the main thread
_received: tuple[int, str] | None = None  # the signal that raised the interruption, and its cause
_saved: dict[int, object] = {}


def _handler(signum: int, frame) -> None:
    global _stopping, _received
    if _stopping:  # a second request while the first is being handled: the default action, now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _stopping, _received = True, (signum, _cause)
    raise Interrupted(signum, _cause)


def _install() -> None:
    for signum in HANDLED:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue  # ignored on purpose: SIGHUP under nohup, SIGINT in a job a script put in the background
        _saved.setdefault(signum, current)
        signal.signal(signum, _handler)


def reinstall() -> None:
    """Take the signals back after a library set its own handlers (ray.init makes SIGTERM a bare sys.exit)."""
    if _active and threading.current_thread() is threading.main_thread():
        for signum in _saved:
            signal.signal(signum, _handler)


@contextmanager
def handled(*, watch: bool | None = None) -> Iterator[None]:
    """Within this block, SIGTERM, SIGHUP and SIGINT (each unless it was ignored when the block began) raise
    `Interrupted` in the main thread, and (`watch`; by default unless nohup'd outside DVC) the end of the process
    that started this one does too. The previous handlers come back after it. Outside the main thread it changes
    nothing."""
    global _active, _stopping, _cause, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _lock:
        outermost = _active == 0
        _active += 1
        if outermost:
            _stopping, _cause, _received = False, "", None
            _install()
    watcher = None
    if outermost and (watch if watch is not None else _should_watch()):
        watcher = _ParentWatch.start()
    try:
        yield
    finally:
        if watcher is not None:
            watcher.stop()
        with _lock:
            _active -= 1
            if _active == 0:
                for signum, previous in _saved.items():
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
                _saved.clear()


def _should_watch() -> bool:
    if os.environ.get("DVC_STAGE"):
        return True
    return signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN


# ---- the parent watch -------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _is_shell_wrapper(argv: list[str]) -> bool:
    """`sh -c '<command>'` (DVC's `$SHELL --noprofile --norc -c ...` too): a shell that only runs a command."""
    if not argv or os.path.basename(argv[0]).lstrip("-") not in _SHELLS:
        return False
    for arg in argv[1:]:
        if not arg.startswith("-") or arg == "--":
            return False
        if not arg.startswith("--") and "c" in arg[1:]:
            return True
    return False


def _describe(pid: int) -> str:
    words = [os.path.basename(a) if "/" in a and not any(c.isspace() for c in a) else a for a in _argv(pid)[:3]]
    command = " ".join(" ".join(words).split())  # one line, however the arguments were spaced
    command = command if len(command) <= 60 else command[:57] + "..."
    return f"{command} (pid {pid})" if command else f"pid {pid}"


class _ParentWatch:
    """Interrupts the main thread when the process that started this one has ended (see the module's notes)."""

    def __init__(self, guardian: tuple[int, int] | None, description: str):
        self.parent = os.getppid()
        self.guardian, self.description = guardian, description
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vggdepth-parent-watch", daemon=True)

    @classmethod
    def start(cls) -> _ParentWatch | None:
        pid = os.getppid()
        seen = set()
        while pid > 1 and pid not in seen:  # past `sh -c` wrappers, to what ran them
            seen.add(pid)
            stat = _stat(pid)
            if stat is None or not _is_shell_wrapper(_argv(pid)):
                break
            pid = stat[1]
        if pid <= 1:
            return None  # started by init or orphaned already: nothing to outlive
        stat = _stat(pid)
        guardian = (pid, stat[2]) if stat is not None else None
        watch = cls(guardian, _describe(pid))
        watch.thread.start()
        return watch

    def gone(self) -> bool:
        if os.getppid() != self.parent:  # our own parent ended: we were handed to init or a subreaper
            return True
        if self.guardian is None:
            return False
        stat = _stat(self.guardian[0])
        return stat is None or stat[0] in "ZXx" or stat[2] != self.guardian[1]

    def _run(self) -> None:
        global _cause
        while not self.done.wait(POLL_S):
            if self.gone():
                _cause = f"{self.description}, which started it, ended"
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                return

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
