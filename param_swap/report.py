"""Reports for people: the stderr table, --plot, --wandb. None of them can change a verdict."""

import sys

from param_swap import memory
from param_swap.errors import log


def memory_rows(records: list[dict]) -> list[tuple[str, float, int, int]]:
    """(phase, elapsed_s, bytes_in_use_sum, process_rss_bytes) of every phase that measured memory."""
    return [(r["phase"] + (f" {r['round']}" if "round" in r else ""), r["elapsed_s"], memory.bytes_in_use_sum(r["memory"]),
             r["memory"]["process_rss_bytes"]) for r in records if "memory" in r]


def memory_table(records: list[dict]) -> str:
    rows = memory_rows(records)
    base = next((b for p, _, b, _ in rows if p == "engine_ready_dummy"), None)
    lines = [f"{'phase':34} {'elapsed_s':>9} {'device bytes in use (sum)':>26} {'vs dummy':>9} {'host RSS':>10}"]
    for phase, elapsed, in_use, rss in rows:
        ratio = f"{in_use / base:8.3f}x" if base else ""
        lines.append(f"{phase:34} {elapsed:9.1f} {in_use:26,} {ratio:>9} {rss / 2**30:8.2f} GiB")
    return "\n".join(lines)


def plot_memory(records: list[dict], path: str) -> None:
    """Bars of bytes_in_use_sum per phase; dashed lines at the dummy engine (one set of params) and at one
    set more (what a second copy would cost); a tick at each swap's sampled peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = memory_rows(records)
    base = next(b for p, _, b, _ in rows if p == "engine_ready_dummy")
    params = next(r["param_bytes_sum"] for r in records if r["phase"] == "engine_ready_dummy")
    unit, unit_name = (2**30, "GiB") if base + params >= 2**30 else (2**20, "MiB")
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=80)
    colors = ["tab:red" if b > base * 1.02 else "tab:blue" for _, _, b, _ in rows]
    ax.bar(range(len(rows)), [b / unit for _, _, b, _ in rows], color=colors)
    peaks = [(i, r["swap_peak_bytes_in_use_sum"]) for i, r in enumerate(r for r in records if "memory" in r)
             if "swap_peak_bytes_in_use_sum" in r]
    if peaks:
        ax.scatter([i for i, _ in peaks], [p / unit for _, p in peaks], marker="_", s=900, color="tab:orange",
                   zorder=3, label="peak during the swap")
    ax.axhline(base / unit, color="black", linestyle="--", linewidth=1, label="one set of params (dummy engine)")
    ax.axhline((base + params) / unit, color="tab:red", linestyle=":", linewidth=1, label="+ a second set")
    ax.set_ylim(0, (base + params) / unit * 1.35)
    ax.set_xticks(range(len(rows)), [p for p, _, _, _ in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"device bytes in use, sum ({unit_name})")
    ax.set_title("run_param_swap: device memory per phase", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class WandbSink:
    """Logs each phase's memory and timings to W&B from process 0. Any W&B failure becomes a warning on
    stderr and turns the sink off: it must never break the run."""

    def __init__(self, cfg):
        self.run, self.step = None, 0
        try:
            import jax
            import wandb

            if jax.process_index() != 0:
                return
            self.run = wandb.init(project=cfg.wandb_project, config={k: v for k, v in vars(cfg).items()},
                                  job_type="param-swap")
        except Exception as e:  # noqa: BLE001 - W&B is optional: warn and go on
            log(f"warning: W&B disabled: {type(e).__name__}: {e}")

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        metrics = {f"{record['phase']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "memory" in record:
            summary = record["memory"]["jax_device_memory_summary"]
            metrics.update({f"memory/{k}": v for k, v in summary.items()})
            metrics["memory/process_rss_bytes"] = record["memory"]["process_rss_bytes"]
        if record["phase"] == "summary":
            metrics["summary/ok"] = int(record["ok"])
            metrics.update({f"checks/{k}": int(v["ok"]) for k, v in record["checks"].items()})
        try:
            self.run.log(metrics, step=self.step)
            self.step += 1
            if record["phase"] == "summary":
                self.run.finish()
                self.run = None
        except Exception as e:  # noqa: BLE001 - W&B is optional: warn and go on
            log(f"warning: W&B logging failed, disabled: {type(e).__name__}: {e}")
            self.run = None


def report(records: list[dict], cfg) -> None:
    """The stderr table, and the plot if asked for (cfg None: the command line did not parse). Runs after the
    summary, on every path."""
    if any("memory" in r for r in records):
        print("\n" + memory_table(records), file=sys.stderr, flush=True)
    if cfg is not None and cfg.plot and any(r["phase"] == "engine_ready_dummy" for r in records):
        try:
            plot_memory(records, cfg.plot)
            log(f"memory plot: {cfg.plot}")
        except Exception as e:  # noqa: BLE001 - a plot must not change the verdict
            log(f"warning: --plot failed: {type(e).__name__}: {e}")
