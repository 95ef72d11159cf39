"""plot_results.py turns metrics.jsonl files and conciseness summaries into valid PNGs."""
import json

import matplotlib.image as mpimg
import pytest

import plot_results
from conftest import PYTHON, run_main

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, slope, iterations=6):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for i in range(1, iterations + 1):
            rewards = [-100 + slope * i + d for d in (-5.0, 0.0, 5.0)]
            f.write(json.dumps({"iteration": i, "seeds": [1, 2, 3], "rewards": rewards,
                                "reward_mean": sum(rewards) / 3, "reward_std": 4.1,
                                "reward_min": min(rewards), "reward_max": max(rewards),
                                "time_s": 1.0}) + "\n")
    return path


def write_summary(path, reward, kl, is_base=False, label="run"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(
        {"reward_mean": reward, "kl_mean": kl, "is_base_model": is_base, "label": label,
         "num_samples": 20, "temperature": 1.0}))
    return path


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_HEADER
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_writes_reward_curves_and_reward_vs_kl_pngs(tmp_path):
    runs = [write_metrics(tmp_path / "a", 2.0), write_metrics(tmp_path / "b", 5.0)]
    evals = [write_summary(tmp_path / "e0", -90.0, 0.0, is_base=True),
             write_summary(tmp_path / "e1", -40.0, 0.02, label="sigma 0.001"),
             write_summary(tmp_path / "e2", -10.0, 0.3, label="sigma 0.01")]
    written = plot_results.make_plots(plot_results.build_parser().parse_args(
        ["--metrics", str(runs[0] / "metrics.jsonl"), str(runs[1]), "--labels", "A", "B",
         "--evals", *map(str, evals), "--output_dir", str(tmp_path / "out"), "--prefix", "x_"]))
    assert [p.name for p in written] == ["x_reward_curves.png", "x_reward_vs_kl.png"]
    for path in written:
        assert_png(path)


def test_plot_command_line_writes_png_from_a_synthetic_metrics_file(tmp_path):
    run = write_metrics(tmp_path / "run", 3.0)
    run_main([PYTHON, "plot_results.py", "--metrics", str(run), "--output_dir", str(tmp_path)])
    assert_png(tmp_path / "reward_curves.png")


def test_plot_rejects_a_label_count_that_does_not_match(tmp_path):
    run = write_metrics(tmp_path / "run", 1.0)
    with pytest.raises(ValueError, match="one label per input"):
        plot_results.make_plots(plot_results.build_parser().parse_args(
            ["--metrics", str(run), "--labels", "a", "b", "--output_dir", str(tmp_path)]))


def test_plot_names_a_file_that_is_not_a_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="trainer's metrics.jsonl"):
        plot_results.read_metrics(tmp_path)


def test_a_run_with_eval_every_gets_its_held_out_curve(tmp_path, monkeypatch):
    """--eval_every's heldout_reward_mean (every 2nd iteration here) is drawn as a dashed line
    beside the training curve, at the iterations that have it; a run without it gets none."""
    run = write_metrics(tmp_path / "run", 2.0)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records[1::2]:
        r["heldout_reward_mean"] = r["reward_mean"] + 1.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plain = write_metrics(tmp_path / "plain", 1.0)
    drawn = {}
    save = plot_results._save
    monkeypatch.setattr(plot_results, "_save", lambda fig, ax, out: (
        drawn.update({line.get_label(): (list(line.get_xdata()), line.get_linestyle())
                      for line in ax.get_lines()}), save(fig, ax, out))[1])
    path = plot_results.make_plots(plot_results.build_parser().parse_args(
        ["--metrics", str(run), str(plain), "--labels", "A", "B",
         "--output_dir", str(tmp_path / "out")]))[0]
    assert_png(path)
    assert drawn["A (held-out)"] == ([2, 4, 6], "--")
    assert "B (held-out)" not in drawn and drawn["A"][0] == drawn["B"][0] == [1, 2, 3, 4, 5, 6]
