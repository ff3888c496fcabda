"""benchmarks/bench_views.py runs and its massl CPU and device columns agree (the same draws, PIL's
rounding on both paths): one draw per photo, a few seconds."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_view_statistics_table_cpu_and_device_agree(capsys):
    import bench_views

    text = bench_views.main(["--images", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| global") or line.startswith("| local")]
    assert len(rows) == 9
    for row in rows:
        published, cpu, device = (float(c.split("+-")[0]) for c in row.strip("|").split("|")[2:])
        assert abs(cpu - device) < 0.5, row  # levels: blur rounding and the hue definitions only
        assert 0 < published < 255
