"""A rich progress bar that shows step, reward, accuracy, KL, clip fraction and tokens/s."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, console=None):
        self.enabled = enabled
        self.console = console
        self._progress = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def update(self, step: int, m: dict, last_eval: dict) -> None:
        if self._progress is None:
            return
        parts = [f"reward {m.get('reward/mean', 0):.3f}", f"acc {m.get('accuracy', 0):.3f}"]
        if "eval/avg@k" in last_eval:
            parts.append(f"eval {last_eval['eval/avg@k']:.3f}")
        if "kl" in m:
            parts.append(f"kl {m['kl']:.4f}")
        if "objective/clip_frac" in m:
            parts.append(f"clip {m['objective/clip_frac']:.3f}")
        parts.append(f"{m.get('throughput/tokens_per_s', 0):.0f} tok/s")
        self._progress.update(self._task, completed=step, info="  ".join(parts))

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        elif self.console is not None:
            self.console.print(text)
