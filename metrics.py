"""What a run shows: its metrics (`MetricsWriter`: metrics.jsonl always, TensorBoard and WandB when asked for) and the
curve plot in the run folder (`plot_curves`)."""
import json
import os

from omegaconf import OmegaConf

from utils import write_atomic


class MetricsWriter:
    """Writes one dict of scalars per call to metrics.jsonl, TensorBoard and WandB, and keeps them for the plot."""

    def __init__(self, run_dir, cfg, enabled=True, resume_step=None, wandb_id=None):
        """enabled=False (processes other than the main one): keeps the history, writes nothing.
        resume_step: continue a run from its checkpoint at that step: what was logged after it is dropped (JSONL
        rewritten, TensorBoard purged, the WandB run resumed by id), so the curves carry no duplicates."""
        path = os.path.join(run_dir, "metrics.jsonl")
        self.history = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                self.history = [r for r in map(json.loads, f) if r["step"] <= resume_step]
        self.jsonl = None
        if enabled:
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.history))
            self.jsonl = open(path, "a")
        self.tb = None
        if cfg.report_to_tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter
            purge = 0 if resume_step is None else resume_step + 1  # drop events of an earlier, unfinished attempt
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)
        self.wandb = None
        if cfg.wandb.enabled and not cfg.debug and enabled:
            import wandb
            self.wandb = wandb.init(entity=cfg.wandb.entity, project=cfg.wandb.project, name=cfg.wandb.name or cfg.exp_name,
                                    dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True), id=wandb_id,
                                    resume="allow" if wandb_id else None)
        self.wandb_id = self.wandb.id if self.wandb is not None else wandb_id

    def log(self, metrics: dict, step: int):
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, rows, step):
        """rows: list of dicts {prompt, policy, reference?}. To WandB as a table (the text file is the trainer's)."""
        if self.wandb is not None and rows:
            import wandb
            columns = list(rows[0])
            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_curves(history, path):
    """PNG of train/eval loss (and reward accuracy for the preference losses, mean reward for the online methods)
    against the optimizer step."""
    plot_runs({"": history}, path)


def plot_runs(runs: dict, path):
    """plot_curves of several runs in one PNG ({label: history}): a colour per run, train solid, eval dotted."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state, and a quicker import

    shown = lambda key: any(key in r or "eval/" + key in r for h in runs.values() for r in h)  # noqa: E731
    panels = [("loss", "loss")] + [(key, title) for key, title in (("rewards/accuracies", "reward accuracy"),
                                                                   ("reward", "mean reward")) if shown(key)]
    fig = Figure(figsize=(6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (name, history) in enumerate(runs.items()):
            for prefix, style in (("", "-"), ("eval/", "o:" if name else "o-")):
                points = [(r["step"], r[prefix + key]) for r in history if prefix + key in r]
                if points:
                    label = " ".join(filter(None, [name, "eval" if prefix else "train"]))
                    ax.plot(*zip(*points), style, label=label, markersize=3, color=f"C{i}" if name else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run stopped before its first log or eval has nothing to label
            ax.legend(fontsize=8 if len(runs) > 1 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
