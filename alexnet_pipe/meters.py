"""The run's instruments, apart from the loop that reads them: the log (people's lines and
machine-readable records), the stop request a signal sets, the GPU's own clock (CUDA events
around each step) and the interval between log points (counted on the device, read there).
Reading any device value is a CPU-GPU sync point: the loop does it at log points only."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from alexnet_base.errors import UserError, os_error
from alexnet_base.files import atomic_path


class Log:
    """Human lines to stdout and train.log, JSON lines to metrics.jsonl and, once opened, their
    numbers to TensorBoard (board.py), rank 0 only."""

    def __init__(self, run_dir: Path, main: bool):
        self.main, self.run_dir = main, run_dir
        self.text = self._open(run_dir / "train.log") if main else None
        self.jsonl = self._open(run_dir / "metrics.jsonl") if main else None
        self.board = None

    def open_board(self, first_step: int) -> None:
        """TensorBoard's event files in the run folder, its steps from `first_step` on."""
        if self.main:
            from alexnet_pipe.board import Board
            try:
                self.board = Board(self.run_dir, first_step)
            except OSError as e:
                raise os_error(e.filename or self.run_dir, e, "write TensorBoard's events") \
                    from None

    def close(self) -> None:
        """The board's last events written (the text logs are flushed at every write)."""
        if self.board is not None:
            board, self.board = self.board, None
            board.close()

    @staticmethod
    def _open(path: Path):
        try:
            return open(path, "a")
        except OSError as e:
            raise os_error(path, e, "open the log") from None

    @staticmethod
    def _append(f, text: str) -> None:
        """A full disk or a failing one as one line naming the log: the run stops there."""
        try:
            f.write(text)
            f.flush()
        except OSError as e:
            raise UserError(f"{os_error(f.name, e, 'write the log')}; the run's checkpoints are "
                            f"intact (continue with --resume)") from None

    def line(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)
            self._append(self.text, msg + "\n")

    def record(self, **rec) -> None:
        if self.main:
            self._append(self.jsonl, json.dumps(rec) + "\n")
            if self.board is not None:
                self.board.record(rec)

    def replay_from(self, step: int) -> list[dict]:
        """metrics.jsonl without the records of steps after `step` (a relaunch trains them
        again and writes them anew) and without a record cut short by a kill, replaced whole
        or not at all; the records kept (rank 0: it alone writes the log; others: none)."""
        if not self.main:
            return []
        path = Path(self.jsonl.name)
        self.jsonl.close()
        try:
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # cut short by a kill
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    kept.append(rec)
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
        except OSError as e:
            raise UserError(f"{os_error(path, e, 'rewrite the log')}; the run's checkpoints are "
                            f"intact (continue with --resume)") from None
        self.jsonl = self._open(path)
        return kept


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (Slurm's warning before a job's time limit or preemption,
    --signal=USR1@120) set a flag; the loop checkpoints at the next step boundary and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signal = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    @staticmethod
    def exit_status(signum: int) -> int:
        """What the process exits with once stopped by `signum` (agreed: the ranks' largest)
        and checkpointed: 128 + N, as a shell reports a signal, except SIGUSR1, a scheduler's
        "stop here, you will be continued" (docs/slurm): 0, so that torchrun ends as asked
        instead of restarting the workers (--max-restarts), and the job script requeues."""
        return 0 if signum == signal.SIGUSR1 else 128 + signum


class StepTimer:
    """The GPU's time in and between training steps, from CUDA events on the compute stream of
    every device a step uses (the towers: two) at each step's start and end. `wait()`: the share
    of its time the busiest device spent between steps, when its stream had nothing to run:
    waiting for the host to enqueue the step, for the loader's batch or for a log point's sync.
    `step_ms()`: the GPU time of a step on the device where it is longest. Together they tell a
    starved GPU (wait) from a slowed one (step time above the synthetic step's). Recording an
    event does not sync; the events are read at log points, which sync anyway. Off CUDA it
    records nothing and reads None. `event`: the event type (torch.cuda.Event); `streams`:
    where each device's events are recorded (default: its current stream, not the current
    device's)."""

    def __init__(self, devices, event=None, streams=None):
        devices = [devices] if isinstance(devices, torch.device) else list(devices)
        cuda = [d for d in devices if d.type == "cuda"]
        streams = streams or [torch.cuda.current_stream(d) for d in cuda]
        event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.lanes = [_Lane(stream, event) for stream in streams[:len(cuda)]]

    def mark(self) -> None:
        """At a step's start, then at its end."""
        for lane in self.lanes:
            lane.mark()

    def read(self) -> dict:
        """Sums the steps marked so far (every step ended): waits for the last one's end.
        Returns {"gpu_wait", "gpu_step_ms"} of the steps just read, and of the gap before them
        (what a log record of them says), {} off CUDA."""
        new = [lane.read() for lane in self.lanes]
        return _figures(new) if any(steps for steps, _, _ in new) else {}

    def wait(self) -> float | None:
        return _figures([(lane.steps, lane.busy_ms, lane.gap_ms) for lane in self.lanes]).get(
            "gpu_wait")

    def step_ms(self) -> float | None:
        return _figures([(lane.steps, lane.busy_ms, lane.gap_ms) for lane in self.lanes]).get(
            "gpu_step_ms")


def _figures(lanes: list[tuple[int, float, float]]) -> dict:
    """Each device's (steps, busy ms, gap ms) -> the step's time on the device where it is
    longest and the idle share of the least idle device; {} where nothing was recorded."""
    shares = [gap / (gap + busy) for _, busy, gap in lanes if gap + busy > 0]
    times = [busy / steps for steps, busy, _ in lanes if steps]
    return {"gpu_wait": min(shares), "gpu_step_ms": max(times)} if shares and times else {}


class _Lane:
    """One device's stream: its steps' busy time and the gaps between them (StepTimer)."""

    def __init__(self, stream, event):
        self._stream, self._event = stream, event
        self._pending: list = []  # start, end, start, end, ... of steps not read yet
        self._free: list = []     # events read: recorded again, not created per step
        self._last = None         # the end of the last step read: the next gap starts there
        self.steps, self.busy_ms, self.gap_ms = 0, 0.0, 0.0

    def mark(self) -> None:
        e = self._free.pop() if self._free else self._event()
        e.record(self._stream)  # on this device's stream, whichever device is current
        self._pending.append(e)

    def read(self) -> tuple[int, float, float]:
        """(steps, busy ms, gap ms) read now, added to the totals."""
        p = self._pending
        if not p:
            return 0, 0.0, 0.0
        p[-1].synchronize()  # the stream's events complete in order: all of them are done
        busy = gap = 0.0
        if self._last is not None:
            gap += self._last.elapsed_time(p[0])
            self._free.append(self._last)
        for i in range(0, len(p), 2):
            busy += p[i].elapsed_time(p[i + 1])
            if i + 2 < len(p):
                gap += p[i + 1].elapsed_time(p[i + 2])
        steps = len(p) // 2
        self.steps += steps
        self.busy_ms += busy
        self.gap_ms += gap
        self._last = p[-1]
        self._free += p[:-1]
        p.clear()
        return steps, busy, gap


class Interval:
    """The steps since the last log point, counted on the device: reading them is a sync."""

    def __init__(self, step: int, device):
        self.step = torch.full((), step, device=device)   # the step count, kept on the device
        self.first_bad = torch.full((), -1, device=device)  # step of the first non-finite loss
        self.loss = torch.zeros((), device=device)        # loss sum since the last log record
        self.steps, self.t0 = 0, time.perf_counter()
        self.wait = 0.0  # seconds the host was blocked in the loader since the last record

    def add(self, loss) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.step,
                                     self.first_bad)
        self.step += 1
        self.loss += loss
        self.steps += 1

    def restart(self, t0: float) -> None:
        self.loss.zero_()
        self.steps, self.t0, self.wait = 0, t0, 0.0




def progress_bar(config, env, total: int, epoch: int):
    """tqdm's bar for an epoch on rank 0, where stderr is a terminal (or config.progress
    says); None otherwise."""
    import sys
    show = sys.stderr.isatty() if config.progress is None else config.progress
    if not (show and env.is_main):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
