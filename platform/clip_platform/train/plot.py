"""The run's curves as a PNG: training loss, validation accuracy and recall, zero-shot top-1/5."""
from __future__ import annotations

import json
from pathlib import Path


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_run(run_dir: Path) -> Path | None:
    """Write {run_dir}/curves.png; None when nothing was logged."""
    records = read_records(run_dir)
    train, valid = [r for r in records if "loss" in r], [r for r in records if "valid_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if valid:
        ax_loss.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid loss")
        steps = [r["step"] for r in valid]
        for key, label in (("valid_t2i_r1", "valid text→image R@1"), ("valid_i2t_r1", "valid image→text R@1"),
                           ("valid_mean_recall", "valid mean recall")):
            ax_acc.plot(steps, [r[key] for r in valid], "o-", label=label)
    zeroshot = [r for r in records if "zeroshot_top1" in r]
    for key in ("zeroshot_top1", "zeroshot_top5"):
        if zeroshot:
            ax_acc.plot([r["step"] for r in zeroshot], [r[key] for r in zeroshot], "s--", label=key.replace("_", " "))
    ax_acc.plot([r["step"] for r in train], [100 * r["t2i_acc"] for r in train], lw=1, alpha=0.6,
                label="train in-batch t2i acc")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="%", title="accuracy / recall")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
