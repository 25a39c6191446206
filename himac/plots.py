"""Pictures of a run: what a person would rather look at than read from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path


def plot_progress(metrics: list[dict], evals: list[dict], path: str | Path) -> Path:
    """Six panels over iterations: success, returns, answer quality, collapse (the executor's action
    histogram and the KL to the reference per phase), and where the time goes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [m["iteration"] for m in metrics]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), constrained_layout=True)
    ax = [[axes[0][0], axes[0][1]], [axes[1][0], axes[1][2]]]

    a = ax[0][0]
    flat = not all("macro/blueprint_valid_rate" in m for m in metrics)
    a.plot(it, [m["success_rate"] for m in metrics], "o-",
           label="sampled (train tasks)" if flat else "Phase A greedy (train tasks)")
    if not flat:
        a.plot(it, [m.get("micro/success_rate", 0.0) for m in metrics], "s-", alpha=0.7, label="Phase B sampled")
    if evals:
        a.plot([e["iteration"] + 1 for e in evals], [e["eval/success_rate"] for e in evals], "D--", color="k",
               label="held-out greedy (after iteration - 1)")
    a.set(title="success rate", xlabel="iteration", ylim=(-0.05, 1.05))
    a.legend(fontsize=8)

    a = ax[0][1]
    a.plot(it, [m["macro/return_mean"] for m in metrics], "o-", label="macro (blueprint) return")
    a.plot(it, [m.get("micro/return_mean", 0.0) for m in metrics], "s-", label="micro (trajectory) return")
    a.set(title="mean return", xlabel="iteration")
    a.legend(fontsize=8)

    a = ax[1][0]
    a.plot(it, [m["env/invalid_action_rate"] for m in metrics], "o-", label="invalid action rate")
    if all("macro/blueprint_valid_rate" in m for m in metrics):  # flat runs have no blueprints
        a.plot(it, [m["macro/blueprint_valid_rate"] for m in metrics], "s-", label="blueprint valid rate")
        a.plot(it, [m.get("micro/subgoal_completion", 0.0) for m in metrics], "^-", label="sub-goals completed")
    a.set(title="answer quality", xlabel="iteration", ylim=(-0.05, 1.05))
    a.legend(fontsize=8)

    a = axes[0][2]  # collapse: one action taking every answer, and the policy's distance from pi_ref
    names = sorted({k.split("/")[-1] for m in metrics for k in m if k.startswith("micro/action_share/")})
    for name in names:
        a.plot(it, [m.get(f"micro/action_share/{name}", 0.0) for m in metrics], ".-", label=f"'{name}' share")
    if not names and any("micro/action_top_share" in m for m in metrics):
        a.plot(it, [m.get("micro/action_top_share", 0.0) for m in metrics], "-", label="top action share")
    a.set(title="executor answers (trained-on rollouts)", xlabel="iteration", ylim=(-0.05, 1.05))
    a.legend(fontsize=7)
    a = axes[1][1]
    for prefix, label in (("macro", "Phase A (blueprints)"), ("micro", "Phase B / flat (actions)")):
        if any(f"{prefix}/kl" in m for m in metrics):
            a.plot(it, [m.get(f"{prefix}/kl", float("nan")) for m in metrics], "o-", label=f"{label} KL to ref")
    a.set(title="KL(pi || pi_ref) per phase", xlabel="iteration", yscale="symlog", ylim=(0, None))
    a.legend(fontsize=8)

    a = ax[1][1]
    parts = [("time/generate_s", "generation"), ("time/update_s", "update"), ("time/env_s", "env")]
    bottom = [0.0] * len(it)
    for key, label in parts:
        vals = [m.get(key, 0.0) for m in metrics]
        a.bar(it, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a.set(title="seconds per iteration", xlabel="iteration")
    a.legend(fontsize=8)

    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
