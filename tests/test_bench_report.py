"""The benchmark report: tables written by `mtp-ext bench --out` parse back to the same
numbers (what --replot draws from), and the plot is written."""
import pytest

from mtp_ext import benchmark as B


def _results():
    out = []
    for n in (1, 2):
        for V in (100, 200):
            case = B.Case(n=n, N=8, D=4, V=V, dtype="bf16", per_head=n == 2, backward=V == 100)
            rows = [B.Row(p, 0.5 * n + V / 1000 + i, 1.0 + i / 10, 2.0 / (i + 1), 10.0 * (i + n),
                          1.1 + i / 10, 0.5 + i)
                    for i, p in enumerate(B.PATHS)]
            rows[-1].peak_mib = None  # the floor has no memory column
            out.append((case, rows))
    return out


def test_tables_round_trip():
    results = _results()
    text = "\n\n".join(B.format_table(c, rows) for c, rows in results)
    parsed = B.parse_tables("# header\nmachine: x\n\n" + text)
    assert [c for c, _ in parsed] == [c for c, _ in results]
    for (_, want), (_, got) in zip(results, parsed):
        assert [r.path for r in got] == [r.path for r in want]
        for a, b in zip(got, want):
            assert a.seconds == pytest.approx(b.seconds, abs=1e-3)
            assert a.vs_floor == pytest.approx(b.vs_floor, abs=1e-3)
            assert a.vs_best == pytest.approx(b.vs_best, abs=1e-3)
            assert a.tflops == pytest.approx(b.tflops, abs=1e-2)
            assert (a.peak_mib is None) == (b.peak_mib is None)
            if b.peak_mib is not None:
                assert a.peak_mib == pytest.approx(b.peak_mib, abs=0.5)


def test_a_run_without_the_floor_as_written_leaves_its_ratio_blank():
    case = B.Case(n=4, N=64, D=32, V=500, dtype="fp32")
    rows = [B.Row("fused", 2.0, float("nan"), None, 12.0, 1.05, 0.2),
            B.Row("best_layout_floor", 1.9, float("nan"), None, None, 1.0, 0.21)]
    text = B.format_table(case, rows)
    assert "nan" not in text and "| fused | 2.000 |  |  | 12 |  | 1.050 | 0.20 |" in text
    (_, [got]), = B.parse_tables(text)
    assert got.path == "fused" and got.vs_best == pytest.approx(1.05) and got.vs_floor != got.vs_floor
    summary = B.format_summary([(case, rows + [B.Row("compiled", 2.2, float("nan"), None, 30.0)])])
    assert "nan" not in summary and "| compiled  |" in summary


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    B.plot(_results(), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="nothing to plot"):
        B.plot(_results()[:1], str(out))


def test_summary_names_the_fastest_and_leanest_other_path():
    case = B.Case(n=1, N=8, D=4, V=100, dtype="fp32", per_head=False, backward=True)
    rows = [B.Row("fused", 1.0, 0.95, 1.2, 50.0), B.Row("reference", 1.2, 1.14, 1.0, 400.0),
            B.Row("compiled", 0.9, 0.86, 1.33, 80.0), B.Row("torch_chunked", 1.5, 1.4, 0.8, 60.0),
            B.Row("gemm_floor", 1.05, 1.0, None, None)]
    text = B.format_summary([(case, rows), (case, rows)])
    line = text.splitlines()[3]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "n=1 N=8 D=4 V=100 fp32 fwd+bwd"
    assert cells[2] == "compiled 0.860" and cells[3] == f"{1.0 / 0.9:.3f}"
    assert cells[4] == "50" and cells[5] == "60 (torch_chunked)"
    assert B.parse_tables(text) == []  # the summary is not read back as a case


def test_rows_for_flag():
    from mtp_ext.cli import _vocab_rows
    assert _vocab_rows("128256:1024") == (128256, 1024)
    for bad in ("128256", "a:b", "0:5"):
        with pytest.raises(Exception, match=bad):
            _vocab_rows(bad)


def test_compare_interleaves_paths_and_reports_the_best_layout_floor(monkeypatch):
    case = B.Case(n=2, N=64, D=32, V=500, dtype="fp32")
    calls = []
    make_step = B.make_step

    def spy(path, case, inputs=None, **kw):
        step = make_step(path, case, inputs, **kw)
        return lambda: (calls.append(path), step())[1]

    time_round = B.LayoutFloor.time_round
    monkeypatch.setattr(B, "make_step", spy)
    monkeypatch.setattr(B.LayoutFloor, "time_round",
                        lambda self, log=None: (calls.append("layouts"), time_round(self, log))[1])
    rows = B.compare(case, paths=("fused", "reference", "gemm_floor"), repeats=3,
                     memory=False, best_floor=True, log=lambda *_: None)
    # one warm-up each, then three rounds of every path and the best-layout floor's layouts
    assert calls == ["fused", "reference", "gemm_floor", "layouts"] * 4, calls
    by = {r.path: r for r in rows}
    assert set(by) == {"fused", "reference", "gemm_floor", "best_layout_floor"}
    best = by["best_layout_floor"].seconds
    for r in rows:
        assert r.vs_best == pytest.approx(r.seconds / best)
        assert r.tflops == pytest.approx(3 * 2 * 2 * 64 * 500 * 32 / r.seconds / 1e12)
    assert "best_layout_floor" in B.format_table(case, rows)


def test_best_layout_floor_times_every_layout_of_every_product():
    case = B.Case(n=3, N=16, D=8, V=40, dtype="bf16")
    seen = []
    total, best = B.best_layout_floor(case, repeats=1, log=seen.append)
    assert set(best) == set(B.PRODUCT_LAYOUTS)
    assert len(seen) == sum(len(v) for v in B.PRODUCT_LAYOUTS.values())
    assert total == pytest.approx(3 * sum(t for _, t in best.values()))
    for product, (layout, _) in best.items():
        assert layout in B.PRODUCT_LAYOUTS[product]


def test_paths_that_do_not_fit_in_memory_are_left_out(monkeypatch):
    case = B.Case(n=1, N=64, D=16, V=1000, dtype="fp32")
    need = B.memory_need("reference", case)
    monkeypatch.setattr(B, "_available_bytes", lambda: int(need / 0.7) - 1)
    logs = []
    rows = B.compare(case, paths=("fused", "reference"), repeats=1, memory=False, log=logs.append)
    assert [r.path for r in rows] == ["fused"]
    assert any("reference left out" in l for l in logs), logs


def test_llm_preset_runs_each_unembedding(monkeypatch, capsys):
    from mtp_ext.cli import main
    monkeypatch.setattr(B, "LLM_SHAPES", {"a": ("Tiny A", 16, 300), "b": ("Tiny B", 24, 200)})
    assert main(["bench", "--preset", "llm", "--rows", "32", "--repeats", "1", "--no-memory",
                 "--paths", "fused", "gemm_floor"]) == 0
    out = capsys.readouterr().out
    for name, D, V in B.LLM_SHAPES.values():
        for n in (1, 4):
            for dt in ("bf16", "fp32"):
                assert f"n={n} N=32 D={D} V={V} {dt} shared fwd+bwd" in out
        assert f"{name} unembedding (D {D}, V {V})" in out
    assert out.count("| best_layout_floor |") == 8
