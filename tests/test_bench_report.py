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
