"""experiments.report: a run writes run.json beside each metrics.json; --render rebuilds the same report."""

import json
import sys
import types

import pytest

from experiments import _common, report


@pytest.fixture
def fake_study(monkeypatch):
    """A two-line experiment registered as ``experiments.fake_study`` (no JAX work)."""
    module = types.ModuleType("experiments.fake_study")
    module.TITLE, module.ORDER = "A fake study", 1

    def main(argv):
        out = argv[argv.index("--out") + 1]
        metrics = {"config": {"quick": "--quick" in argv}, "value": 0.25}
        _common.save_metrics(out, metrics)
        return metrics

    module.main = main
    module.report = lambda metrics, rel_dir: f"The value is {metrics['value']} ({rel_dir}/figure.png)."
    monkeypatch.setitem(sys.modules, "experiments.fake_study", module)
    monkeypatch.setattr(report, "discover", lambda: [module])
    return module


def test_render_rebuilds_the_report_of_a_run(tmp_path, fake_study):
    assert report.main(["--quick", "--out", str(tmp_path), "--jobs", "1"]) == 0
    run = json.loads((tmp_path / "fake_study" / "run.json").read_text())
    assert run["scale"] == "quick" and run["status"] == "ok" and run["seconds"] >= 0
    ran = (tmp_path / "REPORT.md").read_text()
    assert "The value is 0.25 (fake_study/figure.png)." in ran and "--quick --out" in ran

    assert report.main(["--render", "--out", str(tmp_path)]) == 0
    rendered = (tmp_path / "REPORT.md").read_text()
    assert rendered.startswith("# kljax experiment report\n\nRendered from saved metrics")
    assert "at the quick scale" in rendered
    assert rendered.split("\n| experiment |", 1)[1].replace(f"{run['seconds']:.1f}", "S") == \
        ran.split("\n| experiment |", 1)[1].replace(f"{run['seconds']:.1f}", "S")


def test_render_says_what_was_not_run(tmp_path, fake_study):
    (tmp_path / "other").mkdir()
    assert report.main(["--render", "--out", str(tmp_path)]) == 1
    text = (tmp_path / "REPORT.md").read_text()
    assert "| NOT RUN | n/a |" in text and "this experiment was not run" in text


def test_render_refuses_quick_and_a_missing_folder(tmp_path, fake_study):
    with pytest.raises(SystemExit):
        report.main(["--render", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        report.main(["--render", "--out", str(tmp_path / "absent")])


def test_render_states_the_flags_that_differ_from_the_scale(tmp_path, fake_study):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Config:
        repeats: int = 30
        sizes: tuple[int, ...] = (10, 20)
        fast: bool = False

        @classmethod
        def quick(cls):
            return cls(repeats=4)

    fake_study.Config = Config
    _common.save_metrics(tmp_path / "fake_study", {"config": {"repeats": 12, "sizes": [10, 20, 50], "fast": True,
                                                              "quick": False}, "value": 1.0})
    assert report.main(["--render", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "`python -m experiments.fake_study --repeats 12 --sizes 10,20,50 --fast true --out " in text
    assert "at the full scale" in text
