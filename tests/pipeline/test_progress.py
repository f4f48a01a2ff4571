"""The shared progress bar: one line per update off a terminal, throughput and ETA in each line."""

import io

from loca_pipe.pipeline.progress import _LineWriter, progress_bar


def test_off_a_terminal_each_update_is_its_own_line():
    out = io.StringIO()
    with progress_bar(total=300, desc="analyze", unit="row", stream=out, mininterval=0, maxinterval=0,
                      miniters=1) as bar:
        for _ in range(3):
            bar.update(100)
    lines = [ln for ln in out.getvalue().split("\n") if ln]
    assert "\r" not in out.getvalue()
    assert len(lines) >= 3, lines
    assert all(ln.startswith("analyze") for ln in lines)
    assert "100%" in lines[-1] and "row/s" in lines[-1]


def test_eta_is_shown_while_running():
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="train", unit="sample", stream=out, mininterval=0, miniters=1)
    bar.update(10)
    bar.refresh()
    text = out.getvalue()
    bar.close()
    assert "<" in text and "sample/s" in text   # tqdm's [elapsed<remaining, rate]


def test_disabled_bar_writes_nothing():
    out = io.StringIO()
    with progress_bar(total=10, desc="x", enabled=False, stream=out) as bar:
        bar.update(10)
        bar.set_postfix(loss=1.0)
    assert out.getvalue() == ""


def test_line_writer_collapses_carriage_returns():
    out = io.StringIO()
    w = _LineWriter(out)
    w.write("\ra 1%")
    w.write("\ra 2%")
    w.write("\n")
    assert out.getvalue() == "a 1%\na 2%\n"
