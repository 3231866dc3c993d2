"""Rank-0 reporting: metrics.jsonl, a progress bar or plain log lines, Weights & Biases, the loss plot."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.rng import untouched_global_streams
from launcher.run_dir import EXIT_RECORD, METRICS_FILE, WANDB_ID_FILE, RunDir, read_rows


def record_exit(out_dir: Path, code: int, step: int, reason: str | None, **details: Any) -> None:
    """Write OUTPUT_DIR/last_exit.json. A SLURM job script reads it: torchrun and srun report a rank's exit 3
    as a failure of their own, so the launcher's exit code cannot tell a graceful stop from a crash."""
    tmp = out_dir / f".{EXIT_RECORD}.tmp"
    record = {"exit_code": code, "step": step, "reason": reason, "time": time.time()}
    record["attempt"] = os.environ.get("FTL_ATTEMPT_ID")  # set by the SLURM job script, which checks it
    record.update(details)  # e.g. hung_hosts: the nodes a SLURM job resubmits itself without
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(out_dir / EXIT_RECORD)


def log(msg: str) -> None:
    """One plain, timestamped line on stderr (rank 0 calls it), written at once so ranks never interleave."""
    sys.stderr.write(f"[ftl {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class MetricsWriter:
    """Writes each logged step once to metrics.jsonl, the terminal and (optionally) W&B."""

    def __init__(self, cfg: Config, out_dir: Path, total_steps: int, state: Any, mfu: Any = None):
        self.path = out_dir / METRICS_FILE
        self.mfu = mfu  # tokens/s -> model FLOPs utilisation (launcher/mfu.py)
        self.cfg = cfg
        self.total = total_steps
        self.bar = None
        self.wandb_run = None
        keep_rows_up_to(self.path, state.step)
        if state.step:  # a resumed run: the restart is an event of the run's history (loss.png marks it)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.step, "event": "resumed"}) + "\n")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True)
        if cfg.logging.wandb.enabled:
            self.wandb_run = start_wandb(cfg, out_dir, state.wandb_id)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @untouched_global_streams()  # W&B (retry jitter) must not move the training's random streams
    def write(self, row: dict[str, Any]) -> None:
        """Append one row (training step or eval) and show it."""
        if self.mfu is not None and "tokens_per_s" in row:
            row["mfu"] = self.mfu(row["tokens_per_s"])
        with self.path.open("a") as f:  # strict JSON: a NaN/inf (a skipped step's loss) is written as null
            f.write(json.dumps({k: None if _nonfinite(v) else v for k, v in row.items()}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if "loss" in row:
            self._show_step(row)
        else:
            self._say(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))

    def _show_step(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = row["step"]
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            return
        eta = (self.total - row["step"]) * row.get("step_time", 0.0)
        scale = f" loss_scale={row['loss_scale']:g}" if "loss_scale" in row else ""
        mfu = f" mfu={row['mfu']:.1%}" if "mfu" in row else ""
        log(
            f"step {row['step']}/{self.total} loss={row['loss']:.4f} lr={row['lr']:.2e} "
            f"grad_norm={row['grad_norm']:.3f}{scale} tokens/s={row['tokens_per_s']:.0f}{mfu} eta={eta:.0f}s"
        )

    def _say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        plot_losses(self.path, self.path.parent / "loss.png")


def _nonfinite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop rows logged after `step` (by a run killed after its last checkpoint): each step appears once."""
    if not path.exists():
        return
    rows, cut = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            cut += bool(line.strip())  # a row cut short (full disk, kill mid-write): nothing to resume from
            continue
        if row["step"] <= step:
            rows.append(line)
    if cut:
        log(f"{path}: dropped {cut} unreadable row(s) cut short by an earlier run")
    tmp = path.with_name(f".{METRICS_FILE}.tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


def start_wandb(cfg: Config, out_dir: Path, run_id: str | None) -> Any:
    """Open the run's W&B run: the id comes from the checkpoint resumed, else from the run directory (its latest
    checkpoint, else wandb_id.txt), else is new, and every restart calls init(id=..., resume="allow"), so
    crashes and requeues continue one W&B run."""
    import wandb

    w = cfg.logging.wandb
    if run_id is None:
        run_id = RunDir.of(out_dir, cfg.checkpoint.dir).wandb_id() or secrets.token_hex(4)
    (out_dir / WANDB_ID_FILE).write_text(run_id)
    return wandb.init(
        project=w.project,
        entity=w.entity,
        name=w.name or out_dir.name,
        mode=w.mode,
        id=run_id,
        resume="allow",
        dir=str(out_dir),
        config=cfg.model_dump(mode="json"),
    )


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Training (and eval) loss against step; a dashed line where the run resumed from a checkpoint."""
    rows = read_rows(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    resumed = sorted({r["step"] for r in rows if r.get("event") == "resumed"})
    for i, step in enumerate(resumed):
        ax.axvline(step, color="grey", linestyle="--", alpha=0.7, label="resumed from a checkpoint" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def report_peak_memory(env: Any) -> None:
    """One line per rank: CUDA max allocated, or this process's max RSS on CPU."""
    import torch

    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(env.device) / 2**20
        what = "cuda max allocated"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        what = "cpu max rss"
    log(f"rank {env.rank}: peak memory {peak:.0f} MiB ({what})")
