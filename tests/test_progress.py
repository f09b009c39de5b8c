"""Progress off a terminal: a plain line every LINE_EVERY_S seconds while a long step runs."""
import time

from dard import progress


def test_off_a_terminal_a_long_step_prints_a_line_now_and_then(capsys):
    bar = progress._Bar(5, "long step", enabled=True, line_every=0.2)
    for _ in range(3):
        time.sleep(0.25)
        bar.update(1)
    bar.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) >= 2 and lines[0].startswith("long step: 0/5 after") and "\r" not in "".join(lines)
    quiet = progress._Bar(5, "quiet step", enabled=False, line_every=0.05)
    time.sleep(0.2)
    quiet.close()
    assert capsys.readouterr().err == ""
    assert progress.LINE_EVERY_S == 30.0  # the period the README states
