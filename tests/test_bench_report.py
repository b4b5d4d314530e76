"""The benchmark report: tables written by `mtp-ext bench --out` parse back to the same
numbers (what --replot draws from), and the plot is written."""
import pytest

from mtp_ext import benchmark as B


def _results():
    out = []
    for n in (1, 2):
        for V in (100, 200):
            case = B.Case(n=n, N=8, D=4, V=V, dtype="bf16", per_head=n == 2, backward=V == 100)
            rows = [B.Row(p, 0.5 * n + V / 1000 + i, 1.0 + i / 10, 2.0 / (i + 1), 10.0 * (i + n))
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
            assert (a.peak_mib is None) == (b.peak_mib is None)
            if b.peak_mib is not None:
                assert a.peak_mib == pytest.approx(b.peak_mib, abs=0.5)


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
