"""Our daemons as child processes: started, waited for, restarted, stopped in order.

``mqchat up``, the tests and the benchmarks all do the same with a daemon: start
``python -m <module>`` with its settings as its environment (``core.daemon``), its
output appended to a log file; wait until it says it is ready (a line in that log, or
its ports accepting connections); stop it with SIGTERM and, after a timeout, SIGKILL.
``Child`` is one such process (or a server's binary: the tests' mosquitto) and works
from plain code (a test) as well as from an event loop; ``Supervisor`` runs several
in stages, in the shape of uvicorn's server::

    run() ─▶ startup()    stage by stage: start each child, wait until all are ready
          ─▶ main_loop()  a child that exits is started again, at most 5 times a minute
          ─▶ shutdown()   stages in reverse: SIGTERM, SIGKILL after shutdown_timeout

    1st SIGINT / SIGTERM / SIGHUP ─▶ stop in order (exit 0)
    2nd                           ─▶ kill what is left at once (exit 130)

It prints what happens to its children through ``say``, which never raises: stopping
them must not depend on anyone still reading the output.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from pydantic_settings import BaseSettings

from core import daemon
from core.daemon import EXIT_FORCED, EXIT_OK

__all__ = [
    "EXIT_FAILED",
    "EXIT_FORCED",
    "EXIT_OK",
    "Child",
    "NotReady",
    "Supervisor",
    "accepts",
    "exit_text",
    "say",
    "unless_set",
]

# EXIT_OK and EXIT_FORCED (a second signal killed the children instead of waiting for
# them) are the daemons' own codes for the same outcomes.
#: A child could not start, or died too often.
EXIT_FAILED: Final = 1

#: A child that exits more often than this within RESTART_WINDOW is not started again.
MAX_RESTARTS: Final = 5
RESTART_WINDOW: Final = 60.0
#: How often readiness is checked while a child starts (its exit wakes the wait at once).
POLL: Final = 0.05

_T = TypeVar("_T")


def say(line: str, *, err: bool = False) -> None:
    """Print a line and never raise.

    ``make run | tee log`` and Ctrl-C: the terminal's SIGINT kills ``tee`` too, so a
    "stopping" line meets a closed pipe. A stream that cannot be written is pointed at
    /dev/null and the caller goes on.
    """
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


async def unless_set(stop: asyncio.Event, awaitable: Awaitable[_T]) -> _T | None:
    """Await ``awaitable``, or give up on it and return None once ``stop`` is set."""
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    return work.result() if not work.cancelled() else None


def exit_text(returncode: int) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL``: how a child ended, for people."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class NotReady(RuntimeError):
    """A child exited, or did not get ready in time, while starting."""

    def __init__(self, child: Child, reason: str) -> None:
        super().__init__(f"{child.name} {reason}")
        self.child = child


class Child:
    """One daemon of ours as a child process, its output appended to ``log_path``.

    A ``subprocess.Popen``, not an asyncio subprocess, so that code without an event
    loop (a test fixture) can use it as well; ``exited()`` gives a loop the exit.

    Args:
        name: What it is called in messages and by default in its log's name.
        command: A module of ours, run as ``python -m command``; or a whole command
            line (a server's binary and its arguments).
        env: The child's whole environment (nothing else is inherited).
        log_path: Its stdout and stderr, appended across restarts.
        settings: The daemon's settings: they replace every variable of their prefix
            in ``env`` (``core.daemon.child_environment``), now and at ``configure``.
        ready_line: Text the child logs once ready (each start must log it again).
        ports: (host, port) pairs that must accept connections once it is ready.
        describe: The line that says where it listens, given its pid.
        python: The interpreter, e.g. another checkout's ``.venv/bin/python``.
        cwd: The working directory (another checkout), or this process's.
        own_session: Start it in a session of its own, so that a Ctrl-C in the
            terminal reaches only the supervisor, which then stops it in order.
        popen: More ``subprocess.Popen`` arguments: a server that runs as an
            account of its own (``user``, ``group``, ``umask``).
    """

    def __init__(
        self,
        name: str,
        command: str | Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        settings: BaseSettings | None = None,
        ready_line: str | None = None,
        ports: Sequence[tuple[str, int]] = (),
        describe: Callable[[int], str] | None = None,
        python: str | Path = sys.executable,
        cwd: Path | None = None,
        own_session: bool = False,
        popen: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(python), "-m", command] if isinstance(command, str) else list(command)
        self.env = dict(env)
        self.settings: BaseSettings | None = None
        if settings is not None:
            self.configure(settings)
        self.log_path = log_path
        self.ready_line = ready_line
        self.ports = list(ports)
        self._describe = describe
        self.cwd = cwd
        self.own_session = own_session
        self.popen = dict(popen or {})
        self.process: subprocess.Popen[bytes] | None = None
        #: How many times it was started (restarts included).
        self.starts = 0
        #: Where the latest start's output begins in the log.
        self._log_start = 0
        self._exit: asyncio.Future[int] | None = None

    def configure(self, settings: BaseSettings) -> None:
        """Run with ``settings`` from the next start on: written into ``env`` in place of
        every variable of their prefix, so they are the whole truth of the daemon."""
        self.settings = settings
        self.env = daemon.child_environment(settings, self.env)

    def reconfigure(self, **changes: Any) -> None:
        """``configure`` with some of the current settings changed, by field name (a
        misspelt one raises: ``core.daemon.replace``)."""
        if self.settings is None:
            raise RuntimeError(f"{self.name} was not given settings to change")
        self.configure(daemon.replace(self.settings, **changes))

    def describe(self) -> str:
        assert self.process is not None
        if self._describe is not None:
            return self._describe(self.process.pid)
        return f"{self.name:<7} running (pid {self.process.pid})"

    def start(self, banner: str | None = None) -> None:
        """Start it (again); ``banner`` is written to the log first, as a line."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            if banner is not None:
                log.write(f"{banner}\n".encode())
                log.flush()
            self._log_start = log.tell()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
                **self.popen,
            )
        self.starts += 1
        self._exit = None

    def start_ready(self, timeout: float = 30.0) -> None:
        """Start it and block until ``ready()``; one that is not ready in time is killed.

        Raises:
            NotReady: it exited first, or ``timeout`` passed.
        """
        self.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def restart(self, timeout: float = 30.0) -> None:
        """``stop`` (SIGTERM, SIGKILL after ``timeout``), then ``start_ready``."""
        self.stop(timeout)
        self.start_ready(timeout)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def pid(self) -> int | None:
        """The latest start's process id (None before the first start)."""
        return None if self.process is None else self.process.pid

    # -- its log ------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything every start of it has logged."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def latest_log(self) -> str:
        """What the latest start has logged."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- readiness ----------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the latest start has logged its ready line and its ports accept."""
        if self.ready_line is not None and self.ready_line not in self.latest_log():
            return False
        return all(accepts(host, port) for host, port in self.ports)

    def wait_for_log(self, needle: str, *, timeout: float = 30.0) -> None:
        """Block until the latest start has logged ``needle``.

        Raises:
            NotReady: it exited first, or ``timeout`` passed.
        """
        self._wait_until(lambda: needle in self.latest_log(), timeout, f"{needle!r} in its log")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until ``ready()``; raises ``NotReady`` as ``wait_for_log`` does."""
        self._wait_until(self.ready, timeout, "ready")

    def _wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        process = self._started()
        deadline = time.monotonic() + timeout
        while not check():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotReady(self, f"not {what} after {timeout:g} s")
            try:
                # Wakes at once if it exits: a wait on the process, not a sleep.
                returncode = process.wait(min(POLL, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise NotReady(
                self, f"{exit_text(returncode)} before {what}; its log ends:\n{self.log_tail()}"
            )

    async def until_ready(self, timeout: float) -> bool:
        """``wait_ready`` for an event loop; True once ready (a value ``unless_set``
        tells from a stop)."""
        exited = self.exited()
        deadline = time.monotonic() + timeout
        try:
            while not self.ready():
                if time.monotonic() > deadline:
                    raise NotReady(self, f"not ready after {timeout:g} s")
                done, _ = await asyncio.wait({exited}, timeout=POLL)
                if done:
                    raise NotReady(self, f"{exit_text(exited.result())} while starting")
        finally:
            exited.cancel()
        return True

    def exited(self) -> asyncio.Future[int]:
        """The latest start's exit code, for an event loop; cancelling it is harmless.

        A daemon thread waits for the process: an asyncio subprocess would have to be
        started by the loop, and a test starts its children without one.
        """
        process = self._started()
        loop = asyncio.get_running_loop()
        if self._exit is None or self._exit.get_loop() is not loop:
            future: asyncio.Future[int] = loop.create_future()

            def settle(returncode: int) -> None:
                if not future.done():
                    future.set_result(returncode)

            def wait() -> None:
                returncode = process.wait()
                with contextlib.suppress(RuntimeError):  # the loop is closed by now
                    loop.call_soon_threadsafe(settle, returncode)

            threading.Thread(target=wait, name=f"wait-{self.name}", daemon=True).start()
            self._exit = future
        return asyncio.shield(self._exit)

    # -- stopping -----------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM: the daemon finishes what it has in hand and exits."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, and reap it: synchronous, so it also runs from a ``finally`` whose
        event loop is being torn down."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit code
        (None if it was never started)."""
        if self.process is None:
            return None
        if self.alive:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def _signal(self, signum: signal.Signals) -> None:
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process


def accepts(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at (host, port) now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Supervisor:
    """Runs children in stages until a signal, restarting any that dies.

    Stage 0 starts first; each next stage once the one before is ready, and shutdown
    goes in reverse (the bridge finishes its batch while the broker is still up).
    Signals only set flags.

    Args:
        stages: The children, stage by stage.
        startup_timeout: Seconds each child has to get ready.
        shutdown_timeout: Seconds each stage has to exit after SIGTERM.
        name: Who speaks in messages and log banners (``mqchat up``).
        header: Lines said once everything is ready, before each child's ``describe()``.
        footer: Lines said after those.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[Child]],
        *,
        startup_timeout: float,
        shutdown_timeout: float,
        name: str = "supervisor",
        header: Sequence[str] = (),
        footer: Sequence[str] = (),
    ) -> None:
        self.stages = [list(stage) for stage in stages]
        self.children = [child for stage in self.stages for child in stage]
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.name = name
        self.header = list(header)
        self.footer = list(footer)
        self._restarts: dict[Child, collections.deque[float]] = {
            child: collections.deque() for child in self.children
        }
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0

    async def run(self) -> int:
        """EXIT_OK after a signal, EXIT_FAILED when a child could not be kept running,
        EXIT_FORCED when a second signal cut the shutdown short."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal)
        code = EXIT_OK
        try:
            if await self.startup():
                code = await self.main_loop()
            elif not self._stop.is_set():
                code = EXIT_FAILED
        finally:
            forced = await self.shutdown()
        return EXIT_FORCED if forced else code

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
        else:
            self._force.set()

    def _start(self, child: Child) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        child.start(banner=f"--- {self.name}: starting {child.name} at {stamp} ---")

    async def startup(self) -> bool:
        for stage in self.stages:
            for child in stage:
                self._start(child)
            try:
                ready = await unless_set(self._stop, self._all_ready(stage))
            except NotReady as exc:
                say(
                    f"{self.name}: {exc}; last lines of {exc.child.log_path}:\n"
                    f"{exc.child.log_tail()}",
                    err=True,
                )
                return False
            if ready is None:
                return False
        for line in self.header:
            say(line)
        for child in self.children:
            say(child.describe())
        for line in self.footer:
            say(line)
        return True

    async def _all_ready(self, stage: list[Child]) -> bool:
        """Wait for a stage, failing as soon as any child started so far exits."""
        waits = [asyncio.ensure_future(child.until_ready(self.startup_timeout)) for child in stage]
        earlier = [c for c in self.children if c.process is not None and c not in stage]
        deaths = [asyncio.ensure_future(self._death(c)) for c in earlier]
        ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        try:
            done, _ = await asyncio.wait({ready, *deaths}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the NotReady that ended the wait
        finally:
            # The first failure is the one to report; the rest need not run on.
            for task in (ready, *waits, *deaths):
                task.cancel()
            await asyncio.gather(ready, *waits, *deaths, return_exceptions=True)
        return True

    @staticmethod
    async def _death(child: Child) -> None:
        returncode = await child.exited()
        raise NotReady(child, f"{exit_text(returncode)} while the next services started")

    async def main_loop(self) -> int:
        while not self._stop.is_set():
            exits = {child.exited(): child for child in self.children}
            stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait({*exits, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (*exits, stopped):
                task.cancel()
            if self._stop.is_set():
                break
            for task, child in exits.items():
                if task in done and not await self._restart(child, task.result()):
                    return EXIT_FAILED
        return EXIT_OK

    async def _restart(self, child: Child, returncode: int) -> bool:
        """Start a child that died again; False once it has died too often."""
        now = time.monotonic()
        restarts = self._restarts[child]
        while restarts and now - restarts[0] > RESTART_WINDOW:
            restarts.popleft()
        if len(restarts) >= MAX_RESTARTS:
            say(
                f"{self.name}: {child.name} {exit_text(returncode)}, the "
                f"{MAX_RESTARTS + 1}th time within {RESTART_WINDOW:g} s: stopping "
                f"everything (see {child.log_path})",
                err=True,
            )
            return False
        restarts.append(now)
        say(
            f"{child.name:<7} {exit_text(returncode)}; restarting "
            f"({len(restarts)} of {MAX_RESTARTS} restarts a minute)"
        )
        self._start(child)
        try:
            ready = await unless_set(self._stop, child.until_ready(self.startup_timeout))
        except NotReady as exc:
            # Still counts: the next turn of the main loop sees the exit (or lets a
            # slow child be).
            say(f"{self.name}: {exc}", err=True)
            return True
        if ready:
            say(child.describe())
        return True

    async def shutdown(self) -> bool:
        """Stop every child; True if a second signal forced it."""
        alive = [child for child in self.children if child.alive]
        try:
            if alive:
                say("stopping " + ", ".join(child.name for child in reversed(alive)))
            for stage in reversed(self.stages):
                await self._stop_stage([child for child in stage if child.alive])
        finally:
            # Whatever happened above (even an exception), no child outlives the supervisor.
            self.kill_all()
        if alive:
            say("stopped")
        return self._force.is_set()

    def kill_all(self) -> None:
        """SIGKILL every child still running: the last resort."""
        for child in self.children:
            child.kill()

    async def _stop_stage(self, stage: list[Child]) -> None:
        if not stage:
            return
        for child in stage:
            child.terminate()
        pending: set[asyncio.Future[Any]] = {child.exited() for child in stage}
        forced: asyncio.Future[Any] = asyncio.ensure_future(self._force.wait())
        deadline = time.monotonic() + self.shutdown_timeout
        while pending and not forced.done() and (remaining := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait(
                {*pending, forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
        for task in (*pending, forced):
            task.cancel()
        for child in stage:
            if not child.alive:
                continue
            child.kill()
            reason = (
                "second interrupt"
                if self._force.is_set()
                else f"did not stop within {self.shutdown_timeout:g} s"
            )
            say(f"{child.name:<7} {reason}: killed")
