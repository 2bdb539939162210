"""A command's life: one-line errors and exit codes, Ctrl-C and SIGTERM, the stop messages.

Exit status: 0 done, 2 a UserError (bad flags, data, run folder) or a full / read-only disk,
130 Ctrl-C, 143 SIGTERM; in a data-parallel job a rank's failure is told to rank 0 and said once.
"""
import contextlib
import errno
import os
import select
import signal
import sys
import threading

from darts import distributed
from darts.errors import UserError
from darts.files import write_lock

# the open run folder of this process (a runfolder.Run sets itself here), for the stop messages
current_run = []
# set by protocol.py for its children: their stop is reported once, by the protocol
QUIET_STOP = 'PADDLE_DARTS_QUIET_STOP'


def run_main(run, argv, parse):
    """Parse, run, and turn expected failures into one line on stderr and an exit code:
    2 for a UserError or a full / read-only disk, 130 for Ctrl-C, 143 for SIGTERM.  In a
    data-parallel job a rank's failure is also told to rank 0 (distributed.publish_error), and
    a collective that fails because another rank stopped is one line too."""
    args = parse(argv)
    with stop_on_sigterm(command_line=argv is None):
        try:
            run(args)
        except UserError as e:
            distributed.publish_error(str(e), 2)
            return conclude(f'error: {e}', 2)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            where = f'; continue with --resume {current_run[0].path} once it can be written' if current_run else ''
            message = f'cannot write {e.filename or "the run folder"}: {e.strerror}; the last checkpoint is intact'
            distributed.publish_error(message, 2)
            return conclude(f'error: {message}{where}', 2)
        except KeyboardInterrupt:
            return conclude(_stop_line('interrupted'), 130)
        except Exception as e:  # a collective that failed because another rank stopped? (else re-raised)
            failure = distributed.collective_failure(
                e, f'; continue with --resume {current_run[0].path}' if current_run else '')
            if failure is None:
                raise
            line, code = failure   # said by rank 0 alone, also on the launcher's console
            return conclude(line if distributed.RANK == 0 else None, code, console=True)
        return conclude(None, 0)


_ended = threading.Event()   # the run has its outcome (conclude): a later stop changes nothing


def conclude(line, code, console=False, exit_now=False):
    """The run's outcome, once: `line` on stderr (None: nothing), status `code`; the first of the
    main thread's return and a stop (SIGTERM, the stall watchdog) wins.  exit_now: end the process
    here (a stop), once an atomic write in progress has finished, so the file it replaces is whole.
    console: also on the launcher's console in a data-parallel job (distributed.tell_console)."""
    with write_lock:
        if _ended.is_set():
            return code
        _ended.set()
        if line:
            print(line, file=sys.stderr, flush=True)
            if console:
                distributed.tell_console(line)
        if exit_now:
            sys.stdout.flush()
            os._exit(code)
    return code


def _stop_line(what):
    """What stopped the run and how to continue it (also written to the run's log.txt); None for a
    child of protocol.py, which says it once for all (QUIET_STOP)."""
    if current_run:
        message = f'{what}: the last checkpoint is kept; continue with --resume {current_run[0].path}'
        current_run[0].log(message, file_only=True)
    else:
        message = f'{what} before the run folder was made: nothing was written'
    return None if os.environ.get(QUIET_STOP) else '\n' + message


def stop_now(line, code, console=False):
    """A stop from another thread: end the process at once (conclude with exit_now)."""
    conclude(line, code, console=console, exit_now=True)


@contextlib.contextmanager
def stop_on_sigterm(command_line=False):
    """Within: SIGTERM (what batch schedulers and Paddle's launcher send) ends the process at
    once like Ctrl-C, with one line and exit status 143; or, in a data-parallel job that the
    launcher stops because another rank failed, with that rank's line and exit status.

    In a data-parallel job only rank 0 says why it stops, and when the SIGTERM came from the
    launcher (it stops every rank when one fails, or when it is stopped itself) it says so on the
    launcher's console too; a rank stopped by someone else is the one the launcher reports.

    Python runs a signal handler only between bytecodes of the main thread, which can be inside
    one exe.run for minutes, and Paddle's own handler prints a C++ FatalError block (or, during the
    first step's preparation, ends the process silently); so SIGTERM is blocked in this thread, and
    in every thread started from it later, and a watcher thread takes it with sigtimedwait.  Threads
    started before (at Paddle's import) do not block it: there Python's handler replaces Paddle's
    and reports the signal through a wakeup pipe, which the watcher reads too.  Afterwards, for a
    process that is the command (command_line), SIGTERM is ignored: it is exiting with its own
    status (Paddle's launcher sends SIGTERM three times, 0.2 s apart); otherwise (a test calling
    main) the signal handling is as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _ended.clear()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: None)
    done = threading.Event()

    def woken():
        """SIGTERM seen by a thread that does not block it (the pipe also carries Ctrl-C's byte)."""
        if not select.select([wake_r], [], [], 0)[0]:
            return False
        return signal.SIGTERM in os.read(wake_r, 64)

    def watch():
        while not done.is_set():
            got = signal.sigtimedwait([signal.SIGTERM], 0.1)
            if got is None and not woken() or _ended.is_set():
                continue
            # sent by the parent (the launcher stopping its job)?  unknown when it came through the pipe
            console = got.si_pid == os.getppid() if got else distributed.WORLD > 1
            line, code = distributed.peer_stop() or (_stop_line('terminated (SIGTERM)'), 143)
            stop_now(line if distributed.RANK == 0 else None, code, console=console)
    watcher = threading.Thread(target=watch, name='sigterm-watch', daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        if command_line:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        while signal.sigtimedwait([signal.SIGTERM], 0) is not None:   # one that came meanwhile is spent
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def silent(*parts, **kw):
    """print() for the ranks of a data-parallel job that do not write (rank 0 says it all)."""
