"""Run outputs: metrics as JSON lines (one record per training step, plus evaluation
records) and the loss-by-block plot drawn from them."""

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path, resume_step: int | None = None):
        """Appends to `path`. When resuming at `resume_step`, records of later steps (written
        after that checkpoint, then lost with the interrupted process) are dropped first."""
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in self.read(self.path) if line["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def read(path) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_by_block(metrics_path, png_path, num_blocks: int, end_to_end: bool) -> None:
    """Training loss against step, one curve per block (moving average over 25 of its steps)."""
    # matplotlib is imported here, not at the top: it adds 0.4 s to every start of the CLI.
    # A bare Figure draws to a file with no pyplot state and no display backend.
    from matplotlib.figure import Figure

    records = [r for r in MetricsLog.read(metrics_path) if "loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for block in range(num_blocks):
        mine = [r for r in records if r["block"] == block]
        if mine:
            label = "end-to-end" if end_to_end else f"block {block}"
            ax.plot([r["step"] for r in mine], _moving_average([r["loss"] for r in mine], 25), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (CE)" if end_to_end else "training loss (λ(σ)-weighted CE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
